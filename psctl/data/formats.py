"""Sparse inputs: LIBSVM text and CSV with hashed categorical columns (Criteo-style).

Both read one partition (a byte range aligned to lines, planned by
:func:`psctl.data.plan_partitions`) into :class:`~psctl.sparse.SparseRows`
plus raw label strings, and both become a sparse linear model over keys
0..n_features-1 with the bias key n_features.

- ``libsvm``: ``label idx:val idx:val ...`` (``# comments`` allowed). Indices are
  0- or 1-based: given by ``index_base`` or detected from the data (an index 0
  anywhere means 0-based). ``n_features`` is given or the largest index seen;
  both come out of the statistics pass, so every worker and the driver agree.
- ``hashed_csv``: a CSV with a header (or numbered columns); each categorical
  cell becomes the key ``hash(column, value) mod (2^B - 1)`` with value 1, each
  numeric column one key ``hash(column)`` with the cell's number; empty cells
  are missing. The key space is 2^B with the bias key 2^B - 1, so keys fit a
  uint32 on the wire for B <= 32.

Data spec (``spec["data"]`` beside path and size): ``{"format": "libsvm",
"index_base": 0|1|None, "n_features": int|None}`` or ``{"format": "hashed_csv",
"schema": CsvSchema dict, "hash_bits": B, "categorical": [column names]}``.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from psctl.core.sparse import SparseRows, mix64
from psctl.data import csvfile, storage
from psctl.errors import DataError

FORMATS = ("auto", "csv", "libsvm")
SPARSE_FORMATS = ("libsvm", "hashed_csv")
DEFAULT_HASH_BITS = 24
MAX_HASH_BITS = 62
DETECT_BYTES = 64 * 1024

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


# -- what the driver learns before training -----------------------------------------
@dataclass
class Source:
    """An input file as the driver plans it: its format, what workers need to read it,
    and the feature count (None for LIBSVM until the statistics pass)."""

    format: str  # "csv", "libsvm" or "hashed_csv"
    data: dict[str, Any] = field(default_factory=dict)  # spec["data"] entries besides path and size
    schema: csvfile.CsvSchema | None = None
    n_features: int | None = None
    has_header: bool = True

    @property
    def sparse(self) -> bool:
        return self.format in SPARSE_FORMATS


def detect_format(path: str | os.PathLike[str]) -> str:
    """'libsvm' when the first lines have ``idx:val`` items and no commas, else 'csv'."""
    with csvfile._open(path) as fh:
        sample = fh.read(DETECT_BYTES)
    if not sample.strip():
        raise DataError(f"data file '{path}' is empty")
    if b"\0" in sample:
        raise DataError(f"data file '{path}' is not a text file")
    lines = sample.split(b"\n")[:-1] or [sample]  # complete lines only, unless there is just one
    if any(b"," in ln for ln in lines):
        return "csv"
    if any(b":" in tok for ln in lines for tok in ln.split()[1:]):
        return "libsvm"
    return "csv"


def plan_source(
    path: str,
    fmt: str = "auto",
    *,
    label: str | None = None,
    drop: Sequence[str] = (),
    has_header: bool = True,
    index_base: int | None = None,
    n_features: int | None = None,
    hash_bits: int | None = None,
    categorical: Sequence[str] = (),
    delimiter: str = ",",
) -> Source:
    """Resolve the input format and its columns or layout. Raises DataError with one sentence."""
    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}; got '{fmt}'")
    if fmt == "auto":
        fmt = "csv" if delimiter != "," else detect_format(path)
    hashed = hash_bits is not None or bool(categorical)
    if fmt == "libsvm":
        if hashed:
            raise DataError("--hash-bits and --categorical are for CSV input, not LIBSVM")
        if label is not None or drop:
            raise DataError("--label and --drop are for CSV input; a LIBSVM line starts with its label")
        if delimiter != ",":
            raise DataError("--delimiter is for CSV input; LIBSVM items are separated by spaces")
        if index_base not in (None, 0, 1):
            raise DataError("--index-base must be 0 or 1")
        if n_features is not None and n_features < 1:
            raise DataError("--n-features must be at least 1")
        spec = {"format": "libsvm", "index_base": index_base, "n_features": n_features}
        return Source("libsvm", spec, None, n_features, has_header=False)
    if index_base is not None or n_features is not None:
        raise DataError("--index-base and --n-features are for LIBSVM input")
    schema = csvfile.read_schema(path, label, drop, has_header, delimiter)
    if not hashed:
        return Source("csv", {"format": "csv", "schema": schema.to_dict()}, schema, len(schema.feature_indices), has_header)
    bits = DEFAULT_HASH_BITS if hash_bits is None else hash_bits
    if not 1 <= bits <= MAX_HASH_BITS:
        raise DataError(f"--hash-bits must be between 1 and {MAX_HASH_BITS}")
    names = []
    for ref in categorical:
        index = csvfile._column_index(schema.columns, ref, "--categorical", path)
        if index not in schema.feature_indices:
            raise DataError(f"--categorical column '{schema.columns[index]}' is the label or dropped, not a feature")
        names.append(schema.columns[index])
    spec = {"format": "hashed_csv", "schema": schema.to_dict(), "hash_bits": bits, "categorical": sorted(set(names))}
    return Source("hashed_csv", spec, schema, 2**bits - 1, has_header)


# -- reading one partition ---------------------------------------------------------------
def read_partition(spec: dict[str, Any], path: str, part: csvfile.Partition) -> tuple[SparseRows, np.ndarray]:
    """A partition of a sparse input as (rows with raw LIBSVM indices or final hashed keys, labels)."""
    if spec["format"] == "libsvm":
        return read_libsvm(path, part, spec.get("index_base"), spec.get("n_features"))
    schema = csvfile.CsvSchema.from_dict(spec["schema"])
    return read_hashed_csv(path, part, schema, spec["categorical"], int(spec["hash_bits"]))


def _rows_of(path: str | os.PathLike[str], part: csvfile.Partition) -> tuple[list[bytes], list[bytes]]:
    """The partition's lines and its rows (non-blank lines), as bytes."""
    lines = storage.read_range(path, part.start, part.end).split(b"\n")
    return lines, [ln for ln in lines if ln.strip()]


