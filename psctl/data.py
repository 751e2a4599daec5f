"""CSV input: schema, byte-range partitions aligned to lines, parsing, statistics, labels.

Pure functions over files and arrays. A worker reads only its partition's
byte range; the driver's planning pass streams the file in chunks.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from psctl.errors import DataError

CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class CsvSchema:
    columns: tuple[str, ...]
    label_index: int | None
    feature_indices: tuple[int, ...]
    has_header: bool

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.columns[i] for i in self.feature_indices)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CsvSchema:
        return cls(tuple(d["columns"]), d["label_index"], tuple(d["feature_indices"]), bool(d["has_header"]))


@dataclass(frozen=True)
class Partition:
    index: int
    start: int
    end: int
    first_line: int
    n_rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Partition:
        return cls(**{k: int(d[k]) for k in ("index", "start", "end", "first_line", "n_rows")})


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"data file '{path}' does not exist")
    if os.path.isdir(path):
        raise DataError(f"'{path}' is a folder, not a data file")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file '{path}' is empty")


def _first_line(path: str) -> str:
    with open(path, "rb") as fh:
        line = fh.readline(1 << 20)
    try:
        return line.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise DataError(f"'{path}' is not a UTF-8 text file") from None


def _shorten(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _find_column(columns: tuple[str, ...], ref: str, what: str, path: str) -> int:
    if ref in columns:
        return columns.index(ref)
    if ref.lstrip("-").isdigit():
        i = int(ref)
        if 0 <= i < len(columns):
            return i
        raise DataError(f"{what} column {i} is out of range: '{path}' has {len(columns)} columns")
    raise DataError(f"{what} column '{ref}' is not in '{path}'; its columns are {_shorten(columns)}")


def read_schema(path: str, label: str | None = None, drop: Sequence[str] = (), has_header: bool = True) -> CsvSchema:
    """Read the header (only the first line) and resolve the label and dropped columns."""
    _check_file(path)
    first = _first_line(path)
    if not first.strip():
        raise DataError(f"the first line of '{path}' is empty")
    cells = next(csv.reader([first]))
    if has_header:
        columns = tuple(c.strip() for c in cells)
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        if dupes:
            raise DataError(f"'{path}' has duplicate column names: {_shorten(dupes)}")
    else:
        columns = tuple(str(i) for i in range(len(cells)))
    if label is None:
        label_index = columns.index("label") if "label" in columns else 0
    else:
        label_index = _find_column(columns, label, "label", path)
    dropped = {_find_column(columns, d, "--drop", path) for d in drop}
    features = tuple(i for i in range(len(columns)) if i != label_index and i not in dropped)
    if not features:
        raise DataError(f"'{path}' has no feature columns left after the label and --drop")
    return CsvSchema(columns, label_index, features, has_header)


def plan_partitions(path: str, n_parts: int, has_header: bool = True) -> list[Partition]:
    """Split the data rows into ``n_parts`` byte ranges aligned to line starts, balanced by bytes.

    Streams the file once in chunks, counting rows per range.
    """
    _check_file(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        data_start = len(fh.readline()) if has_header else 0
        header_lines = 1 if has_header else 0
        targets = [data_start + (size - data_start) * i // n_parts for i in range(1, n_parts)]
        # Walk every line once; cut at the first line starting at or after each target.
        bounds, first_lines, rows = [data_start], [header_lines + 1], [0]
        line_no = header_lines
        pos = data_start
        fh.seek(data_start)
        t = 0
        for line in fh:
            while t < len(targets) and pos >= targets[t]:
                bounds.append(pos)
                first_lines.append(line_no + 1)
                rows.append(0)
                t += 1
            line_no += 1
            if line.strip():
                rows[-1] += 1
            pos += len(line)
        while len(bounds) < n_parts:
            bounds.append(size)
            first_lines.append(line_no + 1)
            rows.append(0)
    if sum(rows) == 0:
        raise DataError(f"'{path}' has no data rows")
    bounds.append(size)
    return [Partition(i, bounds[i], bounds[i + 1], first_lines[i], rows[i]) for i in range(n_parts)]


def _bad_cell(text: str, schema: CsvSchema, first_line: int, path: str) -> DataError:
    """The slow, exact pass: name the first bad line or cell."""
    n_cols = len(schema.columns)
    line_no = first_line - 1
    for raw in io.StringIO(text, newline=None):
        line_no += 1
        if not raw.strip():
            continue
        cells = next(csv.reader([raw]))
        if len(cells) != n_cols:
            return DataError(f"'{path}' line {line_no} has {len(cells)} cells; the header has {n_cols}")
        for i in schema.feature_indices:
            cell = cells[i].strip()
            if not cell:
                return DataError(f"'{path}' line {line_no}, column '{schema.columns[i]}': the cell is empty")
            try:
                value = float(cell)
            except ValueError:
                return DataError(f"'{path}' line {line_no}, column '{schema.columns[i]}': '{cell[:40]}' is not a number")
            if not math.isfinite(value):
                return DataError(f"'{path}' line {line_no}, column '{schema.columns[i]}': '{cell[:40]}' is not finite")
    return DataError(f"'{path}' could not be parsed as CSV")


def read_partition(path: str, schema: CsvSchema, part: Partition) -> tuple[np.ndarray, np.ndarray]:
    """Features (float64, rows x features) and raw label strings of one partition's rows."""
    n_features = len(schema.feature_indices)
    if part.n_rows == 0:
        return np.empty((0, n_features)), np.empty(0, dtype=str)
    with open(path, "rb") as fh:
        fh.seek(part.start)
        raw = fh.read(part.end - part.start)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"'{path}' is not a UTF-8 text file") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    cells_per_row = len(schema.columns)
    try:
        table = np.loadtxt(
            lines, delimiter=",", dtype=str, quotechar='"', ndmin=2, comments=None
        )
        if table.shape[1] != cells_per_row:
            raise ValueError("column count")
        X = table[:, list(schema.feature_indices)].astype(np.float64)
        if not np.isfinite(X).all():
            raise ValueError("not finite")
    except ValueError:
        raise _bad_cell(text, schema, part.first_line, path) from None
    if schema.label_index is None:
        labels = np.empty(0, dtype=str)
    else:
        labels = np.char.strip(table[:, schema.label_index])
        empty = np.flatnonzero(labels == "")
        if empty.size:
            raise DataError(f"'{path}' row {int(empty[0]) + 1} of partition {part.index}: the label cell is empty")
    return X, labels


