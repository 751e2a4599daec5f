"""A shard's pure state: its slice of every table, the update rule, the clock gate.

No sockets, no files, no clocks but ``time.monotonic`` for rates: the shard
service (psctl.cluster.shard) maps frames onto :class:`ShardState` and its
errors (:mod:`psctl.core.shard_errors`) onto ERROR frames. It holds no connections:
the service knows which connection a worker said HELLO on.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from psctl.core.consistency import ClockGate, Grad, SyncAccumulator, staleness_for
from psctl.core.optim import UpdateRule
from psctl.core.sparse_table import SparseTable
from psctl.core.tables import TableSpec, init_values
from psctl.core.shard_errors import BadClock, BadGradient, BadKeys, NonFiniteGradient, NotLive, UnknownTable
from psctl.protocol.wire import MAX_ARRAYS


class Table:
    """This shard's rows [lo, hi) of one table, with the update rule's per-row state."""

    def __init__(self, spec: TableSpec, lo: int, hi: int, seed: int, rule: UpdateRule):
        self.spec, self.lo, self.hi = spec, lo, hi
        self.values = init_values(spec, lo, hi, seed)
        self.state = rule.init_state(self.values)
        self.steps = 0  # updates applied, for learning-rate schedules

    def locate(self, keys: np.ndarray) -> np.ndarray:
        """Local row indices of global ``keys`` (sorted, unique, inside this shard's range)."""
        if keys.ndim != 1 or keys.dtype.kind not in "iu":
            raise BadKeys(f"keys for {self.spec.name!r} must be a 1-d integer array")
        # Order and range on the keys' own dtype: a uint64 key past 2^63 would turn negative as int64.
        if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
            raise BadKeys(f"keys for {self.spec.name!r} must be sorted and unique")
        if len(keys) and (int(keys[0]) < self.lo or int(keys[-1]) >= self.hi):
            raise BadKeys(f"keys for {self.spec.name!r} fall outside this shard's range [{self.lo}, {self.hi})")
        return keys.astype(np.int64) - self.lo

    def read(self, keys: np.ndarray | None, rows: np.ndarray | None = None) -> np.ndarray:
        """Values of ``keys`` (all rows: None); ``rows`` from :meth:`locate` spares a second look-up.

        A copy: the reply may sit in the transport's buffer while later pushes change the table.
        """
        if keys is None:
            return self.values.copy()
        return self.values[self.locate(keys) if rows is None else rows]

    def check_grad(self, keys: np.ndarray | None, grad: np.ndarray) -> None:
        expected = self.values.shape if keys is None else (len(keys), *self.values.shape[1:])
        if grad.shape != expected:
            raise BadGradient(f"gradient for {self.spec.name!r} has shape {grad.shape}, expected {expected}")

    def snapshot(self) -> dict[str, np.ndarray]:
        """Copies of the values and optimizer state: a checkpoint is written while pushes go on."""
        return {"values": self.values.copy(), **{f"state.{k}": v.copy() for k, v in self.state.items()}}

    def restore(self, arrays: dict[str, np.ndarray], steps: int) -> None:
        name = self.spec.name
        for key in ("values", *(f"state.{k}" for k in self.state)):
            target = self.values if key == "values" else self.state[key[len("state."):]]
            if key not in arrays:
                raise ValueError(f"table {name!r}: the checkpoint lacks {key!r}")
            if arrays[key].shape != target.shape:
                raise ValueError(f"table {name!r}: checkpoint {key} has shape {arrays[key].shape}, expected {target.shape}")
        self.values[...] = arrays["values"]
        for k in self.state:
            self.state[k][...] = arrays[f"state.{k}"]
        self.steps = steps

    def apply(self, rule: UpdateRule, keys: np.ndarray | None, grad: np.ndarray, rows: np.ndarray | None = None) -> None:
        if keys is not None and rows is None:
            rows = self.locate(keys)
        rule.apply(self.values, grad, self.state, rows, self.steps)
        self.steps += 1

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + sum(a.nbytes for a in self.state.values())

    def dump(self, with_state: bool) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Keys, values and (if asked) optimizer state of the whole range."""
        state = {name: arr.copy() for name, arr in self.state.items()} if with_state else {}
        return np.arange(self.lo, self.hi, dtype=np.int64), self.values.copy(), state


class ShardState:
    """One job's parameters on this shard and the rules that change them."""

    def __init__(
        self,
        job_id: str,
        tables: list[TableSpec],
        ranges: dict[str, tuple[int, int]],
        mode: str,
        staleness: int,
        workers: list[int],
        rule: UpdateRule,
        seed: int,
        shard_index: int = 0,
        n_shards: int = 1,
    ):
        self.job_id = job_id
        self.mode = mode
        self.ranges = ranges
        self.tables: dict[str, Table | SparseTable] = {
            t.name: SparseTable(t, shard_index, n_shards, seed, rule) if t.sparse else Table(t, *ranges[t.name], seed, rule)
            for t in tables
        }
        self.gate = ClockGate(workers, staleness_for(mode, staleness))
        self.acc = SyncAccumulator() if mode == "sync" else None
        self.rule = rule
        self.updates = 0  # optimizer applications (a sync clock counts once)
        self.pushes = 0
        self.samples = 0  # rows behind every push, for the "every row used" check
        self.left: dict[int, int] = {}  # worker -> its clock when it left
        self.nonfinite: dict[int, int] = {}  # worker -> pushes refused for NaN/Inf gradients
        self.refused: dict[int, int] = {}  # worker -> clock of its push refused as non-finite, until one is applied
        self.started_s = time.monotonic()

    def adopt(self, part: KeptTables) -> None:
        """Train a kept model's part in place: its table objects become this job's (with this job's
        optimizer state), so a reader of the kept model sees every update as it is applied."""
        for name, table in part.tables.items():
            mine = self.tables.get(name)
            if mine is None or mine.spec != table.spec or (mine.lo, mine.hi) != (table.lo, table.hi):
                raise ValueError(f"kept model {part.name!r}'s table {name!r} is not this job's table {name!r}")
            table.state = self.rule.init_state(table.values)
            if isinstance(table, SparseTable):
                table._init_state = self.rule.init_state
            table.steps = 0
            self.tables[name] = table
        if set(part.tables) != set(self.tables):
            raise ValueError(f"kept model {part.name!r} has tables {sorted(part.tables)}, this job {sorted(self.tables)}")

    def check_tables(self, names: Any, allow_empty: bool = False) -> list[str]:
        if not isinstance(names, list) or not (0 < len(names) or allow_empty) or len(names) > MAX_ARRAYS:
            raise UnknownTable(f"'tables' must be a list of 1 to {MAX_ARRAYS} table names")
        for name in names:
            if not isinstance(name, str) or name not in self.tables:
                raise UnknownTable(f"unknown table {name!r}")
        return names

    def read(
        self, names: list[str], keys: list[np.ndarray] | None = None, rows: list[np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """Each table's values of its keys (whole tables: no keys); ``rows``: their :meth:`locate` results."""
        if keys is None:
            return [self.tables[n].read(None) for n in names]
        return [self.tables[n].read(keys[i], None if rows is None else rows[i]) for i, n in enumerate(names)]

    def check_pull(
        self, names: list[str], keys: list[np.ndarray] | None, whole_sparse: bool = False
    ) -> list[np.ndarray] | None:
        """Validate a pull as it arrives (its keys; whole tables only where they may be read whole,
        sparse ones only by a dump: ``whole_sparse``); the keys' rows.

        A pull that waits at the gate is answered from someone else's push or leave: it must
        not fail then."""
        if keys is not None:
            return self.locate(names, keys)
        sparse = [name for name in names if isinstance(self.tables[name], SparseTable)]
        if sparse and not whole_sparse:
            raise BadKeys(f"table {sparse[0]!r} is sparse: pull its rows by key (or dump it as a driver)")
        return None

    def check_pull_clock(self, worker: int, clock: int) -> None:
        """Refuse a pull past a push of this worker that was refused as non-finite: the worker's
        clock did not move, so the pull would wait at the gate for the worker itself."""
        refused = self.refused.get(worker)
        if refused is not None and clock > refused:
            raise NonFiniteGradient(
                f"worker {worker} pulled at clock {clock}, but its push of clock {refused} was refused "
                "as non-finite (NaN/Inf): nothing of it was applied"
            )

    def locate(self, names: list[str], keys: list[np.ndarray]) -> list[np.ndarray]:
        """Validate each table's keys (range, order, owner) and find their rows, once per request."""
        return [self.tables[n].locate(k) for n, k in zip(names, keys)]

    def dump(self, names: list[str], with_state: bool) -> tuple[list[np.ndarray], dict[str, list[str]]]:
        """Per table: keys, values, then its state arrays (named in the second result)."""
        arrays: list[np.ndarray] = []
        state_names: dict[str, list[str]] = {}
        for name in names:
            keys, values, state = self.tables[name].dump(with_state)
            state_names[name] = sorted(state)
            arrays += [keys, values, *(state[s] for s in state_names[name])]
        return arrays, state_names

    def push(self, worker: int, clock: int, grads: dict[str, Grad], count: int, sums: bool = False) -> list[Any]:
        """Apply (or, in sync mode, accumulate) one push; return the gate tokens now ready.

        ``sums``: the gradients are per-key sums over the batch (the gradient of its summed
        loss), not its mean. Applied alone (async, ssp) either is the optimizer's input as it
        is; in sync mode a clock's sums are added, its means averaged by ``count``
        (:class:`~psctl.core.consistency.SyncAccumulator`), and one clock never mixes them."""
        if worker not in self.gate.clocks:
            raise NotLive(f"worker {worker} is not in the live set of job {self.job_id}")
        expected = self.gate.clocks[worker]
        if clock != expected:
            raise BadClock(f"worker {worker} pushed clock {clock}, expected {expected}")
        rows: dict[str, np.ndarray | None] = {}
        for name, (keys, grad) in grads.items():
            table = self.tables[name]
            table.check_grad(keys, grad)
            if grad.dtype.kind in "fc" and not np.isfinite(grad).all():
                self.nonfinite[worker] = self.nonfinite.get(worker, 0) + 1
                self.refused[worker] = clock
                raise NonFiniteGradient(f"worker {worker} pushed a non-finite gradient (NaN/Inf) for {name!r} at clock {clock}; nothing was applied")
            # validate before anything is applied or accumulated; an async push applies these rows
            rows[name] = None if keys is None else table.locate(keys)
        if self.acc is not None and grads:
            self.acc.check(clock, sums)
        self.refused.pop(worker, None)
        self.pushes += 1
        self.samples += count
        if self.acc is not None:
            self.acc.add(clock, grads, count, sums)
        else:
            self._apply(grads, rows)
        ready = self.gate.advance(worker, clock + 1)
        self._apply_completed()
        return ready

    def leave(self, worker: int) -> list[Any]:
        """Drop a worker (finished, left or lost) from the live set."""
        if worker in self.gate.clocks:
            self.left[worker] = self.gate.clocks[worker]
        ready = self.gate.remove(worker)
        self._apply_completed()
        return ready

    def _apply(self, grads: dict[str, Grad], rows: dict[str, np.ndarray | None] | None = None) -> None:
        for name, (keys, grad) in grads.items():
            self.tables[name].apply(self.rule, keys, grad, None if rows is None else rows[name])
        self.updates += 1

    def _apply_completed(self) -> None:
        if self.acc is None:
            return
        for _clock, means in self.acc.complete(self.gate.min_clock()):
            self._apply(means)

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and meta of a checkpoint at the current min clock (tables, optimizer state, counters).

        The arrays are copies, so they can be written to disk off the event loop."""
        arrays = {f"{name}/{k}": v for name, t in self.tables.items() for k, v in t.snapshot().items()}
        meta = {
            "job_id": self.job_id,
            "steps": {name: t.steps for name, t in self.tables.items()},
            "updates": self.updates,
            "samples": self.samples,
        }
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], clock: int) -> None:
        """Tables and counters from a checkpoint; every worker's clock set to its clock.

        Raises ValueError (one sentence) for a checkpoint of another layout (tables, shapes, counters);
        whose job and clock the file is, files/checkpoint.py checks when it reads it."""
        steps = meta.get("steps")
        counters = [meta.get("updates"), meta.get("samples")]
        if not isinstance(steps, dict) or set(steps) != set(self.tables) or not all(_count(v) for v in [*steps.values(), *counters]):
            raise ValueError(f"the checkpoint's counters do not fit tables {sorted(self.tables)} (steps {steps!r:.60})")
        for name, table in self.tables.items():
            prefix = f"{name}/"
            table.restore({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, steps[name])
        self.updates, self.samples = counters
        for worker in list(self.gate.clocks):
            self.gate.clocks[worker] = clock

    def status(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "keys": int(sum(len(t) for t in self.tables.values())),
            "bytes": int(sum(t.nbytes for t in self.tables.values())),
            "updates": self.updates,
            "pushes": self.pushes,
            "samples": self.samples,
            "clock": self.gate.min_clock(),  # the slowest live worker's: every clock below it is applied (sync)
            "clocks": {str(w): c for w, c in self.gate.clocks.items()},
            "waiting_pulls": self.gate.waiting(),
            "nonfinite_pushes": {str(w): n for w, n in self.nonfinite.items()},
            "updates_s": self.updates / max(time.monotonic() - self.started_s, 1e-9),
        }


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class KeptTables:
    """One kept model's part on this shard: its tables, read-only, and the reads it served.

    Made from a finished job's tables (:meth:`from_job`: the optimizer state is freed, nothing
    pushes to a kept model) or from its file after a shard restart (:meth:`from_arrays`).
    ``extras`` are the model's other arrays (id vocabularies), held by shard 0 only.
    """

    def __init__(self, name: str, version: str, tables: dict[str, Table | SparseTable], extras: dict[str, np.ndarray]):
        self.name, self.version = name, version
        self.tables = tables
        self.extras = extras
        self.pulls = 0
        self.keys_pulled = 0  # keys asked for (whole-table pulls: the table's rows)
        self.bytes_pulled = 0  # value bytes sent

    @classmethod
    def from_job(cls, name: str, version: str, state: ShardState, extras: dict[str, np.ndarray]) -> KeptTables:
        tables, state.tables = state.tables, {}
        for table in tables.values():
            table.state = {}
        return cls(name, version, tables, extras)

    @classmethod
    def from_arrays(
        cls, name: str, version: str, specs: list[TableSpec], ranges: dict[str, tuple[int, int]],
        shard_index: int, n_shards: int, arrays: dict[str, np.ndarray],
    ) -> KeptTables:
        """The part :meth:`arrays` wrote; ValueError (one sentence) when they do not fit ``specs``."""
        rule = _NoState()
        tables: dict[str, Table | SparseTable] = {}
        for spec in specs:
            prefix = f"{spec.name}/"
            mine = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            table: Table | SparseTable
            if spec.sparse:
                table = SparseTable(spec, shard_index, n_shards, 0, rule)
            else:
                table = Table(spec, *ranges[spec.name], 0, rule)
            table.restore(mine, 0)
            table.state = {}
            tables[spec.name] = table
        extras = {k[len("extra/"):]: v for k, v in arrays.items() if k.startswith("extra/")}
        return cls(name, version, tables, extras)

    def arrays(self) -> dict[str, np.ndarray]:
        """What a file of this part holds: each table's values (and a sparse table's keys), the extras."""
        out: dict[str, np.ndarray] = {}
        for name, table in self.tables.items():
            snap = table.snapshot()
            out.update({f"{name}/{k}": v for k, v in snap.items() if not k.startswith("state.")})
        out.update({f"extra/{k}": v for k, v in self.extras.items()})
        return out

    def check_tables(self, names: Any) -> list[str]:
        if not isinstance(names, list) or not 0 < len(names) <= MAX_ARRAYS // 2:
            raise UnknownTable(f"'tables' must be a list of 1 to {MAX_ARRAYS // 2} table names")
        for name in names:
            if not isinstance(name, str) or name not in self.tables:
                raise UnknownTable(f"model {self.name!r} has no table {name!r}")
        return names

    def read(self, names: list[str], keys: list[np.ndarray] | None) -> list[np.ndarray]:
        """Per table its values of ``keys`` (None: the whole range of a dense table); after each
        keyed table's values, a uint8 array saying which keys are stored (a sparse table stores
        only the keys a push touched; a dense table holds all of its range)."""
        out: list[np.ndarray] = []
        for i, name in enumerate(names):
            table = self.tables[name]
            if keys is None:
                if isinstance(table, SparseTable):
                    raise BadKeys(f"table {name!r} of model {self.name!r} is sparse: pull its rows by key")
                values = table.read(None)
                self.keys_pulled += len(table)
                out.append(values)
            else:
                rows = table.locate(keys[i])
                values = table.read(keys[i], rows)
                self.keys_pulled += len(keys[i])
                out += [values, (rows >= 0).astype(np.uint8)]
            self.bytes_pulled += values.nbytes
        self.pulls += 1
        return out

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "keys": int(sum(len(t) for t in self.tables.values())),
            "bytes": int(sum(t.nbytes for t in self.tables.values()) + sum(a.nbytes for a in self.extras.values())),
            "pulls": self.pulls,
            "keys_pulled": self.keys_pulled,
            "bytes_pulled": self.bytes_pulled,
        }


class _NoState:
    """The update rule of a kept table: it holds no optimizer state and applies nothing."""

    def init_state(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return {}