def _line_numbers(lines: list[bytes], first_line: int) -> list[tuple[int, str]]:
    return csvfile._numbered_rows([ln.decode("utf-8", errors="replace") for ln in lines], first_line)


def read_libsvm(
    path: str | os.PathLike[str],
    part: csvfile.Partition,
    index_base: int | None = None,
    n_features: int | None = None,
) -> tuple[SparseRows, np.ndarray]:
    """LIBSVM rows as they are in the file (indices not yet shifted) and their labels.

    With ``index_base`` 1 an index 0 is an error; with ``n_features`` an index past it is.
    Raises DataError naming the file line of the first bad item.
    """
    lines, rows = _rows_of(path, part)
    try:
        X, labels = _libsvm_fast(rows)
    except ValueError:
        X, labels = _libsvm_exact(path, _line_numbers(lines, part.first_line))
    bad = _beyond(X.indices, index_base, n_features)
    if bad is not None:
        row = int(np.searchsorted(X.indptr, bad, side="right")) - 1
        line_no, _ = _line_numbers(lines, part.first_line)[row]
        raise DataError(f"'{path}' line {line_no}: {_index_problem(int(X.indices[bad]), index_base, n_features)}")
    return X, labels


def _beyond(indices: np.ndarray, index_base: int | None, n_features: int | None) -> int | None:
    """Position of the first index that the given base or feature count forbids."""
    bad = np.zeros(len(indices), bool)
    if index_base == 1:
        bad |= indices < 1
    if n_features is not None:
        bad |= indices - (index_base or 0) >= n_features
    hits = np.flatnonzero(bad)
    return int(hits[0]) if len(hits) else None


def _index_problem(index: int, index_base: int | None, n_features: int | None) -> str:
    if index_base == 1 and index < 1:
        return f"feature index {index} in a file read as 1-based (pass --index-base 0 for 0-based indices)"
    return f"feature index {index} is beyond --n-features {n_features}"


