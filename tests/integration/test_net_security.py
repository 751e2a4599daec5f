"""The guarded connection in one process over loopback TCP: handshake framing, the
small pre-handshake parser, the connection limit, the budget of connections in their set-up,
set-up, role and mid-frame deadlines."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from psctl import net
from psctl.errors import ConnectError, SecurityError
from psctl.protocol import handshake
from psctl.protocol.wire import HEADER, Message, MsgType, encode_bytes

from .cluster import Hangups, RawClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

SECRET = b"0123456789abcdef-in-process"


class Recorder(net.NullService):
    """Answers PING with its arrays; remembers every peer it saw."""

    def __init__(self) -> None:
        self.seen: set[net.Peer] = set()
        self.lost: list[net.Peer] = []

    def handle(self, peer: net.Peer, msg: Message) -> net.Reply:
        self.seen.add(peer)
        if msg.type is MsgType.PING:
            if msg.body.get("admit", True):
                peer.admit()  # PING is this service's role (a test may ask it not to be)
            return Message(MsgType.PING, {"n": len(self.seen)}, msg.arrays)
        return super().handle(peer, msg)

    def peer_lost(self, peer: net.Peer, exc: BaseException | None) -> None:
        self.lost.append(peer)


async def serve(security: net.Security, **kwargs) -> tuple[net.Server, Recorder, tuple[str, int]]:
    service = Recorder()
    server = net.Server(service, max_frame_bytes=1 << 20, name="test", security=security, **kwargs)
    return server, service, await server.start("127.0.0.1", 0)


async def test_frames_pipelined_right_behind_the_handshake_are_served():
    server, service, address = await serve(net.Security(secret=SECRET))
    try:
        raw = await RawClient.open(address)
        hs = handshake.ClientHandshake(SECRET)
        raw.send(Message(MsgType.AUTH_HELLO, hs.hello(), req_id=1))
        challenge = await raw.frame()
        big = np.arange(100_000, dtype=np.float32)  # larger than the handshake parser takes
        raw.send(
            Message(MsgType.AUTH_PROOF, hs.on_challenge(challenge.body), req_id=2),
            Message(MsgType.PING, {}, [big], req_id=3),
        )
        assert (await raw.frame()).type is MsgType.AUTH_PROOF
        pong = await raw.frame()
        assert pong.req_id == 3 and np.array_equal(pong.arrays[0], big)
        raw.close()
    finally:
        await server.close()


async def test_before_the_handshake_a_large_frame_is_refused_at_its_header():
    server, service, address = await serve(net.Security(secret=SECRET))
    try:
        raw = await RawClient.open(address)
        raw.send(HEADER.pack(b"PSCT", 1, int(MsgType.PUSH), 0, 1, 100 << 20))
        (error,) = await raw.until_closed()
        assert error.type is MsgType.ERROR and f"exceeds the limit of {net.HANDSHAKE_MAX_FRAME_BYTES}" in error.body["message"]
        assert not service.seen and not service.lost  # the service never heard of it
    finally:
        await server.close()


@pytest.mark.parametrize(
    "first",
    [Message(MsgType.PING, {}, req_id=5), Message(MsgType.AUTH_PROOF, {"proof": "00" * 32}, req_id=5)],
    ids=["request", "proof-first"],
)
async def test_any_other_first_frame_is_answered_and_closed(first):
    server, service, address = await serve(net.Security(secret=SECRET))
    try:
        raw = await RawClient.open(address)
        raw.send(first, Message(MsgType.PING, {}, req_id=6))  # the second is never served
        (error,) = await raw.until_closed()
        assert error.type is MsgType.ERROR and error.req_id == 5 and error.body["code"] == "auth_required"
        assert not service.seen
    finally:
        await server.close()


async def test_a_server_that_speaks_before_the_handshake_is_refused():
    served = asyncio.Event()

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(encode_bytes(Message(MsgType.PING, {}, req_id=1)))
        await reader.read()  # until the client hangs up
        writer.close()
        await writer.wait_closed()
        served.set()

    listener = await asyncio.start_server(impostor, "127.0.0.1", 0)
    try:
        with pytest.raises(SecurityError, match="did not complete the handshake"):
            await net.connect(listener.sockets[0].getsockname()[:2], security=net.Security(secret=SECRET))
        await asyncio.wait_for(served.wait(), 5)
    finally:
        listener.close()


async def test_a_client_with_a_secret_refuses_a_server_without_one():
    server, service, address = await serve(net.LOCAL)
    try:
        with pytest.raises(SecurityError, match="runs without a shared secret, and this process has one"):
            await net.connect(address, security=net.Security(secret=SECRET))
    finally:
        await server.close()


async def test_the_connection_limit_turns_away_the_next_connection():
    server, service, address = await serve(net.LOCAL, max_connections=3)
    try:
        peers = [await net.connect(address) for _ in range(3)]
        for peer in peers:
            await peer.request(MsgType.PING, timeout_s=5)
        extra = await RawClient.open(address)
        (error,) = await extra.until_closed()
        assert "too many connections (limit 3)" in error.body["message"]
        assert (await peers[0].request(MsgType.PING, timeout_s=5)).type is MsgType.PING
        server_side = [p.closed for p in server.peers]
        peers[0].close()
        # The server's end of that connection closes: it leaves server.peers in the same callback.
        await asyncio.wait_for(asyncio.wait(server_side, return_when=asyncio.FIRST_COMPLETED), 10)
        assert len(server.peers) == 2
        late = await net.connect(address)  # a freed slot is usable again
        await late.request(MsgType.PING, timeout_s=5)
        late.close()
        for peer in peers[1:]:
            peer.close()
    finally:
        await server.close()


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
async def test_silent_and_stalled_peers_are_dropped_after_their_deadlines(secret):
    timeout_s = 0.5
    security = net.Security(secret=secret, handshake_timeout_s=timeout_s, idle_timeout_s=timeout_s)
    server, service, address = await serve(security)
    hangups = Hangups()
    try:
        silent = await RawClient.open(address)
        hangups.watch(silent, timeout_s=10)
        half_header = await RawClient.open(address)
        half_header.send(encode_bytes(Message(MsgType.PING, {}, req_id=1))[:10])
        hangups.watch(half_header, timeout_s=10)  # the set-up deadline started before: a lower bound
        stalled = await RawClient.open(address)
        if secret is not None:
            await stalled.authenticate(secret)
        else:
            stalled.send(Message(MsgType.PING, {}, req_id=1))
            assert (await stalled.frame()).type is MsgType.PING
        stalled.send(encode_bytes(Message(MsgType.PING, {}, [np.zeros(1000)], req_id=2))[:4000])
        hangups.watch(stalled, timeout_s=10)
        good = await net.connect(address, security=security)
        while not hangups.done:  # a healthy peer is served meanwhile
            assert (await good.request(MsgType.PING, timeout_s=5)).type is MsgType.PING
        for frames in hangups.frames.values():
            assert frames and frames[-1].type is MsgType.ERROR, frames
            assert "within 0.5 s" in frames[-1].body["message"] or "for 0.5 s" in frames[-1].body["message"]
        assert len(hangups.frames) == 3
        # Not before the deadline (less the moments between its start and ours), and not long after.
        assert all(timeout_s * 0.8 <= after <= timeout_s + 5 for after in hangups.after_s.values()), hangups.after_s
        assert (await good.request(MsgType.PING, timeout_s=5)).type is MsgType.PING
        good.close()
    finally:
        hangups.cancel()
        await server.close()


class TooMany(net.NullService):
    def handle(self, peer: net.Peer, msg: Message) -> net.Reply:
        return Message(MsgType.PING, {}, [np.zeros(1)] * 100)  # more arrays than a frame carries


async def test_a_reply_the_wire_cannot_carry_is_an_internal_error_not_a_dropped_peer():
    server = net.Server(TooMany(), max_frame_bytes=1 << 20, name="test")
    address = await server.start("127.0.0.1", 0)
    try:
        peer = await net.connect(address)
        for _ in range(2):  # and the connection stays usable
            with pytest.raises(net.RemoteError, match="internal error: a message carries at most 64 arrays") as info:
                await peer.request(MsgType.PING, timeout_s=5)
            assert info.value.code == "internal"
        peer.close()
    finally:
        await server.close()


async def _listener(answer: bytes | None) -> tuple[asyncio.Server, tuple[str, int]]:
    """A TCP listener that is not psctl: it answers every connection with ``answer`` (None: silence)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if answer is not None:
            writer.write(answer)
        await reader.read()  # until the client hangs up
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    return listener, listener.sockets[0].getsockname()[:2]


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
async def test_connecting_to_a_port_that_answers_http_says_it_is_not_psctl(secret):
    listener, (host, port) = await _listener(b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/html\r\n\r\n" + b"x" * 200)
    try:
        started = loop_time()
        with pytest.raises(ConnectError) as info:
            await net.connect((host, port), security=net.Security(secret=secret, handshake_timeout_s=5))
        assert str(info.value) == f"{host}:{port} is not a psctl process (it answered 'HTTP/1.0 400 Bad Request')"
        assert loop_time() - started < 5  # it does not wait for the deadline
    finally:
        listener.close()


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
async def test_connecting_to_a_silent_port_fails_at_the_handshake_deadline(secret):
    timeout_s = 0.5
    listener, (host, port) = await _listener(None)
    try:
        started = loop_time()
        with pytest.raises(ConnectError, match=rf"^{host}:{port} did not answer (as psctl|the psctl handshake) within 0.5 s"):
            await net.connect((host, port), security=net.Security(secret=secret, handshake_timeout_s=timeout_s))
        assert timeout_s <= loop_time() - started < timeout_s + 5
    finally:
        listener.close()


async def test_a_psctl_server_at_its_connection_limit_is_named_as_the_refusal():
    server, service, address = await serve(net.LOCAL, max_connections=1)
    try:
        first = await net.connect(address)
        started = loop_time()
        with pytest.raises(ConnectError, match=r"refused the connection: too many connections \(limit 1\)"):
            await net.connect(address, timeout_s=0.5)  # tried again (the server said BUSY) until the deadline
        assert 0.4 <= loop_time() - started < 5
        first.close()
    finally:
        await server.close()


def loop_time() -> float:
    return asyncio.get_running_loop().time()


UNDECIDED = Message(MsgType.PING, {"admit": False}, req_id=1)  # answered, but takes no role


async def _undecided(address: tuple[str, int], source: str) -> RawClient:
    """A connection the server has accepted (it answered) that stays in its set-up."""
    client = await RawClient.open(address, source)
    client.send(UNDECIDED)
    assert (await client.frame()).type is MsgType.PING
    return client


async def test_without_a_secret_a_peer_that_takes_no_role_is_dropped_at_the_role_deadline():
    timeout_s = 0.5
    server, service, address = await serve(net.Security(role_timeout_s=timeout_s))
    hangups = Hangups()
    try:
        admitted = await net.connect(address)  # its PING takes a role
        undecided = await _undecided(address, "127.0.0.1")
        hangups.watch(undecided, timeout_s=10)
        while not hangups.done:  # the admitted peer is served meanwhile, and after
            assert (await admitted.request(MsgType.PING, timeout_s=5)).type is MsgType.PING
        (frames,) = hangups.frames.values()
        assert frames[-1].type is MsgType.ERROR
        assert frames[-1].body["message"] == "did not say what it is (HELLO or REGISTER) within 0.5 s"
        assert all(timeout_s * 0.8 <= after <= timeout_s + 5 for after in hangups.after_s.values()), hangups.after_s
        assert (await admitted.request(MsgType.PING, timeout_s=5)).type is MsgType.PING
        admitted.close()
    finally:
        hangups.cancel()
        await server.close()


async def test_connections_in_their_set_up_have_their_own_budget_shared_by_address():
    security = net.Security(max_connections=2, max_pending_connections=4, max_pending_per_source=2)
    server, service, address = await serve(security)
    try:
        a = await _undecided(address, "127.0.0.1")
        b = await _undecided(address, "127.0.0.1")
        c = await _undecided(address, "127.0.0.1")  # a third from one address: its longest silent goes
        (told,) = await a.until_closed()
        assert told.body["message"] == (
            "too many connections from 127.0.0.1 still in their set-up (limit 2); dropped the one silent longest"
        )
        d = await _undecided(address, "127.0.0.2")
        e = await _undecided(address, "127.0.0.3")  # the budget is full now: b, c, d, e
        f = await _undecided(address, "127.0.0.3")  # room is made at the address with the most (127.0.0.1)
        (told,) = await b.until_closed()
        assert told.body["message"] == (
            "too many connections still in their set-up (limit 4); dropped the one silent longest of the address with the most"
        )
        for alive in (c, d, e, f):
            alive.send(UNDECIDED)
            assert (await alive.frame()).type is MsgType.PING
        # They do not take the slots of established connections.
        established = [await net.connect(address) for _ in range(2)]
        with pytest.raises(ConnectError, match=r"refused the connection: too many connections \(limit 2\)"):
            await net.connect(address, timeout_s=0.5)
        for peer in established:
            assert (await peer.request(MsgType.PING, timeout_s=5)).type is MsgType.PING
            peer.close()
    finally:
        await server.close()


@pytest.mark.parametrize("secret", [None, SECRET])
async def test_many_clients_of_one_address_at_once_all_get_in(secret):
    """More clients of one host than its share of the set-up budget, all at once (80 workers
    of one machine starting): the ones dropped to make room are told BUSY and try again, so
    every one connects; none reports the refusal."""
    security = net.Security(secret=secret, max_pending_connections=4, max_pending_per_source=2)
    server, service, address = await serve(security)
    try:
        peers = await asyncio.gather(*(net.connect(address, security=security, timeout_s=30) for _ in range(24)))
        for peer in peers:
            assert (await peer.request(MsgType.PING, timeout_s=5)).type is MsgType.PING
            peer.close()
    finally:
        await server.close()


async def test_with_a_secret_a_refused_client_says_why_it_was_refused():
    security = net.Security(secret=SECRET, max_connections=1)
    server, service, address = await serve(security)
    try:
        first = await net.connect(address, security=security)
        with pytest.raises(ConnectError, match=r"refused the connection: too many connections \(limit 1\)$"):
            await net.connect(address, security=security, timeout_s=0.5)
        first.close()
    finally:
        await server.close()
