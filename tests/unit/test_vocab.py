"""Id vocabularies: text on the wire, the union, integer vs text ids, lookups, model-file arrays."""

import numpy as np
import pytest

from psctl.data import vocab
from psctl.data.vocab import Vocab, VocabError


@pytest.mark.parametrize("values", [[], ["a"], ["1", "2", "10"], ["ü", "x y", "\"q\"", "🎬"]])
def test_values_round_trip_as_text(values):
    blob = vocab.encode_values(values)
    assert blob.dtype == np.uint8 and blob.ndim == 1
    assert vocab.decode_values(blob).tolist() == values


def test_decode_refuses_what_is_not_utf8_text():
    with pytest.raises(VocabError, match="not UTF-8"):
        vocab.decode_values(np.frombuffer(b"\xff\xfe", np.uint8))
    with pytest.raises(VocabError, match="1-d uint8"):
        vocab.decode_values(np.zeros(3, np.int64))


def test_union_is_sorted_distinct_and_bounded(monkeypatch):
    parts = [np.array(["b", "a"]), np.array([], dtype=str), np.array(["c", "a"])]
    assert vocab.union(parts, "user").tolist() == ["a", "b", "c"]
    assert vocab.union([], "user").tolist() == []
    monkeypatch.setattr(vocab, "MAX_VOCAB_SIZE", 2)
    with pytest.raises(VocabError, match="more than 2 distinct 'user' ids"):
        vocab.union(parts, "user")


def test_integer_ids_sort_numerically_and_match_any_spelling():
    v = Vocab.from_strings(["10", "9", "007", "7", "-3"])
    assert v.kind == "int" and v.ids.tolist() == [-3, 7, 9, 10]
    np.testing.assert_array_equal(v.rows(np.array(["7", "07", "10", "8", "x", "99999999999999999999999"])), [1, 1, 3, -1, -1, -1])


def test_text_ids_when_any_id_is_not_an_integer():
    v = Vocab.from_strings(["u10", "9", "u2", "1.5"])
    assert v.kind == "str" and v.ids.tolist() == ["1.5", "9", "u10", "u2"]
    np.testing.assert_array_equal(v.rows(np.array(["u2", "9", "09", "zzz", ""])), [3, 1, -1, -1, -1])
    assert v.labels(np.array([2, 0])) == ["u10", "1.5"]


def test_empty_vocab_knows_nothing():
    v = Vocab.from_strings([])
    assert len(v) == 0
    np.testing.assert_array_equal(v.rows(np.array(["1"])), [-1])


@pytest.mark.parametrize("values", [["3", "1", "2"], ["b", "a", "ç"]])
def test_model_file_arrays_round_trip(values):
    v = Vocab.from_strings(values)
    back = Vocab.from_array(v.to_array(), v.kind)
    assert back.kind == v.kind and back.ids.tolist() == v.ids.tolist()
    assert v.to_array().dtype.kind in "iu"  # numbers only: loads with allow_pickle=False


def test_messages_name_their_arrays():
    names, arrays = vocab.to_message({"user": ["a", "b"], "item": ["1"]})
    assert names == ["user", "item"]
    decoded = vocab.from_message({"vocab": names}, arrays)
    assert {k: v.tolist() for k, v in decoded.items()} == {"user": ["a", "b"], "item": ["1"]}
    with pytest.raises(VocabError, match="carries 1 arrays"):
        vocab.from_message({"vocab": names}, arrays[:1])
    with pytest.raises(VocabError, match="distinct names"):
        vocab.from_message({"vocab": ["user", "user"]}, arrays)
    assert vocab.attach({"stats": []}, []) == {"stats": []}
    attached = vocab.attach({"vocab": names}, arrays)
    assert isinstance(attached["vocab"]["user"], Vocab) and attached["vocab"]["item"].kind == "int"