def _libsvm_fast(rows: list[bytes]) -> tuple[SparseRows, np.ndarray]:
    """Vectorized parse; raises ValueError on anything unusual (the exact reader then names it)."""
    if any(b"#" in r for r in rows):
        rows = [r.split(b"#", 1)[0] for r in rows]
    tokens = [r.split() for r in rows]
    counts = np.fromiter(map(len, tokens), np.int64, count=len(tokens))
    if (counts == 0).any():  # a line holding only a comment
        raise ValueError("empty row")
    flat = np.array(list(itertools.chain.from_iterable(tokens)), dtype="S") if len(tokens) else np.array([], "S1")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])) if len(tokens) else np.zeros(0, np.int64)
    is_label = np.zeros(len(flat), bool)
    is_label[starts] = True
    labels = flat[is_label]
    if np.strings.find(labels, b":").max(initial=-1) >= 0:
        raise ValueError("a label holds ':'")
    index, sep, value = np.strings.partition(flat[~is_label], b":")
    if len(sep) and (sep != b":").any():
        raise ValueError("an item without ':'")
    indices = index.astype(np.int64)
    values = value.astype(np.float64)
    if (indices < 0).any() or not np.isfinite(values).all():
        raise ValueError("a negative index or a value that is not finite")
    indptr = np.concatenate(([0], np.cumsum(counts - 1)))
    labels_text = [lb.decode("utf-8", errors="replace") for lb in labels.tolist()]
    return SparseRows(indptr, indices, values.astype(np.float32)), np.array(labels_text, dtype=str)


def _libsvm_exact(path: str | os.PathLike[str], rows: list[tuple[int, str]]) -> tuple[SparseRows, np.ndarray]:
    """Item by item in Python: slow, but it names the line of the first bad item (DataError).

    It is the reference: where the fast reader refuses an item this one accepts, the
    rows come from here.
    """
    entries: list[dict[int, float]] = []
    labels = []
    for line_no, line in rows:
        items = line.split("#", 1)[0].split()
        where = f"'{path}' line {line_no}"
        if not items:
            raise DataError(f"{where} has a comment but no label")
        if ":" in items[0]:
            raise DataError(f"{where} starts with '{items[0][:40]}'; a LIBSVM line starts with its label")
        labels.append(items[0])
        entries.append({})
        for item in items[1:]:
            index, sep, value = item.partition(":")
            if not sep:
                raise DataError(f"{where}: '{item[:40]}' is not an index:value pair")
            try:
                if int(index) < 0:
                    raise ValueError
            except ValueError:
                raise DataError(f"{where}: feature index '{index[:40]}' is not a non-negative integer") from None
            try:
                number = float(value)
            except ValueError:
                raise DataError(f"{where}: the value '{value[:40]}' of feature {index} is not a number") from None
            if not math.isfinite(number):
                raise DataError(f"{where}: the value '{value[:40]}' of feature {index} is not finite")
            entries[-1][int(index)] = entries[-1].get(int(index), 0.0) + number
    return SparseRows.from_rows(entries), np.array(labels, dtype=str)


# -- LIBSVM layout from the statistics pass ------------------------------------------------
def partial_stats(spec: dict[str, Any], X: SparseRows) -> dict[str, Any] | None:
    """What a worker tells the statistics pass about its partition (LIBSVM: the index range)."""
    if spec["format"] != "libsvm":
        return None
    has = X.nnz > 0
    return {
        "rows": len(X),
        "nnz": X.nnz,
        "min_index": int(X.indices.min()) if has else None,
        "max_index": int(X.indices.max()) if has else None,
    }


def layout(spec: dict[str, Any], stats: list[dict[str, Any]]) -> tuple[int, int]:
    """(index base, n_features) of a LIBSVM input from every partition's statistics."""
    mins = [s["min_index"] for s in stats if s.get("min_index") is not None]
    maxes = [s["max_index"] for s in stats if s.get("max_index") is not None]
    base = spec.get("index_base")
    if base is None:
        base = 0 if mins and min(mins) == 0 else 1
    largest_key = max(maxes) - base if maxes else -1
    n_features = spec.get("n_features")
    if n_features is None:
        n_features = max(largest_key + 1, 1)
    elif largest_key >= n_features:
        raise DataError(f"the data has feature index {largest_key + base}, beyond --n-features {n_features}")
    return base, n_features


def n_features_of(spec: dict[str, Any], stats: list[dict[str, Any]]) -> int | None:
    """The model's feature count once the statistics are in (None for dense CSV: the schema says)."""
    if spec.get("format") == "libsvm":
        return layout(spec, stats)[1]
    if spec.get("format") == "hashed_csv":
        return 2 ** int(spec["hash_bits"]) - 1
    return None


