"""A party's control connection to the coordinator: one session for a worker, a KVWorker, a driver.

A :class:`Session` connects (security, handshake), registers (a worker:
REGISTER_WORKER; a driver: SUBMIT), keeps an inbox of the coordinator's EVENTs
(each wait on it bounded), and on :meth:`Session.close` or a lost connection
fails every wait on the inbox with the cause.

A worker's liveness must not depend on its event loop: user code between two
calls of a :class:`psctl.apps.api.KVWorker` may compute for minutes without
yielding. So from registration on, a :class:`Heartbeat` thread sends HEARTBEAT
over a connection of its own, with a blocking socket, the sans-IO codec
(psctl.protocol.wire) and handshake (psctl.protocol.handshake). It names the
slot by the ``session`` token of the REGISTER_WORKER reply; the coordinator
counts a heartbeat with the slot's token, on any authenticated connection, as
that slot's. The worker's progress reaches the thread through two plain
attributes, :attr:`Session.clock` and :attr:`Session.samples`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from psctl import net
from psctl.core.job import DEFAULT_HEARTBEAT_INTERVAL_S
from psctl.errors import ConnectError, JobError
from psctl.protocol.handshake import ClientHandshake, HandshakeError
from psctl.protocol.wire import NEED_DATA, FrameParser, Message, MsgType, ProtocolError, encode_bytes

log = logging.getLogger("psctl.session")

MAX_INBOX_EVENTS = 4096  # a party that stops reading loses the oldest events, not memory
HEARTBEAT_MAX_BACKOFF_S = 5.0
_HEARTBEAT_MAX_FRAME_BYTES = 64 * 1024  # the heartbeat connection carries only small replies

EventHook = Callable[[dict[str, Any]], None]
RequestHandler = Callable[[Message], net.Reply]


class SessionClosed(JobError):
    """The control connection closed: what a wait on the inbox raises from then on (cause chained)."""


class EventTimeout(JobError):
    """No event arrived within the wait's bound."""


