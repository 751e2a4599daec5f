"""LIBSVM and hashed-CSV input: detection, parsing, errors that name the line, layouts."""

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psctl.data import csvfile, formats
from psctl.errors import DataError

from .test_data import cells_strategy, read_with_and_without_arrow


def write(tmp_path, text, name="d.txt"):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(p)


def read_libsvm(path, **kw):
    [whole] = csvfile.plan_partitions(path, 1, has_header=False)
    return formats.read_libsvm(path, whole, **kw)


# -- detection ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("+1 3:1 11:0.5 \n-1 2:1\n", "libsvm"),
        ("1\n0 4:2\n", "libsvm"),  # a first line without features is fine when later lines show them
        ("label,a,b\n1,2,3\n", "csv"),
        ("1\n0\n", "csv"),  # nothing says libsvm
    ],
)
def test_detect_format(tmp_path, text, fmt):
    assert formats.detect_format(write(tmp_path, text)) == fmt


def test_plan_source_refuses_mixed_flags(tmp_path):
    svm = write(tmp_path, "1 1:1\n", "a.svm")
    csv = write(tmp_path, "label,a\n1,2\n", "a.csv")
    with pytest.raises(DataError, match="for CSV input"):
        formats.plan_source(svm, categorical=["a"])
    with pytest.raises(DataError, match="for LIBSVM input"):
        formats.plan_source(csv, n_features=3)
    with pytest.raises(DataError, match="'b' is not in"):
        formats.plan_source(csv, categorical=["b"])
    with pytest.raises(DataError, match="is the label"):
        formats.plan_source(csv, categorical=["label"])
    with pytest.raises(DataError, match="--hash-bits must be between"):
        formats.plan_source(csv, hash_bits=0)
    src = formats.plan_source(csv, categorical=["a"], hash_bits=10)
    assert src.sparse and src.n_features == 2**10 - 1 and src.data["categorical"] == ["a"]
    assert not formats.plan_source(csv).sparse


# -- LIBSVM -----------------------------------------------------------------------------------
def test_libsvm_rows_labels_and_comments(tmp_path):
    p = write(tmp_path, "+1 3:1 11:0.5 \n\n-1 2:1 # a comment\n0\n")
    X, labels = read_libsvm(p)
    assert labels.tolist() == ["+1", "-1", "0"]
    assert X.indptr.tolist() == [0, 2, 3, 3] and X.indices.tolist() == [3, 11, 2]
    np.testing.assert_allclose(X.values, [1, 0.5, 1])


def test_libsvm_partitions_cover_every_row_once(tmp_path):
    lines = [f"{i % 2} {i % 7 + 1}:{i} {i % 5 + 10}:1" for i in range(500)]
    p = write(tmp_path, "\n".join(lines) + "\n")
    parts = csvfile.plan_partitions(p, 4, has_header=False)
    rows = [formats.read_libsvm(p, part) for part in parts]
    assert sum(len(X) for X, _ in rows) == 500
    values = np.concatenate([X.values[::2] for X, _ in rows])
    assert values.tolist() == list(range(500))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 3:x\n", "line 3: the value 'x' of feature 3 is not a number"),
        ("1 3:1 -4:2\n", "line 3: feature index '-4' is not a non-negative integer"),
        ("1 a:1\n", "line 3: feature index 'a' is not a non-negative integer"),
        ("1 qid:3 1:1\n", "line 3: feature index 'qid' is not a non-negative integer"),
        ("1 3:1 7\n", "line 3: '7' is not an index:value pair"),
        ("1 3:nan\n", "line 3: the value 'nan' of feature 3 is not finite"),
        ("3:1 4:1\n", "line 3 starts with '3:1'; a LIBSVM line starts with its label"),
        ("# only a comment\n", "line 3 has a comment but no label"),
        ("1 0:1\n", "line 3: feature index 0 in a file read as 1-based (pass --index-base 0"),
        ("1 9:1\n", "line 3: feature index 9 is beyond --n-features 8"),
    ],
)
def test_libsvm_errors_name_the_line(tmp_path, text, message):
    p = write(tmp_path, "1 1:1\n\n" + text + "0 2:1\n")
    with pytest.raises(DataError) as info:
        read_libsvm(p, index_base=1, n_features=8)
    assert message in str(info.value) and str(info.value).startswith(f"'{p}' line 3")
    assert "\n" not in str(info.value)


def test_libsvm_layout_from_the_statistics_pass(tmp_path):
    spec = {"format": "libsvm", "index_base": None, "n_features": None}
    one_based = [{"min_index": 1, "max_index": 123}, {"min_index": 2, "max_index": 90}, {"min_index": None, "max_index": None}]
    assert formats.layout(spec, one_based) == (1, 123)
    zero_based = [{"min_index": 0, "max_index": 9}, {"min_index": 3, "max_index": 12}]
    assert formats.layout(spec, zero_based) == (0, 13)
    assert formats.layout({**spec, "n_features": 200}, one_based) == (1, 200)
    assert formats.layout({**spec, "index_base": 0}, one_based) == (0, 124)
    with pytest.raises(DataError, match="feature index 123, beyond --n-features 100"):
        formats.layout({**spec, "n_features": 100}, one_based)


def test_libsvm_rows_become_zero_based_keys(tmp_path):
    p = write(tmp_path, "1 1:1 3:2\n0 2:1\n")
    X, _ = read_libsvm(p)
    spec = {"format": "libsvm", "index_base": None, "n_features": None}
    stats = [formats.partial_stats(spec, X)]
    K = formats.to_keys(spec, X, stats)
    assert K.indices.tolist() == [0, 2, 1] and K.n_cols == 3
    assert formats.meta_of(spec, stats) == {"format": "libsvm", "index_base": 1, "n_features": 3}