def to_keys(spec: dict[str, Any], X: SparseRows, stats: list[dict[str, Any]]) -> SparseRows:
    """Rows over model keys: LIBSVM indices shifted by the base (hashed keys already are keys)."""
    n_features = n_features_of(spec, stats)
    if spec["format"] == "libsvm":
        base, _ = layout(spec, stats)
        X = X.with_indices(X.indices - base)
    X.n_cols = n_features
    return X


def meta_of(spec: dict[str, Any], stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The input description a model file keeps so predict reads new data the same way."""
    if spec["format"] == "libsvm":
        base, n_features = layout(spec, stats)
        return {"format": "libsvm", "index_base": base, "n_features": n_features}
    return {k: spec[k] for k in ("format", "hash_bits", "categorical")}


# -- hashed CSV --------------------------------------------------------------------------------
def hash_cells(cells: np.ndarray, seed: int) -> np.ndarray:
    """A stable 64-bit hash per byte string (FNV-1a over the bytes, then mixed), vectorized
    over the distinct values: one numpy pass per byte position, no per-cell Python."""
    distinct, inverse = np.unique(np.asarray(cells, dtype="S"), return_inverse=True)
    width = distinct.dtype.itemsize
    h = np.full(len(distinct), _FNV_OFFSET ^ np.uint64(seed % 2**64), np.uint64)
    if width:
        codes = distinct.view(np.uint8).reshape(len(distinct), width)
        for j in range(width):
            byte = codes[:, j].astype(np.uint64)
            h = np.where(byte != 0, (h ^ byte) * _FNV_PRIME, h)  # "S" pads with NUL bytes
    return mix64(h)[inverse.reshape(-1)]


def column_seed(name: str, kind: str) -> int:
    """The hash seed of a column: its name, so column order does not matter."""
    return int(hash_cells(np.array([f"{kind}:{name}".encode()], dtype="S"), 0)[0])


def categorical_keys(cells: np.ndarray, name: str, hash_bits: int) -> np.ndarray:
    """The keys of a categorical column's cells (byte strings, as a CSV holds them)."""
    return hash_cells(cells, column_seed(name, "cat")) % np.uint64(2**hash_bits - 1)


def numeric_key(name: str, hash_bits: int) -> int:
    """The one key of a numeric column; its cells are the key's values."""
    return column_seed(name, "num") % (2**hash_bits - 1)


def hash_columns(columns: Sequence[tuple[str, np.ndarray]], categorical: Sequence[str], hash_bits: int) -> SparseRows:
    """In-memory columns hashed as :func:`read_hashed_csv` hashes a CSV's: a categorical
    column's cells are its values' text (``str(value)``, what a CSV of them holds), a numeric
    column's are its numbers; missing cells (None, NaN, empty text) have no key."""
    n_rows = len(columns[0][1]) if columns else 0
    parts_rows, parts_keys, parts_values = [], [], []
    for name, column in columns:
        column = np.asarray(column)
        if name in categorical:
            text = np.array(["" if _missing(v) else str(v) for v in column.tolist()], dtype=str)
            cells = np.strings.strip(np.char.encode(text, "utf-8")) if len(text) else np.array([], "S1")
            present = np.flatnonzero(np.strings.str_len(cells) > 0)
            keys = categorical_keys(cells[present], name, hash_bits)
            values = np.ones(len(present), np.float32)
        else:
            try:
                numbers = column.astype(np.float64)
            except (TypeError, ValueError):
                raise DataError(f"column '{name}' is not numeric; name it in categorical to hash it") from None
            if np.isinf(numbers).any():
                raise DataError(f"column '{name}' holds an infinite number")
            present = np.flatnonzero(~np.isnan(numbers))
            keys = np.full(len(present), numeric_key(name, hash_bits), np.uint64)
            values = numbers[present].astype(np.float32)
        parts_rows.append(present)
        parts_keys.append(keys.astype(np.int64))
        parts_values.append(values)
    if not columns:
        return SparseRows.from_coo(n_rows, np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), 2**hash_bits - 1)
    return SparseRows.from_coo(
        n_rows, np.concatenate(parts_rows), np.concatenate(parts_keys), np.concatenate(parts_values), 2**hash_bits - 1
    )


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def read_hashed_csv(
    path: str | os.PathLike[str], part: csvfile.Partition, schema: csvfile.CsvSchema, categorical: Sequence[str], hash_bits: int
) -> tuple[SparseRows, np.ndarray]:
    """A CSV partition as hashed keys (see the module doc) and its label cells."""
    raw = storage.read_range(path, part.start, part.end)
    fast = _hashed_arrow(raw, part, schema, categorical, hash_bits)
    if fast is not None:
        return fast
    lines = raw.split(b"\n")
    rows = [ln for ln in lines if ln.strip()]
    n_cols = len(schema.columns)
    sep = schema.delimiter.encode()
    counts = np.fromiter((r.count(sep) for r in rows), np.int64, count=len(rows))
    if (counts != n_cols - 1).any():
        bad = int(np.flatnonzero(counts != n_cols - 1)[0])
        line_no, _ = _line_numbers(lines, part.first_line)[bad]
        reference = "the header" if schema.has_header else "the first line"
        raise DataError(f"'{path}' line {line_no} has {counts[bad] + 1} cells; {reference} has {n_cols}")
    rows = [r.rstrip(b"\r") for r in rows]
    cells = np.array(sep.join(rows).split(sep) if rows else [], dtype="S").reshape(len(rows), n_cols)
    X = hash_cell_columns(
        len(rows), [(schema.columns[j], cells[:, j]) for j in schema.feature_indices], categorical, hash_bits,
        lambda name, column, present: _numbers(column, path, name, present, lines, part),
    )
    if schema.label_index is None:
        return X, np.array([], dtype=str)
    labels = _clean(cells[:, schema.label_index])
    empty = np.flatnonzero(np.strings.str_len(labels) == 0)
    if len(empty):
        line_no, _ = _line_numbers(lines, part.first_line)[empty[0]]
        raise DataError(f"'{path}' line {line_no}, column '{schema.columns[schema.label_index]}': the label cell is empty")
    return X, np.array([v.decode("utf-8", errors="replace") for v in labels.tolist()], dtype=str)


