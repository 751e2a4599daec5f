"""Issue 13, defects 11 and 12: crafted model files get one sentence, never a traceback,
a hang or an allocation the model's own metadata does not justify."""

from __future__ import annotations

import json
import os
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy_format

from psctl.apps import predict
from psctl.errors import ModelFileError
from psctl.files import loading
from psctl.files.modelfile import FORMAT, FORMAT_VERSION, save_model

SCHEMA = {"columns": ["label", "a", "b"], "label_index": 0, "feature_indices": [1, 2], "has_header": True}
META = {
    "kind": "logreg",
    "task": "binary",
    "data_format": "csv",
    "n_features": 2,
    "feature_names": ["a", "b"],
    "label": "label",
    "classes": ["0", "1"],
    "schema": SCHEMA,
    "standardize": None,
    "input": {"format": "csv"},
    "model_params": {},
}
W = np.array([0.5, -0.25, 0.1])


def write(path, meta=None, **params) -> str:
    save_model(str(path), params or {"w": W}, META if meta is None else meta)
    return str(path)


def with_(**fields):
    return {**META, **fields}


def test_a_well_formed_file_loads_and_predicts(tmp_path):
    (tmp_path / "d.csv").write_text("label,a,b\n1,1,2\n0,3,1\n")
    model, params, meta = loading.load(write(tmp_path / "m.npz"))
    assert set(params) == {"w"} and model.n_features == 2
    pred = predict.predict(str(tmp_path / "m.npz"), str(tmp_path / "d.csv"))
    assert len(pred.predicted) == 2


@pytest.mark.parametrize(
    ("meta", "params", "match"),
    [
        (with_(n_features=-5), None, "meta field 'n_features' that is not a whole number"),
        (with_(n_features=True), None, "meta field 'n_features'"),
        (with_(kind="mf"), None, "says task 'binary', but a mf model has 'regression'"),
        (
            with_(kind="mf", task="regression", data_format="ratings", model_params={"rank": 2, "users": 3, "items": 4}),
            None,
            "member 'w' that a mf model does not use",
        ),
        (with_(classes={"0": 1, "1": 2}), None, "meta field 'classes' that is not a list of class labels"),
        (with_(schema="garbage"), None, "meta field 'schema' that is not a CSV schema"),
        (with_(schema={**SCHEMA, "feature_indices": [1, 9]}), None, "meta field 'schema'"),
        (with_(standardize={"mean": [0.0], "std": [1.0]}), None, "standardizes 1 means and 1 deviations; it has 2 features"),
        (with_(standardize={"mean": [0.0, 0.0], "std": [1.0, 0.0]}), None, "standard deviation of zero"),
        (with_(standardize={"mean": [0.0, "x"], "std": [1.0, 1.0]}), None, "meta field 'standardize'"),
        (with_(input={"format": "libsvm"}), None, "meta field 'input' that is not an input spec"),
        (with_(input={"format": "parquet"}), None, "meta field 'input'"),
        (with_(input={"format": "hashed_csv", "hash_bits": 99, "categorical": []}), None, "meta field 'input'"),
        (with_(model_params=[1]), None, "meta field 'model_params'"),
        (with_(kind="mf", task="regression", data_format="ratings", model_params={"rank": -1}), None, "model option 'rank'"),
        (with_(kind="no-such-model"), None, "unknown model 'no-such-model'"),
        (META, {"w": np.array([np.nan, 0.0, 1.0])}, "table 'w' with NaN or infinite weights"),
        (META, {"w": np.array([np.inf, 0.0, 1.0])}, "NaN or infinite"),
        (META, {"w": W, "extra": np.zeros(3)}, "member 'extra' that a logreg model does not use"),
        (META, {"w": np.zeros(5)}, r"table 'w' of shape \(5,\); a logreg model needs \(3,\)"),
    ],
)
def test_crafted_meta_is_refused_with_one_sentence(tmp_path, meta, params, match):
    path = write(tmp_path / "m.npz", meta, **(params if params is not None else {"w": W}))
    with pytest.raises(ModelFileError, match=match) as err:
        loading.load(path)
    assert "\n" not in str(err.value)


def raw_meta_file(path, text: bytes, **arrays) -> str:
    np.savez(path, __meta__=np.frombuffer(text, np.uint8), **arrays)
    return str(path)


def test_deeply_nested_meta(tmp_path):
    head = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "logreg"})[:-1]
    text = (head + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}").encode()
    with pytest.raises(ModelFileError, match="nested too deeply"):
        loading.load(raw_meta_file(tmp_path / "deep.npz", text, w=W))


def test_missing_schema_is_refused_at_predict(tmp_path):
    (tmp_path / "d.csv").write_text("label,a,b\n1,1,2\n")
    path = write(tmp_path / "m.npz", with_(schema=None))
    with pytest.raises(ModelFileError, match="has no training schema"):
        predict.predict(path, str(tmp_path / "d.csv"))


def bomb(path, member: str, shape: tuple[int, ...], extra_w: bool) -> str:
    """An .npz whose ``member`` is ``shape`` float64 zeros, deflated (a few hundred KB on disk)."""
    meta = {**META, "format": FORMAT, "format_version": FORMAT_VERSION}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__meta__.npy", _npy(np.frombuffer(json.dumps(meta).encode(), np.uint8)))
        if extra_w:
            zf.writestr("w.npy", _npy(W))
        with zf.open(f"{member}.npy", "w", force_zip64=True) as out:
            npy_format.write_array_header_1_0(out, {"descr": "<f8", "fortran_order": False, "shape": shape})
            chunk = bytes(1 << 20)
            for _ in range(int(np.prod(shape)) * 8 // len(chunk)):
                out.write(chunk)
    return str(path)


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("member", "extra_w", "match"),
    [("junk", True, "member 'junk' that a logreg model does not use"), ("w", False, r"table 'w' of shape \(8388608,\)")],
)
def test_a_deflate_bomb_is_refused_before_it_is_inflated(tmp_path, member, extra_w, match):
    path = bomb(tmp_path / "bomb.npz", member, (8 << 20,), extra_w)  # 64 MiB of zeros inside
    assert os.path.getsize(path) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError, match=match):
            loading.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated while refusing a bomb"


def test_optimizer_state_is_kept_in_the_file_but_not_loaded(tmp_path):
    path = write(tmp_path / "m.npz", w=W, **{"w.opt.m": np.zeros(3)})
    _, params, _ = loading.load(path)
    assert set(params) == {"w"}
    with pytest.raises(ModelFileError, match="member 'v.opt.m' that a logreg model does not use"):
        loading.load(write(tmp_path / "n.npz", w=W, **{"v.opt.m": np.zeros(3)}))


def test_only_used_tables_are_cast(tmp_path):
    (tmp_path / "d.csv").write_text("label,a,b\n1,1,2\n")
    path = write(tmp_path / "m.npz", w=W.astype(np.float32))
    _, params, _ = loading.load(path)
    assert set(params) == {"w"} and params["w"].dtype == np.float32  # loading casts nothing


@pytest.mark.timeout(20)
def test_a_fifo_is_not_a_model_file(tmp_path):
    fifo = tmp_path / "m.npz"
    os.mkfifo(fifo)
    result: list[BaseException] = []

    def run():
        try:
            loading.load(str(fifo))
        except BaseException as exc:  # noqa: BLE001  (reported to the test thread)
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # unblock the open so the thread can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("loading a FIFO hangs")
    assert isinstance(result[0], ModelFileError) and "is not a regular file" in str(result[0])
