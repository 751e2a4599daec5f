"""asyncio transport for psctl frames: one Peer per TCP connection.

A :class:`Peer` is symmetric: either side may send requests, matched to
replies by request id (never by order), or one-way notifications. Incoming
requests go to a :class:`Service`. The codec (psctl.protocol.wire) does the parsing;
this module only moves bytes, keeps the futures and enforces deadlines.

It is also where a connection is guarded (:class:`Security`): with a shared
secret, :func:`connect` and :class:`Server` run the handshake of psctl.protocol.handshake
before the service sees any frame, reading it with a parser whose limits fit
a handshake; optional TLS wraps the same framing; a connection must finish
its set-up within a deadline, and a peer that stops in the middle of a frame
is dropped. Connections still in their set-up (not authenticated; without a
secret, not yet in a role the service vouched for with :meth:`Peer.admit`)
have a budget of their own and a share per source address, so they cannot
take the slots of established ones; when it is full, the longest-silent one of
the address holding the most makes room, told why in an ERROR frame.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import random
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import numpy as np

from psctl.errors import ConnectError, PsctlError, RequestError, SecurityError
from psctl.net.security import (
    LOCAL,
    Security,
    check_bind,
)
from psctl.protocol.handshake import ClientHandshake, HandshakeError, ServerHandshake
from psctl.protocol.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    NEED_DATA,
    Flag,
    FrameParser,
    LocalProtocolError,
    Message,
    MsgType,
    ProtocolError,
    RemoteProtocolError,
    encode,
    error_message,
)

log = logging.getLogger("psctl.net")

DEFAULT_REQUEST_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: The code of the ERROR frame a server sends a connection it refuses or drops because a
#: connection budget is full (not because of anything the connection did): :func:`connect`
#: tries again, after a pause that doubles from BUSY_RETRY_S (with jitter), until its deadline.
BUSY = "busy"
BUSY_RETRY_S = 0.02
BUSY_RETRY_MAX_S = 0.5
# Until a peer has proved it knows the secret, it gets a parser this small.
HANDSHAKE_MAX_FRAME_BYTES = 4096
_HANDSHAKE_MAX_BODY_BYTES = 1024
_HANDSHAKE_STAGING_BYTES = 8192
# After we close on a peer, how long it may take to read our last words before a hard abort.
CLOSE_GRACE_S = 1.0
_AUTH_TYPES = (MsgType.AUTH_HELLO, MsgType.AUTH_PROOF)
_QUOTE_BYTES = 48  # of a peer that is not psctl, how much of its answer a ConnectError quotes




class RemoteError(PsctlError):
    """The peer answered a request with an ERROR frame."""

    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code


class ConnectionLost(PsctlError):
    """The connection closed while a request was pending, or before a send."""


Reply = Message | None


class Service(Protocol):
    """What a Peer calls for frames that are not replies.

    A service may also name, as ``quiet_types``, the request types it takes with
    ``Flag.QUIET``: those its ``handle`` answers at once, never with an awaitable, so
    the success of one is said by the next reply on the connection (:meth:`Peer.request_quiet`).
    """

    def handle(self, peer: Peer, msg: Message) -> Reply | Awaitable[Reply]: ...

    def peer_lost(self, peer: Peer, exc: BaseException | None) -> None: ...


class NullService:
    """For client connections that expect only replies."""

    def handle(self, peer: Peer, msg: Message) -> Reply:
        raise RequestError(f"unexpected {msg.type.name} request", code="unexpected")

    def peer_lost(self, peer: Peer, exc: BaseException | None) -> None:
        pass


class Peer(asyncio.BufferedProtocol):
    """One connection: a frame parser, a table of pending requests, a service.

    With a secret, a Peer starts unauthenticated: a small parser, and only the
    handshake's frames (a server peer answers them; a client peer accepts only
    replies) until :meth:`_authenticated` swaps in the full parser.
    """

    def __init__(
        self,
        service: Service,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        name: str = "peer",
        security: Security = LOCAL,
        quote_first_bytes: bool = False,
    ):
        self.service = service
        self.name = name
        self.security = security
        self.max_frame_bytes = max_frame_bytes
        self.authenticated = security.secret is None
        if self.authenticated:
            self.parser = FrameParser(max_frame_bytes)
        else:
            self.parser = FrameParser(HANDSHAKE_MAX_FRAME_BYTES, _HANDSHAKE_MAX_BODY_BYTES, _HANDSHAKE_STAGING_BYTES)
        self.transport: asyncio.Transport | None = None
        self.info: dict[str, Any] = {}  # role-specific state owned by the service
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._quiet: deque[tuple[int, MsgType]] = deque()  # quiet requests not yet acknowledged, in order
        self._quiet_types: frozenset[MsgType] = getattr(service, "quiet_types", frozenset())
        self._tasks: set[asyncio.Task[None]] = set()
        # Futures a handler answered with (a pull parked at the gate): replied when done,
        # cancelled when the connection goes, as a task awaiting them would be.
        self._answers_due: set[asyncio.Future[Reply]] = set()
        self._write_ready: asyncio.Event | None = None
        # Frames sent during this turn of the loop, written together at its end (see send).
        self._out: list[bytes | memoryview] = []
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[BaseException | None] = self._loop.create_future()
        self._handshake: ServerHandshake | None = None  # set on the accepting side
        self._setup_timer: asyncio.TimerHandle | None = None
        self._role_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._last_rx_s = self._loop.time()
        self.source = ""
        self._rx_view: memoryview | None = None
        # Set while connect() checks the other side: its first bytes, to quote if they are not psctl.
        self.first_bytes: bytearray | None = bytearray() if quote_first_bytes else None
        self.protocol_error: ProtocolError | None = None  # why the parser gave up on the peer's bytes
        self.peer_error: str | None = None  # an unsolicited ERROR the peer sent (it is about to close)
        self.peer_error_code: str | None = None  # and its code (BUSY: a budget was full, try again)

    # -- protocol callbacks ----------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = transport.get_extra_info("peername")
        self.source = str(peername[0]) if peername else ""  # the address a connection budget is shared by
        if peername:
            self.name = f"{self.name}@{peername[0]}:{peername[1]}"

    def get_buffer(self, sizehint: int) -> memoryview:
        self._rx_view = self.parser.get_buffer(sizehint)
        return self._rx_view

    def buffer_updated(self, nbytes: int) -> None:
        self._last_rx_s = self._loop.time()
        if self.first_bytes is not None and len(self.first_bytes) < _QUOTE_BYTES and self._rx_view is not None:
            self.first_bytes += self._rx_view[: min(nbytes, _QUOTE_BYTES - len(self.first_bytes))]
        self.parser.buffer_updated(nbytes)
        self._drain()

    def _drain(self) -> None:
        """Dispatch every complete frame; then watch for a peer that stops mid-frame."""
        try:
            # self.parser is read each time: the handshake swaps it between frames.
            while (msg := self.parser.next_event()) is not NEED_DATA:
                self._dispatch(msg)  # type: ignore[arg-type]
                if self.transport is None or self.transport.is_closing():
                    return
        except ProtocolError as exc:
            # Only a detached copy goes on (kept, logged): the raised error's traceback holds this
            # peer's frames, and a peer holding it would live, parser buffers and all, until the
            # cycle collector ran.
            self.protocol_error = exc.detached()
            log.warning("%s sent a malformed frame: %s", self.name, self.protocol_error)
            self.abort(self.protocol_error, tell_peer=True)
            return
        if self.parser.partial:
            if self._stall_timer is None:
                self._stall_timer = self._loop.call_later(self.security.idle_timeout_s, self._check_stall)
        elif self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _check_stall(self) -> None:
        self._stall_timer = None
        if not self.is_open or not self.parser.partial:
            return
        timeout_s = self.security.idle_timeout_s
        silent_s = self._loop.time() - self._last_rx_s
        if silent_s < timeout_s:
            self._stall_timer = self._loop.call_later(timeout_s - silent_s, self._check_stall)
            return
        log.warning("%s sent part of a frame and then nothing for %g s; dropping it", self.name, timeout_s)
        self.abort(ConnectionLost(f"no bytes for {timeout_s:g} s in the middle of a frame"), tell_peer=True)

    def _start_setup_deadline(self) -> None:
        """The accepting side: authenticate (or, without a secret, send a first frame) in time."""
        self._setup_timer = self._loop.call_later(self.security.handshake_timeout_s, self._setup_expired)

    def _setup_expired(self) -> None:
        self._setup_timer = None
        if self.is_open:
            timeout_s = self.security.handshake_timeout_s
            what = "authenticate" if self.security.secret is not None else "send a first frame"
            log.warning("%s did not %s within %g s; dropping it", self.name, what, timeout_s)
            self.abort(ConnectionLost(f"did not {what} within {timeout_s:g} s"), tell_peer=True)

    def admit(self) -> None:
        """The service vouches for this peer (it took a role): on the accepting side it
        leaves the budget of connections in their set-up. Without a secret a peer that is
        never admitted is dropped after ``role_timeout_s``; with one, authenticating admits."""

    def _authenticated(self) -> None:
        """The handshake succeeded: lift the handshake limits, keep any bytes already received."""
        self.authenticated = True
        if self._setup_timer is not None:
            self._setup_timer.cancel()
            self._setup_timer = None
        rest = self.parser.take_unparsed()
        self.parser = FrameParser(self.max_frame_bytes)
        if rest:
            self.parser.receive_data(rest)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for timer in (self._setup_timer, self._stall_timer, self._role_timer):
            if timer is not None:
                timer.cancel()
        self._setup_timer = self._stall_timer = self._role_timer = None
        reason = exc or ConnectionLost(f"connection to {self.name} closed")
        said = f": {self.peer_error}" if self.peer_error else ""  # why the other side closed, if it said
        for fut in self._pending.values():
            if not fut.done():
                err = ConnectionLost(f"connection to {self.name} closed before the reply{said}")
                err.__cause__ = reason
                fut.set_exception(err)
        self._pending.clear()
        self._quiet.clear()
        for task in list(self._tasks):
            task.cancel()
        for fut in list(self._answers_due):
            fut.cancel()
        if self._write_ready is not None:
            self._write_ready.set()
        if not self.closed.done():
            self.closed.set_result(exc)
        if not self.authenticated:
            return  # the service never saw this peer
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
        if not self.authenticated:
            if self._handshake is not None:
                self._serve_handshake(self._handshake, msg)
                return
            if not msg.is_reply and msg.type is not MsgType.ERROR:  # a server only answers, until then
                self.abort(RemoteProtocolError(f"{msg.type.name} before the handshake finished"), tell_peer=True)
                return
        elif self._setup_timer is not None:  # no secret: the first frame ends the set-up
            self._setup_timer.cancel()
            self._setup_timer = None
        if msg.type in _AUTH_TYPES and not msg.is_reply:
            if self.security.secret is None:
                self._reply_error(msg, "this psctl process runs without a shared secret", "no_secret")
            else:
                self._reply_error(msg, "this connection is already authenticated", "auth_unexpected")
            return
        if msg.is_reply:
            if self._quiet:
                self._acknowledge_quiet(msg.req_id)
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
            self.peer_error = str(msg.body.get("message", "error"))
            self.peer_error_code = str(msg.body.get("code", "error"))
            log.warning("%s reported: %s", self.name, self.peer_error)
            return
        if msg.is_quiet and msg.type not in self._quiet_types:
            self._reply_error(msg, f"{msg.type.name} cannot be sent quiet (answered only if it fails) here", "bad_request")
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
        # Most handlers answer at once; only the others are asked whether they are awaitable.
        if result is not None and not isinstance(result, Message) and inspect.isawaitable(result):
            if msg.is_quiet:  # a service bug: a later answer would be said out of order
                log.error("handler for quiet %s did not answer at once", msg.type.name)
                if inspect.iscoroutine(result):
                    result.close()
                self._reply_error(msg, f"internal error: {msg.type.name} cannot be answered quiet", "internal")
                return
            if isinstance(result, asyncio.Future):  # answered from a callback: no task to run
                self._answers_due.add(result)
                result.add_done_callback(functools.partial(self._finish_future, msg))
            else:
                self.spawn(self._finish(msg, result))
        else:
            self._reply(msg, result)

    def _serve_handshake(self, handshake: ServerHandshake, msg: Message) -> None:
        try:
            body = handshake.receive(msg)
        except HandshakeError as exc:
            log.warning("%s failed the handshake: %s", self.name, exc)
            req_id = msg.req_id if msg.flags == Flag.NONE else 0
            if self.is_open:
                self.send(error_message(str(exc), req_id, exc.code))
            self.abort(exc)
            return
        self._reply(msg, Message(msg.type, body))
        if handshake.done:
            self._handshake = None
            self._authenticated()

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

    def _finish_future(self, msg: Message, fut: asyncio.Future[Reply]) -> None:
        """:meth:`_finish` for a handler's future, when it is done."""
        self._answers_due.discard(fut)
        if fut.cancelled():
            return  # the connection went, or the service withdrew it
        exc = fut.exception()
        if exc is None:
            self._reply(msg, fut.result())
        elif isinstance(exc, RequestError):
            self._reply_error(msg, str(exc), exc.code)
        elif not isinstance(exc, ConnectionLost):
            log.error("handler for %s failed", msg.type.name, exc_info=exc)
            self._reply_error(msg, f"internal error: {exc}", "internal")

    def _reply(self, request: Message, result: Reply) -> None:
        if request.is_oneway or not self.is_open or (result is None and request.is_quiet):
            return
        reply = result if result is not None else Message(request.type)
        reply.req_id = request.req_id
        reply.flags = Flag.REPLY
        if reply.type is not MsgType.ERROR:
            reply.type = request.type
        try:
            self.send(reply)
        except LocalProtocolError as exc:  # a handler's answer the wire cannot carry: a bug, not the peer's
            log.error("reply to %s cannot be encoded: %s", request.type.name, exc)
            self.send(error_message(f"internal error: {exc}", request.req_id, "internal"))

    def _reply_error(self, request: Message, text: str, code: str) -> None:
        if request.is_oneway:
            log.warning("%s: one-way %s failed: %s", self.name, request.type.name, text)
            return
        if self.is_open:
            self.send(error_message(text, request.req_id, code))

    # -- outgoing ----------------------------------------------------------
    def send(self, msg: Message) -> None:
        """Queue ``msg``'s frame; every frame sent to this peer in one turn of the loop goes
        out in one ``writelines`` when the turn ends.

        Over loopback each write is a system call that also wakes the reader, the largest
        cost of a small message (issue 17): a worker's push and its next pull, or a shard's
        ack and the pull reply behind it, so cost one. Frames keep their order, and an
        error in encoding still raises here. The arrays are written by reference, so the
        caller must not mutate them afterwards (as :func:`encode` says).
        """
        if self.transport is None or self.transport.is_closing():
            raise ConnectionLost(f"connection to {self.name} is closed")
        frame = encode(msg)
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out += frame

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def request_nowait(
        self, kind: MsgType, body: dict[str, Any] | None = None, arrays: list[np.ndarray] | None = None
    ) -> asyncio.Future[Message]:
        """Send a request now and return the future of its reply (for pipelining)."""
        req_id = next(self._ids)
        fut: asyncio.Future[Message] = self._loop.create_future()
        self.send(Message(kind, body or {}, arrays or [], req_id=req_id))
        self._pending[req_id] = fut
        # A caller that gives up on a request (say, its connection died mid-step) may never
        # await it; whoever does await it still gets the exception.
        fut.add_done_callback(_retrieve)
        return fut

    def request_quiet(
        self, kind: MsgType, body: dict[str, Any] | None = None, arrays: list[np.ndarray] | None = None
    ) -> asyncio.Future[Message]:
        """Send a request the peer answers only if it fails (``Flag.QUIET``; the type must be
        one of the peer's ``quiet_types``). The peer handles it before it reads the next frame,
        so the reply to any later request on this connection acknowledges it; the future is
        then done with an empty message of ``kind``. Nothing later: send one (a PING) to know.

        A worker's push costs one frame less this way, and a shard one write less in sync
        mode, where the ack used to leave alone and the parked pull's reply later.
        """
        req_id = next(self._ids)
        fut: asyncio.Future[Message] = self._loop.create_future()
        self.send(Message(kind, body or {}, arrays or [], req_id=req_id, flags=Flag.QUIET))
        self._pending[req_id] = fut
        self._quiet.append((req_id, kind))
        fut.add_done_callback(_retrieve)
        return fut

    def _acknowledge_quiet(self, req_id: int) -> None:
        """A reply to ``req_id`` came: every quiet request sent before it was handled, and
        succeeded (a failure's error reply would have come first)."""
        quiet = self._quiet
        while quiet and quiet[0][0] < req_id:
            quiet_id, kind = quiet.popleft()
            fut = self._pending.pop(quiet_id, None)
            if fut is not None and not fut.done():
                fut.set_result(Message(kind, req_id=quiet_id, flags=Flag.REPLY))
        if quiet and quiet[0][0] == req_id:  # the quiet request itself failed: its error is this reply
            quiet.popleft()

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
        if fut.done():  # answered already: no timer to arm
            return fut.result()
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: on 3.11 it can swallow a cancellation
                return await fut
        except TimeoutError:
            raise ConnectionLost(f"{self.name} did not answer within {timeout_s} s") from None

    def notify(self, kind: MsgType, body: dict[str, Any] | None = None, arrays: list[np.ndarray] | None = None) -> None:
        """Send a one-way message (no reply)."""
        self.send(Message(kind, body or {}, arrays or [], flags=Flag.ONEWAY))

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        self._flush()  # what this turn queued counts
        if self._write_ready is not None:
            await self._write_ready.wait()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def check_keys(self, n_keys: int) -> None:
        """Refuse a request naming more keys than this process allows (RequestError)."""
        limit = self.security.max_keys_per_request
        if n_keys > limit:
            raise RequestError(f"a request may name at most {limit} keys; this one names {n_keys}", code="too_many_keys")

    def abort(self, reason: BaseException, tell_peer: bool = False, code: str = "protocol") -> None:
        """Close now; with tell_peer, send an ERROR frame (of ``code``) first. A peer that does
        not read even that is cut off after CLOSE_GRACE_S."""
        transport = self.transport
        if transport is None:
            return
        if tell_peer and not transport.is_closing():
            try:
                self.send(error_message(str(reason), 0, code))
            except ConnectionLost:
                pass
        self._flush()
        transport.close()
        self._loop.call_later(CLOSE_GRACE_S, self._hard_abort, transport)

    def _hard_abort(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is transport:  # connection_lost has not run yet
            transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class Server:
    """A listening socket whose connections become Peers of one service."""

    def __init__(
        self,
        service: Service,
        *,
        max_frame_bytes: int,
        max_connections: int | None = None,
        name: str,
        security: Security = LOCAL,
    ):
        self.service = service
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections or security.max_connections
        self.name = name
        self.security = security
        self.peers: set[Peer] = set()
        self.pending: set[_ServerPeer] = set()  # still in their set-up
        self.established: set[_ServerPeer] = set()
        self.max_pending = security.max_pending_connections
        self.max_pending_per_source = security.max_pending_per_source
        self.tasks: set[asyncio.Future[None]] = set()  # background work that lives as long as the server
        self._server: asyncio.base_events.Server | None = None

    def _make_peer(self) -> Peer:
        return _ServerPeer(self)

    def _accept(self, peer: _ServerPeer) -> bool:
        """A new connection: refused when the established ones are at their limit; else it
        joins the set-up budget, making room there if need be."""
        if len(self.established) >= self.max_connections:
            log.warning("refusing %s: %d connections already", peer.name, len(self.established))
            peer.abort(ConnectionLost(f"too many connections (limit {self.max_connections})"), tell_peer=True, code=BUSY)
            return False
        self._make_room(peer.source)
        self.peers.add(peer)
        self.pending.add(peer)
        return True

    def _make_room(self, source: str) -> None:
        """Before a connection from ``source`` joins the set-up budget: if its address (or the
        whole budget) is full, drop the longest-silent connection of that address (of the
        address holding the most). A flood thus pushes out its own connections first; a
        client from elsewhere keeps its place while it finishes its set-up."""
        mine = [p for p in self.pending if p.source == source]
        if len(mine) >= self.max_pending_per_source:
            victims = mine
            reason = (
                f"too many connections from {source or 'one address'} still in their set-up "
                f"(limit {self.max_pending_per_source}); dropped the one silent longest"
            )
        elif len(self.pending) >= self.max_pending:
            by_source: dict[str, list[_ServerPeer]] = {}
            for p in self.pending:
                by_source.setdefault(p.source, []).append(p)
            victims = max(by_source.values(), key=len)
            reason = (
                f"too many connections still in their set-up (limit {self.max_pending}); "
                "dropped the one silent longest of the address with the most"
            )
        else:
            return
        victim = min(victims, key=lambda p: p._last_rx_s)
        self.pending.discard(victim)
        log.warning("dropping %s: %s", victim.name, reason)
        victim.abort(ConnectionLost(reason), tell_peer=True, code=BUSY)

    def _admit(self, peer: _ServerPeer) -> None:
        if peer not in self.pending:
            return  # admitted already, or dropped
        self.pending.discard(peer)
        if len(self.established) >= self.max_connections:
            log.warning("refusing %s: %d connections already", peer.name, len(self.established))
            peer.abort(ConnectionLost(f"too many connections (limit {self.max_connections})"), tell_peer=True, code=BUSY)
            return
        self.established.add(peer)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; SecurityError for a bind the security settings do not allow."""
        check_bind(host, self.security.secret, self.security.insecure)
        tls = self.security.tls.server_context if self.security.tls is not None else None
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._make_peer,
                host,
                port,
                reuse_address=True,
                ssl=tls,
                ssl_handshake_timeout=self.security.handshake_timeout_s if tls else None,
            )
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
        super().__init__(server.service, max_frame_bytes=server.max_frame_bytes, name=server.name, security=server.security)
        self._server = server
        if server.security.secret is not None:
            self._handshake = ServerHandshake(server.security.secret)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._server._accept(self):
            return
        self._start_setup_deadline()
        if self.security.secret is None:
            self._role_timer = self._loop.call_later(self.security.role_timeout_s, self._role_expired)

    def _role_expired(self) -> None:
        self._role_timer = None
        if self.is_open and self in self._server.pending:
            timeout_s = self.security.role_timeout_s
            log.warning("%s did not say what it is within %g s; dropping it", self.name, timeout_s)
            self.abort(ConnectionLost(f"did not say what it is (HELLO or REGISTER) within {timeout_s:g} s"), tell_peer=True)

    def admit(self) -> None:
        if self._role_timer is not None:
            self._role_timer.cancel()
            self._role_timer = None
        self._server._admit(self)

    def _authenticated(self) -> None:
        super()._authenticated()
        self.admit()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.peers.discard(self)
        self._server.pending.discard(self)
        self._server.established.discard(self)
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
    security: Security = LOCAL,
) -> Peer:
    """Open a connection (TLS and the handshake when ``security`` says so).

    The first exchange is bounded by ``security.handshake_timeout_s``: the
    handshake with a secret, else a PING the other side must answer as psctl,
    so a port that is not psctl (or a psctl process that does not answer) fails
    here and not at the first real request.

    ConnectError with one sentence if it cannot be made or the other side is not
    psctl; SecurityError if the other side fails TLS or the handshake. A server that
    refuses or drops the connection because a connection budget is full (ERROR code
    BUSY: many clients in their set-up at once, e.g. 80 workers of one host) is tried
    again after a growing pause; no new attempt starts ``timeout_s`` after the first one.
    """
    host, port = parse_address(address) if isinstance(address, str) else address
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    for attempt in itertools.count():
        try:
            return await _connect_once(host, port, service, max_frame_bytes, timeout_s, what, security)
        except _Busy as busy:
            left = deadline - loop.time()
            if left <= 0:
                raise ConnectError(str(busy)) from None
            pause = min(left, random.uniform(0.5, 1.0) * min(BUSY_RETRY_MAX_S, BUSY_RETRY_S * 2**attempt))
            log.info("%s; trying again in %.2f s", busy, pause)
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")


class _Busy(ConnectError):
    """The server refused or dropped the connection because a connection budget was full (code BUSY)."""


def _refused(peer: Peer, where: str) -> ConnectError:
    error = _Busy if peer.peer_error_code == BUSY else ConnectError
    return error(f"{where} refused the connection: {peer.peer_error}")


async def _connect_once(
    host: str, port: int, service: Service | None, max_frame_bytes: int, timeout_s: float, what: str, security: Security
) -> Peer:
    where = f"{what} at {host}:{port}"
    loop = asyncio.get_running_loop()
    svc = service or NullService()
    tls = security.tls.client_context if security.tls is not None else None
    try:
        async with asyncio.timeout(timeout_s):
            _, peer = await loop.create_connection(
                lambda: Peer(svc, max_frame_bytes=max_frame_bytes, name=what, security=security, quote_first_bytes=True),
                host,
                port,
                ssl=tls,
                server_hostname=host if tls else None,
                ssl_handshake_timeout=security.handshake_timeout_s if tls else None,
            )
    except TimeoutError:
        raise ConnectError(f"cannot reach {where}: no answer within {timeout_s:g} s") from None
    except ssl.SSLError as exc:
        reason = getattr(exc, "verify_message", None) or exc.reason or exc
        raise SecurityError(f"TLS with {where} failed: {reason} (does it use TLS, with a certificate for '{host}'?)") from None
    except OSError as exc:
        raise ConnectError(f"cannot reach {where}: {exc.strerror or exc}") from None
    try:
        if security.secret is not None:
            await _authenticate(peer, security, what, f"{host}:{port}")
        else:
            await _probe(peer, what, f"{host}:{port}", security.handshake_timeout_s)
    except BaseException:
        peer.close()
        raise
    finally:
        peer.first_bytes = None
    return peer


def _not_psctl(peer: Peer, hostport: str) -> str | None:
    """The sentence for a peer whose first answer was not psctl, or None if it may still be."""
    if peer.protocol_error is not None and peer.first_bytes:
        text = bytes(peer.first_bytes).decode("ascii", "backslashreplace").splitlines()[0][:_QUOTE_BYTES]
        return f"{hostport} is not a psctl process (it answered {text!r})"
    if peer.protocol_error is not None:
        return f"{hostport} is not a psctl process ({peer.protocol_error})"
    return None


async def _probe(peer: Peer, what: str, hostport: str, timeout_s: float) -> None:
    """Without a secret: a PING the other side must answer with a psctl frame within ``timeout_s``.

    Any reply counts, an ERROR too (a psctl service that does not serve PING still speaks psctl).
    """
    where = f"{what} at {hostport}"
    try:
        await peer.request(MsgType.PING, timeout_s=timeout_s)
    except RemoteError as exc:
        if exc.code == "auth_required":
            raise SecurityError(f"{where} refused this process: {exc}") from None
    except ConnectionLost:
        if (sentence := _not_psctl(peer, hostport)) is not None:
            raise ConnectError(sentence) from None
        if peer.peer_error is not None:
            raise _refused(peer, where) from None
        if not peer.is_open:
            raise ConnectError(f"{hostport} closed the connection without answering as psctl; is it the {what}?") from None
        raise ConnectError(f"{hostport} did not answer as psctl within {timeout_s:g} s; is it the {what}?") from None


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


async def _authenticate(peer: Peer, security: Security, what: str, hostport: str) -> None:
    """The client half of the handshake (psctl.protocol.handshake); the peer dispatches nothing else meanwhile."""
    assert security.secret is not None
    where = f"{what} at {hostport}"
    handshake = ClientHandshake(security.secret)
    timeout_s = security.handshake_timeout_s
    try:
        challenge = await peer.request(MsgType.AUTH_HELLO, handshake.hello(), timeout_s=timeout_s)
        answer = handshake.on_challenge(challenge.body)
        await peer.request(MsgType.AUTH_PROOF, answer, timeout_s=timeout_s)
    except HandshakeError as exc:
        raise SecurityError(f"{where} failed authentication: {exc}; refusing it") from None
    except RemoteError as exc:
        if exc.code == "no_secret":
            raise SecurityError(
                f"{where} runs without a shared secret, and this process has one; start it with the same secret"
            ) from None
        raise SecurityError(f"{where} refused this process: {exc}") from None
    except ConnectionLost as exc:
        if (sentence := _not_psctl(peer, hostport)) is not None:
            raise ConnectError(sentence) from None
        if peer.peer_error is not None:
            raise _refused(peer, where) from None
        if peer.is_open:
            raise ConnectError(
                f"{hostport} did not answer the psctl handshake within {timeout_s:g} s; is it the {what}?"
            ) from None
        raise SecurityError(f"{where} did not complete the handshake: {exc} (does it use TLS, or no secret?)") from None
    peer._authenticated()
    peer._drain()  # frames that arrived right behind the last handshake reply


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
