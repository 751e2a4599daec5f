"""Quiet requests (Flag.QUIET, a worker's push): answered only when they fail, acknowledged by
the next reply on the connection. Real peers on loopback; the service counts what it sends."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from psctl import net
from psctl.errors import RequestError
from psctl.protocol.wire import Flag, Message, MsgType

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


class Counter(net.NullService):
    """Takes quiet PUSHes (refusing one whose body says so), answers PINGs, holds PULLs until told."""

    quiet_types = frozenset({MsgType.PUSH})

    def __init__(self) -> None:
        self.pushes: list[int] = []
        self.held: list[asyncio.Future[Message]] = []
        self.pull_held = asyncio.Event()

    def handle(self, peer: net.Peer, msg: Message):
        if msg.type is MsgType.PING:
            return Message(MsgType.PING, {})
        if msg.type is MsgType.PUSH:
            if msg.body.get("refuse"):
                raise RequestError(f"push {msg.body['n']} refused")
            self.pushes.append(msg.body["n"])
            return None
        if msg.type is MsgType.PULL:
            fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
            self.held.append(fut)
            self.pull_held.set()
            return fut
        return super().handle(peer, msg)


@pytest.fixture
async def pair():
    service = Counter()
    server = net.Server(service, max_frame_bytes=1 << 20, name="counter")
    host, port = await server.start("127.0.0.1", 0)
    peer = await net.connect(f"{host}:{port}")
    frames_in: list[Message] = []
    dispatch = peer._dispatch

    def counting(msg: Message) -> None:
        frames_in.append(msg)
        dispatch(msg)

    peer._dispatch = counting  # what the client receives, frame by frame
    try:
        yield service, peer, frames_in
    finally:
        peer.close()
        await server.close()


async def test_quiet_requests_get_no_reply_and_the_next_reply_acknowledges_them(pair):
    service, peer, frames_in = pair
    futs = [peer.request_quiet(MsgType.PUSH, {"n": n}, [np.ones(4, np.float32)]) for n in range(3)]
    reply = await peer.request(MsgType.PING, {}, timeout_s=10)
    assert reply.type is MsgType.PING
    assert all(f.done() and f.result().type is MsgType.PUSH for f in futs)
    assert service.pushes == [0, 1, 2]  # handled in order, before the PING
    assert [m.type for m in frames_in] == [MsgType.PING]  # the PING's reply was the only frame back
    assert not peer._quiet and not peer._pending


async def test_a_failed_quiet_request_fails_alone_and_says_why(pair):
    service, peer, _ = pair
    ok = peer.request_quiet(MsgType.PUSH, {"n": 0})
    bad = peer.request_quiet(MsgType.PUSH, {"n": 1, "refuse": True})
    after = peer.request_quiet(MsgType.PUSH, {"n": 2})
    await peer.request(MsgType.PING, {}, timeout_s=10)
    assert ok.result().type is MsgType.PUSH and after.result().type is MsgType.PUSH
    with pytest.raises(net.RemoteError, match="push 1 refused"):
        bad.result()
    assert service.pushes == [0, 2]


async def test_a_reply_to_an_earlier_request_does_not_acknowledge_a_later_quiet_one(pair):
    """A pull held at a gate and answered after a quiet push was sent says nothing of the push:
    the push was sent after the pull, so only a reply to a request sent after it can."""
    service, peer, _ = pair
    pull = peer.request_nowait(MsgType.PULL, {})
    push = peer.request_quiet(MsgType.PUSH, {"n": 7})
    await asyncio.wait_for(service.pull_held.wait(), 10)
    service.held[0].set_result(Message(MsgType.PULL, {}))
    await asyncio.wait_for(pull, 10)
    assert not push.done()
    await peer.request(MsgType.PING, {}, timeout_s=10)
    assert push.done() and service.pushes == [7]


async def test_a_type_the_service_does_not_take_quiet_is_refused(pair):
    _, peer, _ = pair
    fut = peer.request_quiet(MsgType.STATUS, {})
    with pytest.raises(net.RemoteError, match="STATUS cannot be sent quiet") as info:
        await asyncio.wait_for(fut, 10)
    assert info.value.code == "bad_request"
    assert (await peer.request(MsgType.PING, {}, timeout_s=10)).type is MsgType.PING  # the connection serves on


async def test_quiet_requests_fail_when_the_connection_closes(pair):
    _, peer, _ = pair
    fut = peer.request_quiet(MsgType.PUSH, {"n": 0})
    peer.close()
    with pytest.raises(net.ConnectionLost):
        await asyncio.wait_for(fut, 10)
    assert not peer._quiet


def test_quiet_is_a_flag_of_requests_only():
    from psctl.protocol.wire import ProtocolError, decode_payload, encode

    frame = b"".join(bytes(p) for p in encode(Message(MsgType.PUSH, {"n": 1}, req_id=3, flags=Flag.QUIET)))
    msg = decode_payload(MsgType.PUSH, int(Flag.QUIET), 3, memoryview(frame)[24:], 1 << 20)
    assert msg.flags is Flag.QUIET and not msg.is_reply
    with pytest.raises(ProtocolError, match="unknown flag bits"):
        decode_payload(MsgType.PUSH, int(Flag.QUIET | Flag.REPLY), 3, memoryview(frame)[24:], 1 << 20)
