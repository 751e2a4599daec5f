"""A connection that sent a malformed frame is freed when it closes, not when the cycle collector runs.

Driven with an in-memory transport (no sockets). Each Peer owns a parser with a 256 KiB
staging buffer; a fuzzer's thousands of refused connections, each kept alive by a reference
cycle until the collector ran, grew a shard's resident memory by about 5 KB per hostile frame
(the allocator keeps freed memory for reuse).
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest

from psctl.net import transport
from psctl.net.transport import NullService, Peer
from psctl.protocol.wire import HEADER


class FakeTransport:
    """What Peer uses of a transport; closing it reports connection_lost on the next loop turn."""

    def __init__(self, peer: Peer):
        self.peer: Peer | None = peer
        self.closing = False
        self.written: list[bytes] = []

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def writelines(self, parts: list[bytes]) -> None:
        self.written.append(b"".join(parts))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing and self.peer is not None:
            self.closing = True
            peer, self.peer = self.peer, None
            asyncio.get_running_loop().call_soon(peer.connection_lost, None)

    abort = close


@pytest.mark.parametrize("data", [b"x" * 30, HEADER.pack(b"PSCT", 1, 250, 0, 0, 8) + bytes(8)], ids=["not-psctl", "unknown-type"])
async def test_a_peer_that_sent_a_malformed_frame_is_freed_by_reference_counting(monkeypatch, data):
    monkeypatch.setattr(transport, "CLOSE_GRACE_S", 0.01)  # the timer that holds a closing peer a moment
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        peer = Peer(NullService())
        fake = FakeTransport(peer)
        peer.connection_made(fake)  # type: ignore[arg-type]
        buf = peer.get_buffer(-1)
        buf[: len(data)] = data
        del buf
        peer.buffer_updated(len(data))
        assert peer.protocol_error is not None and fake.closing
        assert b"protocol" in fake.written[-1]  # the peer was told why
        gone = weakref.ref(peer)
        del peer, fake
        deadline = time.monotonic() + 5
        while gone() is not None:
            assert time.monotonic() < deadline, "the closed peer is only reachable through a reference cycle"
            await asyncio.sleep(0.01)  # a turn for connection_lost and the close-grace timer
    finally:
        if was_enabled:
            gc.enable()