class Session(net.NullService):
    """One party's control connection: requests, one-way messages, the EVENT inbox, heartbeats.

    ``requests``: handlers for the coordinator's requests to this party (a worker's PAUSE
    and RESUME); others are refused. ``on_event`` sees every EVENT as it arrives (before
    it is queued), ``decode`` turns an EVENT frame into the dict queued (default: its body),
    ``on_close`` hears the cause once when the session closes. With ``keep_events`` false
    EVENTs are not queued (a test's driver that does not read them).
    """

    def __init__(
        self,
        *,
        requests: Mapping[MsgType, RequestHandler] | None = None,
        on_event: EventHook | None = None,
        on_close: Callable[[BaseException], None] | None = None,
        decode: Callable[[Message], dict[str, Any]] | None = None,
        keep_events: bool = True,
        what: str = "psctl coordinator",
    ):
        self.what = what
        self._requests = dict(requests or {})
        self._on_event = on_event
        self._on_close = on_close
        self._decode = decode or (lambda msg: msg.body)
        self._keep_events = keep_events
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_INBOX_EVENTS)
        self._closed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self.peer: net.Peer | None = None
        self._address: tuple[str, int] = ("", 0)  # where heartbeats go: set by open()
        self._security = net.LOCAL
        self.heartbeat: Heartbeat | None = None
        self.registration: dict[str, Any] | None = None  # the REGISTER_WORKER reply
        # Written by the worker's loop, read by the heartbeat thread: plain ints.
        self.clock = 0  # steps pushed
        self.samples = 0  # rows trained so far

    @classmethod
    async def open(
        cls,
        address: str,
        *,
        max_frame_bytes: int,
        security: net.Security = net.LOCAL,
        what: str = "psctl coordinator",
        **kwargs: Any,
    ) -> Session:
        """Connect to the coordinator at ``address`` (ConnectError/SecurityError in one sentence)."""
        session = cls(what=what, **kwargs)
        session.peer = await net.connect(address, session, max_frame_bytes=max_frame_bytes, what=what, security=security)
        session._address, session._security = net.parse_address(address), security
        return session

    # -- registration --------------------------------------------------------
    async def register_worker(self, body: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        """REGISTER_WORKER (``timeout_s`` None: wait for a job as long as it takes); heartbeats
        start with the reply, at the job's ``heartbeat_interval_s``."""
        reg = (await self.request(MsgType.REGISTER_WORKER, body, timeout_s=timeout_s)).body
        self.registration = reg
        token = reg.get("session")
        if not isinstance(token, str):
            raise JobError(f"the {self.what} gave no session token for heartbeats; is it a psctl of this version?")
        interval_s = float((reg.get("spec") or {}).get("heartbeat_interval_s") or DEFAULT_HEARTBEAT_INTERVAL_S)
        slot = {"job_id": reg["job_id"], "worker_id": int(reg["worker_id"]), "session": token}
        if self._closed.done():  # closed while the reply was on its way: no thread to outlive it
            raise self._closed_error()
        self.heartbeat = Heartbeat(self._address, self._security, slot, self._progress, interval_s, self.what)
        self.heartbeat.start()
        return reg

    async def submit(self, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """SUBMIT a job: this session is then its driver."""
        return (await self.request(MsgType.SUBMIT, {"spec": spec}, timeout_s=timeout_s)).body

    def _progress(self) -> tuple[int, int]:
        return self.clock, self.samples

    # -- messages ------------------------------------------------------------
    async def request(
        self, kind: MsgType, body: dict[str, Any] | None = None, arrays: list[Any] | None = None, *, timeout_s: float | None
    ) -> Message:
        return await self._open_peer().request(kind, body, arrays, timeout_s=timeout_s)

    def notify(self, kind: MsgType, body: dict[str, Any] | None = None, arrays: list[Any] | None = None) -> None:
        self._open_peer().notify(kind, body, arrays)

    @property
    def is_open(self) -> bool:
        return self.peer is not None and self.peer.is_open and not self._closed.done()

    def _open_peer(self) -> net.Peer:
        if self._closed.done():
            raise self._closed_error()
        assert self.peer is not None, "Session.open() first"
        return self.peer

    async def next_event(self, timeout_s: float | None) -> dict[str, Any]:
        """The next EVENT, oldest first. Events that arrived before a close are still handed
        out; then SessionClosed. EventTimeout after ``timeout_s`` without one."""
        if not self._inbox.empty() or self._closed.done():
            if not self._inbox.empty():
                return self._inbox.get_nowait()
            raise self._closed_error()
        get = asyncio.ensure_future(self._inbox.get())
        try:
            await asyncio.wait({get, self._closed}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():
            return get.result()
        if self._closed.done():
            raise self._closed_error()
        raise EventTimeout(f"no event from the {self.what} within {timeout_s:g} s")

    def _closed_error(self) -> SessionClosed:
        cause = self._closed.result()
        err = SessionClosed(f"lost the connection to the {self.what}" if isinstance(cause, net.ConnectionLost) else str(cause))
        err.__cause__ = cause
        return err

    # -- net.Service -----------------------------------------------------------
    def handle(self, peer: net.Peer, msg: Message) -> net.Reply:
        if msg.type is MsgType.EVENT:
            event = self._decode(msg)
            if self._on_event is not None:
                self._on_event(event)
            if self._keep_events:
                if self._inbox.full():
                    dropped = self._inbox.get_nowait()
                    log.warning("%d events unread; dropping the oldest (%s)", MAX_INBOX_EVENTS, dropped.get("kind"))
                self._inbox.put_nowait(event)
            return None
        handler = self._requests.get(msg.type)
        if handler is None:
            return super().handle(peer, msg)
        return handler(msg)

    def peer_lost(self, peer: net.Peer, exc: BaseException | None) -> None:
        cause = net.ConnectionLost(f"the connection to the {self.what} closed")
        if exc is not None:
            cause.__cause__ = exc
        self._finish(cause)

    # -- closing -------------------------------------------------------------
    def close(self, reason: BaseException | None = None) -> None:
        """Stop the heartbeats, close the connection; waits on the inbox fail with ``reason``."""
        self._finish(reason or SessionClosed(f"the session with the {self.what} was closed"))
        if self.peer is not None:
            self.peer.close()

    def _finish(self, cause: BaseException) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self._closed.done():
            return
        self._closed.set_result(cause)
        if self._on_close is not None:
            self._on_close(cause)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Heartbeat:
    """HEARTBEAT every ``interval_s`` from a daemon thread, over a blocking connection of its own.

    ``slot`` ({job_id, worker_id, session}) names the worker; ``progress()`` returns its
    (clock, samples so far), read in the thread. A failed connection is logged and tried
    again with backoff; nothing is raised into the worker. :meth:`stop` ends the thread.
    """

    def __init__(
        self,
        address: tuple[str, int],
        security: net.Security,
        slot: dict[str, Any],
        progress: Callable[[], tuple[int, int]],
        interval_s: float,
        what: str = "psctl coordinator",
    ):
        self.address, self.security, self.slot = address, security, slot
        self.progress, self.interval_s, self.what = progress, interval_s, what
        self.sent = 0  # heartbeats the coordinator acknowledged
        self.failures = 0  # connections that failed
        self.refusals = 0  # heartbeats the coordinator answered with an ERROR (the slot is gone)
        self.answered = threading.Event()  # set at the coordinator's first answer to a heartbeat
        self._stop = threading.Event()
        self._conn: BlockingConnection | None = None
        self._thread = threading.Thread(target=self._run, name=f"psctl-heartbeat-{slot.get('worker_id')}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop sending; with ``timeout_s``, wait that long for the thread to end."""
        self._stop.set()
        conn = self._conn
        if conn is not None:
            conn.shutdown()  # a blocked send or receive returns at once
        if timeout_s is not None and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        backoff_s = self.interval_s
        last_t, last_samples = time.monotonic(), self.progress()[1]
        while not self._stop.is_set():
            try:
                self._conn = BlockingConnection.open(self.address, self.security, self.what)
                if self._stop.is_set():
                    break
                while not self._stop.is_set():
                    clock, samples = self.progress()
                    now = time.monotonic()
                    rate = (samples - last_samples) / max(now - last_t, 1e-9)
                    last_t, last_samples = now, samples
                    try:
                        self._conn.request(MsgType.HEARTBEAT, {**self.slot, "clock": clock, "samples_s": rate})
                    except HeartbeatRefused as exc:  # the connection is fine; the slot may be gone
                        self.refusals += 1
                        if self.refusals == 1:
                            log.warning("the %s refused a heartbeat: %s", self.what, exc)
                    else:
                        self.sent += 1
                    self.answered.set()
                    backoff_s = self.interval_s
                    self._stop.wait(self.interval_s)
            except (OSError, ProtocolError, ConnectError, HeartbeatRefused) as exc:
                if self._stop.is_set():
                    break
                self.failures += 1
                log.warning("heartbeat to the %s failed (%s); trying again in %.1f s", self.what, exc, backoff_s)
                self._stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, HEARTBEAT_MAX_BACKOFF_S)
            finally:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None


class HeartbeatRefused(Exception):
    """The coordinator answered a heartbeat connection's request with an ERROR."""


class BlockingConnection:
    """Request and reply over a blocking socket with timeouts: the sans-IO codec and handshake
    driven by hand, for a thread that must not depend on an event loop."""

    def __init__(self, sock: socket.socket, timeout_s: float):
        self.sock = sock
        self.timeout_s = timeout_s
        self.parser = FrameParser(_HEARTBEAT_MAX_FRAME_BYTES)
        self._ids = itertools.count(1)

    @classmethod
    def open(cls, address: tuple[str, int], security: net.Security, what: str) -> BlockingConnection:
        """Connect, wrap in TLS when ``security`` says so, and run the handshake with a secret."""
        timeout_s = security.handshake_timeout_s
        sock = socket.create_connection(address, timeout=timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if security.tls is not None:
                sock = security.tls.client_context.wrap_socket(sock, server_hostname=address[0])
            conn = cls(sock, timeout_s)
            if security.secret is not None:
                handshake = ClientHandshake(security.secret)
                try:
                    challenge = conn.request(MsgType.AUTH_HELLO, handshake.hello())
                    conn.request(MsgType.AUTH_PROOF, handshake.on_challenge(challenge.body))
                except HandshakeError as exc:
                    raise ConnectError(f"the {what} at {address[0]}:{address[1]} failed authentication: {exc}") from None
        except BaseException:
            sock.close()
            raise
        return conn

    def request(self, kind: MsgType, body: dict[str, Any]) -> Message:
        req_id = next(self._ids)
        self.sock.sendall(encode_bytes(Message(kind, body, req_id=req_id)))
        deadline = time.monotonic() + self.timeout_s
        while True:
            msg = self.parser.next_event()
            if msg is NEED_DATA:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise TimeoutError(f"no reply to {kind.name} within {self.timeout_s:g} s")
                self.sock.settimeout(left_s)
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("the connection closed")
                self.parser.receive_data(data)
                continue
            assert isinstance(msg, Message)
            if msg.type is MsgType.ERROR:
                raise HeartbeatRefused(str(msg.body.get("message", "error")))
            if msg.is_reply and msg.req_id == req_id:
                return msg

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
