import json
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from psctl.data import csvfile
from psctl.errors import DataError


def write(tmp_path, text, name="d.csv"):
    p = tmp_path / name
    p.write_bytes(text.encode())
    return str(p)


# --- schema -------------------------------------------------------------------------


def test_schema_defaults_and_drop(tmp_path):
    p = write(tmp_path, "id,x,label,y\n1,2,0,3\n")
    s = csvfile.read_schema(p, drop=["id"])
    assert s.label_index == 2 and s.feature_names == ("x", "y")
    s = csvfile.read_schema(p, label="1", drop=["0"])
    assert s.columns[s.label_index] == "x" and s.feature_names == ("label", "y")
    s2 = csvfile.read_schema(write(tmp_path, "a,b\n1,2\n", "n.csv"))
    assert s2.label_index == 0
    assert csvfile.CsvSchema.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_schema_name_wins_over_index_and_header_is_cleaned(tmp_path):
    p = write(tmp_path, '\ufeff"a", 2 ,b\r\n1,2,3\r\n')
    s = csvfile.read_schema(p, label="2")
    assert s.columns == ("a", "2", "b") and s.label_index == 1 and s.feature_indices == (0, 2)


def test_schema_without_header(tmp_path):
    p = write(tmp_path, "1,0.5,7\n0,0.1,8\n")
    s = csvfile.read_schema(p, has_header=False, drop=["2"])
    assert s.columns == ("0", "1", "2") and s.label_index == 0 and s.feature_indices == (1,)


@pytest.mark.parametrize(
    ("text", "kwargs", "match"),
    [
        ("", {}, "data file '.*d.csv' is empty"),
        ("\nlabel,x\n", {}, "the first line of .* is blank"),
        ("PK\x03\x04\x00\x00,\n", {}, "is not a CSV text file"),
        ("label,x\n", {"label": "y"}, "label column 'y' is not in '.*'; its columns are 'label', 'x'$"),
        ("label,x\n", {"drop": ["z"]}, "--drop column 'z' is not in"),
        ("label,x\n", {"label": "7"}, "label column 7 is out of range: '.*' has 2 columns"),
        ("label,x\n", {"label": "-1"}, "label column -1 is out of range"),
        ("label\n", {}, "no feature columns left after the label and --drop"),
        ("label,x,y\n", {"drop": ["x", "2"]}, "no feature columns"),
        ("label,x,x,y,y\n", {}, "duplicate column names: 'x', 'y'$"),
    ],
)
def test_schema_errors(tmp_path, text, kwargs, match):
    with pytest.raises(DataError, match=match):
        csvfile.read_schema(write(tmp_path, text), **kwargs)


def test_schema_error_shortens_a_long_column_list(tmp_path):
    p = write(tmp_path, ",".join(f"c{i}" for i in range(20)) + "\n")
    with pytest.raises(DataError, match=r"'c7', \.\.\. \(20 in all\)$"):
        csvfile.read_schema(p, label="nope")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="data file '.*no.csv' does not exist"):
        csvfile.read_schema(str(tmp_path / "no.csv"))
    with pytest.raises(DataError, match="is a directory, not a file"):
        csvfile.plan_partitions(str(tmp_path), 2)


# --- partitions ----------------------------------------------------------------------


def row_lines(text: str, has_header: bool = True) -> list[int]:
    """1-based line numbers of the rows, by the slowest obvious method."""
    lines = text.split("\n")
    first = 1 if has_header else 0
    return [i + 1 for i, line in enumerate(lines) if i >= first and line.strip()]


