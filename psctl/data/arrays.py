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
"format": "csv" | "ratings" | "libsvm" | "hashed_csv", "schema": CsvSchema dict or None,
"labels": path, "labels_size": bytes, "rows": n}``, and for sparse rows ``"layout": "csr"``
with ``"indptr"`` and ``"indices"`` paths (``path`` is then the values file). ``format``
is what the rows are (dense numeric features standardized as a CSV's, ratings, a sparse
matrix read as LIBSVM rows with 0-based indices, or a frame hashed as a hashed CSV's
cells), so the statistics pass, standardization and model file are the ones of that format.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from psctl.core.sparse import SparseRows
from psctl.data import csvfile
from psctl.errors import DataError

FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
CSR_FILES = ("values.npy", "indptr.npy", "indices.npy")
STORAGE = "npy"


def is_arrays(data: dict[str, Any]) -> bool:
    return data.get("storage") == STORAGE


def is_per_worker(data: dict[str, Any]) -> bool:
    """Each worker holds only its own partition's rows, in a folder of its own (psctl.spark:
    a Spark task writes the rows it was given there): the job's ``path`` is no file, and a
    worker's ``data_path`` names its features file, the other files beside it."""
    return is_arrays(data) and bool(data.get("per_worker"))


def check_local(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"this worker's in-memory rows '{path}' do not exist")


def per_worker_spec(fmt: str, schema: csvfile.CsvSchema | None, partition_rows: list[int], **extra: Any) -> dict[str, Any]:
    """The data spec of rows that each worker holds alone (:func:`is_per_worker`):
    ``partition_rows[k]`` rows in partition k."""
    return {"storage": STORAGE, "per_worker": True, "format": fmt, "schema": schema.to_dict() if schema is not None else None,
            "rows": int(sum(partition_rows)), "partition_rows": [int(n) for n in partition_rows], **extra}


def partitions_of(partition_rows: list[int]) -> list[csvfile.Partition]:
    """Contiguous row ranges of these sizes (partition k: ``partition_rows[k]`` rows)."""
    bounds = np.concatenate([[0], np.cumsum(np.asarray(partition_rows, np.int64))])
    return [csvfile.Partition(k, int(bounds[k]), int(bounds[k + 1]), int(bounds[k]) + 1, int(n)) for k, n in enumerate(partition_rows)]


WRITE_CHUNK_BYTES = 64 << 20


def write(folder: str | os.PathLike[str], X: np.ndarray, labels: np.ndarray, allow_empty: bool = False) -> tuple[str, str]:
    """Write the features (or ids) and the labels (or ratings) as ``.npy`` files in ``folder``
    (one pass each, straight from the arrays), and return their paths. ``labels`` must be
    numeric or text (``'<U'``): object arrays are refused, as they would need pickling.
    ``allow_empty``: one worker's partition, which may have no rows."""
    features, label_file, fill = start(folder, X, labels, allow_empty)
    fill()
    return features, label_file


def start(folder: str | os.PathLike[str], X: np.ndarray, labels: np.ndarray, allow_empty: bool = False) -> tuple[str, str, Callable[[], None]]:
    """:func:`write` in two parts: the labels file whole, and the features file with its
    ``.npy`` header and its final size; the function returned writes the rows into it
    (straight from ``X``'s memory when it is C-ordered), e.g. in a thread while a cluster
    starts. Workers must not read the file before that function has returned."""
    if X.dtype == object or labels.dtype == object:
        raise DataError("in-memory input must be numeric or text arrays, not Python objects")
    if len(X) != len(labels):
        raise DataError(f"the features have {len(X)} rows and the labels {len(labels)}")
    if len(X) == 0 and not allow_empty:
        raise DataError("the data has no rows")
    features, label_file = str(Path(folder) / FEATURES_FILE), str(Path(folder) / LABELS_FILE)
    np.save(label_file, np.ascontiguousarray(labels), allow_pickle=False)
    X = np.ascontiguousarray(X)
    with open(features, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, np.lib.format.header_data_from_array_1_0(X))
        offset = fh.tell()
        fh.truncate(offset + X.nbytes)

    def fill() -> None:
        flat = X.reshape(-1).view(np.uint8) if X.size else np.empty(0, np.uint8)
        with open(features, "r+b") as fh:
            fh.seek(offset)
            for at in range(0, len(flat), WRITE_CHUNK_BYTES):
                fh.write(flat[at : at + WRITE_CHUNK_BYTES])

    return features, label_file, fill


