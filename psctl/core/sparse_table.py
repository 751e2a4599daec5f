"""A shard's part of a sparse (hash-routed) table: rows exist only for keys that were pushed.

Same interface as :class:`psctl.core.shard_state.Table` (``locate``, ``read``,
``check_grad``, ``apply``, ``dump``, ``snapshot``, ``restore``), so the shard, the sync accumulator and
the update rules do not care which kind they hold.

Layout: values and optimizer state live in append-only row arrays (grown by
half again when full), so a key's row never moves and an update rule is applied
once per push. A sorted index maps keys to rows. New keys go into a small
sorted *delta* index first and are merged into the main index when the delta
outgrows ``max(DELTA_MIN_KEYS, len(main) / DELTA_FRACTION)``, so inserting
costs O(delta) per push instead of O(table) and everything stays vectorized
(np.searchsorted, np.insert; no per-key Python). Memory is about 12 bytes of
index plus the row's values and state per touched key, whatever the key space.
"""

from __future__ import annotations

import numpy as np

from psctl.core.optim import UpdateRule
from psctl.core.sparse import key_owner, keyed_normal
from psctl.core.tables import TableSpec, hash_name
from psctl.core.shard_errors import BadGradient, BadKeys, ShardError, TableFull

DELTA_MIN_KEYS = 1 << 15
DELTA_FRACTION = 32
MIN_CAPACITY = 1024
MAX_KEYS = 2**31 - 1
_EMPTY_KEYS = np.empty(0, np.int64)
_EMPTY_ROWS = np.empty(0, np.int32)  # a shard holds fewer than 2^31 keys


