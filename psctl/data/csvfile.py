"""CSV input: the schema from the first line, byte-range partitions, fast row parsing,
mergeable column statistics and label handling.

A *row* is a non-blank line after the header. Partitions are byte ranges aligned to
line starts, so a worker reads its own range and nothing else. The cells are separated
by the schema's ``delimiter`` (a comma unless ``--delimiter`` says otherwise). The bytes
come through :mod:`.storage`: a local file, a URL, or a compressed file's text.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

import numpy as np

from psctl.data import storage
from psctl.errors import DataError

CHUNK_BYTES = 4 << 20
# The longest line read (its newline included): a bound on memory for files that are
# not CSV, or are hostile. A row of 100,000 numbers takes about 1-2 MiB.
MAX_LINE_BYTES = 4 << 20
_UTF8_BOM = b"\xef\xbb\xbf"
# What bytes.strip() removes; a line made only of these is blank, not a row.
_BLANK = b" \t\n\r\x0b\x0c"
_BLANK_STR = _BLANK.decode()
_BLANK_CODES = np.frombuffer(_BLANK, np.uint8)
#: The most bytes of a partition a worker parses in one call (see :func:`slice_partition`).
SLICE_BYTES = 2 << 20


@dataclass(frozen=True)
class CsvSchema:
    """Which columns of a CSV are the label and the features (by 0-based index)."""

    columns: tuple[str, ...]  # header names, or "0".."n-1" without a header
    label_index: int | None  # None: the file has no label column (predict input)
    feature_indices: tuple[int, ...]
    has_header: bool
    delimiter: str = ","

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.columns[i] for i in self.feature_indices)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CsvSchema:
        label = d["label_index"]
        return cls(
            tuple(str(c) for c in d["columns"]),
            None if label is None else int(label),
            tuple(int(i) for i in d["feature_indices"]),
            bool(d["has_header"]),
            str(d.get("delimiter", ",")),
        )


@dataclass(frozen=True)
class Partition:
    """Bytes [start, end) of a data file, aligned to line starts, holding ``n_rows`` rows.

    ``first_line`` is the 1-based file line number of the first row (of the line at
    ``start`` when the partition is empty), so errors can name real lines.
    """

    index: int
    start: int
    end: int
    first_line: int
    n_rows: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Partition:
        return cls(**{k: int(d[k]) for k in ("index", "start", "end", "first_line", "n_rows")})


def _open(path: str | os.PathLike[str]) -> BinaryIO:
    """The input's text (a local file, a URL, decompressed): see :func:`storage.open_input`."""
    return storage.open_input(path)


DELIMITER_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}


def check_delimiter(delimiter: str | None) -> str:
    """The cell separator ``--delimiter`` names: one character (``tab`` or ``\\t`` for a tab).
    UsageError-like DataError for anything a line-based reader cannot split on."""
    if delimiter is None:
        return ","
    value = DELIMITER_NAMES.get(delimiter.lower(), delimiter) if len(delimiter) > 1 else delimiter
    if len(value) != 1 or value in "\n\r\"" or len(value.encode()) != 1:
        raise DataError(f"--delimiter must be one ASCII character other than a quote or newline (or 'tab'); got {delimiter!r}")
    return value


def _line_too_long(path: str | os.PathLike[str], line_no: int) -> DataError:
    return DataError(
        f"'{path}' line {line_no} is longer than {MAX_LINE_BYTES >> 20} MiB, the most psctl reads as one line; "
        "is it a CSV file?"
    )


def _first_line(fh: BinaryIO, path: str | os.PathLike[str]) -> bytes:
    first = fh.readline(MAX_LINE_BYTES + 1)
    if not first:
        raise DataError(f"data file '{path}' is empty")
    if len(first) > MAX_LINE_BYTES:
        raise _line_too_long(path, 1)
    if b"\0" in first:
        raise DataError(f"data file '{path}' is not a CSV text file")
    return first


