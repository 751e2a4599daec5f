"""Helpers that start real psctl processes for tests and wait on conditions with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from psctl import net
from psctl.cluster.session import Session
from psctl.protocol import handshake
from psctl.protocol.wire import DEFAULT_MAX_FRAME_BYTES, NEED_DATA, FrameParser, Message, MsgType, encode_bytes


class ServerProcess:
    """`psctl server --shards N` as a real process; its address is read from its first line."""

    def __init__(self, shards: int, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "psctl", "server", "--shards", str(shards), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded by the test's timeout
        if "listening on" not in line:
            code, out, err = self.stop()
            raise RuntimeError(f"server did not start (exit {code}): {line + out!r} {err}")
        self.address = line.split("listening on ", 1)[1].split()[0]

    def stop(self, timeout_s: float = 10) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, out, err


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10, what: str = "condition") -> None:
    """Ask a remote process until ``predicate`` holds; fail after the deadline.

    The predicate asks over the network (a STATUS round trip): that answer is the
    wait between tries, so a predicate that does no I/O does not belong here.
    """
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


async def equals(value: Awaitable[Any], expected: Any) -> bool:
    """For wait_until: whether an awaited value equals ``expected``."""
    return await value == expected


class IgnoreEvents(net.NullService):
    """A connection's service that drops the coordinator's EVENTs (benchmarks/tls_cost.py uses it;
    tests use :func:`driver_session` and :func:`worker_session`)."""

    def handle(self, peer: net.Peer, msg: Message) -> net.Reply:
        return None if msg.type is MsgType.EVENT else super().handle(peer, msg)


async def driver_session(address: str, security: net.Security = net.LOCAL, *, keep_events: bool = False, **kwargs: Any) -> Session:
    """A test's driver: a session with the coordinator (its EVENTs kept only with ``keep_events``)."""
    return await Session.open(
        address, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES, security=security, what="psctl server", keep_events=keep_events,
        **kwargs,
    )  # fmt: skip


async def worker_session(
    address: str, security: net.Security = net.LOCAL, body: dict[str, Any] | None = None, timeout_s: float = 30
) -> tuple[Session, dict[str, Any]]:
    """A test's worker: registered (``body`` adds to the registration) and heartbeating from its thread.

    It returns once the coordinator has answered a heartbeat, so the heartbeat connection is
    one the coordinator holds (and closes) when the test stops it.
    """
    session = await Session.open(address, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES, security=security)
    try:
        reg = await session.register_worker({"pid": 0, "host": "test", **(body or {})}, timeout_s=timeout_s)
        assert session.heartbeat is not None
        answered = await asyncio.to_thread(session.heartbeat.answered.wait, timeout_s)
        assert answered, f"the coordinator did not answer a heartbeat within {timeout_s} s"
        return session, reg
    except BaseException:
        session.close()
        raise


async def status(address: str, security: net.Security = net.LOCAL) -> dict[str, Any]:
    peer = await net.connect(address, security=security)
    try:
        return (await peer.request(MsgType.STATUS, timeout_s=5)).body
    finally:
        peer.close()


def bare_spec(n_workers: int, mode: str, staleness: int = 0, rows: int = 8, lr: float = 0.1) -> dict[str, Any]:
    """A job with one table and no data: test code plays the workers."""
    return {
        "model": "test",
        "n_workers": n_workers,
        "tables": [{"name": "w", "rows": rows}],
        "mode": mode,
        "staleness": staleness,
        "optimizer": {"name": "sgd", "params": {"lr": lr}},
        "partitions": [{} for _ in range(n_workers)],
        # Its 8 rows go on every shard, not on as few as their bytes need (core/tables.py),
        # so that tests of several shards have several.
        "min_shard_bytes": 0,
    }


def write_secret(folder: Path) -> tuple[Path, bytes]:
    """A fresh shared secret in a file only its owner may read."""
    secret = secrets.token_hex(32).encode()
    path = folder / "secret"
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return path, secret


