"""A worker parses its partition slice by slice (so its heartbeat thread gets the interpreter's
lock between slices): the rows, labels and error lines are those of one read of the partition,
in every file format."""

from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from psctl.cluster import worker
from psctl.core.sparse import SparseRows
from psctl.data import csvfile, formats, ratings
from psctl.errors import DataError

ROWS = 300


def write(tmp_path, text, name):
    p = tmp_path / name
    p.write_bytes(text.encode())
    return str(p)


def dense(tmp_path, n_rows=ROWS):
    rng = np.random.default_rng(1)
    lines = ["label,a,b,c"] + [f"{'yes' if i % 3 else 'no'},{i},{rng.normal():.6f},{rng.integers(9)}" for i in range(n_rows)]
    lines[40:40] = ["", " "]  # blank lines shift the line numbers of what follows
    p = write(tmp_path, "\n".join(lines) + "\n", "d.csv")
    return p, {"format": "csv", "schema": csvfile.read_schema(p).to_dict()}, True


def hashed(tmp_path, n_rows=ROWS):
    lines = ["label,n,c"] + [f"{i % 2},{i * 0.5},v{i % 17}" for i in range(n_rows)]
    p = write(tmp_path, "\r\n".join(lines) + "\r\n", "h.csv")
    return p, formats.plan_source(p, label="label", categorical=["c"], hash_bits=12).data, True


def libsvm(tmp_path, n_rows=ROWS):
    lines = [f"{i % 2} {1 + i % 5}:{i} {7 + i % 3}:0.5" for i in range(n_rows)]
    p = write(tmp_path, "\n".join(lines) + "\n", "s.txt")
    return p, formats.plan_source(p, "libsvm").data, False


def rated(tmp_path, n_rows=ROWS):
    lines = ["userId,movieId,rating"] + [f"u{i % 23},{i % 31},{1 + i % 5}" for i in range(n_rows)]
    p = write(tmp_path, "\n".join(lines) + "\n", "r.csv")
    return p, {"format": "ratings", "schema": ratings.read_schema(p).to_dict()}, True


@pytest.mark.parametrize("make", [dense, hashed, libsvm, rated])
def test_a_partition_read_in_slices_equals_one_read(tmp_path, make):
    path, data, header = make(tmp_path)
    spec = {"data": {"path": path, **data}}
    for part in csvfile.plan_partitions(path, 2, header):
        X_whole, y_whole = worker._load_slice(spec, path, part)
        with mock.patch.object(csvfile, "SLICE_BYTES", 256):
            assert len(csvfile.slice_partition(path, part)) >= 4
            X, y = worker.load_partition(spec, path, part)
        np.testing.assert_array_equal(y, y_whole)
        if isinstance(X_whole, SparseRows):
            assert isinstance(X, SparseRows) and X.n_cols == X_whole.n_cols
            for field in ("indptr", "indices", "values"):
                np.testing.assert_array_equal(getattr(X, field), getattr(X_whole, field))
        else:
            assert X.dtype == X_whole.dtype or X.dtype.kind == X_whole.dtype.kind == "U"
            np.testing.assert_array_equal(X, X_whole)


@pytest.mark.parametrize(
    ("bad", "match"),
    [("yes,1,x,2", "line 252, column 'b': 'x' is not a number"), ("yes,1,2", "line 252 has 3 cells; the header has 4")],
)
def test_a_bad_row_in_a_later_slice_is_named_by_its_file_line(tmp_path, bad, match):
    path, data, _ = dense(tmp_path)
    text = Path(path).read_text().split("\n")
    text[251] = bad  # file line 252
    path = write(tmp_path, "\n".join(text), "bad.csv")
    [part] = csvfile.plan_partitions(path, 1)
    with mock.patch.object(csvfile, "SLICE_BYTES", 256), pytest.raises(DataError, match=match):
        worker.load_partition({"data": {"path": path, **data}}, path, part)


def test_sparse_rows_concat_keeps_every_row():
    a = SparseRows.from_rows([{1: 1.0}, {}, {2: 2.0, 3: 3.0}], 10)
    b = SparseRows.from_rows([{4: 4.0}], 10)
    both = SparseRows.concat([a, b])
    assert len(both) == 4 and both.n_cols == 10
    np.testing.assert_array_equal(both.to_dense(), np.vstack([a.to_dense(), b.to_dense()]))
