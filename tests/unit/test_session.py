"""The control session: its EVENT inbox and close semantics, and the heartbeat thread
against a real server on loopback."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from psctl import net
from psctl.cluster import session as session_mod
from psctl.cluster.session import EventTimeout, Heartbeat, Session, SessionClosed
from psctl.errors import RequestError
from psctl.protocol.wire import Message, MsgType

pytestmark = pytest.mark.timeout(30)

SECRET = b"0123456789abcdef-session-test"


def event(kind: str, **body: object) -> Message:
    return Message(MsgType.EVENT, {"kind": kind, **body})


async def test_events_come_out_in_order_and_a_wait_is_bounded():
    s = Session()
    s.handle(None, event("a"))  # type: ignore[arg-type]
    s.handle(None, event("b"))  # type: ignore[arg-type]
    assert [(await s.next_event(1))["kind"] for _ in range(2)] == ["a", "b"]
    started = time.monotonic()
    with pytest.raises(EventTimeout, match="no event from the psctl coordinator within 0.2 s"):
        await s.next_event(0.2)
    assert time.monotonic() - started >= 0.2
    s.handle(None, event("c"))  # type: ignore[arg-type]
    assert (await s.next_event(1))["kind"] == "c"  # a timed-out wait lost nothing


async def test_close_fails_a_pending_wait_with_the_cause_after_the_events_before_it():
    closed: list[BaseException] = []
    s = Session(on_close=closed.append)
    waiting = asyncio.ensure_future(s.next_event(10))
    await asyncio.sleep(0)  # the wait is under way (one loop turn, not a timing guess)
    cause = RuntimeError("the job ended")
    s.close(cause)
    with pytest.raises(SessionClosed, match="the job ended") as info:
        await waiting
    assert info.value.__cause__ is cause and closed == [cause]
    s2 = Session()
    s2.handle(None, event("failed", reason="x"))  # type: ignore[arg-type]
    s2.peer_lost(None, ConnectionResetError("reset"))  # type: ignore[arg-type]
    assert (await s2.next_event(1))["kind"] == "failed"  # what came before the close is still read
    with pytest.raises(SessionClosed, match="^lost the connection to the psctl coordinator$") as info:
        await s2.next_event(1)
    assert isinstance(info.value.__cause__, net.ConnectionLost)
    assert isinstance(info.value.__cause__.__cause__, ConnectionResetError)
    with pytest.raises(SessionClosed):
        s2.notify(MsgType.PROGRESS, {})  # nothing is sent on a closed session
    s2.close()  # closing twice is harmless; the first cause stays
    with pytest.raises(SessionClosed, match="^lost the connection"):
        await s2.next_event(1)


async def test_requests_go_to_their_handlers_events_to_the_hook():
    seen: list[dict] = []
    s = Session(requests={MsgType.PAUSE: lambda msg: Message(MsgType.PAUSE, {"clock": 3})}, on_event=seen.append, keep_events=False)
    reply = s.handle(None, Message(MsgType.PAUSE, {}))  # type: ignore[arg-type]
    assert reply is not None and reply.body == {"clock": 3}
    with pytest.raises(RequestError, match="unexpected RESUME"):
        s.handle(None, Message(MsgType.RESUME, {}))  # type: ignore[arg-type]
    s.handle(None, event("stop"))  # type: ignore[arg-type]
    assert seen == [{"kind": "stop"}]
    with pytest.raises(EventTimeout):  # keep_events=False: the hook saw it, the inbox did not
        await s.next_event(0.05)


async def test_an_unread_inbox_drops_its_oldest_events(monkeypatch, caplog):
    monkeypatch.setattr(session_mod, "MAX_INBOX_EVENTS", 3)
    s = Session()
    for i in range(5):
        s.handle(None, event("progress", i=i))  # type: ignore[arg-type]
    assert [(await s.next_event(1))["i"] for _ in range(3)] == [2, 3, 4]
    assert "events unread; dropping the oldest" in caplog.text


class Beats(net.NullService):
    """A coordinator stand-in: records HEARTBEAT bodies; refuses them while ``refuse`` is set;
    drops each connection after ``drop_after`` heartbeats."""

    def __init__(self, refuse: bool = False, drop_after: int | None = None) -> None:
        self.bodies: list[dict] = []
        self.peers: set[net.Peer] = set()
        self.refuse, self.drop_after = refuse, drop_after
        self.arrived = asyncio.Event()

    def handle(self, peer: net.Peer, msg: Message) -> net.Reply:
        if msg.type is not MsgType.HEARTBEAT:
            return super().handle(peer, msg)
        self.peers.add(peer)
        self.arrived.set()
        if self.refuse:
            raise RequestError("this session does not hold the worker's slot", code="no_session")
        self.bodies.append(msg.body)
        if self.drop_after is not None and len(self.bodies) % self.drop_after == 0:
            peer.abort(net.ConnectionLost("dropped by the test"))
        return None


async def serve(service: Beats, security: net.Security = net.LOCAL) -> tuple[net.Server, tuple[str, int]]:
    server = net.Server(service, max_frame_bytes=1 << 20, name="test", security=security)
    return server, await server.start("127.0.0.1", 0)


async def until(predicate, arrived: asyncio.Event, timeout_s: float = 10) -> None:
    """Wait until ``predicate`` holds; it is checked again at each arrival from the heartbeat thread."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        arrived.clear()
        await asyncio.wait_for(arrived.wait(), max(deadline - time.monotonic(), 0))


