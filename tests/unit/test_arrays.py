"""In-memory input as memory-mapped .npy files: row-range partitions, views, checks, and the
block-wise statistics and scaling that keep a large partition to one float32 copy."""

from __future__ import annotations

import numpy as np
import pytest

from psctl.data import arrays, csvfile
from psctl.errors import DataError


def _written(tmp_path, X, labels):
    features, label_file = arrays.write(tmp_path, X, labels)
    schema = csvfile.CsvSchema(("label", *(f"x{i}" for i in range(X.shape[1]))), 0, tuple(range(1, X.shape[1] + 1)), True)
    return features, arrays.data_spec(features, label_file, "csv", schema, len(X))


@pytest.mark.parametrize("rows, parts", [(10, 3), (2, 4), (1000, 7), (5, 1)])
def test_partitions_are_contiguous_row_ranges_covering_every_row(rows, parts):
    planned = arrays.plan_partitions(rows, parts)
    assert len(planned) == parts
    assert planned[0].start == 0 and planned[-1].end == rows
    assert all(a.end == b.start for a, b in zip(planned, planned[1:]))
    assert sum(p.n_rows for p in planned) == rows
    assert max(p.n_rows for p in planned) - min(p.n_rows for p in planned) <= 1


def test_a_partition_is_a_view_of_the_mapped_file_and_its_labels(tmp_path):
    X = np.arange(40, dtype=np.float32).reshape(10, 4)
    labels = np.array([str(i % 2) for i in range(10)])
    path, spec = _written(tmp_path, X, labels)
    part = arrays.plan_partitions(10, 3)[1]
    rows, got = arrays.read_partition(spec, path, part)
    assert isinstance(rows, np.memmap) and not rows.flags.writeable  # no copy of the data
    np.testing.assert_array_equal(rows, X[part.start : part.end])
    assert got.tolist() == labels[part.start : part.end].tolist()


def test_arrays_that_would_need_pickling_or_do_not_match_are_refused(tmp_path):
    with pytest.raises(DataError, match="not Python objects"):
        arrays.write(tmp_path, np.zeros((2, 2)), np.array([1, "a"], dtype=object))
    with pytest.raises(DataError, match="3 rows and the labels 2"):
        arrays.write(tmp_path, np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(DataError, match="no rows"):
        arrays.write(tmp_path, np.zeros((0, 2)), np.zeros(0))
    path, spec = _written(tmp_path, np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(DataError, match="does not hold the job's 5 rows"):
        arrays.read_partition({**spec, "rows": 5}, path, arrays.plan_partitions(5, 1)[0])
    with pytest.raises(DataError, match="does not exist on this host"):
        arrays.read_partition(spec, str(tmp_path / "gone.npy"), arrays.plan_partitions(4, 1)[0])


def test_block_wise_statistics_equal_the_one_pass_ones(monkeypatch):
    X = np.random.default_rng(0).normal(5, 3, size=(1000, 6)).astype(np.float32)
    whole = csvfile.partial_stats(X)
    monkeypatch.setattr(csvfile, "BLOCK_BYTES", 97 * 8 * 6)  # 97 rows
    blocks = csvfile.partial_stats(X)
    assert blocks["count"] == whole["count"] == 1000
    np.testing.assert_allclose(blocks["mean"], whole["mean"], rtol=1e-12)
    np.testing.assert_allclose(blocks["m2"], whole["m2"], rtol=1e-10)


def test_block_wise_scaling_is_the_float64_formula_in_float32(monkeypatch):
    X = np.random.default_rng(1).normal(size=(500, 3))
    mean, std = X.mean(axis=0), X.std(axis=0)
    monkeypatch.setattr(csvfile, "BLOCK_BYTES", 64 * 8 * 3)
    out = csvfile.scaled_float32(X, (mean, std))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, ((X - mean) / std).astype(np.float32))
    np.testing.assert_array_equal(csvfile.scaled_float32(X, None), X.astype(np.float32))