class RawClient:
    """Bytes in and frames out, with deadlines: for playing a peer that breaks the rules.

    Everything it sends is kept in ``sent``, as a capture of the wire would be.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.parser = FrameParser()
        self.sent = bytearray()

    @classmethod
    async def open(cls, address: str | tuple[str, int], source: str | None = None) -> RawClient:
        """Connect, from the loopback address ``source`` if given (127.0.0.0/8 all reach lo)."""
        host, port = net.parse_address(address) if isinstance(address, str) else address
        client = cls(*await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None))
        _OPENED.append(client)
        return client

    def send(self, *msgs: Message | bytes) -> None:
        data = b"".join(m if isinstance(m, bytes) else encode_bytes(m) for m in msgs)
        self.sent += data
        self.writer.write(data)

    async def frame(self, timeout_s: float = 5) -> Message | None:
        """The next frame, or None at EOF."""
        deadline = time.monotonic() + timeout_s
        while (msg := self.parser.next_event()) is NEED_DATA:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), max(deadline - time.monotonic(), 0))
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.parser.receive_data(data)
        return msg  # type: ignore[return-value]

    async def until_closed(self, timeout_s: float = 5) -> list[Message]:
        frames = []
        while (msg := await self.frame(timeout_s)) is not None:
            frames.append(msg)
        return frames

    async def authenticate(self, secret: bytes) -> None:
        hs = handshake.ClientHandshake(secret)
        self.send(Message(MsgType.AUTH_HELLO, hs.hello(), req_id=1))
        challenge = await self.frame()
        assert challenge is not None and challenge.type is MsgType.AUTH_HELLO, challenge
        self.send(Message(MsgType.AUTH_PROOF, hs.on_challenge(challenge.body), req_id=2))
        ok = await self.frame()
        assert ok is not None and ok.type is MsgType.AUTH_PROOF and ok.is_reply, ok

    def close(self) -> None:
        self.writer.close()


_OPENED: list[RawClient] = []


class Hangups:
    """Watches RawClients until the other side closes them; notes when, from a time of our choosing."""

    def __init__(self) -> None:
        self.since: dict[int, float] = {}  # client index -> monotonic time its deadline started
        self.after_s: dict[int, float] = {}  # client index -> seconds from then to the hang-up
        self.frames: dict[int, list[Message]] = {}
        self._waits: list[asyncio.Future[list[Message]]] = []

    def watch(self, client: RawClient, timeout_s: float) -> None:
        """Start watching ``client``; its deadline started now."""
        i = len(self._waits)
        self.since[i] = time.monotonic()
        fut = asyncio.ensure_future(client.until_closed(timeout_s=timeout_s))
        fut.add_done_callback(lambda f, i=i: self._closed(i, f))
        self._waits.append(fut)

    def _closed(self, i: int, fut: asyncio.Future[list[Message]]) -> None:
        self.after_s[i] = time.monotonic() - self.since[i]
        if not fut.cancelled() and fut.exception() is None:
            self.frames[i] = fut.result()

    @property
    def done(self) -> bool:
        return len(self.after_s) == len(self._waits)  # every done-callback has run, not only every future

    def cancel(self) -> None:
        for fut in self._waits:
            fut.cancel()


async def close_raw_clients() -> None:
    """Close every RawClient a test opened (the integration conftest calls this after each test)."""
    while _OPENED:
        client = _OPENED.pop()
        client.close()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(client.writer.wait_closed(), 5)


_BEATING: set[asyncio.Task[None]] = set()


def keep_beating(peer: net.Peer, interval_s: float = 0.05, body: dict[str, Any] | None = None) -> None:
    """What every worker does from registration until its connection closes: send HEARTBEATs
    (a test playing a worker needs them too, or it is declared lost after the failure timeout)."""

    async def beat() -> None:
        while peer.is_open:
            peer.notify(MsgType.HEARTBEAT, {"clock": 0, **(body or {})})
            await asyncio.sleep(interval_s)  # the heartbeat's period, not a wait for anything

    task = asyncio.ensure_future(beat())
    _BEATING.add(task)
    task.add_done_callback(_BEATING.discard)


def descendants(pid: int) -> list[Path]:
    """The /proc folders of ``pid``'s live children and their children, and so on (the
    embedded cluster's shards and workers are children of its fork server)."""
    parents: dict[int, list[Path]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if stat[0] != "Z":
                parents.setdefault(int(stat[1]), []).append(entry)
    found, todo = [], [pid]
    while todo:
        for entry in parents.get(todo.pop(), []):
            found.append(entry)
            todo.append(int(entry.name))
    return found


def cluster_children(pid: int) -> list[Path]:
    """The shard and worker processes among ``pid``'s descendants."""
    return [p for p in descendants(pid) if b"psctl.cluster.child" in (p / "cmdline").read_bytes().split(b"\0")]
