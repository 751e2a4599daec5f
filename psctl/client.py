"""The worker's (and driver's) view of the shards: key routing, concurrent pull/push."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from psctl import net
from psctl.wire import MsgType


class ShardClient:
    """Connections to every shard of one job; splits requests by key range.

    Requests to different shards go out concurrently; a push and the next
    pull may be pipelined on the same connection (replies match by id).
    """

    def __init__(self, peers: list[net.Peer], ranges: dict[str, list[tuple[int, int]]], job_id: str):
        self.peers = peers
        self.ranges = {name: [tuple(r) for r in rs] for name, rs in ranges.items()}
        self.job_id = job_id
        self.bytes_pulled = 0
        self.bytes_pushed = 0

    @classmethod
    async def connect(
        cls,
        addresses: list[str],
        ranges: dict[str, list[tuple[int, int]]],
        job_id: str,
        hello: dict[str, Any],
        *,
        max_frame_bytes: int,
        security: net.Security = net.LOCAL,
    ) -> ShardClient:
        peers = await asyncio.gather(
            *(
                net.connect(a, max_frame_bytes=max_frame_bytes, what=f"psctl shard {i}", security=security)
                for i, a in enumerate(addresses)
            )
        )
        client = cls(list(peers), ranges, job_id)
        await asyncio.gather(*(p.request(MsgType.HELLO, {"job_id": job_id, **hello}) for p in peers))
        return client

    async def pull(self, tables: list[str], clock: int = 0, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Whole tables, assembled from every shard's range (waits at the clock gate)."""
        futs = [p.request_nowait(MsgType.PULL, {"job_id": self.job_id, "tables": tables, "clock": clock}) for p in self.peers]
        replies = await asyncio.gather(*(p.wait_reply(f, timeout_s) for p, f in zip(self.peers, futs)))
        out = {}
        for i, name in enumerate(tables):
            parts = [r.arrays[i] for r in replies]
            self.bytes_pulled += sum(a.nbytes for a in parts)
            out[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out

    def push_nowait(self, grads: dict[str, np.ndarray], clock: int, count: int) -> list[asyncio.Future[Any]]:
        """Send each shard its slice of every gradient; return the ack futures."""
        names = list(grads)
        futs = []
        for i, peer in enumerate(self.peers):
            arrays = []
            for name in names:
                lo, hi = self.ranges[name][i]
                arrays.append(grads[name][lo:hi])
            self.bytes_pushed += sum(a.nbytes for a in arrays)
            body = {"job_id": self.job_id, "tables": names, "clock": clock, "count": count}
            futs.append(peer.request_nowait(MsgType.PUSH, body, arrays))
        return futs

    async def push(self, grads: dict[str, np.ndarray], clock: int, count: int, timeout_s: float | None = None) -> None:
        await self.wait_all(self.push_nowait(grads, clock, count), timeout_s)

    async def wait_all(self, futs: list[asyncio.Future[Any]], timeout_s: float | None = None) -> None:
        await asyncio.gather(*(p.wait_reply(f, timeout_s) for p, f in zip(self.peers, futs)))

    async def leave(self) -> None:
        await asyncio.gather(*(p.request(MsgType.LEAVE, {"job_id": self.job_id}) for p in self.peers))

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