def check_plan(path: str, text: str, n_parts: int, has_header: bool = True) -> list[csvfile.Partition]:
    """Every invariant of a plan, against a naive reading of the same text."""
    raw = text.encode()
    parts = csvfile.plan_partitions(path, n_parts, has_header)
    expected_lines = row_lines(text, has_header)
    assert [p.index for p in parts] == list(range(n_parts))
    assert parts[0].start == (raw.index(b"\n") + 1 if has_header else 0)
    assert parts[-1].end == len(raw)
    for a, b in zip(parts, parts[1:]):
        assert a.end == b.start
    got_lines = []
    for p in parts:
        assert p.start <= p.end
        assert p.start == 0 or raw[p.start - 1 : p.start] == b"\n" or p.start == len(raw)
        chunk = raw[p.start : p.end].decode()
        offset = raw[: p.start].count(b"\n")
        lines = [offset + i + 1 for i, line in enumerate(chunk.split("\n")) if line.strip()]
        assert len(lines) == p.n_rows
        if lines:
            assert p.first_line == lines[0]
        got_lines += lines
    assert got_lines == expected_lines
    return parts


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
@pytest.mark.parametrize("trailer", ["", "\n\n", " \r\n\t\n"])
def test_partitions_cover_every_row_once(tmp_path, ending, trailer):
    rows = [f"{i % 2},{i},{i * 0.5}" for i in range(37)]
    text = ending.join(["label,a,b", *rows]) + trailer
    p = write(tmp_path, text)
    schema = csvfile.read_schema(p)
    for n in [*range(1, 10), 50]:
        parts = check_plan(p, text, n)
        got = np.concatenate([csvfile.read_partition(p, schema, x)[0] for x in parts])
        np.testing.assert_array_equal(got[:, 0], np.arange(37))
    assert sum(x.n_rows == 0 for x in csvfile.plan_partitions(p, 50)) >= 13


def test_partitions_are_balanced_by_bytes(tmp_path):
    text = "label,a\n" + "".join(f"{i % 2},{i:06d}\n" for i in range(1000))
    parts = check_plan(write(tmp_path, text), text, 7)
    sizes = [p.end - p.start for p in parts]
    assert max(sizes) - min(sizes) <= len("0,000000\n")


def test_partitions_without_header_skip_a_byte_order_mark(tmp_path):
    text = "\ufeff1,2\n0,3\n"
    p = write(tmp_path, text)
    parts = csvfile.plan_partitions(p, 1, has_header=False)
    assert parts[0].start == 3 and parts[0].first_line == 1 and parts[0].n_rows == 2
    X, labels = csvfile.read_csv(p, csvfile.read_schema(p, has_header=False))
    assert X.tolist() == [[2.0], [3.0]] and labels.tolist() == ["1", "0"]


def test_no_trailing_newline_and_header_only(tmp_path):
    p = write(tmp_path, "label,a\n1,2\n0,3")
    assert [x.n_rows for x in csvfile.plan_partitions(p, 1)] == [2]
    for i, text in enumerate(["label,a\n", "label,a", "label,a\n\n \r\n"]):
        with pytest.raises(DataError, match="has no data rows"):
            csvfile.plan_partitions(write(tmp_path, text, f"h{i}.csv"), 2)
    with pytest.raises(DataError, match="is empty"):
        csvfile.plan_partitions(write(tmp_path, "", "e.csv"), 2)


lines_strategy = st.lists(
    st.one_of(
        st.just(""), st.just(" "), st.just("\r"), st.from_regex(r"[01],[0-9]{1,12}\r?", fullmatch=True)
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(lines=lines_strategy, n_parts=st.integers(1, 12), chunk=st.integers(1, 64), final_newline=st.booleans())
def test_partition_plan_property(lines, n_parts, chunk, final_newline):
    """Any mix of rows, blank lines and CRLF, any chunk size: every invariant holds."""
    text = "\n".join(["label,a", *lines]) + ("\n" if final_newline else "")
    with tempfile.TemporaryDirectory() as folder, mock.patch.object(csvfile, "CHUNK_BYTES", chunk):
        path = str(Path(folder) / "p.csv")
        Path(path).write_bytes(text.encode())
        if not row_lines(text):
            with pytest.raises(DataError, match="no data rows"):
                csvfile.plan_partitions(path, n_parts)
            return
        check_plan(path, text, n_parts)


@settings(max_examples=150, deadline=None)
@given(lines=lines_strategy, n_parts=st.integers(1, 4), max_bytes=st.integers(1, 80), final_newline=st.booleans())
# A partition of blank lines only was returned whole, however large (found by a suite run).
@example(lines=["0,0", "0,00", *[""] * 7, " ", " "], n_parts=2, max_bytes=1, final_newline=False)
def test_slices_of_a_partition_read_as_the_partition(lines, n_parts, max_bytes, final_newline):
    """A partition cut into slices (what a worker parses per call): contiguous, aligned to
    line starts, each with its rows and first row's line; together they read the same rows."""
    text = "\n".join(["label,a", *lines]) + ("\n" if final_newline else "")
    if not row_lines(text):
        return
    raw = text.encode()
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "p.csv")
        Path(path).write_bytes(raw)
        schema = csvfile.read_schema(path)
        for part in csvfile.plan_partitions(path, n_parts):
            slices = csvfile.slice_partition(path, part, max_bytes)
            assert [s.start for s in slices][0] == part.start and slices[-1].end == part.end
            assert all(a.end == b.start for a, b in zip(slices, slices[1:]))
            assert sum(s.n_rows for s in slices) == part.n_rows and {s.index for s in slices} == {part.index}
            for s in slices:
                assert s.start in (0, len(raw)) or raw[s.start - 1 : s.start] == b"\n"
                offset = raw[: s.start].count(b"\n")
                found = [offset + i + 1 for i, line in enumerate(raw[s.start : s.end].decode().split("\n")) if line.strip()]
                assert len(found) == s.n_rows and (not found or s.first_line == found[0])
                assert s.end - s.start <= max(max_bytes, 1) + len(max(raw.split(b"\n"), key=len)) + 1
            got = [csvfile.read_partition(path, schema, s) for s in slices]
            whole = csvfile.read_partition(path, schema, part)
            np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), whole[0])
            np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), whole[1])