def _hashed_arrow(
    raw: bytes, part: csvfile.Partition, schema: csvfile.CsvSchema, categorical: Sequence[str], hash_bits: int
) -> tuple[SparseRows, np.ndarray] | None:
    """:func:`read_hashed_csv`'s rows and labels from pyarrow's CSV reader, when it reads the
    bytes as the cell-by-cell path does; else None (refused as ``csvfile._read_arrow`` refuses,
    and also for a non-finite number, a numeric cell pyarrow does not parse or an empty label),
    and that path decides, error sentences included. Categorical and label cells come as
    dictionaries of the file's bytes: each distinct cell is cleaned and hashed once, where the
    other path makes a byte string of every cell; an empty numeric cell is absent, as there."""
    feature_cat = [(j, schema.columns[j] in categorical) for j in schema.feature_indices]
    label = [] if schema.label_index is None else [schema.label_index]
    table = csvfile._arrow_table(raw, schema, part.n_rows, [j for j, cat in feature_cat if not cat],
                                 [j for j, cat in feature_cat if cat] + label, empty_numbers=True, text_bytes=True)
    if table is None:
        return None
    parts_rows, parts_keys, parts_values = [], [], []
    for j, cat in feature_cat:
        name = schema.columns[j]
        if cat:
            distinct, codes = _arrow_cells(table, j)
            present = np.flatnonzero(np.strings.str_len(distinct)[codes] > 0)
            keys = categorical_keys(distinct, name, hash_bits)[codes[present]]
            values = np.ones(len(present), np.float32)
        else:
            column = table.column(f"c{j}").combine_chunks()
            numbers = csvfile._values(column, np.float64)
            present = np.arange(len(column)) if not column.null_count else np.flatnonzero(_valid(column))
            with np.errstate(over="ignore"):
                values = numbers[present].astype(np.float32)
            if not np.isfinite(values).all():  # not finite, or past float32's range: the sentence is the other path's
                return None
            keys = np.full(len(present), numeric_key(name, hash_bits), np.uint64)
        parts_rows.append(present)
        parts_keys.append(keys.astype(np.int64))
        parts_values.append(values)
    n_rows = table.num_rows
    X = SparseRows.from_coo(n_rows, np.concatenate(parts_rows), np.concatenate(parts_keys), np.concatenate(parts_values), 2**hash_bits - 1)
    if not label:
        return X, np.array([], dtype=str)
    distinct, codes = _arrow_cells(table, label[0])
    if not np.strings.str_len(distinct)[codes].all():
        return None
    return X, np.array([v.decode("utf-8", errors="replace") for v in distinct.tolist()], dtype=str)[codes]


