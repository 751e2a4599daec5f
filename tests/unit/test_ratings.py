"""The ratings format: columns, partitions, errors that name the line, the statistics pass."""

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psctl.data import csvfile, ratings, vocab
from psctl.data.vocab import Vocab
from psctl.errors import DataError

from .test_data import read_with_and_without_arrow


def write(tmp_path, text, name="r.csv"):
    p = tmp_path / name
    p.write_bytes(text.encode())
    return str(p)


def test_schema_finds_the_columns_by_name_or_index(tmp_path):
    p = write(tmp_path, "timestamp,movieId,userId,rating\n9,1,2,3.5\n")
    s = ratings.read_schema(p)
    assert s.feature_names == ("userId", "movieId") and s.columns[s.label_index] == "rating"
    s = ratings.read_schema(p, user_col="2", item_col="1", rating_col="3")
    assert s.feature_indices == (2, 1) and s.label_index == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"user_col": "user"}, "user column 'user' is not in"),
        ({"item_col": "itemId"}, "item column 'itemId' is not in"),
        ({"rating_col": "stars"}, "rating column 'stars' is not in"),
        ({"item_col": "userId"}, "user and item columns .* must differ"),
        ({"rating_col": "movieId"}, "rating column .* must differ"),
    ],
)
def test_schema_errors_name_the_missing_column(tmp_path, kwargs, message):
    p = write(tmp_path, "userId,movieId,rating\n1,2,3\n")
    with pytest.raises(DataError, match=message):
        ratings.read_schema(p, **kwargs)


def test_rating_column_is_optional_for_predict_input(tmp_path):
    p = write(tmp_path, "userId,movieId\n1,2\n")
    s = ratings.read_schema(p, need_rating=False)
    assert s.label_index is None
    ids, values = ratings.read_ratings(p, s)
    assert ids.tolist() == [["1", "2"]] and len(values) == 0


def test_reads_string_ids_and_ignores_other_columns(tmp_path):
    p = write(tmp_path, 'userId,movieId,rating,title\n"alice", m-1 ,4.5,x\n\nbob,m-2,1,y\r\n')
    ids, values = ratings.read_ratings(p, ratings.read_schema(p))
    assert ids.tolist() == [["alice", "m-1"], ["bob", "m-2"]]
    np.testing.assert_array_equal(values, [4.5, 1.0])


def test_partitions_together_read_every_row_once(tmp_path):
    lines = [f"u{i % 7},{i % 11},{(i % 5) + 0.5}" for i in range(101)]
    p = write(tmp_path, "userId,movieId,rating\n" + "\n".join(lines) + "\n")
    s = ratings.read_schema(p)
    parts = csvfile.plan_partitions(p, 4)
    read = [ratings.read_partition(p, s, part) for part in parts]
    ids = np.concatenate([r[0] for r in read])
    assert [f"{u},{i}" for u, i in ids.tolist()] == [ln.rsplit(",", 1)[0] for ln in lines]
    assert sum(len(r[1]) for r in read) == 101


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("1,2,3\n1,2,good\n", r"line 3, column 'rating': rating 'good' is not a number"),
        ("1,2,3\n1,2,nan\n", r"line 3, column 'rating': rating 'nan' is not finite"),
        ("1,2,3\n1,,4\n", r"line 3, column 'movieId': the id cell is empty"),
        ("1,2,3\n1,2\n", r"line 3 has 2 cells; the header has 3"),
    ],
)
def test_bad_rows_get_one_sentence_naming_the_line(tmp_path, body, message):
    p = write(tmp_path, "userId,movieId,rating\n" + body)
    with pytest.raises(DataError, match=message):
        ratings.read_ratings(p, ratings.read_schema(p))


