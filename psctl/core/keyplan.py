"""One step's keys routed to the shards once: what each shard is sent, and where its reply goes.

A worker's step pulls the rows its batch touches and then pushes a gradient for
the same rows. :class:`KeyPlan` does the routing for both: per shard, the
positions of its keys in each table's (sorted, unique) key array, the keys in
the narrowest type the wire carries, and the inverse, :meth:`KeyPlan.scatter`,
that puts each shard's reply rows back in key order. :meth:`KeyPlan.gather`
cuts an array laid out like the pull's result (a gradient) into the same
per-shard parts, so ``scatter(gather(x)) == x``. Pure numpy; ps-lite's Slice.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from psctl.core.sparse import narrow_keys, route_keys
from psctl.core.tables import split_keys

Where = slice | np.ndarray  # positions in a table's keys: a slice (key ranges) or an index array (hashing)


@dataclass(frozen=True)
class Routing:
    """How one job's tables are split across its shards."""

    ranges: Mapping[str, list[tuple[int, int]]]  # per table, each shard's key range [lo, hi)
    hashed: frozenset[str]  # tables routed by key hash (sparse tables)

    @classmethod
    def of(cls, ranges: Mapping[str, Any], hashed: Collection[str] = ()) -> Routing:
        return cls({name: [(int(lo), int(hi)) for lo, hi in rs] for name, rs in ranges.items()}, frozenset(hashed))

    @property
    def n_shards(self) -> int:
        return len(next(iter(self.ranges.values()))) if self.ranges else 0

    def rows(self, name: str) -> int:
        """The table's key space: keys are below this."""
        return self.ranges[name][-1][1]


class KeyPlan:
    """The keys of one step, per table (None: the whole table), routed to shards once.

    A plan is *keyed* when some table has keys: then every table travels keyed (a
    whole one as all its keys), so a shard gets one request per step, at one clock.
    An unkeyed plan asks every shard for its whole range and sends no keys.
    """

    def __init__(self, routing: Routing, keys: Mapping[str, np.ndarray | None]):
        self.names = list(keys)
        unknown = [n for n in self.names if n not in routing.ranges]
        if unknown:
            raise KeyError(f"no routing for table {unknown[0]!r}")
        n_shards = routing.n_shards
        self.keyed = any(k is not None for k in keys.values())
        self.sizes: dict[str, int] = {}
        # where[i][t]: positions of shard i's part in table t's keys (or rows, unkeyed)
        self.where: list[list[Where]] = [[] for _ in range(n_shards)]
        self.wire_keys: list[list[np.ndarray]] = [[] for _ in range(n_shards)]
        for name in self.names:
            k = keys[name]
            if not self.keyed:
                self.sizes[name] = routing.rows(name)
                for i, (lo, hi) in enumerate(routing.ranges[name]):
                    self.where[i].append(slice(lo, hi))
                continue
            k = np.arange(routing.rows(name)) if k is None else k
            self.sizes[name] = len(k)
            parts = route_keys(k, n_shards) if name in routing.hashed else split_keys(k, routing.ranges[name])
            rows = routing.rows(name)
            for i, where in enumerate(parts):
                self.where[i].append(where)
                self.wire_keys[i].append(narrow_keys(k[where], rows))
        # A keyed pull asks only the shards that own some key; an unkeyed one asks them all.
        self.pull_shards = [
            i for i in range(n_shards) if not self.keyed or any(len(a) for a in self.wire_keys[i])
        ]
        if self.keyed and not self.pull_shards and n_shards:
            # A batch that touches no key (rows with no features) still gets each table's
            # row shape ((0, dim) for an embedding) from a shard's empty reply.
            self.pull_shards = [0]
        self.n_shards = n_shards

    def gather(self, values: Mapping[str, np.ndarray]) -> list[list[np.ndarray]]:
        """Per shard, its part of each table's array (laid out as :meth:`scatter` returns it)."""
        return [[values[n][w] for n, w in zip(self.names, self.where[i])] for i in range(self.n_shards)]

    def scatter(self, parts: Mapping[int, list[np.ndarray]]) -> dict[str, np.ndarray]:
        """Each table's rows in key order, from the shards' parts (those in :attr:`pull_shards`)."""
        out: dict[str, np.ndarray] = {}
        for t, name in enumerate(self.names):
            got = [(self.where[i][t], parts[i][t]) for i in self.pull_shards]
            if len(got) == 1 and _covers(got[0][0], self.sizes[name]):
                out[name] = got[0][1]  # one shard holds it all: no copy
                continue
            template = got[0][1] if got else np.empty(0, dtype=np.float32)
            rows = np.empty((self.sizes[name], *template.shape[1:]), dtype=template.dtype)
            for where, values in got:
                rows[where] = values
            out[name] = rows
        return out

    def pull_arrays(self, shard: int) -> list[np.ndarray]:
        """What a pull sends shard ``shard``: its keys of every table (nothing, unkeyed)."""
        return list(self.wire_keys[shard]) if self.keyed else []

    def push_arrays(self, shard: int, grads: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """What a push sends shard ``shard``: (keys, rows) per table keyed, its rows of each table otherwise."""
        rows = [grads[n][w] for n, w in zip(self.names, self.where[shard])]
        if not self.keyed:
            return rows
        return [a for pair in zip(self.wire_keys[shard], rows) for a in pair]


def _covers(where: Where, size: int) -> bool:
    if isinstance(where, slice):
        return where.start == 0 and where.stop == size
    return len(where) == size  # a hash route of every key: positions 0..size-1 in order
