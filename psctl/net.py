"""asyncio transport for psctl frames: one Peer per TCP connection.

A :class:`Peer` is symmetric: either side may send requests, matched to
replies by request id (never by order), or one-way notifications. Incoming
requests go to a :class:`Service`. The codec (wire.py) does the parsing;
this module only moves bytes, keeps the futures and enforces deadlines.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import numpy as np

from psctl.errors import ConnectError, PsctlError
from psctl.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    NEED_DATA,
    Flag,
    FrameParser,
    Message,
    MsgType,
    ProtocolError,
    encode,
    error_message,
)

log = logging.getLogger("psctl.net")

DEFAULT_REQUEST_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 1024


class RequestError(Exception):
    """Raised by a service handler: becomes an ERROR reply; the connection stays open."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


class RemoteError(PsctlError):
    """The peer answered a request with an ERROR frame."""

    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code


class ConnectionLost(PsctlError):
    """The connection closed while a request was pending, or before a send."""


Reply = Message | None


class Service(Protocol):
    """What a Peer calls for frames that are not replies."""

    def handle(self, peer: Peer, msg: Message) -> Reply | Awaitable[Reply]: ...

    def peer_lost(self, peer: Peer, exc: BaseException | None) -> None: ...


class NullService:
    """For client connections that expect only replies."""

    def handle(self, peer: Peer, msg: Message) -> Reply:
        raise RequestError(f"unexpected {msg.type.name} request", code="unexpected")

    def peer_lost(self, peer: Peer, exc: BaseException | None) -> None:
        pass


class Peer(asyncio.BufferedProtocol):
    """One connection: a frame parser, a table of pending requests, a service."""

    def __init__(self, service: Service, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, name: str = "peer"):
        self.service = service
        self.name = name
        self.parser = FrameParser(max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.info: dict[str, Any] = {}  # role-specific state owned by the service
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._write_ready: asyncio.Event | None = None
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[BaseException | None] = self._loop.create_future()

    # -- protocol callbacks ----------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = transport.get_extra_info("peername")
        if peername:
            self.name = f"{self.name}@{peername[0]}:{peername[1]}"

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.parser.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.parser.buffer_updated(nbytes)
        try:
            while (msg := self.parser.next_event()) is not NEED_DATA:
                self._dispatch(msg)  # type: ignore[arg-type]
                if self.transport is None or self.transport.is_closing():
                    return
        except ProtocolError as exc:
            log.warning("%s sent a malformed frame: %s", self.name, exc)
            self.abort(exc, tell_peer=True)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        reason = exc or ConnectionLost(f"connection to {self.name} closed")
        for fut in self._pending.values():
            if not fut.done():
                err = ConnectionLost(f"connection to {self.name} closed before the reply")
                err.__cause__ = reason
                fut.set_exception(err)
        self._pending.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._write_ready is not None:
            self._write_ready.set()
        if not self.closed.done():
            self.closed.set_result(exc)
        try:
            self.service.peer_lost(self, exc)
        except Exception:  # a service bug must not stop the loop's callback chain
            log.exception("peer_lost handler failed for %s", self.name)

    def pause_writing(self) -> None:
        self._write_ready = asyncio.Event()

    def resume_writing(self) -> None:
        if self._write_ready is not None:
            self._write_ready.set()
            self._write_ready = None

    # -- incoming ----------------------------------------------------------
    def _dispatch(self, msg: Message) -> None:
        if msg.is_reply:
            fut = self._pending.pop(msg.req_id, None)
            if fut is None or fut.done():
                return  # a reply to a request that timed out: drop it
            if msg.type is MsgType.ERROR:
                fut.set_exception(RemoteError(str(msg.body.get("message", "error")), str(msg.body.get("code", "error"))))
            else:
                fut.set_result(msg)
            return
        if msg.type is MsgType.ERROR:
            # An unsolicited error: the peer is about to close on us.
            log.warning("%s reported: %s", self.name, msg.body.get("message"))
            return
        try:
            result = self.service.handle(self, msg)
        except RequestError as exc:
            self._reply_error(msg, str(exc), exc.code)
            return
        except Exception as exc:
            log.exception("handler for %s failed", msg.type.name)
            self._reply_error(msg, f"internal error: {exc}", "internal")
            return
        if inspect.isawaitable(result):
            self.spawn(self._finish(msg, result))
        else:
            self._reply(msg, result)

    async def _finish(self, msg: Message, pending: Awaitable[Reply]) -> None:
        try:
            result = await pending
        except RequestError as exc:
            self._reply_error(msg, str(exc), exc.code)
        except ConnectionLost:
            return  # the requester is gone; nobody to answer
        except Exception as exc:
            log.exception("handler for %s failed", msg.type.name)
            self._reply_error(msg, f"internal error: {exc}", "internal")
        else:
            self._reply(msg, result)

    def _reply(self, request: Message, result: Reply) -> None:
        if request.flags & Flag.ONEWAY or not self.is_open:
            return
        reply = result if result is not None else Message(request.type)
        reply.req_id = request.req_id
        reply.flags = Flag.REPLY
        if reply.type is not MsgType.ERROR:
            reply.type = request.type
        self.send(reply)

    def _reply_error(self, request: Message, text: str, code: str) -> None:
        if request.flags & Flag.ONEWAY:
            log.warning("%s: one-way %s failed: %s", self.name, request.type.name, text)
            return
        if self.is_open:
            self.send(error_message(text, request.req_id, code))

    # -- outgoing ----------------------------------------------------------
    def send(self, msg: Message) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionLost(f"connection to {self.name} is closed")
        self.transport.writelines(encode(msg))

    def request_nowait(
        self, kind: MsgType, body: dict[str, Any] | None = None, arrays: list[np.ndarray] | None = None
    ) -> asyncio.Future[Message]:
        """Send a request now and return the future of its reply (for pipelining)."""
        req_id = next(self._ids)
        fut: asyncio.Future[Message] = self._loop.create_future()
        self.send(Message(kind, body or {}, arrays or [], req_id=req_id))
        self._pending[req_id] = fut
        return fut

    async def request(
        self,
        kind: MsgType,
        body: dict[str, Any] | None = None,
        arrays: list[np.ndarray] | None = None,
        timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> Message:
        """Send a request and wait for its reply (RemoteError on an ERROR reply)."""
        fut = self.request_nowait(kind, body, arrays)
        return await self.wait_reply(fut, timeout_s)

    async def wait_reply(self, fut: asyncio.Future[Message], timeout_s: float | None) -> Message:
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise ConnectionLost(f"{self.name} did not answer within {timeout_s} s") from None

    def notify(self, kind: MsgType, body: dict[str, Any] | None = None, arrays: list[np.ndarray] | None = None) -> None:
        """Send a one-way message (no reply)."""
        self.send(Message(kind, body or {}, arrays or [], flags=Flag.ONEWAY))

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self._write_ready is not None:
            await self._write_ready.wait()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def abort(self, reason: BaseException, tell_peer: bool = False) -> None:
        """Close now; with tell_peer, send an ERROR frame first."""
        if self.transport is None:
            return
        if tell_peer:
            try:
                self.send(error_message(str(reason), 0, "protocol"))
            except ConnectionLost:
                pass
        self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)


class Server:
    """A listening socket whose connections become Peers of one service."""

    def __init__(self, service: Service, *, max_frame_bytes: int, max_connections: int, name: str):
        self.service = service
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self.name = name
        self.peers: set[Peer] = set()
        self.tasks: set[asyncio.Future[None]] = set()  # background work that lives as long as the server
        self._server: asyncio.base_events.Server | None = None

    def _make_peer(self) -> Peer:
        return _ServerPeer(self)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(self._make_peer, host, port, reuse_address=True)
        except OSError as exc:
            raise ConnectError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self, timeout_s: float = 2.0) -> None:
        """Stop accepting, close every connection, wait for them with a bound."""
        if self._server is not None:
            self._server.close()
        for task in self.tasks:
            task.cancel()
        for peer in list(self.peers):
            peer.close()
        waits = [p.closed for p in self.peers]
        if waits:
            await asyncio.wait(waits, timeout=timeout_s)