@settings(max_examples=150, deadline=None)
@given(lines=lines_strategy, has_header=st.booleans(), bom=st.booleans(), max_bytes=st.integers(1, 80),
       final_newline=st.booleans(), max_line=st.sampled_from([10, 13, 4 << 20]))
def test_a_whole_file_sliced_in_one_pass_is_its_one_partition_sliced(lines, has_header, bom, max_bytes, final_newline, max_line):
    """plan_slices (psctl predict in one process) finds the slices slice_partition finds in the
    one partition plan_partitions plans, without the pass that counts that partition's rows;
    or the same sentence (a line too long named by its file line, no rows, an empty file)."""
    text = "\n".join(["label,a", *lines] if has_header else lines) + ("\n" if final_newline else "")
    raw = ("\ufeff" if bom and not has_header else "").encode() + text.encode()
    with tempfile.TemporaryDirectory() as folder, mock.patch.object(csvfile, "MAX_LINE_BYTES", max_line):
        path = str(Path(folder) / "p.csv")
        Path(path).write_bytes(raw)
        try:
            [whole] = csvfile.plan_partitions(path, 1, has_header)
        except DataError as exc:
            with pytest.raises(DataError) as refused:
                csvfile.plan_slices(path, has_header, max_bytes)
            assert str(refused.value) == str(exc)
            return
        assert csvfile.plan_slices(path, has_header, max_bytes) == csvfile.slice_partition(path, whole, max_bytes)


def test_a_partition_smaller_than_a_slice_is_one_slice(tmp_path):
    p = write(tmp_path, "label,a\n0,1\n1,2\n")
    [part] = csvfile.plan_partitions(p, 1)
    assert csvfile.slice_partition(p, part) == [part]


# --- reading rows --------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
@pytest.mark.parametrize(
    ("bad_row", "match"),
    [
        ("1,abc,3", "line 6, column 'a': 'abc' is not a number$"),
        ("1,,3", "line 6, column 'a': the cell is empty$"),
        ("1, ,3", "line 6, column 'a': the cell is empty$"),
        ("1,2", "line 6 has 2 cells; the header has 3$"),
        ("1,2,3,4", "line 6 has 4 cells; the header has 3$"),
        ("1,inf,2", "line 6, column 'a': 'inf' is not finite$"),
        ("1,2,nan", "line 6, column 'b': 'nan' is not finite$"),
        (",2,3", "line 6, column 'label': the label cell is empty$"),
    ],
)
def test_read_errors_name_the_line(tmp_path, ending, bad_row, match):
    text = ending.join(["label,a,b", "0,1,2", "", "1,2,3", "", bad_row, "0,1,1"]) + ending
    p = write(tmp_path, text)
    schema = csvfile.read_schema(p)
    for n_parts in (1, 2, 3):
        with pytest.raises(DataError, match=f"^'{p}' {match}"):
            for part in csvfile.plan_partitions(p, n_parts):
                csvfile.read_partition(p, schema, part)


def test_read_error_without_header_counts_from_line_one(tmp_path):
    p = write(tmp_path, "0,1,2\n1,2\n")
    with pytest.raises(DataError, match="line 2 has 2 cells; the first line has 3"):
        csvfile.read_csv(p, csvfile.read_schema(p, has_header=False))


