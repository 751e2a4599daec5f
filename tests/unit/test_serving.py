"""The pure part of psctl serve: request bodies in, predictions or one-sentence refusals out."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from psctl.apps import predict, serving
from psctl.errors import ModelFileError, UsageError
from psctl.models.logreg import LogReg

pytestmark = pytest.mark.timeout(30)


def snapshot(columns=("a", "b"), label="y") -> serving.Snapshot:
    model = LogReg(len(columns), ["no", "yes"])
    params = {"w": np.array([1.0, -2.0, 0.5])}
    meta = {"kind": "logreg", "standardize": {"mean": [1.0, 0.0], "std": [2.0, 1.0]}}
    return serving.Snapshot(predict.Predictor(model, params, meta, None, "m.npz"), tuple(columns), label, 0.0)


def test_objects_and_arrays_give_the_predict_numbers():
    snap = snapshot()
    rows = [[3.0, 1.0], [0.0, -1.0]]
    expected = predict.evaluate_rows(snap.predictor, predict.Rows(np.array(rows), None)).outputs
    by_array = serving.predictions(snap, {"instances": rows}, 10)
    by_object = serving.predictions(snap, {"instances": [{"b": 1.0, "a": 3, "y": "ignored"}, {"a": 0.0, "b": -1}]}, 10)
    assert by_array == by_object
    assert [p["probability"] for p in by_array] == expected.tolist()
    assert [p["label"] for p in by_array] == ["yes" if p >= 0.5 else "no" for p in expected]


@pytest.mark.parametrize("body,words", [
    (b"{", "not valid JSON"),
    (b"\xff", "not UTF-8"),
    (b"[]", "JSON array"),
    (b'{"instances": [[1, NaN]]}', "NaN"),
    (b'{"instances": [[1, Infinity]]}', "Infinity"),
    (b"[" * 50_000 + b"]" * 50_000, "nests too deeply"),
])  # fmt: skip
def test_bodies_that_are_not_json_objects(body, words):
    with pytest.raises(serving.BadRequest, match=words) as exc:
        serving.parse_body(body)
    assert exc.value.status == 400


@pytest.mark.parametrize("instances,words,status", [
    ([[1.0]], "has 1 values; the model takes 2", 400),
    ([[1.0, "2"]], "'b', which is not a number", 400),
    ([[1.0, True]], "true for column 'b', which is not a number", 400),
    ([{"a": None, "b": 1}], "null for column 'a', which is not a number", 400),
    ([[1.0, 1e308 * 10]], "not a finite number", 400),
    ([{"a": 1}], "lacks 1 column", 400),
    ([{"a": 1, "b": 2, "c": 3}], "a column 'c' the model does not have", 400),
    ([{"a": 1, "b": 2, "y": 3}, {"a": 1, "b": 2, "y": 0, "z": 1}], "instance 1 has a column 'z'", 400),
    ([[1, 2], "row"], "instance 1 is a JSON string", 400),
    ([None], "is a JSON null", 400),
    ([[1, 2]] * 11, "the limit is 10 (--max-rows)", 400),
])  # fmt: skip
def test_instances_refused_with_one_sentence(instances, words, status):
    with pytest.raises(serving.BadRequest, match=words.replace("(", r"\(").replace(")", r"\)")) as exc:
        serving.predictions(snapshot(), {"instances": instances}, 10)
    assert exc.value.status == status


def test_unknown_body_fields_and_cold_start_outside_mf():
    with pytest.raises(serving.BadRequest, match="'inputs'"):
        serving.predictions(snapshot(), {"inputs": []}, 10)
    with pytest.raises(serving.BadRequest, match="cold_start is for mf"):
        serving.predictions(snapshot(), {"instances": [], "cold_start": "mean"}, 10)
    with pytest.raises(serving.BadRequest, match="recommend is for mf") as exc:
        serving.recommendations(snapshot(), {"user": 1})
    assert exc.value.status == 404


def test_model_arguments_are_named_by_stem_or_name():
    assert serving.parse_model_args(["dir/model.npz", "b=other.npz", "x=y=z.npz"]) == [
        ("model", "dir/model.npz"), ("b", "other.npz"), ("x", "y=z.npz")]  # fmt: skip
    with pytest.raises(UsageError, match="two models are named 'model'"):
        serving.parse_model_args(["model.npz", "a/model.npz"])
    with pytest.raises(UsageError, match="cannot be a model's name"):
        serving.parse_model_args(["my model.npz"])


def test_a_missing_file_is_a_model_file_error(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        serving.FileSource.load("m", str(tmp_path / "none.npz"))


def test_a_file_source_describes_itself_and_returns_its_snapshot():
    snap = snapshot()
    source = serving.FileSource("m", "/x/m.npz", snap)
    assert source.describe()["kind"] == "file" and source.describe()["path"] == "/x/m.npz"
    assert asyncio.run(source.snapshot()) is snap
    meta = serving.metadata("m", source, snap)
    assert meta["columns"] == ["a", "b"] and meta["classes"] == ["no", "yes"] and meta["label"] == "y"
    json.dumps(meta)  # plain JSON values


def test_a_sparse_model_is_refused_in_one_sentence():
    model = LogReg(16, ["0", "1"], sparse=True)
    meta = {"kind": "logreg", "input": {"format": "hashed_csv", "hash_bits": 4, "categorical": ["c"]}}
    with pytest.raises(ModelFileError, match="hashed_csv \\(sparse\\) model; psctl serve answers for dense CSV and mf"):
        serving.snapshot_of(predict.Predictor(model, {"w": np.zeros(1), "w.keys": np.zeros(1, np.int64)}, meta, None, "h.npz"))
