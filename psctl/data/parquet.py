"""Parquet input (the ``parquet`` extra, pyarrow): a file, or a folder of files, local or at a URL.

The driver reads only the footers: the column names (the same in every file) and each
file's row groups with their row counts. Partitions are row ranges over the files in
name order, like those of in-memory input (:mod:`.arrays`): ``start``/``end`` are row
numbers, ``first_line`` is ``start + 1``. With at least as many row groups as workers
the ranges end at row-group boundaries, balanced by rows, so each worker reads its own
row groups and no other; with fewer, rows are split evenly and a row group may be read
by the two workers whose ranges it straddles. A worker reads only the feature and label
columns (projection) of its row groups: one ranged read per column chunk from object
storage, never the whole object.

The rows are what a CSV of the same columns gives: numeric features as float64, the
label as text (integers as ``1``, floats by ``repr``, strings as they are).

Data spec (``spec["data"]`` beside path and size): ``{"storage": "parquet", "format":
"csv", "schema": CsvSchema dict, "files": [[name, bytes, [rows per row group]], ...],
"rows": n}``; ``name`` is relative to ``path`` ("" when ``path`` is the file).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from psctl.data import csvfile, storage
from psctl.errors import DataError

STORAGE = "parquet"
SUFFIXES = (".parquet", ".pq", ".parq")
MAX_FILES = 100_000
# Names that are files of text input, never a Parquet folder.
TEXT_SUFFIXES = (".csv", ".tsv", ".txt", ".gz", ".gzip", ".bz2", ".zst", ".zstd", ".svm", ".libsvm", ".data")


def _pq() -> Any:
    storage.require("pyarrow", "Parquet input")
    import pyarrow.parquet as pq

    return pq


def is_parquet(path: str, fmt: str = "auto") -> bool:
    """``--format parquet``, or (auto) a name ending in .parquet/.pq or a folder of such files."""
    if fmt == "parquet":
        return True
    if fmt != "auto":
        return False
    name = path.rstrip("/")
    if name.lower().endswith(SUFFIXES):
        return True
    if os.path.splitext(name)[1].lower() in TEXT_SUFFIXES:  # no listing (a round trip to object storage) for these
        return False
    return _is_dir(path)


def is_parquet_data(data: dict[str, Any]) -> bool:
    return data.get("storage") == STORAGE


def _is_dir(path: str) -> bool:
    if not storage.is_url(path):
        return os.path.isdir(path)
    try:
        fs, inner = storage.filesystem(path)
        return bool(fs.isdir(inner))
    except Exception:
        return False  # the reader that opens it next says what is wrong in one sentence


def _list(path: str) -> list[tuple[str, int]]:
    """(name relative to ``path``, bytes) of the dataset's files in name order; a folder's
    files whose names start with '_' or '.' (Spark's _SUCCESS, checksums) are skipped."""
    if not _is_dir(path):
        return [("", storage.stored_size(path))]
    found: list[tuple[str, int]] = []
    if storage.is_url(path):
        fs, inner = storage.filesystem(path)
        try:
            listing = fs.find(inner, detail=True)
        except Exception as exc:
            raise storage.storage_error(path, exc) from None
        base = inner.rstrip("/") + "/"
        for full, info in listing.items():
            found.append((full[len(base):] if full.startswith(base) else posixpath.basename(full), int(info.get("size") or 0)))
    else:
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
            for f in files:
                full = os.path.join(root, f)
                found.append((os.path.relpath(full, path).replace(os.sep, "/"), os.path.getsize(full)))
    keep = sorted(
        (name, size) for name, size in found
        if not any(part.startswith((".", "_")) for part in name.split("/")) and name.lower().endswith(SUFFIXES)
    )
    if not keep:
        raise DataError(f"the folder '{path}' holds no Parquet files (*.parquet)")
    if len(keep) > MAX_FILES:
        raise DataError(f"'{path}' holds {len(keep)} Parquet files; psctl reads at most {MAX_FILES}")
    return keep


def file_path(path: str, name: str) -> str:
    if not name:
        return path
    return path.rstrip("/") + "/" + name if storage.is_url(path) else os.path.join(path, *name.split("/"))


class _Counted:
    """A file object that counts the bytes read through it (what pyarrow fetched)."""

    def __init__(self, inner: Any):
        self._inner, self.bytes_read = inner, 0

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        self.bytes_read += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._inner.seek(pos, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return bool(self._inner.closed)

    def close(self) -> None:
        self._inner.close()


def _open(path: str) -> tuple[Any, _Counted]:
    """(pyarrow ParquetFile, its counted file); DataError when it is not Parquet."""
    pq = _pq()
    fh = _Counted(storage.open_stored(path))
    try:
        return pq.ParquetFile(fh, pre_buffer=False), fh
    except Exception as exc:  # pyarrow's ArrowInvalid, OSError ...
        fh.close()
        detail = " ".join(str(exc).split())[:200]
        raise DataError(f"'{path}' is not a readable Parquet file ({detail})") from None


@dataclass
class Dataset:
    """What the driver learns from the footers: the columns and every file's row groups."""

    path: str
    columns: tuple[str, ...]
    files: list[tuple[str, int, list[int]]] = field(default_factory=list)  # (name, bytes, rows per row group)

    @property
    def rows(self) -> int:
        return sum(sum(groups) for _, _, groups in self.files)

    @property
    def size(self) -> int:
        return sum(size for _, size, _ in self.files)

    def pieces(self) -> list[tuple[int, int, int, int]]:
        """(file index, row group, first row, rows) of every row group, in order."""
        out, at = [], 0
        for f, (_, _, groups) in enumerate(self.files):
            for g, n in enumerate(groups):
                out.append((f, g, at, n))
                at += n
        return out

    def to_data(self, schema: csvfile.CsvSchema) -> dict[str, Any]:
        return {"storage": STORAGE, "format": "csv", "schema": schema.to_dict(),
                "files": [[n, s, list(g)] for n, s, g in self.files], "rows": self.rows}

    @classmethod
    def from_data(cls, path: str, data: dict[str, Any]) -> Dataset:
        schema = data["schema"]
        return cls(path, tuple(schema["columns"]), [(str(n), int(s), [int(r) for r in g]) for n, s, g in data["files"]])


def describe(path: str) -> Dataset:
    """Read the footers of a Parquet file or folder. DataError when the files disagree on
    their columns or one is not Parquet."""
    files, columns = [], None
    for name, size in _list(path):
        full = file_path(path, name)
        pf, fh = _open(full)
        try:
            names = tuple(pf.schema_arrow.names)
            groups = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        finally:
            fh.close()
        if columns is None:
            columns = names
        elif names != columns:
            raise DataError(f"'{full}' has the columns {csvfile._quoted_list(list(names))}; the first file of '{path}' has {csvfile._quoted_list(list(columns))}")
        files.append((name, size, groups))
    assert columns is not None
    dataset = Dataset(path, columns, files)
    if dataset.rows == 0:
        raise DataError(f"the Parquet data '{path}' has no rows")
    return dataset


def read_schema(dataset: Dataset, label: str | None = None, drop: Sequence[str] = ()) -> csvfile.CsvSchema:
    return csvfile.schema_of(dataset.columns, dataset.path, label, drop)


def plan_partitions(dataset: Dataset, n_parts: int) -> list[csvfile.Partition]:
    """``n_parts`` row ranges: at row-group boundaries, balanced by rows, when there are at
    least ``n_parts`` row groups; else rows split evenly (see the module doc)."""
    if n_parts < 1:
        raise ValueError("n_parts must be at least 1")
    pieces = dataset.pieces()
    total = dataset.rows
    if len(pieces) >= n_parts:
        edges = np.array([first for _, _, first, _ in pieces] + [total])
        bounds = [0]
        for k in range(1, n_parts):
            # the row-group edge nearest the even split, leaving one group each to the rest
            target = k * total / n_parts
            lo = int(np.searchsorted(edges, bounds[-1], side="right"))  # at least one group each
            hi = len(pieces) - (n_parts - k)
            candidates = edges[lo : hi + 1]
            bounds.append(int(candidates[np.argmin(np.abs(candidates - target))]))
        bounds.append(total)
    else:
        bounds = [int(b) for b in np.arange(n_parts + 1) * total // n_parts]
    return [csvfile.Partition(k, bounds[k], bounds[k + 1], bounds[k] + 1, bounds[k + 1] - bounds[k]) for k in range(n_parts)]


@dataclass
class ReadReport:
    """What a worker read: the row groups (file index, group), the bytes of their column
    chunks fetched, and the bytes of the files' footers (read by every reader)."""

    row_groups: list[tuple[int, int]] = field(default_factory=list)
    bytes_read: int = 0
    footer_bytes: int = 0
    bytes_total: int = 0

    def describe(self) -> str:
        groups = ", ".join(f"{f}:{g}" for f, g in self.row_groups) or "none"
        return (f"read row groups (file:group) {groups}: {self.bytes_read} bytes of column chunks "
                f"and {self.footer_bytes} of footers, of {self.bytes_total} bytes in all")


def read_rows(dataset: Dataset, schema: csvfile.CsvSchema, part: csvfile.Partition,
              report: ReadReport | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows [part.start, part.end) as ``csvfile.read_partition`` gives a CSV's: float64
    features in the schema's order and the label cells as text (empty without a label).
    Only the row groups holding those rows are read, and only the schema's columns."""
    report = report if report is not None else ReadReport()
    report.bytes_total = dataset.size
    names = [dataset.columns[i] for i in schema.feature_indices]
    label = dataset.columns[schema.label_index] if schema.label_index is not None else None
    wanted = [*names, *([label] if label is not None else [])]
    by_file: dict[int, list[tuple[int, int, int]]] = {}
    for f, g, first, n in dataset.pieces():
        if n and first < part.end and first + n > part.start:
            by_file.setdefault(f, []).append((g, first, n))
    feature_blocks, label_blocks = [], []
    for f, groups in sorted(by_file.items()):
        name = file_path(dataset.path, dataset.files[f][0])
        pf, fh = _open(name)
        footer = fh.bytes_read
        try:
            missing = [c for c in wanted if c not in pf.schema_arrow.names]
            if missing:
                raise DataError(f"'{name}' lacks the column(s) {csvfile._quoted_list(missing)}")
            try:
                table = pf.read_row_groups([g for g, _, _ in groups], columns=wanted, use_threads=False)
            except DataError:
                raise
            except Exception as exc:
                detail = " ".join(str(exc).split())[:200]
                raise DataError(f"cannot read the row groups of '{name}' ({detail})") from None
        finally:
            fh.close()
            report.footer_bytes += footer
            report.bytes_read += fh.bytes_read - footer
        report.row_groups += [(f, g) for g, _, _ in groups]
        first_row = groups[0][1]
        lo, hi = max(part.start - first_row, 0), min(part.end - first_row, table.num_rows)
        table = table.slice(lo, hi - lo)
        where = first_row + lo  # the dataset row number of the table's first row, from 0
        feature_blocks.append(_features(table, names, name, where))
        if label is not None:
            label_blocks.append(_labels(table, label, name, where))
    X = np.concatenate(feature_blocks) if feature_blocks else np.empty((0, len(names)))
    labels = np.concatenate(label_blocks) if label_blocks else np.array([], dtype=str)
    return X, labels


def _column(table: Any, name: str) -> Any:
    return table.column(name).combine_chunks() if table.num_rows else table.column(name)


def _first_null(column: Any) -> int:
    return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])


def _features(table: Any, names: list[str], path: str, first_row: int) -> np.ndarray:
    import pyarrow as pa

    X = np.empty((table.num_rows, len(names)))
    for c, name in enumerate(names):
        column = _column(table, name)
        kind = column.type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_decimal(kind)):
            raise DataError(f"'{path}' column '{name}' holds {kind}, not numbers; pass --drop {name} to leave it out")
        if column.null_count:
            raise DataError(f"'{path}' row {first_row + _first_null(column) + 1}, column '{name}': the cell is empty (null)")
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise DataError(f"'{path}' row {first_row + int(bad[0]) + 1}, column '{name}': {float(values[bad[0]])} is not finite")
        X[:, c] = values
    return X


def _labels(table: Any, name: str, path: str, first_row: int) -> np.ndarray:
    import pyarrow as pa

    column = _column(table, name)
    if column.null_count:
        raise DataError(f"'{path}' row {first_row + _first_null(column) + 1}, column '{name}': the label cell is empty (null)")
    kind = column.type
    values = column.to_pylist()
    if pa.types.is_floating(kind):
        text = [repr(float(v)) for v in values]
    else:
        text = [str(v) for v in values]
    return np.array(text, dtype=str)


def read_partition(data: dict[str, Any], path: str, part: csvfile.Partition,
                   report: ReadReport | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A worker's partition of Parquet input from its job spec's data entries."""
    return read_rows(Dataset.from_data(path, data), csvfile.CsvSchema.from_dict(data["schema"]), part, report)


def check_unchanged(data: dict[str, Any], path: str) -> None:
    """DataError unless every file of the job's dataset is at ``path`` with its size."""
    for name, size, _ in data["files"]:
        full = file_path(path, name)
        if storage.stored_size(full) != int(size):
            raise DataError(f"Parquet file '{full}' differs in size from the job's ({size} bytes)")