def test_read_partition_reads_only_its_bytes(tmp_path):
    text = "label,a\n" + "".join(f"{i % 2},{i}\n" for i in range(100)) + "1,garbage\n"
    p = write(tmp_path, text)
    schema = csvfile.read_schema(p)
    first, last = csvfile.plan_partitions(p, 2)
    X, labels = csvfile.read_partition(p, schema, first)
    assert len(X) == first.n_rows and X[0, 0] == 0 and len(labels) == first.n_rows
    with pytest.raises(DataError, match="line 102, column 'a': 'garbage'"):
        csvfile.read_partition(p, schema, last)


def test_columns_in_schema_order_and_text_in_dropped_columns(tmp_path):
    p = write(tmp_path, "id,b,label,a\nx1,1,yes,10\nx2,2,no,20\n")
    schema = csvfile.read_schema(p, drop=["id"])
    X, labels = csvfile.read_csv(p, schema)
    assert X.dtype == np.float64 and X.tolist() == [[1, 10], [2, 20]]
    assert labels.tolist() == ["yes", "no"]
    predict_schema = csvfile.CsvSchema(schema.columns, None, (3, 1), True)
    X, labels = csvfile.read_csv(p, predict_schema)
    assert X.tolist() == [[10, 1], [20, 2]] and labels.shape == (0,) and labels.dtype.kind == "U"


def test_quoted_cells_and_string_labels(tmp_path):
    p = write(tmp_path, 'label,a\n"yes","1.5"\n no ,2\n')
    X, labels = csvfile.read_csv(p, csvfile.read_schema(p))
    np.testing.assert_array_equal(X[:, 0], [1.5, 2.0])
    assert labels.tolist() == ["yes", "no"]


def test_cells_the_fast_path_refuses_still_parse(tmp_path):
    p = write(tmp_path, 'label,a,b\n0, "2" ,1_000\n')
    X, _ = csvfile.read_csv(p, csvfile.read_schema(p))
    assert X.tolist() == [[2.0, 1000.0]]


def test_fast_and_exact_paths_agree(tmp_path):
    rng = np.random.default_rng(5)
    values = rng.normal(size=(200, 5)) * 10.0 ** rng.integers(-8, 8, size=(200, 5))
    rows = [f"{i % 2},{i}," + ",".join(repr(float(v)) for v in r) for i, r in enumerate(values)]
    cells = rows[3].split(",")
    rows[3] = ",".join([*cells[:2], f'"{cells[2]}"', *cells[3:]])  # a quoted feature
    text = "label,id,a,b,c,d,e\r\n" + "\r\n".join(rows) + "\r\n"
    p = write(tmp_path, text)
    schema = csvfile.read_schema(p, drop=["id"])
    lines = text.encode()[len("label,id,a,b,c,d,e\r\n") :].decode().split("\n")
    rows_only = [line for line in lines if line.strip()]
    fast = csvfile._features_fast(rows_only, schema)
    exact = csvfile._features_exact(csvfile._numbered_rows(lines, 2), schema, p)
    np.testing.assert_array_equal(fast, exact)
    np.testing.assert_array_equal(exact[3], values[3])


cells_strategy = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(-10**20, 10**20).map(str),
    st.sampled_from(["", " ", "1_000", " 2 ", "+3", ".5", "5.", "1e5", "-0", "nan", "inf", "x", "0x10", "\t7", "1,2",
                     '"4"', ' "4"', "\xff", "\r"]),
)