def _cell(text: str) -> str:
    """A cell's value: surrounding whitespace and one pair of double quotes removed."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def _quoted_list(values: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{v}'" for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def read_schema(
    path: str | os.PathLike[str], label: str | None = None, drop: Sequence[str] = (), has_header: bool = True,
    delimiter: str = ",",
) -> CsvSchema:
    """Read the first line of ``path`` and resolve the label and feature columns.

    ``label`` and each ``drop`` entry are a column name or a 0-based index as a string.
    Without ``label`` the column named ``label`` is used, else column 0. Every column
    that is neither the label nor dropped is a feature. Raises DataError.
    """
    return schema_of(read_columns(path, has_header, delimiter), path, label, drop, has_header, delimiter)


def schema_of(
    columns: tuple[str, ...], path: str | os.PathLike[str], label: str | None = None, drop: Sequence[str] = (),
    has_header: bool = True, delimiter: str = ",",
) -> CsvSchema:
    """The label and features among ``columns`` (of ``path``, for the sentences), as :func:`read_schema` resolves them."""
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise DataError(f"'{path}' has duplicate column names: {_quoted_list(duplicates)}")
    if label is None:
        label = "label" if "label" in columns else "0"
    label_index = _column_index(columns, label, "label", path)
    dropped = {_column_index(columns, d, "--drop", path) for d in drop}
    features = tuple(i for i in range(len(columns)) if i != label_index and i not in dropped)
    if not features:
        raise DataError(f"'{path}' has no feature columns left after the label and --drop")
    return CsvSchema(columns, label_index, features, has_header, delimiter)


def read_columns(path: str | os.PathLike[str], has_header: bool = True, delimiter: str = ",") -> tuple[str, ...]:
    """The column names from the first line ("0".."n-1" without a header)."""
    with _open(path) as fh:
        first = _first_line(fh, path)
    if not first.strip():
        raise DataError(f"the first line of '{path}' is blank")
    cells = [_cell(c) for c in first.decode("utf-8-sig", errors="replace").split(delimiter)]
    return tuple(cells) if has_header else tuple(str(i) for i in range(len(cells)))


def _column_index(columns: tuple[str, ...], ref: str, what: str, path: str | os.PathLike[str]) -> int:
    """A name wins over an index, so a header name like "3" still means that column."""
    if ref in columns:
        return columns.index(ref)
    if ref.strip().lstrip("-").isdigit():
        index = int(ref)
        if not 0 <= index < len(columns):
            raise DataError(f"{what} column {index} is out of range: '{path}' has {len(columns)} columns")
        return index
    raise DataError(f"{what} column '{ref}' is not in '{path}'; its columns are {_quoted_list(columns)}")


def _scan_lines(
    fh: BinaryIO, offset: int, line_no: int, path: str | os.PathLike[str]
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Read ``fh`` from its position (file offset ``offset``, line ``line_no``) to the end
    in chunks, yielding per chunk each complete line's start offset, line number and
    whether it is a row (not blank). DataError for a line over MAX_LINE_BYTES."""
    carry = b""
    while True:
        chunk = fh.read(CHUNK_BYTES)
        if not chunk:
            if carry:  # a last line without a newline
                yield np.array([offset]), np.array([line_no]), np.array([bool(carry.strip())])
            return
        buf = carry + chunk
        arr = np.frombuffer(buf, np.uint8)
        newlines = np.flatnonzero(arr == ord("\n"))
        if not len(newlines):
            if len(buf) > MAX_LINE_BYTES:
                raise _line_too_long(path, line_no)
            carry = buf
            continue
        starts = np.concatenate(([0], newlines[:-1] + 1))
        too_long = np.flatnonzero(newlines + 1 - starts > MAX_LINE_BYTES)
        if len(too_long):
            raise _line_too_long(path, line_no + int(too_long[0]))
        if len(buf) - int(newlines[-1]) - 1 > MAX_LINE_BYTES:
            raise _line_too_long(path, line_no + len(newlines))
        # A line starting with a visible byte is a row; only the rare others need a full look.
        is_row = ~np.isin(arr[starts], _BLANK_CODES)
        for i in np.flatnonzero(~is_row):
            is_row[i] = bool(buf[starts[i] : newlines[i]].strip())
        yield offset + starts, line_no + np.arange(len(starts)), is_row
        used = int(newlines[-1]) + 1
        offset, line_no, carry = offset + used, line_no + len(newlines), buf[used:]


def _data_start(first: bytes, has_header: bool) -> tuple[int, int]:
    """Where the rows start, after the first line ``first`` when it is a header (or a UTF-8
    byte-order mark), and the file line number there."""
    if has_header:
        return len(first), 2
    return (len(_UTF8_BOM) if first.startswith(_UTF8_BOM) else 0), 1


