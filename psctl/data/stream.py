"""A worker's partition of a text input (CSV, hashed CSV, LIBSVM, ratings) read slice by slice.

The partition is cut into slices of about :data:`csvfile.SLICE_BYTES` (``slice_partition``);
nothing ever holds the whole partition as text, Python strings or float64. Three passes use
the slices, each holding one slice's parse at a time:

- the statistics pass (:func:`scan`): held-out rows chosen, column statistics, distinct
  labels, LIBSVM index range, mf ids, and each slice's row and entry counts;
- memory mode (:func:`gather`): the rows in the model's compact form (float32 dense blocks,
  CSR with uint32 keys, int32 ids with float32 ratings), written into arrays allocated once
  at their final size from those counts;
- streaming mode (:class:`StreamRows`): every epoch (and every evaluation) reads the file
  again, the batches drawn from a bounded shuffle window (``batching.stream_windows``).

Which mode: :func:`choose_mode`, from the compact size and the worker's memory budget.
The compact form itself (scaling, keys, encoded labels) is the caller's ``compact`` function.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from psctl.core.batching import batch_indices, stream_windows
from psctl.core.sparse import SparseRows, distinct
from psctl.data import csvfile, formats, ratings, vocab
from psctl.errors import DataError

#: The default budget: this share of the host's memory, divided by the workers started there.
DEFAULT_MEMORY_FRACTION = 0.5
#: Memory mode when the compact partition is at most this share of the budget: the rest is
#: for what reading a slice and an evaluation block take beside it.
MEMORY_SHARE = 2 / 3
#: Streaming mode: the shuffle window's share of the budget. A window is filled in place (one
#: copy of its rows); beside it are a slice's parse, a batch and the rows carried to the next.
WINDOW_SHARE = 1 / 3
#: The most rows, and compact bytes of rows, an evaluation computes at once (in either mode):
#: a model's temporaries for many rows (a sparse batch's unique keys and their positions, 3-4
#: times its entries' bytes; mf's factors of every row, rank x 8 bytes several times) would be
#: several times their compact size.
EVAL_BLOCK_ROWS = 1 << 14
EVAL_BLOCK_BYTES = 2 << 20

Compact = Callable[[Any, np.ndarray], tuple[Any, np.ndarray]]
Load = Callable[[csvfile.Partition], tuple[Any, np.ndarray]]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str, flag: str = "--worker-memory", minimum: int = 1 << 20) -> int:
    """Bytes from ``64MB``, ``2GiB``, ``512k`` or a plain number of bytes (MB and MiB both mean
    2^20: memory is counted in pages); ValueError with one sentence for anything else."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{flag} must be a size such as 64MB, 2GiB or a number of bytes; got '{text}'")
    value = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " ")
    if value < minimum:
        raise ValueError(f"{flag} must be at least {_size_text(minimum)}; got '{text}'")
    return int(value)


def _size_text(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n} bytes" if n != 1 else "1 byte"