class SparseTable:
    """Keys k with ``key_owner(k, n_shards) == shard_index`` of a table of ``spec.rows`` keys."""

    def __init__(self, spec: TableSpec, shard_index: int, n_shards: int, seed: int, rule: UpdateRule):
        if not 0 <= shard_index < n_shards:
            raise ValueError(f"shard index {shard_index} is not below the shard count {n_shards}")
        self.spec, self.lo, self.hi = spec, 0, spec.rows
        self.shard_index, self.n_shards, self.seed = shard_index, n_shards, seed
        self.values = np.empty(spec.shape(0), spec.dtype)
        self.state = rule.init_state(self.values)
        self._init_state = rule.init_state
        self.steps = 0
        self.n = 0  # rows in use; the arrays may hold more (capacity)
        self._keys, self._rows = _EMPTY_KEYS, _EMPTY_ROWS  # main index, sorted by key
        self._new_keys, self._new_rows = _EMPTY_KEYS, _EMPTY_ROWS  # delta index, sorted by key

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        """Bytes held: the index, and values and state at their allocated capacity."""
        index = sum(a.nbytes for a in (self._keys, self._rows, self._new_keys, self._new_rows))
        return index + self.values.nbytes + sum(a.nbytes for a in self.state.values())

    # -- the Table interface ---------------------------------------------------
    def locate(self, keys: np.ndarray) -> np.ndarray:
        """Rows of ``keys`` (sorted, unique, in the key space, owned by this shard); -1 where not yet stored."""
        name = self.spec.name
        if keys.ndim != 1 or keys.dtype.kind not in "iu":
            raise BadKeys(f"keys for {name!r} must be a 1-d integer array")
        # Order and range on the keys' own dtype: a uint64 key past 2^63 would turn negative as int64.
        if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
            raise BadKeys(f"keys for {name!r} must be sorted and unique")
        if len(keys) and (int(keys[0]) < 0 or int(keys[-1]) >= self.hi):
            raise BadKeys(f"keys for {name!r} fall outside its key space [0, {self.hi})")
        k = keys.astype(np.int64)
        if len(k):
            if self.n_shards > 1 and (key_owner(k, self.n_shards) != self.shard_index).any():
                raise BadKeys(f"keys for {name!r} include keys another shard owns (hash routing)")
        return self._find(k)

    def read(self, keys: np.ndarray | None, rows: np.ndarray | None = None) -> np.ndarray:
        """Values of ``keys``: stored rows, or the initial values of keys never pushed (not stored).

        ``rows`` from :meth:`locate` spares the look-up: a stored key's row never moves,
        and keys stored since (pushed while this pull waited at the gate) are found again.
        """
        if keys is None:
            raise BadKeys(f"table {self.spec.name!r} is sparse: pull its rows by key (or dump it as a driver)")
        if rows is None:
            rows = self.locate(keys)
        elif (rows < 0).any():
            rows = rows.copy()
            missing = rows < 0
            rows[missing] = self._find(keys[missing].astype(np.int64))
        out = np.empty(self.spec.shape(len(rows)), self.spec.dtype)
        found = rows >= 0
        out[found] = self.values[rows[found]]
        if not found.all():
            out[~found] = self._initial(keys[~found].astype(np.int64))
        return out

    def check_grad(self, keys: np.ndarray | None, grad: np.ndarray) -> None:
        if keys is None:
            raise BadKeys(f"table {self.spec.name!r} is sparse: pushes must carry keys")
        expected = self.spec.shape(len(keys))
        if grad.shape != expected:
            raise BadGradient(f"gradient for {self.spec.name!r} has shape {grad.shape}, expected {expected}")

    def apply(self, rule: UpdateRule, keys: np.ndarray | None, grad: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Apply ``grad`` to the rows of ``keys``, creating missing ones; ``rows``: :meth:`locate`'s, just now."""
        if keys is None:
            raise BadKeys(f"table {self.spec.name!r} is sparse: pushes must carry keys")
        rows = self._ensure(keys.astype(np.int64), rows)
        rule.apply(self.values, grad, self.state, rows, self.steps)
        self.steps += 1

    def dump(self, with_state: bool) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Every stored key (sorted), its values and (if asked) its optimizer state."""
        self._merge_delta()  # then the main index is all keys, sorted: no copy or sort of keys
        keys, rows = self._keys, self._rows  # replaced on insert, never changed in place: safe to send
        state = {name: arr[rows] for name, arr in self.state.items()} if with_state else {}
        return keys, self.values[rows], state

    def snapshot(self) -> dict[str, np.ndarray]:
        """The stored keys (sorted), their values and optimizer state, for a checkpoint."""
        keys, values, state = self.dump(with_state=True)
        return {"keys": keys, "values": values, **{f"state.{k}": v for k, v in state.items()}}

    def restore(self, arrays: dict[str, np.ndarray], steps: int) -> None:
        """Replace this shard's rows by a checkpoint's (as :meth:`snapshot` wrote them)."""
        name = self.spec.name
        try:
            keys = arrays["keys"]
            values = arrays["values"]
            state = {k: arrays[f"state.{k}"] for k in self.state}
        except KeyError as exc:
            raise ValueError(f"table {name!r}: the checkpoint lacks {exc.args[0]!r}") from None
        if keys.ndim != 1 or keys.dtype != np.int64:
            raise ValueError(f"table {name!r}: checkpoint keys must be a 1-d int64 array")
        try:
            self.locate(keys)  # sorted, unique, in the key space, owned by this shard
        except ShardError as exc:
            raise ValueError(f"checkpoint: {exc}") from None
        n = len(keys)
        if values.shape != self.spec.shape(n):
            raise ValueError(f"table {name!r}: checkpoint values have shape {values.shape}, expected {self.spec.shape(n)}")
        capacity = max(n, MIN_CAPACITY)
        self.values = _grown(values.astype(self.spec.dtype, copy=False), n, capacity)
        fresh = self._init_state(self.values)  # the rule's state arrays at this capacity
        for k, arr in fresh.items():
            if state[k].shape != (n, *arr.shape[1:]):
                raise ValueError(f"table {name!r}: checkpoint state {k!r} has shape {state[k].shape} for {n} keys")
            arr[:n] = state[k]
        self.state = fresh
        self.n = n
        self._keys, self._rows = keys.copy(), np.arange(n, dtype=np.int32)
        self._new_keys, self._new_rows = _EMPTY_KEYS, _EMPTY_ROWS
        self.steps = steps

    # -- the index -------------------------------------------------------------
    def _find(self, keys: np.ndarray) -> np.ndarray:
        rows = np.full(len(keys), -1, np.int64)
        for index_keys, index_rows in ((self._keys, self._rows), (self._new_keys, self._new_rows)):
            if len(index_keys) and len(keys):
                pos = np.minimum(np.searchsorted(index_keys, keys), len(index_keys) - 1)
                hit = index_keys[pos] == keys
                rows[hit] = index_rows[pos[hit]]
        return rows

    def _ensure(self, keys: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Rows of ``keys`` (sorted, unique, validated), creating the missing ones (first touch)."""
        rows = self._find(keys) if rows is None else rows.copy()
        missing = rows < 0
        if not missing.any():
            return rows
        fresh = keys[missing]
        m = len(fresh)
        self._reserve(self.n + m)
        if self.n + m > MAX_KEYS:
            raise TableFull(f"table {self.spec.name!r} would hold more than {MAX_KEYS} keys on this shard")
        new_rows = np.arange(self.n, self.n + m, dtype=np.int32)
        self.values[self.n : self.n + m] = self._initial(fresh)
        for name, arr in self._init_state(self.values[self.n : self.n + m]).items():
            self.state[name][self.n : self.n + m] = arr
        self.n += m
        rows[missing] = new_rows
        pos = np.searchsorted(self._new_keys, fresh)
        self._new_keys = np.insert(self._new_keys, pos, fresh)
        self._new_rows = np.insert(self._new_rows, pos, new_rows)
        if len(self._new_keys) > max(DELTA_MIN_KEYS, len(self._keys) // DELTA_FRACTION):
            self._merge_delta()
        return rows

    def _merge_delta(self) -> None:
        if len(self._new_keys):
            pos = np.searchsorted(self._keys, self._new_keys)
            self._keys = np.insert(self._keys, pos, self._new_keys)
            self._rows = np.insert(self._rows, pos, self._new_rows)
            self._new_keys, self._new_rows = _EMPTY_KEYS, _EMPTY_ROWS

    def _reserve(self, rows: int) -> None:
        capacity = self.values.shape[0]
        if rows <= capacity:
            return
        capacity = max(rows, capacity + capacity // 2, MIN_CAPACITY)
        self.values = _grown(self.values, self.n, capacity)
        self.state = {name: _grown(arr, self.n, capacity) for name, arr in self.state.items()}

    def _initial(self, keys: np.ndarray) -> np.ndarray:
        spec = self.spec
        if spec.init == "zeros":
            return np.zeros(spec.shape(len(keys)), spec.dtype)
        values = keyed_normal(keys, self.seed, hash_name(spec.name), spec.init_scale, spec.dim)
        return values.reshape(spec.shape(len(keys))).astype(spec.dtype)


def _grown(arr: np.ndarray, used: int, capacity: int) -> np.ndarray:
    out = np.empty((capacity, *arr.shape[1:]), arr.dtype)
    out[:used] = arr[:used]
    return out