def plan_partitions(path: str | os.PathLike[str], n_parts: int, has_header: bool = True) -> list[Partition]:
    """Split the rows of ``path`` into exactly ``n_parts`` contiguous byte ranges of about
    equal size, aligned to line starts, counting the rows in each, in one streaming pass.

    The ranges cover everything after the header. With fewer rows than parts some
    partitions are empty. Raises DataError if the file has no rows.
    """
    if n_parts < 1:
        raise ValueError("n_parts must be at least 1")
    with _open(path) as fh:
        first = _first_line(fh, path)
        data_start, line_no = _data_start(first, has_header)
        size = storage.text_size(path, fh)
        # Partition k > 0 starts at the first line start at or after targets[k - 1].
        targets = data_start + np.arange(1, n_parts) * (size - data_start) // n_parts
        starts = np.full(n_parts, size)
        start_lines = np.zeros(n_parts, np.int64)  # 0 until the start is found
        starts[0], start_lines[0] = data_start, line_no
        n_rows = np.zeros(n_parts, np.int64)
        first_rows = np.zeros(n_parts, np.int64)  # 0 until a row is seen
        next_line = line_no
        fh.seek(data_start)
        for offsets, line_nos, is_row in _scan_lines(fh, data_start, line_no, path):
            at = np.searchsorted(offsets, targets)
            found = (at < len(offsets)) & (start_lines[1:] == 0)
            starts[1:][found] = offsets[at[found]]
            start_lines[1:][found] = line_nos[at[found]]
            # A line belongs to the partition whose start is the last one at or before it;
            # for line starts that is the count of targets at or before it.
            part_of = np.searchsorted(targets, offsets[is_row], side="right")
            n_rows += np.bincount(part_of, minlength=n_parts)
            seen, first_at = np.unique(part_of, return_index=True)
            fresh = first_rows[seen] == 0
            first_rows[seen[fresh]] = line_nos[is_row][first_at[fresh]]
            next_line = int(line_nos[-1]) + 1
    if not n_rows.sum():
        raise DataError(f"data file '{path}' has no data rows")
    start_lines[start_lines == 0] = next_line
    ends = [*starts[1:], size]
    return [
        Partition(k, int(starts[k]), int(ends[k]), int(first_rows[k] if n_rows[k] else start_lines[k]), int(n_rows[k]))
        for k in range(n_parts)
    ]


class _Bounded:
    """A binary file read from its position up to ``end`` and no further."""

    def __init__(self, fh: BinaryIO, end: int):
        self.fh, self.end = fh, end

    def read(self, n: int) -> bytes:
        return self.fh.read(max(0, min(n, self.end - self.fh.tell())))


def plan_slices(path: str | os.PathLike[str], has_header: bool = True, max_bytes: int | None = None) -> list[Partition]:
    """Every row of ``path`` as consecutive slices of about ``max_bytes`` (:func:`slice_partition`
    of the one partition :func:`plan_partitions` would give), in one pass over the file: for a
    reader that goes through a whole file a slice at a time (``psctl predict`` in one process).
    Raises DataError if the file has no rows."""
    max_bytes = SLICE_BYTES if max_bytes is None else max_bytes
    with _open(path) as fh:
        first = _first_line(fh, path)
        data_start, line_no = _data_start(first, has_header)
        size = storage.text_size(path, fh)
    if size - data_start <= max_bytes:
        return plan_partitions(path, 1, has_header)
    slices = slice_partition(path, Partition(0, data_start, size, line_no, 0), max_bytes, start_line=line_no)
    if not sum(s.n_rows for s in slices):
        raise DataError(f"data file '{path}' has no data rows")
    return slices