def read_with_and_without_arrow(text: str, read_schema, read_partition) -> list[tuple[Any, Any]]:
    """``text`` (surrogate-escaped bytes: "\xff" is a lone 0xff byte) as a file, read in two
    partitions by ``read_partition`` with pyarrow's path and without: each partition's two
    results, to compare. Where either path refuses the file, both must refuse it with the same
    sentence, and there is nothing more to compare (nor when the file has no schema)."""
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "data.csv")
        Path(path).write_bytes(text.encode("utf-8", errors="surrogateescape").replace(b"\xc3\xbf", b"\xff"))
        try:
            schema = read_schema(path)
            parts = csvfile.plan_partitions(path, 2)
        except DataError:
            return []
        results: list[Any] = []
        for use_arrow in (True, False):
            with mock.patch.object(csvfile, "USE_ARROW", use_arrow), mock.patch.object(csvfile, "ARROW_MIN_BYTES", 0):
                try:
                    results.append([read_partition(path, schema, part) for part in parts])
                except DataError as exc:
                    results.append(str(exc))
    arrow, numpy_paths = results
    if isinstance(numpy_paths, str) or isinstance(arrow, str):
        assert arrow == numpy_paths
        return []
    return list(zip(arrow, numpy_paths))


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.tuples(st.sampled_from(["a", "b", " c ", "", '"d"', "1"]), st.lists(cells_strategy, min_size=3, max_size=3)),
                  min_size=1, max_size=8),
    blank=st.sampled_from(["", "\n", "\n \n", "\r\n"]), ending=st.sampled_from(["\n", "\r\n"]),
)  # fmt: skip
def test_pyarrow_reads_every_partition_as_numpy_and_the_exact_path_do(rows, blank, ending):
    """Where pyarrow is installed it parses CSV partitions first; whatever the cells, the
    values, labels and error sentences are those of the numpy and exact paths."""
    pytest.importorskip("pyarrow", reason="the fast CSV path needs pyarrow (psctl[parquet])")
    text = "label,a,b,c" + ending + ending.join(",".join([label, *cells]) for label, cells in rows) + blank + ending
    for (xa, la), (xn, ln) in read_with_and_without_arrow(text, csvfile.read_schema, csvfile.read_partition):
        np.testing.assert_array_equal(xa, xn)
        assert xa.dtype == xn.dtype and la.tolist() == ln.tolist()


def test_pyarrow_is_the_path_taken_for_plain_numbers(tmp_path):
    pytest.importorskip("pyarrow", reason="the fast CSV path needs pyarrow (psctl[parquet])")
    p = write(tmp_path, "label,a,b\nx,1,2.5\ny,3,-4e-3\n")
    schema = csvfile.read_schema(p)
    [part] = csvfile.plan_partitions(p, 1)
    with mock.patch.object(csvfile, "_features_fast", side_effect=AssertionError("numpy path taken")), \
            mock.patch.object(csvfile, "ARROW_MIN_BYTES", 0):
        X, labels = csvfile.read_partition(p, schema, part)
    assert X.tolist() == [[1.0, 2.5], [3.0, -0.004]] and labels.tolist() == ["x", "y"]
    # Small inputs stay with numpy: importing pyarrow would cost more than it saves.
    with mock.patch.object(csvfile, "_features_fast", wraps=csvfile._features_fast) as numpy_path:
        small = csvfile.read_partition(p, schema, part)
    assert numpy_path.call_count == 1
    np.testing.assert_array_equal(small[0], X)


def test_empty_partition(tmp_path):
    p = write(tmp_path, "label,a,b\n0,1,2\n")
    schema = csvfile.read_schema(p)
    parts = csvfile.plan_partitions(p, 3)
    empty = next(x for x in parts if x.n_rows == 0)
    X, labels = csvfile.read_partition(p, schema, empty)
    assert X.shape == (0, 2) and labels.shape == (0,)
    assert csvfile.Partition.from_dict(json.loads(json.dumps(empty.to_dict()))) == empty


# --- statistics ----------------------------------------------------------------------


def test_merge_stats_equals_numpy():
    X = np.random.default_rng(0).normal(3, 2, size=(101, 4))
    X[:, 3] = 5.0
    parts = [csvfile.partial_stats(X[a:b]) for a, b in [(0, 10), (10, 11), (11, 11), (11, 101)]]
    jsonable = [{k: np.asarray(v).tolist() for k, v in p.items()} for p in parts]
    mean, std = csvfile.merge_stats(jsonable)
    np.testing.assert_allclose(mean, X.mean(axis=0))
    np.testing.assert_allclose(std[:3], X.std(axis=0)[:3])
    assert std[3] == 1.0


def test_merge_stats_is_sane_far_from_zero():
    X = 1e9 + np.random.default_rng(1).normal(0, 1e-3, size=(1000, 2))
    mean, std = csvfile.merge_stats([csvfile.partial_stats(X[i : i + 100]) for i in range(0, 1000, 100)])
    # sum/sum-of-squares would give a variance of rounding noise (~1e2) here, not ~1e-6.
    np.testing.assert_allclose(std, X.std(axis=0), rtol=1e-3)


def test_merge_stats_needs_rows():
    with pytest.raises(ValueError):
        csvfile.merge_stats([csvfile.partial_stats(np.empty((0, 3)))])


