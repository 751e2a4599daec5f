"""In-memory input: arrays written once as ``.npy`` files that every worker memory-maps.

Why memory-mapped ``.npy`` and not shared memory (``multiprocessing.shared_memory``):
the data is written once, into the page cache, and each worker maps only its row
range, so every process on the host shares that one copy; the OS pages it in and out
(an array larger than RAM still trains); a worker that dies or is killed leaves no
shared segment behind (the driver removes its temporary folder); a worker started
again, or a survivor taking a lost partition over, maps the same file again; and the
format is numpy's own, read with ``allow_pickle=False``. Nothing of the data is
pickled or sent over a socket: the job spec carries the file's path, size and rows.

A partition of such an input is a row range: :class:`~psctl.data.csvfile.Partition`
with ``start``/``end`` as row numbers (``first_line`` is ``start + 1``), so the rest
of the job (steps per epoch, take-over, checkpoints) is the same as for a CSV.

Data spec entries (``spec["data"]`` beside path and size): ``{"storage": "npy",
"format": "csv" | "ratings", "schema": CsvSchema dict, "labels": path, "labels_size": bytes,
"rows": n}``. ``format`` is what the rows are (dense numeric features standardized as a
CSV's, or ratings), so the statistics pass, standardization and model file are the
ones of that format.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from psctl.data import csvfile
from psctl.errors import DataError

FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
STORAGE = "npy"


def is_arrays(data: dict[str, Any]) -> bool:
    return data.get("storage") == STORAGE


def write(folder: str | os.PathLike[str], X: np.ndarray, labels: np.ndarray) -> tuple[str, str]:
    """Write the features (or ids) and the labels (or ratings) as ``.npy`` files in ``folder``
    (one pass each, straight from the arrays), and return their paths. ``labels`` must be
    numeric or text (``'<U'``): object arrays are refused, as they would need pickling."""
    if X.dtype == object or labels.dtype == object:
        raise DataError("in-memory input must be numeric or text arrays, not Python objects")
    if len(X) != len(labels):
        raise DataError(f"the features have {len(X)} rows and the labels {len(labels)}")
    if len(X) == 0:
        raise DataError("the data has no rows")
    paths = str(Path(folder) / FEATURES_FILE), str(Path(folder) / LABELS_FILE)
    for path, array in zip(paths, (X, labels)):
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)
    return paths


def plan_partitions(n_rows: int, n_parts: int) -> list[csvfile.Partition]:
    """``n_parts`` contiguous row ranges of about equal size (some empty with fewer rows)."""
    if n_parts < 1:
        raise ValueError("n_parts must be at least 1")
    bounds = np.arange(n_parts + 1) * n_rows // n_parts
    return [
        csvfile.Partition(k, int(bounds[k]), int(bounds[k + 1]), int(bounds[k]) + 1, int(bounds[k + 1] - bounds[k]))
        for k in range(n_parts)
    ]


def data_spec(features_path: str, labels_path: str, fmt: str, schema: csvfile.CsvSchema, n_rows: int) -> dict[str, Any]:
    """The job spec's ``data`` entries for arrays written by :func:`write` (beside path and size)."""
    return {
        "storage": STORAGE,
        "format": fmt,
        "schema": schema.to_dict(),
        "labels": os.path.abspath(labels_path),
        "labels_size": os.path.getsize(labels_path),
        "rows": n_rows,
    }


def _map(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"the in-memory {what} file '{path}' does not exist on this host") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the in-memory {what} file '{path}': {exc}") from None


def read_partition(data: dict[str, Any], path: str, part: csvfile.Partition) -> tuple[np.ndarray, np.ndarray]:
    """Rows [part.start, part.end) of the features (a read-only view into the mapped file,
    no copy) and their labels (raw label text or numbers, ratings; read into memory)."""
    X = _map(path, "features")
    labels = _map(data["labels"], "labels")
    if len(X) != int(data["rows"]) or len(labels) != int(data["rows"]):
        raise DataError(f"the in-memory data '{path}' does not hold the job's {data['rows']} rows")
    if not 0 <= part.start <= part.end <= len(X):
        raise DataError(f"partition {part.index} (rows {part.start}-{part.end}) is outside the data's {len(X)} rows")
    return X[part.start : part.end], np.array(labels[part.start : part.end])
