"""The clock gate and sync aggregation: pure bookkeeping, no I/O.

Every worker has a clock c: the number of steps whose push a shard has
received. A pull by a worker at clock c may be answered when

    min(live clocks) >= c - staleness

with staleness 0 for sync, s for ssp and None (infinity) for async. A
worker that leaves is dropped from the live set, so no gate waits on it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from psctl.core.shard_errors import MixedPush

MODES = ("sync", "ssp", "async")


def staleness_for(mode: str, staleness: int) -> int | None:
    """The gate's bound for a mode: 0 (sync), s (ssp) or None (async)."""
    if mode == "sync":
        return 0
    if mode == "ssp":
        if staleness < 0:
            raise ValueError("staleness must be >= 0")
        return staleness
    if mode == "async":
        return None
    raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")


class ClockGate:
    """Clocks of the live workers plus the pulls waiting on them.

    Waiters are opaque tokens; :meth:`advance` and :meth:`remove` return the
    tokens that became answerable, in the order they can be served.
    """

    def __init__(self, workers: Iterable[int], staleness: int | None):
        self.staleness = staleness
        self.clocks: dict[int, int] = {w: 0 for w in workers}
        self._waiters: list[tuple[int, int, Any]] = []  # (needed min clock, seq, token)
        self._seq = itertools.count()

    def min_clock(self) -> int | None:
        """Clock of the slowest live worker; None when nobody is live."""
        return min(self.clocks.values()) if self.clocks else None

    def can_read(self, clock: int) -> bool:
        low = self.min_clock()
        return self.staleness is None or low is None or low >= clock - self.staleness

    def wait(self, clock: int, token: Any) -> bool:
        """True if a pull at ``clock`` may be answered now; else queue ``token``."""
        if self.can_read(clock):
            return True
        assert self.staleness is not None
        heapq.heappush(self._waiters, (clock - self.staleness, next(self._seq), token))
        return False

    def advance(self, worker: int, clock: int) -> list[Any]:
        """Record that ``worker`` reached ``clock``; return the tokens now ready."""
        if worker in self.clocks:
            if clock < self.clocks[worker]:
                raise ValueError(f"worker {worker} clock went back from {self.clocks[worker]} to {clock}")
            self.clocks[worker] = clock
        return self._release()

    def add(self, worker: int, clock: int) -> None:
        """A worker joins the live set at ``clock`` (a replacement resumes where its predecessor stopped)."""
        self.clocks[worker] = clock

    def remove(self, worker: int) -> list[Any]:
        """Drop ``worker`` from the live set; return the tokens now ready."""
        self.clocks.pop(worker, None)
        return self._release()

    def drain(self) -> list[Any]:
        """Every queued token (the job is ending: answer them all)."""
        ready = [t for _, _, t in sorted(self._waiters)]
        self._waiters.clear()
        return ready

    def waiting(self) -> int:
        return len(self._waiters)

    def discard(self, tokens: Collection[Any]) -> None:
        """Forget queued ``tokens`` (their requester went away): they are never returned."""
        kept = [w for w in self._waiters if w[2] not in tokens]
        if len(kept) != len(self._waiters):
            heapq.heapify(kept)
            self._waiters = kept

    def _release(self) -> list[Any]:
        low = self.min_clock()
        ready = []
        while self._waiters and (low is None or self._waiters[0][0] <= low):
            ready.append(heapq.heappop(self._waiters)[2])
        return ready


Grad = tuple[np.ndarray | None, np.ndarray]  # (sorted unique keys, or None for the whole table; values)


@dataclass
class _Pending:
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    keyed: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    count: int = 0
    sums: bool | None = None  # None until a push with gradients says which kind the clock holds


class SyncAccumulator:
    """Combines the pushes of each clock and releases the result once.

    Two kinds of push, one kind per clock:

    - batch means (``sums=False``): released as their sample-weighted mean, which
      is the mean gradient over the union of the workers' batches, even when
      batch sizes differ;
    - per-key sums (``sums=True``, the gradient of the batch's summed loss):
      released as their plain sum, which is the per-key sum over the union of the
      batches. So a sync clock applies exactly what one process would push for the
      union batch, and a key's update does not shrink as workers are added.

    Keyed (sparse) pushes are merged by key: a key two workers touched gets
    the sum of both contributions (weighted by ``count`` for means).
    """

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}

    def check(self, clock: int, sums: bool) -> None:
        """Raise :class:`MixedPush` if a push of this kind may not join ``clock`` (nothing changes)."""
        entry = self._pending.get(clock)
        if entry is not None and entry.sums is not None and entry.sums != sums:
            have, got = ("per-key sums", "batch means") if entry.sums else ("batch means", "per-key sums")
            raise MixedPush(f"clock {clock} holds {have}; a push of {got} cannot be combined with them")

    def add(self, clock: int, grads: dict[str, Grad], count: int, sums: bool = False) -> None:
        if grads:  # a clock tick without gradients is of neither kind
            self.check(clock, sums)
        entry = self._pending.setdefault(clock, _Pending())
        if grads:
            entry.sums = sums
        weight = 1 if sums else count
        for name, (keys, grad) in grads.items():
            if keys is not None:
                entry.keyed.setdefault(name, []).append((keys, grad.astype(np.float64) * weight))
            elif name in entry.dense:
                # In float64 like the first push's, so two pushes add the same in either order.
                entry.dense[name] += grad.astype(np.float64) * weight
            else:
                entry.dense[name] = grad.astype(np.float64) * weight
        entry.count += count

    def complete(self, min_clock: int | None) -> list[tuple[int, dict[str, Grad]]]:
        """Pop every clock all live workers have pushed (all of them when nobody is live)."""
        done = sorted(c for c in self._pending if min_clock is None or c < min_clock)
        out = []
        for clock in done:
            entry = self._pending.pop(clock)
            if not entry.count:
                continue
            divisor = 1 if entry.sums else entry.count  # sums add up; means are weighted by samples
            combined: dict[str, Grad] = {name: (None, acc / divisor) for name, acc in entry.dense.items()}
            for name, parts in entry.keyed.items():
                keys, rows = merge_rows(parts)
                combined[name] = (keys, rows / divisor)
            out.append((clock, combined))
        return out

    def __len__(self) -> int:
        return len(self._pending)


def merge_rows(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum row blocks given as (keys, rows) into one block with sorted unique keys."""
    if len(parts) == 1:
        return parts[0]
    keys, inverse = np.unique(np.concatenate([k for k, _ in parts]), return_inverse=True)
    rows = np.concatenate([r for _, r in parts])
    sums = np.zeros((len(keys), *rows.shape[1:]), dtype=rows.dtype)
    np.add.at(sums, inverse.reshape(-1), rows)
    return keys, sums
