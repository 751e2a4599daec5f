"""The worker's (and driver's) view of the shards: key routing, concurrent pull/push."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

import numpy as np

from psctl import net
from psctl.core.sparse import narrow_keys, route_keys
from psctl.core.tables import split_keys
from psctl.protocol.wire import MsgType


class ShardClient:
    """Connections to every shard of one job; splits requests by key range, or by key
    hash for the tables named in ``hashed`` (sparse tables).

    Requests to different shards go out concurrently; a push and the next
    pull may be pipelined on the same connection (replies match by id).
    Keys travel in the smallest unsigned type their table's key space allows.
    """

    def __init__(
        self, peers: list[net.Peer], ranges: dict[str, list[tuple[int, int]]], job_id: str, hashed: Collection[str] = ()
    ):
        self.peers = peers
        self.ranges = {name: [tuple(r) for r in rs] for name, rs in ranges.items()}
        self.hashed = frozenset(hashed)
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
        hashed: Collection[str] = (),
        security: net.Security = net.LOCAL,
    ) -> ShardClient:
        peers = await asyncio.gather(
            *(
                net.connect(a, max_frame_bytes=max_frame_bytes, what=f"psctl shard {i}", security=security)
                for i, a in enumerate(addresses)
            )
        )
        client = cls(list(peers), ranges, job_id, hashed)
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

    async def pull_rows(
        self, keys: dict[str, np.ndarray], clock: int = 0, timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        """The rows ``keys[table]`` (sorted, unique) of each table, in that order.

        Only shards that own some of the keys are asked.
        """
        names = list(keys)
        splits = {n: self._split(n, keys[n]) for n in names}
        asked = []
        for i, peer in enumerate(self.peers):
            arrays = [self._wire_keys(n, keys[n][splits[n][i]]) for n in names]
            if any(len(a) for a in arrays):
                self.bytes_pulled += sum(a.nbytes for a in arrays)
                body = {"job_id": self.job_id, "tables": names, "clock": clock, "keyed": True}
                asked.append((i, peer, peer.request_nowait(MsgType.PULL, body, arrays)))
        replies = await asyncio.gather(*(p.wait_reply(f, timeout_s) for _, p, f in asked))
        out: dict[str, np.ndarray] = {}
        for t, name in enumerate(names):
            parts = [(splits[name][i], r.arrays[t]) for (i, _, _), r in zip(asked, replies)]
            template = parts[0][1] if parts else np.empty(0, dtype=np.float32)
            rows = np.empty((len(keys[name]), *template.shape[1:]), dtype=template.dtype)
            for where, values in parts:
                rows[where] = values
                self.bytes_pulled += values.nbytes
            out[name] = rows
        return out

    def push_rows_nowait(
        self, grads: dict[str, tuple[np.ndarray, np.ndarray]], clock: int, count: int
    ) -> list[asyncio.Future[Any]]:
        """Push (sorted unique keys, gradient rows) per table. Every shard gets a push
        (perhaps empty) because a push is also how a shard learns the worker's clock."""
        names = list(grads)
        splits = {n: self._split(n, grads[n][0]) for n in names}
        futs = []
        for i, peer in enumerate(self.peers):
            arrays = []
            for n in names:
                keys, rows = grads[n]
                arrays += [self._wire_keys(n, keys[splits[n][i]]), rows[splits[n][i]]]
            self.bytes_pushed += sum(a.nbytes for a in arrays)
            body = {"job_id": self.job_id, "tables": names, "clock": clock, "count": count, "keyed": True}
            futs.append(peer.request_nowait(MsgType.PUSH, body, arrays))
        return futs

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

    def _split(self, name: str, keys: np.ndarray) -> list[Any]:
        """Per shard, the positions in sorted ``keys`` it owns (slices or index arrays)."""
        if name in self.hashed:
            return route_keys(keys, len(self.peers))
        return split_keys(keys, self.ranges[name])

    def _wire_keys(self, name: str, keys: np.ndarray) -> np.ndarray:
        return narrow_keys(keys, max(hi for _, hi in self.ranges[name]))

    async def dump(
        self, tables: list[str], with_state: bool = False, timeout_s: float | None = None
    ) -> dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        """Every stored key of each table with its values (and optimizer state), sorted by key (drivers only)."""
        body = {"job_id": self.job_id, "tables": tables, "dump": True, "with_state": with_state}
        futs = [p.request_nowait(MsgType.PULL, body) for p in self.peers]
        replies = await asyncio.gather(*(p.wait_reply(f, timeout_s) for p, f in zip(self.peers, futs)))
        out = {}
        for name in tables:
            keys, values, state = [], [], {}
            for r in replies:
                at = _dump_offset(r.body["state"], tables, name)
                state_names = r.body["state"][name]
                keys.append(r.arrays[at])
                values.append(r.arrays[at + 1])
                for j, s in enumerate(state_names):
                    state.setdefault(s, []).append(r.arrays[at + 2 + j])
            all_keys = np.concatenate(keys)
            order = np.argsort(all_keys, kind="stable")
            self.bytes_pulled += sum(a.nbytes for a in keys + values)
            out[name] = (all_keys[order], np.concatenate(values)[order], {s: np.concatenate(p)[order] for s, p in state.items()})
        return out

    async def status(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Each shard's STATUS body (keys, bytes, memory), in shard order."""
        return [r.body for r in await asyncio.gather(*(p.request(MsgType.STATUS, {}, timeout_s=timeout_s) for p in self.peers))]

    async def push(self, grads: dict[str, np.ndarray], clock: int, count: int, timeout_s: float | None = None) -> None:
        await self.wait_all(self.push_nowait(grads, clock, count), timeout_s)

    async def wait_all(self, futs: list[asyncio.Future[Any]], timeout_s: float | None = None) -> None:
        await asyncio.gather(*(p.wait_reply(f, timeout_s) for p, f in zip(self.peers, futs)))

    async def leave(self) -> None:
        await asyncio.gather(*(p.request(MsgType.LEAVE, {"job_id": self.job_id}) for p in self.peers))

    # -- what workers use: whole tables where keys are None, rows otherwise ----------
    def _full_keys(self, keys: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        # A model mixing keyed and whole tables sends everything keyed: one request per shard keeps one clock.
        return {n: k if k is not None else np.arange(self.ranges[n][-1][1]) for n, k in keys.items()}

    async def pull_for(self, keys: dict[str, np.ndarray | None], clock: int = 0) -> dict[str, np.ndarray]:
        if all(k is None for k in keys.values()):
            return await self.pull(list(keys), clock)
        return await self.pull_rows(self._full_keys(keys), clock)

    def push_for_nowait(
        self, keys: dict[str, np.ndarray | None], grads: dict[str, np.ndarray], clock: int, count: int
    ) -> list[asyncio.Future[Any]]:
        if all(k is None for k in keys.values()):
            return self.push_nowait(grads, clock, count)
        full = self._full_keys(keys)
        return self.push_rows_nowait({n: (full[n], grads[n]) for n in keys}, clock, count)

    def close(self) -> None:
        for peer in self.peers:
            peer.close()


def _dump_offset(state_names: dict[str, list[str]], tables: list[str], name: str) -> int:
    """Where ``name``'s arrays start in a dump reply: each table sends keys, values, then its state."""
    at = 0
    for t in tables:
        if t == name:
            return at
        at += 2 + len(state_names[t])
    raise KeyError(name)