def _arrow_cells(table: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Column ``index`` of a ``text_bytes`` table: its distinct cells, cleaned (:func:`_clean`), and each row's code into them."""
    cells = table.column(f"c{index}").unify_dictionaries().combine_chunks()
    return _clean(np.array(cells.dictionary.to_pylist(), dtype="S")), csvfile._values(cells.indices, np.int32)


def _valid(column: Any) -> np.ndarray:
    """Which entries of a pyarrow array are not null, from its validity bitmap."""
    bits = np.unpackbits(np.frombuffer(column.buffers()[0], np.uint8), bitorder="little")
    return bits[column.offset : column.offset + len(column)].astype(bool)


def hash_cell_columns(
    n_rows: int, columns: Sequence[tuple[str, np.ndarray]], categorical: Sequence[str], hash_bits: int,
    numbers: Callable[[str, np.ndarray, np.ndarray], np.ndarray],
) -> SparseRows:
    """Feature columns (name, byte-string cells, as a CSV holds them) as hashed keys: a categorical cell is the key of
    its hashed text (value 1), a numeric one its column's key with the number as the value; an
    empty cell is absent. ``numbers(name, cells, rows)`` parses a numeric column's present cells
    (its sentence names where a bad one is)."""
    space = 2**hash_bits - 1  # keys 0 .. 2^B - 2; the bias key is 2^B - 1
    parts_rows, parts_keys, parts_values = [], [], []
    for name, cells in columns:
        column = _clean(cells)
        present = np.flatnonzero(np.strings.str_len(column) > 0)
        if name in categorical:
            keys = categorical_keys(column[present], name, hash_bits)
            values = np.ones(len(present), np.float32)
        else:
            values = numbers(name, column[present], present)
            keys = np.full(len(present), numeric_key(name, hash_bits), np.uint64)
        parts_rows.append(present)
        parts_keys.append(keys.astype(np.int64))
        parts_values.append(values)
    return SparseRows.from_coo(n_rows, np.concatenate(parts_rows), np.concatenate(parts_keys), np.concatenate(parts_values), space)


def _clean(column: np.ndarray) -> np.ndarray:
    """Cells without surrounding whitespace and one pair of double quotes (as csvfile._cell)."""
    column = np.strings.strip(column)
    quoted = np.strings.startswith(column, b'"') & np.strings.endswith(column, b'"') & (np.strings.str_len(column) >= 2)
    if quoted.any():
        column = column.copy()
        column[quoted] = np.strings.slice(column[quoted], 1, -1)
    return column


def _numbers(
    cells: np.ndarray, path: str | os.PathLike[str], name: str, rows: np.ndarray, lines: list[bytes], part: csvfile.Partition
) -> np.ndarray:
    try:
        values = cells.astype(np.float64)
    except ValueError:  # the exact reading, cell by cell, is the reference (as in csvfile.py)
        values = np.array([_number_or_nan(c) for c in cells.tolist()])
    with np.errstate(over="ignore"):
        single = values.astype(np.float32)
    ok = np.isfinite(single)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        line_no, _ = _line_numbers(lines, part.first_line)[rows[bad]]
        text = cells[bad].decode("utf-8", errors="replace")[:40]
        what = ("is past float32's range, the values' type (about 3.4e38)" if np.isfinite(values[bad])
                else "is not a finite number (pass --categorical to hash text columns)")
        raise DataError(f"'{path}' line {line_no}, column '{name}': '{text}' {what}")
    return single


def _number_or_nan(cell: bytes) -> float:
    try:
        return float(cell)
    except ValueError:
        return math.nan


def read_whole(spec: dict[str, Any], path: str, schema: csvfile.CsvSchema | None = None) -> tuple[SparseRows, np.ndarray]:
    """Every row of a file (predict): one partition covering it."""
    has_header = spec["format"] != "libsvm" and (schema.has_header if schema else True)
    [whole] = csvfile.plan_partitions(path, 1, has_header)
    if spec["format"] == "libsvm":
        return read_libsvm(path, whole, spec.get("index_base"))
    assert schema is not None
    return read_hashed_csv(path, whole, schema, spec["categorical"], int(spec["hash_bits"]))
