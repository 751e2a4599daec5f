"""Parquet input: partitions at row-group boundaries, each worker reading only its row
groups and the columns it needs, rows equal to a CSV of the same values, one sentence
for every bad input."""

from __future__ import annotations

import numpy as np
import pytest

from psctl.cluster.worker import load_partition
from psctl.data import csvfile, parquet
from psctl.errors import DataError

from ..conftest import write_logreg_csv

pytestmark = pytest.mark.timeout(60)
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def table_of_csv(path):
    """The CSV's values as an Arrow table (float64 features as the CSV reader parses them)."""
    schema = csvfile.read_schema(str(path))
    X, labels = csvfile.read_csv(str(path), schema)
    columns = {schema.columns[schema.label_index]: pa.array(labels.astype(np.int64))}
    for j, i in enumerate(schema.feature_indices):
        columns[schema.columns[i]] = pa.array(X[:, j])
    return pa.table({c: columns[c] for c in schema.columns}), X, labels


@pytest.fixture
def data(tmp_path):
    csv = write_logreg_csv(tmp_path / "d.csv", rows=320, features=3, seed=2)
    table, X, labels = table_of_csv(csv)
    # a wide text column the model drops: a worker must not read it
    table = table.append_column("notes", pa.array([f"row {i} " + "x" * 300 for i in range(table.num_rows)]))
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=20)  # 16 row groups
    return path, X, labels


def spec_of(path, workers, drop=("notes",)):
    dataset = parquet.describe(str(path))
    schema = parquet.read_schema(dataset, drop=list(drop))
    return dataset, schema, {"data": dataset.to_data(schema)}, parquet.plan_partitions(dataset, workers)


def test_eight_workers_each_read_only_their_row_groups_and_columns(data):
    path, X, labels = data
    dataset, schema, spec, parts = spec_of(path, 8)
    assert [(p.start, p.end) for p in parts] == [(40 * k, 40 * k + 40) for k in range(8)]
    meta = pq.ParquetFile(path).metadata
    wanted = [meta.schema.column(i).name for i in range(meta.num_columns)].index("notes")
    got_X, got_y = [], []
    for k, part in enumerate(parts):
        report = parquet.ReadReport()
        Xk, yk = parquet.read_partition(spec["data"], str(path), part, report)
        assert report.row_groups == [(0, 2 * k), (0, 2 * k + 1)]
        own = sum(meta.row_group(g).column(c).total_compressed_size
                  for g in (2 * k, 2 * k + 1) for c in range(meta.num_columns) if c != wanted)
        assert 0 < report.bytes_read <= own  # its row groups' label and feature chunks: no 'notes', no other group
        assert report.bytes_read < dataset.size / 8
        got_X.append(Xk)
        got_y.append(yk)
    np.testing.assert_array_equal(np.concatenate(got_X), X)
    np.testing.assert_array_equal(np.concatenate(got_y), labels)


def test_the_worker_reads_its_partition_through_the_same_interface(data):
    path, X, labels = data
    _, _, spec, parts = spec_of(path, 3)
    Xk, yk = load_partition(spec, str(path), parts[1])
    np.testing.assert_array_equal(Xk, X[parts[1].start : parts[1].end])
    np.testing.assert_array_equal(yk, labels[parts[1].start : parts[1].end])


def test_fewer_row_groups_than_workers_split_rows_evenly(tmp_path, data):
    _, X, labels = data
    table, _, _ = table_of_csv(tmp_path / "d.csv")
    path = tmp_path / "one.parquet"
    pq.write_table(table, path)  # one row group
    dataset, schema, spec, parts = spec_of(path, 8, drop=())
    assert [p.n_rows for p in parts] == [40] * 8
    rows = [parquet.read_partition(spec["data"], str(path), p) for p in parts]
    np.testing.assert_array_equal(np.concatenate([r[0] for r in rows]), X)
    np.testing.assert_array_equal(np.concatenate([r[1] for r in rows]), labels)


def test_a_folder_of_files_is_one_dataset_in_name_order(tmp_path, data):
    _, X, labels = data
    table, _, _ = table_of_csv(tmp_path / "d.csv")
    folder = tmp_path / "ds"
    (folder / "b").mkdir(parents=True)
    pq.write_table(table.slice(0, 100), folder / "a-0.parquet", row_group_size=50)
    pq.write_table(table.slice(100, 220), folder / "b" / "part-1.parquet", row_group_size=60)
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-1.parquet.crc").write_text("x")
    dataset, schema, spec, parts = spec_of(folder, 4, drop=())
    assert [name for name, _, _ in dataset.files] == ["a-0.parquet", "b/part-1.parquet"]
    assert [(p.start, p.end) for p in parts] == [(0, 100), (100, 160), (160, 220), (220, 320)]
    rows = [parquet.read_partition(spec["data"], str(folder), p) for p in parts]
    np.testing.assert_array_equal(np.concatenate([r[0] for r in rows]), X)
    np.testing.assert_array_equal(np.concatenate([r[1] for r in rows]), labels)