def test_stats_request_carries_rating_stats_and_distinct_ids():
    ids = np.array([["b", "1"], ["a", "2"], ["b", "2"]])
    body, arrays = ratings.stats_request(ids, np.array([1.0, 2.0, 4.5]))
    assert body["vocab"] == ["user", "item"] and body["labels"] == []
    decoded = vocab.from_message(body, arrays)
    assert decoded["user"].tolist() == ["a", "b"] and decoded["item"].tolist() == ["1", "2"]
    assert body["stats"]["count"] == 3
    assert ratings.global_mean([body["stats"]]) == pytest.approx(2.5)
    empty, _ = ratings.stats_request(np.empty((0, 2), dtype=str), np.empty(0))
    assert empty["stats"] is None


def test_global_mean_merges_partitions():
    a = ratings.stats_request(np.array([["u", "i"]] * 2), np.array([1.0, 2.0]))[0]["stats"]
    b = ratings.stats_request(np.array([["u", "i"]] * 3), np.array([3.0, 4.0, 5.0]))[0]["stats"]
    assert ratings.global_mean([a, b]) == pytest.approx(3.0)


def test_rows_come_from_the_shared_vocabularies():
    vocabs = {"user": Vocab.from_strings(["b", "a"]), "item": Vocab.from_strings(["10", "9"])}
    rows = ratings.encode_rows(np.array([["a", "10"], ["b", "9"], ["c", "09"]]), vocabs)
    assert rows.dtype == np.int64 and rows.tolist() == [[0, 1], [1, 0], [-1, 0]]


def test_random_split_is_seeded_and_complete():
    train, test = ratings.random_split(100, 0.2, seed=42)
    assert len(test) == 20 and len(train) == 80
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))
    again = ratings.random_split(100, 0.2, seed=42)
    np.testing.assert_array_equal(test, again[1])
    assert not np.array_equal(test, ratings.random_split(100, 0.2, seed=1)[1])


_id_cells = st.sampled_from(["u1", " u2 ", "7", "007", "", " ", "x y", "\xff", '"q"', "1.5", "-3"])
_rating_cells = st.sampled_from(["4", "3.5", " 2 ", "", "x", "nan", "inf", "1e1", "+1", '"5"', "1_0"])


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.tuples(_id_cells, _id_cells, _rating_cells), min_size=1, max_size=8),
       blank=st.sampled_from(["", "\n", "\n \n"]), ending=st.sampled_from(["\n", "\r\n"]), extra=st.booleans())
def test_pyarrow_reads_ratings_as_numpy_and_the_exact_path_do(rows, blank, ending, extra):
    """Ratings partitions parsed by pyarrow first: whatever the cells, the ids, ratings and error
    sentences are those of the numpy and exact paths."""
    pytest.importorskip("pyarrow", reason="the fast CSV path needs pyarrow (psctl[parquet])")
    lines = [",".join([u, i, r, *(["z"] if extra else [])]) for u, i, r in rows]
    text = "userId,movieId,rating" + (",other" if extra else "") + ending + ending.join(lines) + blank + ending
    for (ia, ra), (in_, rn) in read_with_and_without_arrow(text, ratings.read_schema, ratings.read_partition):
        assert ia.tolist() == in_.tolist() and ia.shape == in_.shape
        np.testing.assert_array_equal(ra, rn)
        assert ra.dtype == rn.dtype


def test_pyarrow_is_the_path_taken_for_plain_ratings(tmp_path):
    pytest.importorskip("pyarrow", reason="the fast CSV path needs pyarrow (psctl[parquet])")
    p = tmp_path / "r.csv"
    p.write_text("userId,movieId,rating\nu1,10,4.5\nu2,11,3\n")
    schema = ratings.read_schema(str(p))
    [part] = csvfile.plan_partitions(str(p), 1)
    with mock.patch.object(ratings, "_fast", side_effect=AssertionError("numpy path taken")), \
            mock.patch.object(csvfile, "ARROW_MIN_BYTES", 0):
        ids, values = ratings.read_partition(str(p), schema, part)
    assert ids.tolist() == [["u1", "10"], ["u2", "11"]] and values.tolist() == [4.5, 3.0]