# -- hashed CSV ---------------------------------------------------------------------------------
def hashed(tmp_path, text, categorical=("site", "ad"), bits=20, label="label"):
    p = write(tmp_path, text, "h.csv")
    src = formats.plan_source(p, label=label, categorical=categorical, hash_bits=bits)
    [whole] = csvfile.plan_partitions(p, 1)
    return formats.read_hashed_csv(p, whole, src.schema, src.data["categorical"], bits)


def test_hashed_csv_keys_values_and_missing_cells(tmp_path):
    X, labels = hashed(tmp_path, 'label,site,ad,price\n1,a.com,x,2.5\n0,"b.com", ,\n1,a.com,y,-1\n')
    assert labels.tolist() == ["1", "0", "1"]
    assert (np.diff(X.indptr)).tolist() == [3, 1, 3]  # the empty ad and price are missing
    site = formats.hash_cells(np.array([b"a.com", b"b.com"]), formats.column_seed("site", "cat")) % np.uint64(2**20 - 1)
    row0 = dict(zip(X.indices[:3].tolist(), X.values[:3].tolist()))
    assert row0[int(site[0])] == 1.0 and 2.5 in row0.values()
    assert X.indices[3] == site[1]  # quotes and spaces are not part of a value
    price_key = formats.column_seed("price", "num") % (2**20 - 1)
    assert row0[price_key] == 2.5 and X.indices.max() < 2**20 - 1  # the bias key stays free


def test_hashing_is_stable_and_column_aware():
    cells = np.array([b"abc", b"abd", b"", b"abc"])
    h = formats.hash_cells(cells, 1)
    assert h[0] == h[3] and len(set(h.tolist())) == 3
    assert (formats.hash_cells(cells, 2) != h).all()
    # FNV-1a: b"a" from the standard offset basis, before the final mix
    fnv = (0xCBF29CE484222325 ^ ord("a")) * 0x100000001B3 % 2**64
    assert int(formats.hash_cells(np.array([b"a"]), 0)[0]) == int(formats.mix64(np.array([fnv], np.uint64))[0])
    # pinned: a model file's keys must mean the same thing in every later psctl
    site = formats.column_seed("site", "cat")
    assert site == 1679508756670530104
    assert int(formats.hash_cells(np.array([b"a.com"]), site)[0]) == 16269141235985347161


def test_hashed_csv_errors_name_line_and_column(tmp_path):
    with pytest.raises(DataError, match=r"line 3, column 'price': 'cheap' is not a finite number \(pass --categorical"):
        hashed(tmp_path, "label,site,ad,price\n1,a,b,1\n0,a,b,cheap\n")
    with pytest.raises(DataError, match="line 2 has 3 cells; the header has 4"):
        hashed(tmp_path, "label,site,ad,price\n1,a,b\n")
    with pytest.raises(DataError, match="line 2, column 'label': the label cell is empty"):
        hashed(tmp_path, "label,site,ad,price\n,a,b,1\n")


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.tuples(st.sampled_from(["a", "b", " c ", "", '"d"', "1", "\xff"]), st.lists(cells_strategy, min_size=3, max_size=3)),
                  min_size=1, max_size=8),
    blank=st.sampled_from(["", "\n", "\n \n", "\r\n"]), ending=st.sampled_from(["\n", "\r\n"]),
)  # fmt: skip
def test_pyarrow_hashes_every_partition_as_the_cell_by_cell_path(rows, blank, ending):
    """Hashed CSV through pyarrow's reader (dictionaries of each column's distinct cells): the
    same keys, values, labels and error sentences as the byte string a cell path."""
    pytest.importorskip("pyarrow", reason="the fast CSV path needs pyarrow (psctl[parquet])")
    text = "label,site,ad,price" + ending + ending.join(",".join([label, *cells]) for label, cells in rows) + blank + ending

    def read(path, schema, part):
        return formats.read_hashed_csv(path, part, schema, ["site", "ad"], 20)

    for (xa, la), (xn, ln) in read_with_and_without_arrow(text, csvfile.read_schema, read):
        for name in ("indptr", "indices", "values"):
            np.testing.assert_array_equal(getattr(xa, name), getattr(xn, name))
            assert getattr(xa, name).dtype == getattr(xn, name).dtype
        assert xa.n_cols == xn.n_cols and la.tolist() == ln.tolist()


def test_pyarrow_is_the_hashed_path_for_plain_cells(tmp_path):
    pytest.importorskip("pyarrow", reason="the fast CSV path needs pyarrow (psctl[parquet])")
    text = "label,site,ad,price\n1,a.com,x,2.5\n0,b.com, ,\n1,a.com,y,-1\n"
    with mock.patch.object(formats, "_clean", wraps=formats._clean) as clean, mock.patch.object(csvfile, "ARROW_MIN_BYTES", 0):
        X, labels = hashed(tmp_path, text)
    assert clean.call_count == 3  # the distinct cells of two categorical columns and the label, once each
    numpy_path = hashed(tmp_path, text)
    assert labels.tolist() == numpy_path[1].tolist() and X.indices.tolist() == numpy_path[0].indices.tolist()


def test_a_hashed_number_past_float32_is_refused_with_its_line(tmp_path):
    with pytest.raises(DataError, match=r"line 3, column 'price': '4e38' is past float32's range"):
        hashed(tmp_path, "label,site,ad,price\n1,a,b,1\n0,a,b,4e38\n")