SLOT = {"job_id": "j-1", "worker_id": 2, "session": "ab" * 16}


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
async def test_the_heartbeat_thread_sends_the_slot_and_progress_until_stopped(secret):
    security = net.Security(secret=secret)
    service = Beats()
    server, address = await serve(service, security)
    progress = {"clock": 0, "samples": 0}
    beat = Heartbeat(address, security, SLOT, lambda: (progress["clock"], progress["samples"]), 0.02)
    try:
        beat.start()
        await until(lambda: len(service.bodies) >= 2, service.arrived)
        progress.update(clock=7, samples=700)
        await until(lambda: service.bodies[-1]["clock"] == 7, service.arrived)
        body = service.bodies[-1]
        assert {k: body[k] for k in SLOT} == SLOT and body["samples_s"] >= 0
        assert any(b["samples_s"] > 0 for b in service.bodies)
        assert len(service.peers) == 1 and beat.failures == 0  # one connection, kept
    finally:
        beat.stop()
        await asyncio.to_thread(beat._thread.join, 5)
        await server.close()
    assert not beat.alive


async def test_a_dropped_heartbeat_connection_is_opened_again_and_logged(caplog):
    caplog.set_level(logging.WARNING, "psctl.session")
    service = Beats(drop_after=2)
    server, address = await serve(service)
    beat = Heartbeat(address, net.LOCAL, SLOT, lambda: (0, 0), 0.02)
    try:
        beat.start()
        await until(lambda: len(service.bodies) >= 6, service.arrived)
        assert len(service.peers) >= 3 and beat.failures >= 2 and beat.alive
    finally:
        beat.stop()
        await asyncio.to_thread(beat._thread.join, 5)
        await server.close()
    assert "heartbeat to the psctl coordinator failed" in caplog.text


async def test_refused_heartbeats_are_counted_not_raised_and_nobody_listening_is_retried(caplog):
    caplog.set_level(logging.WARNING, "psctl.session")
    service = Beats(refuse=True)
    server, address = await serve(service)
    beat = Heartbeat(address, net.LOCAL, SLOT, lambda: (0, 0), 0.02)
    try:
        beat.start()
        await until(lambda: beat.refusals >= 3, service.arrived)
        assert beat.answered.is_set() and beat.sent == 0 and len(service.peers) == 1
    finally:
        beat.stop()
        await asyncio.to_thread(beat._thread.join, 5)
        await server.close()
    assert "refused a heartbeat: this session does not hold the worker's slot" in caplog.text


async def test_a_listener_that_hangs_up_at_once_is_retried_with_backoff():
    arrived, times = asyncio.Event(), []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        times.append(time.monotonic())
        arrived.set()
        writer.close()

    listener = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    beat = Heartbeat(listener.sockets[0].getsockname()[:2], net.LOCAL, SLOT, lambda: (0, 0), 0.02)
    try:
        beat.start()
        await until(lambda: len(times) >= 4, arrived)
        assert beat.alive and beat.sent == 0
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert gaps[-1] >= 0.04  # the wait doubles: 0.02, 0.04, 0.08 s ...
    finally:
        beat.stop()
        await asyncio.to_thread(beat._thread.join, 5)
        listener.close()
    assert not beat.alive and beat.failures >= 3