def slice_partition(path: str | os.PathLike[str], part: Partition, max_bytes: int | None = None,
                    start_line: int | None = None) -> list[Partition]:
    """``part`` cut into consecutive partitions of about ``max_bytes`` each (default
    :data:`SLICE_BYTES`), aligned to line
    starts, each with its row count and its first row's file line number: read one after
    another they give the rows ``part`` gives, and name the same lines in errors.
    ``start_line``: the file line number at ``part.start``, for a ``part`` whose rows are not
    counted yet (``part.first_line`` and ``part.n_rows`` are then not read).

    Why: numpy's parsers hold the interpreter's lock for a whole call (np.loadtxt over 1M
    rows of 20 numbers held it 8 s), and a worker's heartbeat thread needs that lock to
    send. Parsed slice by slice, the lock changes hands between slices.
    """
    max_bytes = SLICE_BYTES if max_bytes is None else max_bytes
    if part.end - part.start <= max_bytes:
        return [part]
    targets = part.start + max_bytes * np.arange(1, -(-(part.end - part.start) // max_bytes))
    # One pass, chunk by chunk, keeping only each slice's figures (a partition of millions of
    # lines never holds an array per line). A slice: [start offset, its first line (relative),
    # its first row's relative line or -1, its rows].
    slices: list[list[int]] = []
    first_row, first_any, next_target, base = -1, -1, 0, 0
    with _open(path) as fh:
        fh.seek(part.start)
        # The scan numbers lines from the file's line at part.start where it is given, so that a
        # line too long is named by its file line (no pass before this one counted); below they
        # are numbered from 0 at part.start, as a line's index.
        base_line = 0 if start_line is None else start_line
        for offsets, lines, is_row in _scan_lines(_Bounded(fh, part.end), part.start, base_line, path):  # type: ignore[arg-type]
            lines = lines - base_line
            if first_any < 0:
                first_any = int(lines[0])
            rows_at = np.flatnonzero(is_row)
            if first_row < 0 and len(rows_at):
                first_row = int(lines[rows_at[0]])
            # Where the slices starting in this chunk begin: the first line start at or after a target.
            cuts = [0] if not slices else []
            while next_target < len(targets) and offsets[-1] >= targets[next_target]:
                at = int(np.searchsorted(offsets, targets[next_target]))
                if base + at > 0 and (not cuts or cuts[-1] != at) and (not slices or base + at != slices[-1][1]):
                    cuts.append(at)
                next_target += 1
            bounds = [*cuts, len(offsets)]
            if bounds[0] != 0:  # the chunk's first lines finish the slice under way
                slices[-1][3] += int(is_row[: bounds[0]].sum())
                if slices[-1][2] < 0 and is_row[: bounds[0]].any():
                    slices[-1][2] = int(lines[np.flatnonzero(is_row[: bounds[0]])[0]])
            for a, b in zip(bounds[:-1], bounds[1:]):
                rows = np.flatnonzero(is_row[a:b])
                slices.append([int(offsets[a]), int(lines[a]), int(lines[a + rows[0]]) if len(rows) else -1, len(rows)])
            base += len(offsets)
    # A line's file line number is its relative number + shift. ``first_line`` names the first row,
    # or for a partition of blank lines only (cut too: its bytes are read as any others) its start.
    shift = start_line if start_line is not None else part.first_line - (first_row if first_row >= 0 else first_any)
    ends = [s[0] for s in slices[1:]] + [part.end]
    return [
        Partition(part.index, start, end, (row if row >= 0 else line) + shift, n)
        for (start, line, row, n), end in zip(slices, ends)
    ]


def read_lines(path: str | os.PathLike[str], part: Partition) -> tuple[list[str], list[str]]:
    """Only bytes [part.start, part.end) of ``path``: every line, and the rows (non-blank lines)."""
    return _split_lines(storage.read_range(path, part.start, part.end))


def _split_lines(raw: bytes) -> tuple[list[str], list[str]]:
    # Undecodable bytes become U+FFFD: harmless in a dropped column, "not a number" in a feature.
    lines = raw.decode("utf-8", errors="replace").split("\n")
    return lines, [line for line in lines if line.strip(_BLANK_STR)]


#: Set to False to parse with numpy even where pyarrow is installed (the tests compare both).
USE_ARROW = True
#: Bytes from which a partition (or a worker's slice of one) goes to pyarrow. Importing pyarrow
#: costs a process 0.2-0.4 s of CPU, more than numpy's parser spends on a few MiB, so small
#: inputs (most jobs, and every start-up) never import it; a slice of SLICE_BYTES does.
ARROW_MIN_BYTES = 1 << 20


def _values(array: Any, dtype: type) -> np.ndarray:
    """The values of a pyarrow array without nulls, as a numpy view of its data buffer.
    (pyarrow's own ``to_numpy`` imports pandas when it is installed: 0.3-0.9 s a process.)"""
    data = np.frombuffer(array.buffers()[1], dtype)
    return data[array.offset : array.offset + len(array)]


def _read_arrow(raw: bytes, schema: CsvSchema, n_rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(X, labels)`` of a partition's bytes parsed by pyarrow's CSV reader, when pyarrow is
    installed (the ``parquet`` extra) and the bytes are plain CSV it reads exactly as
    :func:`_features_exact` would; otherwise None, and numpy's parser or the exact one decide
    (including every error sentence). pyarrow parses in C++ threads without the interpreter's
    lock, 2-3x faster than ``np.loadtxt`` here (0.10 s for 200k rows of 20 numbers, loadtxt
    0.35 s, pandas 0.19 s), and its float parsing is correctly rounded as numpy's is, so the
    values are the same to the bit.

    Refused, so decided by the other paths: any double quote in the bytes (pyarrow would
    read a quoted delimiter as part of a cell, where the other paths split the row), a
    non-finite or empty cell, a row with another number of cells, a blank line of spaces,
    an empty label (the error sentence needs its line number), anything pyarrow does not
    parse as a number, and a row count other than the partition's ``n_rows`` (a lone
    carriage return ends a line for pyarrow, not for the partition planner).
    """
    label = [] if schema.label_index is None else [schema.label_index]
    table = _arrow_table(raw, schema, n_rows, list(schema.feature_indices), label)
    if table is None:
        return None
    X = np.empty((table.num_rows, len(schema.feature_indices)))
    for c, j in enumerate(schema.feature_indices):
        at = 0
        for chunk in table.column(f"c{j}").chunks:
            X[at : at + len(chunk), c] = _values(chunk, np.float64)
            at += len(chunk)
    if not np.isfinite(X).all():
        return None
    if not label:
        return X, np.array([], dtype=str)
    labels = arrow_text(table, label[0])
    return None if labels is None else (X, labels)


def _arrow_table(raw: bytes, schema: CsvSchema, n_rows: int, numeric: list[int], text: list[int],
                 empty_numbers: bool = False, text_bytes: bool = False) -> Any:
    """The columns ``numeric`` (float64, no empty cell) and ``text`` (strings) of a partition's
    bytes as a pyarrow table (column ``c<index>``), or None where :func:`_read_arrow` says.
    ``empty_numbers``: an empty numeric cell is a null (a hashed CSV's absent value), not a
    refusal; ``text_bytes``: text as the file's bytes, not decoded (as the hashed reader hashes it)."""
    if not USE_ARROW or len(raw) < ARROW_MIN_BYTES or b'"' in raw or not raw.strip(_BLANK):
        return None
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
    except ImportError:
        return None
    names = [f"c{i}" for i in range(len(schema.columns))]  # header names may repeat or be empty
    # Text read straight into dictionaries: each distinct cell is one string, not one a row.
    text_type = pa.dictionary(pa.int32(), pa.binary() if text_bytes else pa.string())
    types = {names[j]: pa.float64() for j in numeric} | {names[j]: text_type for j in text}
    try:
        table = pacsv.read_csv(
            pa.py_buffer(raw),
            read_options=pacsv.ReadOptions(column_names=names, encoding="utf8"),
            parse_options=pacsv.ParseOptions(delimiter=schema.delimiter, quote_char='"', double_quote=True,
                                             escape_char=False, newlines_in_values=False, ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types=types, include_columns=[names[j] for j in [*numeric, *text]],
                                                 null_values=[""] if empty_numbers else [], strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False),
        )  # fmt: skip
    except (pa.ArrowException, UnicodeError, ValueError, TypeError):
        return None
    if table.num_rows != n_rows or any(table.column(names[j]).null_count for j in ([] if empty_numbers else numeric)):
        return None
    return table


def arrow_text(table: Any, index: int) -> np.ndarray | None:
    """Column ``index`` of an :func:`_arrow_table` as cleaned cells (:func:`_cell`) in a str array,
    each distinct cell cleaned once (no Python string per row); None if a cell is empty."""
    import pyarrow as pa

    cells = table.column(f"c{index}").unify_dictionaries().combine_chunks()  # one dictionary
    if not pa.types.is_dictionary(cells.type) or not pa.types.is_int32(cells.indices.type):
        return None
    values = np.array([_cell(text) for text in cells.dictionary.to_pylist()], dtype=str)[_values(cells.indices, np.int32)]
    return None if (values == "").any() else values


def read_partition(path: str | os.PathLike[str], schema: CsvSchema, part: Partition) -> tuple[np.ndarray, np.ndarray]:
    """Read only bytes [part.start, part.end) of ``path``.

    Returns ``X`` (float64, one row per data row, the schema's feature columns in order)
    and the stripped label cells as an array of str (empty without a label column).
    Raises DataError naming the file line and column of the first bad cell.
    """
    raw = storage.read_range(path, part.start, part.end)
    fast = _read_arrow(raw, schema, part.n_rows)
    if fast is not None:
        return fast
    lines, rows = _split_lines(raw)
    try:
        X = _features_fast(rows, schema)
    except ValueError:
        X = _features_exact(_numbered_rows(lines, part.first_line), schema, path)
    if schema.label_index is None:
        return X, np.array([], dtype=str)
    label = schema.label_index
    labels = np.array([_cell(row.split(schema.delimiter, label + 1)[label]) for row in rows], dtype=str)
    empty = np.flatnonzero(labels == "")
    if len(empty):
        line_no = _numbered_rows(lines, part.first_line)[empty[0]][0]
        raise DataError(f"'{path}' line {line_no}, column '{schema.columns[label]}': the label cell is empty")
    return X, labels


def read_csv(path: str | os.PathLike[str], schema: CsvSchema) -> tuple[np.ndarray, np.ndarray]:
    """Read every row of ``path``, as :func:`read_partition` does for one partition."""
    [whole] = plan_partitions(path, 1, schema.has_header)
    return read_partition(path, schema, whole)


def _numbered_rows(lines: list[str], first_line: int) -> list[tuple[int, str]]:
    """(file line number, text) of each row; ``first_line`` numbers the first row,
    which may follow blank lines."""
    numbered = [(i, line) for i, line in enumerate(lines) if line.strip(_BLANK_STR)]
    shift = first_line - numbered[0][0] if numbered else 0
    return [(i + shift, line) for i, line in numbered]


def _features_fast(rows: list[str], schema: CsvSchema) -> np.ndarray:
    """numpy's C parser; raises ValueError on anything it or the checks here dislike."""
    if not rows:  # loadtxt warns on empty input
        return np.empty((0, len(schema.feature_indices)))
    # loadtxt with usecols ignores extra cells, so count them first.
    n_commas = len(schema.columns) - 1
    if any(row.count(schema.delimiter) != n_commas for row in rows):
        raise ValueError("wrong number of cells")
    X = np.loadtxt(
        rows, delimiter=schema.delimiter, usecols=schema.feature_indices, dtype=np.float64, comments=None, quotechar='"', ndmin=2
    )
    if not np.isfinite(X).all():
        raise ValueError("a feature is not finite")
    return X


def _features_exact(rows: list[tuple[int, str]], schema: CsvSchema, path: str | os.PathLike[str]) -> np.ndarray:
    """Cell by cell in Python: slow, but it names the line and column of the first bad cell.

    It is the reference: where the fast path refuses a cell that this accepts
    (``1_000``, a space before a quote), the values come from here.
    """
    names = schema.columns
    reference = "the header" if schema.has_header else "the first line"
    X = np.empty((len(rows), len(schema.feature_indices)))
    for r, (line_no, line) in enumerate(rows):
        cells = line.split(schema.delimiter)
        if len(cells) != len(names):
            raise DataError(f"'{path}' line {line_no} has {len(cells)} cells; {reference} has {len(names)}")
        for c, j in enumerate(schema.feature_indices):
            where = f"'{path}' line {line_no}, column '{names[j]}'"
            text = _cell(cells[j])
            if not text:
                raise DataError(f"{where}: the cell is empty")
            try:
                X[r, c] = float(text)
            except ValueError:
                raise DataError(f"{where}: '{text[:40]}' is not a number") from None
            if not math.isfinite(X[r, c]):
                raise DataError(f"{where}: '{text[:40]}' is not finite")
    return X


# Statistics and scaling go over a large array in blocks of about this many float64
# bytes, so a partition (a memory-mapped in-memory input) never needs float64 copies of
# itself: the temporaries stay a few blocks' size.
BLOCK_BYTES = 4 << 20


def _block_rows(X: np.ndarray) -> int:
    return max(1, BLOCK_BYTES // (8 * max(1, int(np.prod(X.shape[1:])))))


def partial_stats(X: np.ndarray) -> dict[str, Any]:
    """Per-column count, mean and M2 (sum of squared deviations) of one partition's rows
    (in blocks of BLOCK_BYTES, merged as :func:`merge_stats` does, when it is larger)."""
    step = _block_rows(X)
    if len(X) > step:
        blocks = [partial_stats(X[a : a + step]) for a in range(0, len(X), step)]
        mean, m2, count = _merged(blocks)
        return {"count": count, "mean": mean, "m2": m2}
    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(axis=0) if len(X) else np.zeros(X.shape[1])
    return {"count": len(X), "mean": mean, "m2": ((X - mean) ** 2).sum(axis=0)}


def scaled_float32(X: np.ndarray, mean_std: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """``(X - mean) / std`` (computed in float64) as a new float32 array, block by block:
    the result is the only copy made of ``X``, which may be a memory-mapped file."""
    out = np.empty(X.shape, np.float32)
    step = _block_rows(X)
    for a in range(0, len(X), step):
        block = np.asarray(X[a : a + step], np.float64)
        out[a : a + step] = block if mean_std is None else (block - mean_std[0]) / mean_std[1]
    return out


def merge_stats(parts: Iterable[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and population std of the union of the partitions' rows.

    Merges with Chan et al.'s parallel update, which avoids the cancellation of
    sum/sum-of-squares. A std of 0 (a constant column) becomes 1.0 so scaling is safe.
    """
    mean, m2, count = _merged(parts)
    if count == 0:
        raise ValueError("merge_stats needs at least one row")
    std = np.sqrt(m2 / count)
    std[std == 0] = 1.0
    return mean, std


def _merged(parts: Iterable[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, M2, count) of the union of partial statistics (Chan et al.)."""
    count, mean, m2 = 0, np.zeros(0), np.zeros(0)
    for part in parts:
        n = int(part["count"])
        if n == 0:
            continue
        part_mean, part_m2 = np.asarray(part["mean"], np.float64), np.asarray(part["m2"], np.float64)
        if count == 0:
            count, mean, m2 = n, part_mean, part_m2
            continue
        total = count + n
        delta = part_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + part_m2 + delta**2 * (count * n / total)
        count = total
    return mean, m2, count


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def normalize_label(label: str) -> str:
    """One spelling per numeric label ("1", "1.0", "+1" -> "1"); other labels only stripped."""
    text = label.strip()
    try:
        return str(int(text))  # exact for integers too large for a float
    except ValueError:
        pass
    value = _number(text)
    if value is None:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def binary_classes(distinct_labels: Iterable[str]) -> tuple[str, str]:
    """The two classes of a binary label, (class 0, class 1), in normalized spelling.

    Both numeric: the smaller is class 0 (so 0/1 and -1/+1 map as expected); otherwise
    string order. Raises DataError unless there are exactly two distinct values.
    """
    values = sorted({normalize_label(v) for v in distinct_labels})
    if len(values) != 2:
        raise DataError(f"logreg needs exactly two label values; found {len(values)}: {_quoted_list(values)}")
    low, high = values
    a, b = _number(low), _number(high)
    if a is not None and b is not None and b < a:
        low, high = high, low
    return low, high


def encode_labels(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Labels as float64 class indices (0.0 / 1.0) in ``classes`` order; DataError for a stranger."""
    distinct, inverse = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    index = {normalize_label(c): float(i) for i, c in enumerate(classes)}
    codes = np.empty(len(distinct))
    for k, value in enumerate(distinct.tolist()):
        code = index.get(normalize_label(value))
        if code is None:
            raise DataError(f"label '{value}' is not one of the model's classes {_quoted_list(list(classes))}")
        codes[k] = code
    return codes[inverse.reshape(-1)]


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices with each label value split in ``test_fraction``
    (rounded), shuffled per class by ``np.random.default_rng(seed)``: same input, same split."""
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be between 0 and 1")
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(np.asarray(labels), return_inverse=True)
    inverse = inverse.reshape(-1)
    train, test = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for k in range(len(classes)):
        members = rng.permutation(np.flatnonzero(inverse == k))
        n_test = round(len(members) * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
