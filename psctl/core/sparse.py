"""Sparse rows and 64-bit keys: the CSR batch type, key mixing and hash routing (pure numpy).

A :class:`SparseRows` holds rows as CSR (``indptr``, ``indices`` as int64 keys,
``values`` as float32). Linear models use it through ``X @ w`` and ``X.T @ err``
with ``w`` holding one row per *unique* key of the batch (``X.keys``, sorted),
which is exactly what a keyed pull returns, so the dense loss and gradient code
runs unchanged on sparse batches. Duplicate keys (within a row, as hashing may
produce, or across rows) add up in both products.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a 1-D array of integers or strings, as ``np.unique(values)``.
    numpy 2.4's ``np.unique`` without ``return_*`` hashes integers, and took 196 us for 500
    random keys, 15.7 ms for 50k and 2.3 s for 2M (here, numpy 2.4.6), where a sort and a
    comparison of neighbours take 14 us, 0.4 ms and 32 ms. (Not for floats: NaNs stay apart.)"""
    s = np.sort(np.asarray(values).reshape(-1))
    keep = np.empty(len(s), bool)
    keep[:1] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def mix64(keys: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective 64-bit mix, so neighbouring keys land far apart."""
    z = np.asarray(keys).astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def key_owner(keys: np.ndarray, n_shards: int) -> np.ndarray:
    """The shard each key of a hash-routed table lives on."""
    if n_shards == 1:
        return np.zeros(len(keys), np.int64)
    return (mix64(keys) % np.uint64(n_shards)).astype(np.int64)


def route_keys(keys: np.ndarray, n_shards: int) -> list[np.ndarray]:
    """For sorted unique ``keys``, the positions in ``keys`` each shard owns (each still sorted)."""
    owner = key_owner(keys, n_shards)
    order = np.argsort(owner, kind="stable")  # stable: keys stay sorted within a shard
    bounds = np.concatenate(([0], np.cumsum(np.bincount(owner, minlength=n_shards))))
    return [order[bounds[i] : bounds[i + 1]] for i in range(n_shards)]


def keyed_normal(keys: np.ndarray, seed: int, salt: int, scale: float, dim: int) -> np.ndarray:
    """N(0, scale^2) values per key, shape (len(keys), dim), the same for a key wherever it
    lives and whenever it is first touched (Box-Muller over mixed counters; no per-key loop)."""
    keys = np.asarray(keys, np.uint64)
    base = mix64(keys ^ mix64(np.array([(seed * 0x9E3779B1 + salt) % 2**64], np.uint64)))
    cols = np.arange(dim, dtype=np.uint64)
    a = mix64(base[:, None] + np.uint64(2) * cols)
    b = mix64(base[:, None] + np.uint64(2) * cols + np.uint64(1))
    u1 = ((a >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53  # (0, 1]
    u2 = (b >> np.uint64(11)).astype(np.float64) / 2.0**53
    return scale * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def narrow_keys(keys: np.ndarray, rows: int) -> np.ndarray:
    """``keys`` in the smallest unsigned type that holds every key below ``rows``.

    Sent keys are 1/3 to 2/3 of a keyed request's bytes; a cast costs almost
    nothing, and the shard reads any integer type (measured in the README).
    The wire carries u8, u32 and i64 keys (it has no u16).
    """
    for dtype in (np.uint8, np.uint32):
        if rows <= np.iinfo(dtype).max + 1:
            return keys.astype(dtype)
    return keys.astype(np.int64, copy=False)


_KEY_TYPES = (np.dtype(np.int64), np.dtype(np.uint32), np.dtype(np.int32))


class SparseRows:
    """A batch of sparse rows in CSR form. ``X[idx]`` selects rows; ``len(X)`` counts them."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n_cols: int | None = None):
        self.indptr = np.asarray(indptr, np.int64)
        # int64 keys, or narrower ones as given (a worker's compact partition: uint32 for a key
        # space below 2^32, see :meth:`compact`); every product here reads any integer type.
        indices = np.asarray(indices)
        self.indices = indices if indices.dtype in _KEY_TYPES else indices.astype(np.int64)
        self.values = np.asarray(values, np.float32)
        if self.indptr.ndim != 1 or len(self.indptr) < 1 or self.indptr[0] != 0:
            raise ValueError("indptr must be a 1-d array starting at 0")
        if self.indptr[-1] != len(self.indices) or len(self.indices) != len(self.values):
            raise ValueError("indptr, indices and values disagree in length")
        self.n_cols = n_cols  # the key space, when known

    @classmethod
    def from_rows(cls, rows: Sequence[dict[int, float]], n_cols: int | None = None) -> SparseRows:
        """From a list of {key: value} dicts (tests and small inputs)."""
        lengths = [len(r) for r in rows]
        indptr = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
        indices = np.array([k for r in rows for k in r], np.int64)
        values = np.array([v for r in rows for v in r.values()], np.float32)
        return cls(indptr, indices, values, n_cols)

    @classmethod
    def from_coo(cls, n_rows: int, rows: np.ndarray, keys: np.ndarray, values: np.ndarray, n_cols: int | None = None) -> SparseRows:
        """From (row, key, value) triples in any order; a row keeps its entries' relative order."""
        order = np.argsort(rows, kind="stable")
        counts = np.bincount(rows, minlength=n_rows) if len(rows) else np.zeros(n_rows, np.int64)
        indptr = np.concatenate(([0], np.cumsum(counts)))
        return cls(indptr, np.asarray(keys)[order], np.asarray(values)[order], n_cols)

    @classmethod
    def concat(cls, parts: Sequence[SparseRows]) -> SparseRows:
        """The rows of ``parts``, one after another (the key space is the first part's)."""
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [p.nnz for p in parts[:-1]])
        indptr = np.concatenate([parts[0].indptr[:1], *(p.indptr[1:] + o for p, o in zip(parts, offsets))])
        indices = np.concatenate([p.indices for p in parts])
        values = np.concatenate([p.values for p in parts])
        return cls(indptr, indices, values, parts[0].n_cols)

    def compact(self) -> SparseRows:
        """The same rows with keys in uint32 when the key space (``n_cols`` and the bias key after it) fits."""
        if self.indices.dtype == np.uint32 or self.n_cols is None or self.n_cols >= 2**32 - 1:
            return self
        return SparseRows(self.indptr, self.indices.astype(np.uint32), self.values, self.n_cols)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return len(self.indices)

    def __getitem__(self, rows: np.ndarray | slice) -> SparseRows:
        if isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        rows = np.asarray(rows, np.int64)
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        indptr = np.concatenate(([0], np.cumsum(lengths)))
        # position of every selected entry: its row's start plus its offset within the row
        take = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return SparseRows(indptr, self.indices[take], self.values[take], self.n_cols)

    def with_indices(self, indices: np.ndarray, keep: np.ndarray | None = None) -> SparseRows:
        """The same rows with new keys, keeping only entries where ``keep`` is True."""
        if keep is None:
            return SparseRows(self.indptr, indices, self.values, self.n_cols)
        counts = np.bincount(self.row_of_entry[keep], minlength=len(self))
        indptr = np.concatenate(([0], np.cumsum(counts)))
        return SparseRows(indptr, indices[keep], self.values[keep], self.n_cols)

    @cached_property
    def row_of_entry(self) -> np.ndarray:
        return np.repeat(np.arange(len(self)), np.diff(self.indptr))

    @cached_property
    def _unique(self) -> tuple[np.ndarray, np.ndarray]:
        keys, inverse = np.unique(self.indices, return_inverse=True)
        return keys, inverse.reshape(-1)

    @property
    def keys(self) -> np.ndarray:
        """The sorted unique keys of this batch: what it pulls, and what ``X @ w`` expects ``w`` rows for."""
        return self._unique[0]

    def occurrences(self, keys: np.ndarray) -> int:
        """How many entries have one of ``keys`` (sorted, distinct), counted from the key
        positions the batch has (no search of every entry)."""
        mine, inverse = self._unique
        if not len(keys) or not len(mine):
            return 0
        at = np.minimum(np.searchsorted(mine, keys), len(mine) - 1)
        counts = np.bincount(inverse, minlength=len(mine))
        return int(counts[at[mine[at] == keys]].sum())

    def __matmul__(self, w: np.ndarray) -> np.ndarray:
        """Row scores: ``w`` has one row per key of ``self.keys`` ((k,) or (k, d))."""
        keys, inverse = self._unique
        if w.shape[0] != len(keys):
            raise ValueError(f"w has {w.shape[0]} rows; this batch has {len(keys)} unique keys")
        n = len(self)
        if w.ndim == 1:
            return np.bincount(self.row_of_entry, weights=self.values * w[inverse], minlength=n)
        contrib = self.values[:, None] * w[inverse]
        return np.stack([np.bincount(self.row_of_entry, weights=contrib[:, j], minlength=n) for j in range(w.shape[1])], axis=1)

    @property
    def T(self) -> _Transposed:
        return _Transposed(self)

    def to_dense(self, n_cols: int | None = None) -> np.ndarray:
        """A dense (rows, n_cols) array (tests and tiny inputs only)."""
        n_cols = n_cols or self.n_cols or (int(self.indices.max()) + 1 if self.nnz else 0)
        out = np.zeros((len(self), n_cols))
        np.add.at(out, (self.row_of_entry, self.indices), self.values)
        return out


class _Transposed:
    """``X.T``: only for ``X.T @ err``, the per-key sums a gradient needs."""

    def __init__(self, rows: SparseRows):
        self.rows = rows

    def __matmul__(self, err: np.ndarray) -> np.ndarray:
        X = self.rows
        keys, inverse = X._unique
        per_entry = X.values[:, None] * err[X.row_of_entry] if err.ndim == 2 else X.values * err[X.row_of_entry]
        if per_entry.ndim == 1:
            return np.bincount(inverse, weights=per_entry, minlength=len(keys))
        return np.stack([np.bincount(inverse, weights=per_entry[:, j], minlength=len(keys)) for j in range(per_entry.shape[1])], axis=1)
