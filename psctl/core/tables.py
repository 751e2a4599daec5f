"""Parameter tables and how their keys are split across shards (pure)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class TableSpec:
    """A parameter table: ``rows`` keys, each a vector of ``dim`` values.

    A ``sparse`` table is hash-routed (a key lives on shard ``mix64(key) % n_shards``)
    and stores only the keys pushed so far, so ``rows`` may be a key space of 2^32.
    """

    name: str
    rows: int
    dim: int = 1
    dtype: str = "float32"
    init: str = "zeros"  # or "normal": N(0, init_scale^2), seeded per key range
    init_scale: float = 0.01
    sparse: bool = False

    def __post_init__(self) -> None:
        if self.rows < 1 or self.dim < 1:
            raise ValueError(f"table {self.name!r} needs rows >= 1 and dim >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"table {self.name!r}: dtype must be one of {DTYPES}")
        if self.init not in ("zeros", "normal"):
            raise ValueError(f"table {self.name!r}: init must be 'zeros' or 'normal'")

    def shape(self, rows: int) -> tuple[int, ...]:
        return (rows,) if self.dim == 1 else (rows, self.dim)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TableSpec:
        return cls(**d)


def shard_ranges(rows: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous, balanced key ranges [lo, hi) of a table, one per shard."""
    bounds = [rows * i // n_shards for i in range(n_shards + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n_shards)]


def table_ranges(spec: TableSpec, n_shards: int) -> list[tuple[int, int]]:
    """The key range each shard accepts: a contiguous split, or (sparse tables, routed by
    key hash) the whole key space on every shard."""
    if spec.sparse:
        return [(0, spec.rows)] * n_shards
    return shard_ranges(spec.rows, n_shards)


def split_keys(keys: np.ndarray, ranges: list[tuple[int, int]]) -> list[slice]:
    """For sorted ``keys``, the slice of ``keys`` each shard owns (ps-lite's Slice)."""
    starts = np.searchsorted(keys, [lo for lo, _ in ranges], side="left")
    ends = np.searchsorted(keys, [hi for _, hi in ranges], side="left")
    return [slice(int(s), int(e)) for s, e in zip(starts, ends)]


def init_values(spec: TableSpec, lo: int, hi: int, seed: int) -> np.ndarray:
    """Initial values for keys [lo, hi): the same whichever way the table is sharded."""
    shape = spec.shape(hi - lo)
    if spec.init == "zeros":
        return np.zeros(shape, dtype=spec.dtype)
    # One generator per block of keys keeps values independent of the shard split.
    out = np.empty(spec.shape(hi - lo), dtype=spec.dtype)
    block = 4096
    for start in range(lo - lo % block, hi, block):
        rng = np.random.default_rng([seed, hash_name(spec.name), start // block])
        vals = rng.normal(0.0, spec.init_scale, size=spec.shape(block)).astype(spec.dtype)
        a, b = max(start, lo), min(start + block, hi)
        out[a - lo : b - lo] = vals[a - start : b - start]
    return out


def hash_name(name: str) -> int:
    """A stable (not per-process salted) small hash of a table name."""
    h = 2166136261
    for byte in name.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


# A job's tables go on as few shards as their size needs (TensorFlow's
# MinSizePartitioner): below this many bytes per shard, another shard costs a round trip
# per step and per worker more than it saves in bandwidth or memory.
MIN_SHARD_BYTES = 256 * 1024


def table_bytes(spec: TableSpec) -> int:
    return spec.rows * spec.dim * np.dtype(spec.dtype).itemsize


def shards_needed(tables: list[TableSpec], n_shards: int, min_shard_bytes: int = MIN_SHARD_BYTES) -> int:
    """How many of ``n_shards`` a job's tables are split over: one per ``min_shard_bytes`` of
    dense tables, at least one; every shard for a sparse (hash-routed) table, whose size is
    not known up front, and when ``min_shard_bytes`` is 0."""
    if min_shard_bytes <= 0 or any(t.sparse for t in tables):
        return n_shards
    total = sum(table_bytes(t) for t in tables)
    return max(1, min(n_shards, total // min_shard_bytes))