def write_csr(folder: str | os.PathLike[str], X: SparseRows, labels: np.ndarray, allow_empty: bool = False) -> tuple[str, str, dict[str, str]]:
    """Sparse rows as three ``.npy`` files (values, indptr, indices) and the labels; returns
    the values path, the labels path and the data spec's ``layout``/``indptr``/``indices``."""
    if labels.dtype == object:
        raise DataError("in-memory input must be numeric or text arrays, not Python objects")
    if len(X) != len(labels):
        raise DataError(f"the features have {len(X)} rows and the labels {len(labels)}")
    if len(X) == 0 and not allow_empty:
        raise DataError("the data has no rows")
    values, indptr, indices = (str(Path(folder) / name) for name in CSR_FILES)
    for path, array in ((values, X.values), (indptr, X.indptr), (indices, X.indices), (labels_path := str(Path(folder) / LABELS_FILE), labels)):
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)
    return values, labels_path, {"layout": "csr", "indptr": os.path.abspath(indptr), "indices": os.path.abspath(indices)}


def plan_partitions(n_rows: int, n_parts: int) -> list[csvfile.Partition]:
    """``n_parts`` contiguous row ranges of about equal size (some empty with fewer rows)."""
    if n_parts < 1:
        raise ValueError("n_parts must be at least 1")
    bounds = np.arange(n_parts + 1) * n_rows // n_parts
    return [
        csvfile.Partition(k, int(bounds[k]), int(bounds[k + 1]), int(bounds[k]) + 1, int(bounds[k + 1] - bounds[k]))
        for k in range(n_parts)
    ]


def data_spec(features_path: str, labels_path: str, fmt: str, schema: csvfile.CsvSchema | None, n_rows: int) -> dict[str, Any]:
    """The job spec's ``data`` entries for arrays written by :func:`write` (beside path and size)."""
    return {
        "storage": STORAGE,
        "format": fmt,
        "schema": schema.to_dict() if schema is not None else None,
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


def read_partition(data: dict[str, Any], path: str, part: csvfile.Partition) -> tuple[Any, np.ndarray]:
    """Rows [part.start, part.end) of the features (dense: a read-only view into the mapped
    file, no copy; csr: SparseRows of that range) and their labels (raw label text or
    numbers, ratings; read into memory)."""
    if is_per_worker(data):
        return _read_own(data, path, part)
    labels = _map(data["labels"], "labels")
    rows = int(data["rows"])
    if data.get("layout") == "csr":
        indptr = _map(data["indptr"], "indptr")
        n = len(indptr) - 1
    else:
        X = _map(path, "features")
        n = len(X)
    if n != rows or len(labels) != rows:
        raise DataError(f"the in-memory data '{path}' does not hold the job's {rows} rows")
    if not 0 <= part.start <= part.end <= n:
        raise DataError(f"partition {part.index} (rows {part.start}-{part.end}) is outside the data's {n} rows")
    y = np.array(labels[part.start : part.end])
    if data.get("layout") != "csr":
        return X[part.start : part.end], y
    bounds = np.asarray(indptr[part.start : part.end + 1], np.int64)
    first, last = int(bounds[0]), int(bounds[-1])
    values, indices = _map(path, "values"), _map(data["indices"], "indices")
    if not 0 <= first <= last <= min(len(values), len(indices)) or (np.diff(bounds) < 0).any():
        raise DataError(f"the in-memory sparse data '{path}' has row offsets outside its values")
    keys = np.asarray(indices[first:last], np.int64)
    if len(keys) and keys.min() < 0:
        raise DataError(f"the in-memory sparse data '{path}' has a negative column index")
    return SparseRows(bounds - first, keys, np.asarray(values[first:last], np.float32)), y


def _read_own(data: dict[str, Any], path: str, part: csvfile.Partition) -> tuple[Any, np.ndarray]:
    """A worker's own rows (:func:`is_per_worker`): the files in ``path``'s folder hold ``part`` alone."""
    folder = Path(path).parent
    n = len(_map(str(folder / LABELS_FILE), "labels"))
    if n != part.n_rows:
        raise DataError(f"this worker holds {n} rows, but partition {part.index} has {part.n_rows}: the data changed "
                        "between the row count and the training pass (persist() a DataFrame whose rows are not deterministic)")
    own = {**data, "per_worker": False, "rows": n, "labels": str(folder / LABELS_FILE)}
    if data.get("layout") == "csr":
        own.update(indptr=str(folder / CSR_FILES[1]), indices=str(folder / CSR_FILES[2]))
    return read_partition(own, path, csvfile.Partition(part.index, 0, n, 1, n))