# --- labels --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["1", "0"], ("0", "1")),
        (["+1", "-1"], ("-1", "1")),
        (["1", "-1"], ("-1", "1")),
        (["1.0", "0", "1", " 0.0 "], ("0", "1")),
        (["M", "B"], ("B", "M")),
        (["10", "9"], ("9", "10")),
        (["2.5", "10"], ("2.5", "10")),
        (["yes", "1"], ("1", "yes")),
    ],
)
def test_binary_classes(values, expected):
    assert csvfile.binary_classes(values) == expected


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (["a"], "logreg needs exactly two label values; found 1: 'a'$"),
        (["1", "1.0", "+1"], "found 1: '1'$"),
        (["a", "b", "c"], "found 3: 'a', 'b', 'c'$"),
        ([str(i) for i in range(30)], r"found 30: '0', '1', .* \(30 in all\)$"),
        ([], "found 0"),
    ],
)
def test_binary_classes_errors(values, match):
    with pytest.raises(DataError, match=match):
        csvfile.binary_classes(values)


def test_encode_labels():
    y = csvfile.encode_labels(np.array(["+1", "-1", "1.0", "-1"]), ("-1", "1"))
    assert y.dtype == np.float64 and y.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert csvfile.encode_labels(np.array(["B", "M"]), ["B", "M"]).tolist() == [0.0, 1.0]
    assert csvfile.encode_labels(np.array([], dtype=str), ["0", "1"]).shape == (0,)
    with pytest.raises(DataError, match="label '7' is not one of the model's classes '0', '1'$"):
        csvfile.encode_labels(np.array(["0", "7"]), ("0", "1"))


def test_stratified_split_is_deterministic_and_stratified():
    labels = np.array(["a"] * 80 + ["b"] * 20)
    train, test = csvfile.stratified_split(labels, 0.2, seed=42)
    assert len(test) == 20 and (labels[test] == "b").sum() == 4
    assert not set(train) & set(test) and len(train) + len(test) == 100
    again = csvfile.stratified_split(labels, 0.2, seed=42)
    np.testing.assert_array_equal(again[1], test)


def test_stratified_split_proportions_and_seeds():
    labels = np.random.default_rng(3).choice(["x", "y", "z"], size=997, p=[0.6, 0.3, 0.1])
    train, test = csvfile.stratified_split(labels, 0.25, seed=1)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(997))
    for value in "xyz":
        n = (labels == value).sum()
        assert abs((labels[test] == value).sum() - 0.25 * n) <= 0.5
    assert not np.array_equal(csvfile.stratified_split(labels, 0.25, seed=2)[1], test)
    with pytest.raises(ValueError):
        csvfile.stratified_split(labels, 1.0, seed=0)


# --- hostile files -------------------------------------------------------------------

TEN_MB = 10 << 20


@pytest.mark.parametrize(
    ("where", "line"),
    [("header", 1), ("middle", 3), ("last-without-newline", 4), ("last-after-blank", 5)],
)
def test_a_ten_megabyte_line_is_refused_by_number(tmp_path, where, line):
    long = "1," + "9" * TEN_MB
    lines = {
        "header": [long, "1,2"],
        "middle": ["label,x", "1,2", long, "0,3"],
        "last-without-newline": ["label,x", "1,2", "0,3", long],
        "last-after-blank": ["label,x", "1,2", "0,3", "", long],
    }[where]
    text = "\n".join(lines) + ("" if where.startswith("last") else "\n")
    path = write(tmp_path, text)
    with pytest.raises(DataError, match=rf"line {line} is longer than 4 MiB, the most psctl reads as one line; is it a CSV file\?$"):
        csvfile.read_schema(path)
        csvfile.plan_partitions(path, 3)


def test_the_line_bound_holds_across_chunks(tmp_path):
    path = write(tmp_path, "label,x\n" + "1,2\n" * 10 + "1," + "5" * 100 + "\n0,1\n")
    # Line 12 is 103 bytes, its newline included.
    with mock.patch.object(csvfile, "CHUNK_BYTES", 7), mock.patch.object(csvfile, "MAX_LINE_BYTES", 102):
        with pytest.raises(DataError, match="line 12 is longer than"):
            csvfile.plan_partitions(path, 2)
    with mock.patch.object(csvfile, "CHUNK_BYTES", 7), mock.patch.object(csvfile, "MAX_LINE_BYTES", 103):
        assert sum(p.n_rows for p in csvfile.plan_partitions(path, 2)) == 12