class _ServerPeer(Peer):
    def __init__(self, server: Server):
        super().__init__(server.service, max_frame_bytes=server.max_frame_bytes, name=server.name)
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if len(self._server.peers) >= self._server.max_connections:
            log.warning("refusing %s: %d connections already", self.name, len(self._server.peers))
            self.abort(ConnectionLost(f"too many connections (limit {self._server.max_connections})"), tell_peer=True)
            return
        self._server.peers.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.peers.discard(self)
        super().connection_lost(exc)


def parse_address(text: str) -> tuple[str, int]:
    """'host:port' -> (host, port), with a one-sentence error."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConnectError(f"'{text}' is not an address of the form HOST:PORT")
    return host.strip("[]"), int(port)


async def connect(
    address: str | tuple[str, int],
    service: Service | None = None,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    what: str = "psctl server",
) -> Peer:
    """Open a connection; ConnectError with one sentence if it cannot be made."""
    host, port = parse_address(address) if isinstance(address, str) else address
    loop = asyncio.get_running_loop()
    svc = service or NullService()
    try:
        _, peer = await asyncio.wait_for(
            loop.create_connection(lambda: Peer(svc, max_frame_bytes=max_frame_bytes, name=what), host, port),
            timeout_s,
        )
    except TimeoutError:
        raise ConnectError(f"cannot reach {what} at {host}:{port}: no answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise ConnectError(f"cannot reach {what} at {host}:{port}: {exc.strerror or exc}") from None
    return peer


# glibc hands freed blocks above its mmap threshold back to the OS at once (and
# trims the heap top), so every large frame buffer, table copy and numpy
# temporary is fresh memory whose pages fault in again: about 1,000 page faults
# per 4 MiB, most of a shard's time in a 4 MiB pull + push. Keeping freed memory
# lets the next frame reuse warm pages. See BENCHMARKS.md.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
KEEP_FREED_BYTES = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Ask the C allocator to reuse freed large blocks; False where it cannot (not glibc)."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it loads, else the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``main()`` on the best available loop, with the allocator set up for large frames."""
    keep_freed_memory()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main())
