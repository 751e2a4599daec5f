import numpy as np
import pytest

from psctl import data
from psctl.errors import DataError


def write(tmp_path, text, name="d.csv"):
    p = tmp_path / name
    p.write_bytes(text.encode())
    return str(p)


def test_schema_defaults_and_drop(tmp_path):
    p = write(tmp_path, "id,x,label,y\n1,2,0,3\n")
    s = data.read_schema(p, drop=["id"])
    assert s.label_index == 2 and s.feature_names == ("x", "y")
    s = data.read_schema(p, label="1", drop=["0"])
    assert s.columns[s.label_index] == "x" and s.feature_names == ("label", "y")
    s2 = data.read_schema(write(tmp_path, "a,b\n1,2\n", "n.csv"))
    assert s2.label_index == 0
    assert data.CsvSchema.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    ("text", "kwargs", "match"),
    [
        ("", {}, "is empty"),
        ("label,x\n", {"label": "y"}, "label column 'y' is not in"),
        ("label,x\n", {"drop": ["z"]}, "--drop column 'z' is not in"),
        ("label,x\n", {"label": "7"}, "out of range"),
        ("label\n", {}, "no feature columns"),
        ("label,x,x\n", {}, "duplicate column names"),
    ],
)
def test_schema_errors(tmp_path, text, kwargs, match):
    with pytest.raises(DataError, match=match):
        data.read_schema(write(tmp_path, text), **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.read_schema(str(tmp_path / "no.csv"))


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
@pytest.mark.parametrize("trailer", ["", "\n\n"])
def test_partitions_cover_every_row_once(tmp_path, ending, trailer):
    rows = [f"{i % 2},{i},{i * 0.5}" for i in range(37)]
    p = write(tmp_path, ending.join(["label,a,b", *rows]) + trailer)
    schema = data.read_schema(p)
    for n in range(1, 10):
        parts = data.plan_partitions(p, n)
        assert len(parts) == n and sum(x.n_rows for x in parts) == 37
        got = np.concatenate([data.read_partition(p, schema, x)[0] for x in parts])
        np.testing.assert_array_equal(got[:, 0], np.arange(37))
    parts = data.plan_partitions(p, 50)
    assert sum(x.n_rows == 0 for x in parts) >= 13


def test_no_trailing_newline_and_header_only(tmp_path):
    p = write(tmp_path, "label,a\n1,2\n0,3")
    assert [x.n_rows for x in data.plan_partitions(p, 1)] == [2]
    with pytest.raises(DataError, match="no data rows"):
        data.plan_partitions(write(tmp_path, "label,a\n", "h.csv"), 2)


@pytest.mark.parametrize(
    ("bad_row", "match"),
    [("1,abc,3", "line 4, column 'a': 'abc' is not a number"), ("1,,3", "line 4, column 'a': the cell is empty"),
     ("1,2", "line 4 has 2 cells; the header has 3"), ("1,inf,2", "is not finite")],
)
def test_read_errors_name_the_line(tmp_path, bad_row, match):
    p = write(tmp_path, "\n".join(["label,a,b", "0,1,2", "1,2,3", bad_row, "0,1,1"]) + "\n")
    schema = data.read_schema(p)
    parts = data.plan_partitions(p, 2)
    with pytest.raises(DataError, match=match):
        for part in parts:
            data.read_partition(p, schema, part)


def test_quoted_cells_and_string_labels(tmp_path):
    p = write(tmp_path, 'label,a\n"yes","1.5"\nno,2\n')
    X, labels = data.read_csv(p, data.read_schema(p))
    np.testing.assert_array_equal(X[:, 0], [1.5, 2.0])
    assert labels.tolist() == ["yes", "no"]


def test_merge_stats_equals_numpy():
    X = np.random.default_rng(0).normal(3, 2, size=(101, 4))
    X[:, 3] = 5.0
    parts = [data.partial_stats(X[a:b]) for a, b in [(0, 10), (10, 11), (11, 101)]]
    mean, std = data.merge_stats(parts)
    np.testing.assert_allclose(mean, X.mean(axis=0))
    np.testing.assert_allclose(std[:3], X.std(axis=0)[:3])
    assert std[3] == 1.0


@pytest.mark.parametrize(
    ("values", "expected"),
    [(["1", "0"], ("0", "1")), (["+1", "-1"], ("-1", "1")), (["1.0", "0", "1"], ("0", "1")),
     (["M", "B"], ("B", "M")), (["10", "9"], ("9", "10"))],
)
def test_binary_classes(values, expected):
    assert data.binary_classes(values) == expected


@pytest.mark.parametrize(("values", "match"), [(["a"], "found 1"), (["a", "b", "c"], "found 3: 'a', 'b', 'c'")])
def test_binary_classes_errors(values, match):
    with pytest.raises(DataError, match=match):
        data.binary_classes(values)


def test_encode_labels_unknown():
    np.testing.assert_array_equal(data.encode_labels(np.array(["+1", "-1"]), ("-1", "1")), [1.0, 0.0])
    with pytest.raises(DataError, match="label '7' is not one of"):
        data.encode_labels(np.array(["7"]), ("0", "1"))


def test_stratified_split_is_deterministic_and_stratified():
    labels = np.array(["a"] * 80 + ["b"] * 20)
    train, test = data.stratified_split(labels, 0.2, seed=42)
    assert len(test) == 20 and (labels[test] == "b").sum() == 4
    assert not set(train) & set(test) and len(train) + len(test) == 100
    again = data.stratified_split(labels, 0.2, seed=42)
    np.testing.assert_array_equal(again[1], test)