def test_row_group_boundaries_are_balanced_by_rows():
    dataset = parquet.Dataset("x", ("label", "a"), [("", 0, [10, 10, 10, 70, 10, 10])])
    parts = parquet.plan_partitions(dataset, 3)
    assert [(p.start, p.end) for p in parts] == [(0, 30), (30, 100), (100, 120)]
    assert all(p.n_rows > 0 for p in parquet.plan_partitions(dataset, 6))  # one group each at least


def test_labels_read_as_a_csv_spells_them(tmp_path):
    path = tmp_path / "l.parquet"
    pq.write_table(pa.table({"label": pa.array([0.5, 2.0, 1e-7]), "s": ["a", "b", "c"], "x": [1, 2, 3]}), path)
    dataset = parquet.describe(str(path))
    [part] = parquet.plan_partitions(dataset, 1)
    _, y = parquet.read_rows(dataset, parquet.read_schema(dataset, drop=["s"]), part)
    assert y.tolist() == ["0.5", "2.0", "1e-07"]
    _, y = parquet.read_rows(dataset, parquet.read_schema(dataset, label="s", drop=["label"]), part)
    assert y.tolist() == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("columns", "kw", "fragment"),
    [
        ({"label": [1, 0], "x": [1.0, None]}, {}, "row 2, column 'x': the cell is empty (null)"),
        ({"label": [1, None], "x": [1.0, 2.0]}, {}, "row 2, column 'label': the label cell is empty"),
        ({"label": [1, 0], "x": ["a", "b"]}, {}, "column 'x' holds string, not numbers; pass --drop x"),
        ({"label": [1, 0], "x": [1.0, float("inf")]}, {}, "row 2, column 'x': inf is not finite"),
        ({"label": [1, 0], "x": [1.0, 2.0]}, {"label": "y"}, "label column 'y' is not in"),
    ],
)
def test_bad_parquet_input_is_one_sentence(tmp_path, columns, kw, fragment):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(DataError) as caught:
        dataset = parquet.describe(str(path))
        schema = parquet.read_schema(dataset, **kw)
        parquet.read_rows(dataset, schema, parquet.plan_partitions(dataset, 1)[0])
    assert fragment in str(caught.value)


def test_not_parquet_and_mismatched_files_are_one_sentence(tmp_path):
    fake = tmp_path / "fake.parquet"
    fake.write_text("label,x\n1,2\n")
    with pytest.raises(DataError, match="is not a readable Parquet file"):
        parquet.describe(str(fake))
    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(pa.table({"label": [1], "x": [1.0]}), folder / "a.parquet")
    pq.write_table(pa.table({"label": [1], "y": [1.0]}), folder / "b.parquet")
    with pytest.raises(DataError, match="has the columns 'label', 'y'; the first file"):
        parquet.describe(str(folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no Parquet files"):
        parquet.describe(str(empty))


def test_a_file_that_lost_a_column_since_planning_is_one_sentence(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"label": [1, 0], "x": [1.0, 2.0]}), path)
    dataset = parquet.describe(str(path))
    schema = parquet.read_schema(dataset)
    pq.write_table(pa.table({"label": [1, 0], "z": [1.0, 2.0]}), path)
    with pytest.raises(DataError, match="lacks the column"):
        parquet.read_rows(dataset, schema, parquet.plan_partitions(dataset, 1)[0])


def test_parquet_is_told_by_the_name_a_folder_or_the_format(tmp_path, monkeypatch, data):
    path, _, _ = data
    assert parquet.is_parquet(str(path)) and parquet.is_parquet(str(tmp_path))  # a folder (here of d.csv and d.parquet)
    assert not parquet.is_parquet(str(tmp_path / "d.csv")) and parquet.is_parquet(str(tmp_path / "d.csv"), "parquet")
    assert not parquet.is_parquet(str(path), "csv")

    def no_listing(url):
        raise AssertionError(f"listed {url}")

    monkeypatch.setattr(parquet.storage, "filesystem", no_listing)
    assert not parquet.is_parquet("s3://bucket/train.csv.gz") and parquet.is_parquet("s3://bucket/t.parquet")