def host_memory_bytes() -> int:
    """This host's physical memory (Linux /proc/meminfo, else sysconf)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_budget(local_workers: int) -> int:
    """The budget of a worker when ``--worker-memory`` is not given."""
    return int(DEFAULT_MEMORY_FRACTION * host_memory_bytes() / max(1, local_workers))


# -- held-out rows, slice by slice -----------------------------------------------------------
@dataclass(frozen=True)
class HoldOut:
    """``--test-split``: hold out ``fraction`` of each label value (of all rows when not
    ``stratify``), seeded by ``seed`` (the job's seed and the partition)."""

    fraction: float
    seed: int
    stratify: bool


def _classes(labels: np.ndarray, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    key = labels if stratify else np.zeros(len(labels), dtype=np.int8)
    distinct, inverse = np.unique(np.asarray(key), return_inverse=True)
    return distinct, inverse.reshape(-1)


def held_out_rows(labels: np.ndarray, counts: dict[str, int], hold: HoldOut, slice_index: int, stratify: bool) -> np.ndarray:
    """Sorted positions of a slice's held-out rows: ``counts[value]`` rows of each label value,
    drawn per value (in sorted order) by the slice's generator. For slice 0 that generator and
    those draws are :func:`csvfile.stratified_split`'s, so a partition of one slice splits as before."""
    rng = np.random.default_rng(hold.seed if slice_index == 0 else [hold.seed, slice_index])
    distinct, inverse = _classes(labels, stratify)
    test = [np.empty(0, np.int64)]
    for k, value in enumerate(distinct.tolist()):
        members = rng.permutation(np.flatnonzero(inverse == k))
        test.append(members[: counts.get(str(value), 0)])
    return np.sort(np.concatenate(test))


class Splitter:
    """Chooses each slice's held-out counts as the slices come in file order: of each label value,
    ``round(fraction * seen so far)`` minus what the slices before took, so the partition holds out
    ``round(fraction * count)`` of each value, as a split of the whole partition does."""

    def __init__(self, hold: HoldOut):
        self.hold = hold
        self.seen: dict[str, int] = {}

    def counts(self, labels: np.ndarray) -> dict[str, int]:
        distinct, inverse = _classes(labels, self.hold.stratify)
        out = {}
        for value, n in zip(distinct.tolist(), np.bincount(inverse, minlength=len(distinct)).tolist()):
            before = self.seen.get(str(value), 0)
            self.seen[str(value)] = before + n
            out[str(value)] = round(self.hold.fraction * (before + n)) - round(self.hold.fraction * before)
        return out


# -- the partition's file -------------------------------------------------------------------
@dataclass
class SliceCounts:
    rows: int = 0
    nnz: int = 0


@dataclass
class PartitionFile:
    """One partition of a text input, cut into slices; ``load`` reads one slice's raw rows.
    ``held`` (set by :func:`scan`): each slice's held-out count per label value."""

    slices: list[csvfile.Partition]
    load: Load
    hold: HoldOut | None = None
    held: list[dict[str, int]] = field(default_factory=list)
    train: list[SliceCounts] = field(default_factory=list)  # per slice, set by scan
    val: list[SliceCounts] = field(default_factory=list)
    #: Every row held out (a --validate file's partition)
    all_held: bool = False
    #: A one-slice partition's parse, kept by :func:`scan` until :meth:`release`: a small
    #: partition is parsed once, not once a pass (one slice is within a worker's constant).
    kept: tuple[Any, np.ndarray] | None = None
    #: No rows, of the raw form slice 0 parses to (set by :func:`scan`): the compact form's dtypes
    #: and row width come from it without parsing a slice again.
    empty: tuple[Any, np.ndarray] | None = None

    @classmethod
    def of(cls, path: str, part: csvfile.Partition, load: Load, hold: HoldOut | None = None, all_held: bool = False) -> PartitionFile:
        return cls(csvfile.slice_partition(path, part), load, hold, all_held=all_held)

    def rows(self, j: int) -> tuple[Any, np.ndarray, Any, np.ndarray]:
        """Slice ``j``'s raw training rows and labels, then its held-out ones."""
        if self.kept is not None and j == 0:
            return self.split(j, *self.kept)
        return self.split(j, *self.load(self.slices[j]))

    def release(self) -> None:
        """Drop the kept parse (memory mode holds the compact rows from now on)."""
        self.kept = None

    def split(self, j: int, raw_X: Any, labels: np.ndarray) -> tuple[Any, np.ndarray, Any, np.ndarray]:
        """Slice ``j``'s rows as (training rows, labels, held-out rows, labels)."""
        if self.all_held:
            return raw_X[:0], labels[:0], raw_X, labels
        if self.hold is None or not len(labels):
            return raw_X, labels, raw_X[:0], labels[:0]
        val = held_out_rows(labels, self.held[j], self.hold, j, self.hold.stratify)
        train = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
        return raw_X[train], labels[train], raw_X[val], labels[val]

    def n(self, which: str) -> int:
        return sum(c.rows for c in (self.train if which == "train" else self.val))


# -- the statistics pass ---------------------------------------------------------------------
class Stats:
    """A partition's part of the statistics pass, added slice by slice; :meth:`request` is the
    STATS body and arrays the whole partition's rows would give at once."""

    def __init__(self, data: dict[str, Any], standardize: bool, task: str):
        self.fmt = data.get("format", "csv")
        self.data, self.standardize, self.task = data, standardize, task
        self.labels: set[str] = set()
        self.moments: tuple[np.ndarray, np.ndarray, int] | None = None  # mean, m2, count
        self.sparse: dict[str, Any] | None = None
        self.ids: dict[str, np.ndarray] = {}
        self.range: tuple[float, float] | None = None

    def add(self, raw_X: Any, labels: np.ndarray, held_labels: np.ndarray) -> None:
        """One slice's training rows, and the labels of its held-out rows (classes cover them)."""
        if self.task != "regression":
            self.labels.update(distinct(labels).tolist(), distinct(held_labels).tolist())
        if self.fmt == "ratings":
            for c, name in enumerate((ratings.USER, ratings.ITEM)):
                fresh = distinct(raw_X[:, c]) if len(raw_X) else np.array([], dtype=str)
                self.ids[name] = np.union1d(self.ids[name], fresh) if name in self.ids else fresh
                vocab.check_size(name, len(self.ids[name]))
            if len(labels):
                self._moments(csvfile.partial_stats(labels[:, None]))
                low, high = float(labels.min()), float(labels.max())
                self.range = (low, high) if self.range is None else (min(self.range[0], low), max(self.range[1], high))
        elif self.fmt in formats.SPARSE_FORMATS:
            part = formats.partial_stats(self.data, raw_X)
            if part is not None:
                self.sparse = part if self.sparse is None else _merge_index_stats(self.sparse, part)
        elif len(raw_X) and self.standardize:
            self._moments(csvfile.partial_stats(raw_X))

    def _moments(self, part: dict[str, Any]) -> None:
        parts = [part] if self.moments is None else [dict(zip(("mean", "m2", "count"), self.moments)), part]
        self.moments = csvfile._merged(parts)

    def request(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        moments = None
        if self.moments is not None:
            mean, m2, count = self.moments
            moments = {"count": count, "mean": mean.tolist(), "m2": m2.tolist()}
        if self.fmt == "ratings":
            names, arrays = vocab.to_message({k: self.ids.get(k, np.array([], dtype=str)).tolist() for k in (ratings.USER, ratings.ITEM)})
            if moments is not None and self.range is not None:
                moments.update(min=self.range[0], max=self.range[1])
            return {"stats": moments, "labels": [], "vocab": names}, arrays
        stats = self.sparse if self.fmt in formats.SPARSE_FORMATS else moments
        return {"stats": stats, "labels": sorted(self.labels)}, []


def _merge_index_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two LIBSVM index statistics (formats.partial_stats) as one."""
    def pick(f: Callable[..., int], key: str) -> int | None:
        values = [s[key] for s in (a, b) if s[key] is not None]
        return f(values) if values else None

    return {"rows": a["rows"] + b["rows"], "nnz": a["nnz"] + b["nnz"], "min_index": pick(min, "min_index"), "max_index": pick(max, "max_index")}


def _nnz(X: Any) -> int:
    return X.nnz if isinstance(X, SparseRows) else 0


def scan(pf: PartitionFile, stats: Stats | None) -> None:
    """The statistics pass over ``pf``: chooses its held-out rows (slice by slice, in file order),
    adds every slice to ``stats`` (None: labels only, for a --validate file, into nothing) and
    records each slice's training and held-out row and entry counts in ``pf``."""
    splitter = Splitter(pf.hold) if pf.hold is not None else None
    pf.held, pf.train, pf.val = [], [], []
    for j, piece in enumerate(pf.slices):
        raw_X, labels = pf.load(piece)
        if len(pf.slices) == 1:
            pf.kept = (raw_X, labels)
        if j == 0:  # copies: a view of no rows would keep the slice's arrays alive
            pf.empty = (raw_X[:0] if isinstance(raw_X, SparseRows) else np.array(raw_X[:0]), labels[:0].copy())
        pf.held.append(splitter.counts(labels) if splitter is not None and len(labels) else {})
        train_X, train_y, val_X, val_y = pf.split(j, raw_X, labels)
        if stats is not None:
            stats.add(train_X, train_y, val_y)
        pf.train.append(SliceCounts(len(train_y), _nnz(train_X)))
        pf.val.append(SliceCounts(len(val_y), _nnz(val_X)))


# -- the compact form -------------------------------------------------------------------------
def compact_bytes(X: Any, y: np.ndarray) -> int:
    """Bytes of rows in their compact form."""
    if isinstance(X, SparseRows):
        return X.indptr.nbytes + X.indices.nbytes + X.values.nbytes + y.nbytes
    return int(np.asarray(X).nbytes + y.nbytes)


def estimate_bytes(pf: PartitionFile, which: str, sample: tuple[Any, np.ndarray]) -> int:
    """The compact size of ``pf``'s training or held-out rows, from the counts and one slice's
    compact rows (``sample``: their dtypes and row width)."""
    X, y = sample
    counts = pf.train if which == "train" else pf.val
    n, nnz = sum(c.rows for c in counts), sum(c.nnz for c in counts)
    if isinstance(X, SparseRows):
        return (n + 1) * 8 + nnz * (X.indices.itemsize + 4) + n * y.itemsize
    row = int(np.prod(np.shape(X)[1:], dtype=np.int64)) * np.asarray(X).itemsize
    return n * (row + y.itemsize)


def choose_mode(mode: str, compact: int, budget: int) -> str:
    """'memory' or 'stream' for a partition of ``compact`` bytes in its compact form."""
    if mode != "auto":
        return mode
    return "memory" if compact <= MEMORY_SHARE * budget else "stream"


def _chunks(pf: PartitionFile, which: str, compact: Compact) -> Iterator[tuple[int, Any, np.ndarray]]:
    counts = pf.train if which == "train" else pf.val
    for j in range(len(pf.slices)):
        if not counts[j].rows:
            continue
        raw = pf.rows(j)
        X, y = compact(*raw[:2]) if which == "train" else compact(*raw[2:])
        del raw  # the parsed slice is not held while the caller uses its compact rows
        yield j, X, y


def gather(pf: PartitionFile, which: str, compact: Compact) -> tuple[Any, np.ndarray] | None:
    """Memory mode: ``pf``'s training or held-out rows in compact form, read slice by slice into
    arrays allocated once at their final size (None: there are none)."""
    counts = pf.train if which == "train" else pf.val
    n, nnz = sum(c.rows for c in counts), sum(c.nnz for c in counts)
    return fill((chunk for _, *chunk in _chunks(pf, which, compact)), n, nnz)


def fill(chunks: Iterator[Any], n: int, nnz: int) -> tuple[Any, np.ndarray] | None:
    """Compact chunks (X, y) one after another in arrays of ``n`` rows (``nnz`` sparse entries)
    allocated once, with the first chunk's types: no second copy of the rows at any time.
    None when there are no chunks; DataError when they do not hold ``n`` rows."""
    X_out: Any = None  # dense rows, or (indptr, indices, values, n_cols) until the end
    y_out: np.ndarray | None = None
    row, entry = 0, 0
    for X, y in chunks:
        if y_out is None:
            y_out = np.empty(n, y.dtype)
            if isinstance(X, SparseRows):
                X_out = (np.zeros(n + 1, np.int64), np.empty(nnz, X.indices.dtype), np.empty(nnz, np.float32), X.n_cols)
            else:
                X_out = np.empty((n, *X.shape[1:]), X.dtype)
        m = len(y)
        if row + m > n or (isinstance(X, SparseRows) and entry + X.nnz > nnz):
            raise DataError("the data file changed while it was read: its rows differ from the statistics pass's")
        y_out[row : row + m] = y
        if isinstance(X, SparseRows):
            indptr, indices, values, _ = X_out
            indptr[row + 1 : row + m + 1] = X.indptr[1:] + entry
            indices[entry : entry + X.nnz] = X.indices
            values[entry : entry + X.nnz] = X.values
            entry += X.nnz
        else:
            X_out[row : row + m] = X
        row += m
    if y_out is None:
        return None
    if row != n or (isinstance(X_out, tuple) and entry != nnz):
        raise DataError("the data file changed while it was read: its rows differ from the statistics pass's")
    return (SparseRows(*X_out) if isinstance(X_out, tuple) else X_out), y_out


# -- batches and evaluation blocks -----------------------------------------------------------
class MemoryEpoch:
    """An epoch's batches of rows held in memory (``batch_indices``' order)."""

    def __init__(self, X: Any, y: np.ndarray, order: Iterator[np.ndarray]):
        self.X, self.y, self.order = X, y, order

    def ready(self) -> bool:
        return True

    def next(self) -> tuple[Any, np.ndarray] | None:
        idx = next(self.order, None)
        return None if idx is None else (self.X[idx], self.y[idx])


class MemoryRows:
    """Rows held whole in their compact form (memory mode, and inputs that are not text files)."""

    mode = "memory"

    def __init__(self, X: Any, y: np.ndarray):
        self.X, self.y = X, y
        self.n = len(y)
        self.compact_bytes = compact_bytes(X, y)

    def epoch(self, epoch: int, batch_size: int, seed: int, partition: int, max_rows: int | None) -> MemoryEpoch:
        return MemoryEpoch(self.X, self.y, batch_indices(self.n, batch_size, seed, partition, epoch, max_rows))

    def blocks(self) -> Iterator[tuple[Any, np.ndarray]]:
        return eval_blocks(self.X, self.y)


def eval_blocks(X: Any, y: np.ndarray) -> Iterator[tuple[Any, np.ndarray]]:
    """Rows in consecutive blocks of at most EVAL_BLOCK_ROWS rows and about EVAL_BLOCK_BYTES."""
    n = len(y)
    step = max(1, min(EVAL_BLOCK_ROWS, int(EVAL_BLOCK_BYTES * n / max(compact_bytes(X, y), 1))))
    for a in range(0, n, step):
        yield X[a : a + step], y[a : a + step]


class StreamEpoch:
    """An epoch of a streamed partition: windows of slices read as the batches need them."""

    def __init__(self, rows: StreamRows, windows: Iterator[Any]):
        self.rows, self.windows = rows, windows
        self.window: tuple[Any, np.ndarray] | None = None
        self.carry: tuple[Any, np.ndarray] | None = None
        self.batches: list[np.ndarray] = []
        self.at = 0

    def ready(self) -> bool:
        """Whether the next batch is in the window already (:meth:`next` then reads nothing)."""
        return self.at < len(self.batches)

    def next(self) -> tuple[Any, np.ndarray] | None:
        """The next batch (reading the next window when this one is used up), None at the end."""
        while self.at >= len(self.batches):
            plan = next(self.windows, None)
            if plan is None:
                self.window = self.carry = None  # not held through the evaluation that follows
                return None
            self._read(plan)
        pos = self.batches[self.at]
        self.at += 1
        X, y = self.window  # type: ignore[misc]
        return X[pos], y[pos]

    def _read(self, plan: Any) -> None:
        self.window, self.batches = None, []  # the last window goes before the next is read
        carry, self.carry = self.carry, None
        counts = [self.rows.pf.train[j] for j in plan.slices]
        n = sum(c.rows for c in counts) + (len(carry[1]) if carry is not None else 0)
        nnz = sum(c.nnz for c in counts) + (_nnz(carry[0]) if carry is not None else 0)

        def chunks() -> Iterator[tuple[Any, np.ndarray]]:
            if carry is not None:
                yield carry
            for j in plan.slices:
                raw = self.rows.pf.rows(j)
                chunk = self.rows.compact(*raw[:2])
                del raw  # the parsed slice is not held while its compact rows are copied in
                yield chunk

        got = fill(chunks(), n, nnz)  # the carried rows (less than a batch) are copied in
        if got is None:
            raise DataError("the data file changed while it was read: its rows differ from the statistics pass's")
        X, y = got
        self.carry = (X[plan.carry], y[plan.carry]) if len(plan.carry) else None
        self.window, self.batches, self.at = (X, y), plan.batches, 0


class StreamRows:
    """Streaming mode: ``pf``'s training (or held-out) rows read from the file whenever they are needed."""

    mode = "stream"

    def __init__(self, pf: PartitionFile, which: str, compact: Compact, window_rows: int, compact_estimate: int):
        self.pf, self.which, self.compact = pf, which, compact
        self.window_rows = max(1, window_rows)
        self.n = pf.n(which)
        self.compact_bytes = compact_estimate

    def epoch(self, epoch: int, batch_size: int, seed: int, partition: int, max_rows: int | None) -> StreamEpoch:
        counts = [c.rows for c in self.pf.train]
        return StreamEpoch(self, stream_windows(counts, batch_size, seed, partition, epoch, max_rows, max(self.window_rows, batch_size)))

    def blocks(self) -> Iterator[tuple[Any, np.ndarray]]:
        for _, X, y in _chunks(self.pf, self.which, self.compact):
            yield from eval_blocks(X, y)


def window_rows(budget: int, row_bytes: float, slice_rows: int, batch_size: int) -> int:
    """Rows of a streamed epoch's shuffle window: :data:`WINDOW_SHARE` of the budget, less what is
    held beside it while a slice is read into it (that slice's rows twice: parsed and compact, the
    window overshooting by up to a slice; a batch), and at least one batch (a window always takes
    whole slices, so it holds one slice at least)."""
    rows = WINDOW_SHARE * budget / max(row_bytes, 1.0) - 2 * slice_rows - batch_size
    return max(batch_size, int(rows))