def read_csv(path: str, schema: CsvSchema) -> tuple[np.ndarray, np.ndarray]:
    """The whole file as one partition."""
    (part,) = plan_partitions(path, 1, schema.has_header)
    return read_partition(path, schema, part)


def partial_stats(X: np.ndarray) -> dict[str, Any]:
    """Count, mean and sum of squared deviations (M2) per column, for merging."""
    mean = X.mean(axis=0)
    return {"count": int(X.shape[0]), "mean": mean.tolist(), "m2": ((X - mean) ** 2).sum(axis=0).tolist()}


def merge_stats(parts: Iterable[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std over all parts (Chan et al.'s pairwise update); std 0 -> 1."""
    count, mean, m2 = 0, None, None
    for p in parts:
        n_b, mean_b, m2_b = p["count"], np.asarray(p["mean"], dtype=np.float64), np.asarray(p["m2"], dtype=np.float64)
        if n_b == 0:
            continue
        if mean is None:
            count, mean, m2 = n_b, mean_b, m2_b
            continue
        total = count + n_b
        delta = mean_b - mean
        mean = mean + delta * n_b / total
        m2 = m2 + m2_b + delta**2 * count * n_b / total
        count = total
    if mean is None or m2 is None:
        raise DataError("no rows to compute feature statistics from")
    std = np.sqrt(m2 / count)
    std[std == 0] = 1.0
    return mean, std


def _numeric(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _normalize(label: str) -> str:
    number = _numeric(label)
    if number is not None and number.is_integer():
        return str(int(number))
    return label


def binary_classes(distinct_labels: Iterable[str]) -> tuple[str, str]:
    """The (negative, positive) labels of a binary problem: 0/1, -1/+1 or two values in sorted order."""
    values = sorted({_normalize(str(v).strip()) for v in distinct_labels})
    if len(values) != 2:
        found = ", ".join(f"'{v}'" for v in values[:5]) + (" ..." if len(values) > 5 else "")
        raise DataError(f"logreg needs exactly two label values; found {len(values)}: {found}")
    nums = [_numeric(v) for v in values]
    if nums[0] is not None and nums[1] is not None:
        values.sort(key=lambda v: float(v))
    return values[0], values[1]


def encode_labels(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """0.0 for classes[0], 1.0 for classes[1]."""
    norm = np.array([_normalize(str(v)) for v in labels.tolist()], dtype=str)
    y = np.full(len(norm), np.nan)
    for i, c in enumerate(classes):
        y[norm == c] = i
    unknown = np.flatnonzero(np.isnan(y))
    if unknown.size:
        raise DataError(f"label '{norm[unknown[0]]}' is not one of the model's classes {', '.join(classes)}")
    return y


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices (sorted), the test fraction taken from every class."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for value in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == value)
        rng.shuffle(rows)
        n_test = int(round(len(rows) * test_fraction))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
