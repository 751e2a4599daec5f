"""The pure prediction step: batches evaluated apart combine exactly; mf ratings are clipped
to the training range (and old model files without one are not)."""

from pathlib import Path

import numpy as np
import pytest

from psctl.apps import predict, recommend
from psctl.apps.train import vocab_file_parts
from psctl.data import csvfile
from psctl.data.vocab import Vocab
from psctl.errors import DataError, PsctlError
from psctl.files import loading, modelfile
from psctl.models.logreg import LogReg
from psctl.models.mf import MF

from ..conftest import write_logreg_csv
from .test_recommend import BI, BU, ITEMS, MEAN, USERS, P, Q, expected


def mf_file(tmp_path, rating_range=None):
    stats = {"vocab": {"user": Vocab.from_strings(USERS), "item": Vocab.from_strings(ITEMS)}}
    params_meta = {"rank": 2, "users": 3, "items": 4, "mean": MEAN}
    if rating_range is not None:
        params_meta.update(rating_min=rating_range[0], rating_max=rating_range[1])
    meta = {"kind": "mf", "task": "regression", "data_format": "ratings", "model_params": params_meta,
            "schema": {"columns": ["user", "item", "stars"], "label_index": 2, "feature_indices": [0, 1], "has_header": True},
            "feature_names": ["user", "item"], "classes": []}
    params = {"user_factors": P.astype(np.float32), "item_factors": Q.astype(np.float32),
              "user_bias": BU.astype(np.float32), "item_bias": BI.astype(np.float32)}
    meta["vocab"], arrays = vocab_file_parts(stats)
    params.update(arrays)
    path = tmp_path / ("mf.npz" if rating_range is None else "mf-range.npz")
    modelfile.save_model(str(path), params, meta)
    return str(path)


def test_mf_ratings_are_clipped_to_the_training_range(tmp_path):
    users = np.repeat(USERS, len(ITEMS))
    items = np.tile(ITEMS, len(USERS))
    raw = np.array([expected(u, i) for u in range(3) for i in range(4)])
    assert raw.max() > 4.0 and raw.min() < 2.5  # the tables alone overshoot the range below
    old = predict.predict_pairs(mf_file(tmp_path), users, items)
    np.testing.assert_allclose(old, raw, rtol=1e-6)  # a model file without a range: as before
    clipped = predict.predict_pairs(mf_file(tmp_path, (2.5, 4.0)), users, items)
    np.testing.assert_allclose(clipped, np.clip(raw, 2.5, 4.0), rtol=1e-6)
    mf = recommend.load_mf(mf_file(tmp_path, (2.5, 4.0)))
    assert mf.model.rating_range == (2.5, 4.0)
    # cold start "mean" is clipped too; NaN stays NaN
    out = recommend.predict_pairs(mf, ["ghost", "ann"], ["i1", "nothing"], "mean")
    assert 2.5 <= out.min() and out.max() <= 4.0
    assert np.isnan(recommend.predict_pairs(mf, ["ghost"], ["i1"])).all()
    # recommendations rank by the unclipped score, and show the clipped one
    ranked = recommend.recommend_user(mf, "ann", 4)
    order = np.argsort(-np.array([expected(0, i) for i in range(4)]), kind="stable")
    assert [item for item, _ in ranked] == [ITEMS[i] for i in order]
    assert max(score for _, score in ranked) == 4.0


def test_one_pair_and_bad_pairs(tmp_path):
    mf = recommend.load_mf(mf_file(tmp_path, (1.0, 5.0)))
    assert recommend.predict_one(mf, "bob", "i2") == pytest.approx(expected(1, 1))
    with pytest.raises(DataError, match="user 'zed' and item 'i9' are not in the model"):
        recommend.predict_one(mf, "zed", "i9")
    assert recommend.predict_one(mf, "zed", "i2", "mean") == pytest.approx(MEAN + BI[1])
    with pytest.raises(DataError, match="got 2 users and 1 items"):
        recommend.predict_pairs(mf, ["ann", "bob"], ["i1"])


def test_range_checks():
    with pytest.raises(PsctlError, match="rating_min <= rating_max"):
        MF(2, rank=2, rating_min=5.0, rating_max=1.0)
    with pytest.raises(PsctlError, match="both be given"):
        MF(2, rank=2, rating_min=1.0)
    meta = {"kind": "mf", "model_params": {"rating_min": float("nan"), "rating_max": 5.0}}
    with pytest.raises(Exception, match="rating_min"):
        loading.check_meta("m.npz", meta)


def test_dense_batches_evaluated_apart_combine_to_the_whole(tmp_path):
    path = str(write_logreg_csv(tmp_path / "d.csv", 301, seed=4))
    model = LogReg(4, ["0", "1"])
    w = np.array([0.7, -0.3, 0.2, 1.1, 0.05])
    meta = {"kind": "logreg", "task": "binary", "classes": ["0", "1"], "label": "label",
            "schema": csvfile.read_schema(path).to_dict(), "standardize": {"mean": [0.1] * 4, "std": [1.5] * 4}}
    pred = predict.Predictor(model, {"w": w}, meta, None, path)
    plan = predict.plan_input(pred, path)
    whole = predict.combine(pred, [predict.evaluate_rows(pred, predict.read_rows(pred, plan, path, predict.whole_file(path, plan)))], plan)
    parts = csvfile.plan_partitions(path, 7)
    apart = predict.combine(pred, [predict.evaluate_rows(pred, predict.read_rows(pred, plan, path, p)) for p in parts], plan)
    assert np.array_equal(whole.outputs, apart.outputs) and whole.predicted == apart.predicted
    assert whole.metrics.keys() == apart.metrics.keys()
    for name, value in whole.metrics.items():
        assert np.array_equal(value, apart.metrics[name]), name


def test_one_process_reads_a_file_slice_by_slice_as_one_batch(tmp_path, monkeypatch):
    """predict() without workers evaluates the file a slice at a time (file_slices): the same
    outputs and metrics as one batch of every row, and a bad cell's sentence names its line."""
    path = str(write_logreg_csv(tmp_path / "d.csv", 301, seed=4))
    meta = {"kind": "logreg", "task": "binary", "classes": ["0", "1"], "label": "label",
            "schema": csvfile.read_schema(path).to_dict(), "standardize": {"mean": [0.1] * 4, "std": [1.5] * 4}}
    pred = predict.Predictor(LogReg(4, ["0", "1"]), {"w": np.array([0.7, -0.3, 0.2, 1.1, 0.05])}, meta, None, path)
    plan = predict.plan_input(pred, path)
    whole = predict.combine(pred, [predict.evaluate_rows(pred, predict.read_rows(pred, plan, path, predict.whole_file(path, plan)))], plan)
    monkeypatch.setattr(predict, "load_predictor", lambda *a: pred)
    monkeypatch.setattr(csvfile, "SLICE_BYTES", 512)
    assert len(predict.file_slices(path, plan)) > 10
    sliced = predict.predict("model.npz", path)
    assert np.array_equal(whole.outputs, sliced.outputs) and whole.predicted == sliced.predicted
    assert {k: np.asarray(v).tolist() for k, v in whole.metrics.items()} == {k: np.asarray(v).tolist() for k, v in sliced.metrics.items()}
    lines = Path(path).read_text().split("\n")
    cells = lines[250].split(",")
    lines[250] = ",".join([cells[0], "x", *cells[2:]])
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines))
    with pytest.raises(DataError, match="line 251, column 'x0'"):
        predict.predict("model.npz", str(bad))


def test_mf_batches_evaluated_apart_combine_to_the_whole(tmp_path):
    data = tmp_path / "r.csv"
    data.write_text("user,item,stars\n" + "".join(f"{u},{i},{(k % 9) / 2 + 0.5}\n" for k, (u, i) in
                    enumerate([(u, i) for u in [*USERS, "ghost"] for i in [*ITEMS, "i9"]])))
    pred = predict.load_predictor(mf_file(tmp_path, (1.0, 4.5)))
    plan = predict.plan_input(pred, str(data))
    for cold in ("nan", "drop", "mean"):
        whole = predict.combine(pred, [predict.evaluate_rows(pred, predict.read_rows(pred, plan, str(data), predict.whole_file(str(data), plan)), cold)], plan, cold)
        parts = [predict.evaluate_rows(pred, predict.read_rows(pred, plan, str(data), p), cold) for p in csvfile.plan_partitions(data, 4)]
        apart = predict.combine(pred, parts, plan, cold)
        assert np.array_equal(whole.outputs, apart.outputs, equal_nan=True) and np.array_equal(whole.ids, apart.ids)
        assert whole.metrics == apart.metrics and whole.cold_start == apart.cold_start


def _csv_writer_rows(task, outputs, labels):
    """What write_prediction_rows wrote before it formatted blocks: csv.writer, a list per row."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    if task == "regression":
        writer.writerows([f"{v:.6g}"] for v in outputs)
    elif task == "binary":
        writer.writerows([f"{p:.6f}", label] for p, label in zip(outputs, labels))
    else:
        writer.writerows([*(f"{v:.6f}" for v in row), label] for row, label in zip(outputs, labels))
    return out.getvalue()


@pytest.mark.parametrize("task", ["binary", "classes", "regression"])
def test_predictions_are_written_as_csv_writer_writes_them(task, monkeypatch):
    import io
    from types import SimpleNamespace

    monkeypatch.setattr(predict, "ROWS_PER_WRITE", 7)  # blocks that do not divide the rows
    rng = np.random.default_rng(5)
    n = 50
    texts = np.array(["yes", "no", "a,b", 'say "hi"', "line\nbreak", " padded ", "ünï"])
    labels = texts[rng.integers(0, len(texts), n)]
    special = [np.nan, np.inf, -np.inf, -0.0, 1e300, 5e-324, 0.5, 0.0000005, 0.0000015]
    if task == "classes":
        outputs = rng.random((n, 3)).astype(np.float32)
        outputs[: len(special), 0] = [min(v, 3e38) if v > 0 else v for v in special]  # within float32
    else:
        outputs = np.r_[special, rng.normal(scale=1e3, size=n - len(special))]
    pred = SimpleNamespace(meta={"task": task}, outputs=outputs, predicted=labels)
    fh = io.StringIO()
    predict.write_prediction_rows(pred, fh)
    assert fh.getvalue() == _csv_writer_rows(task, outputs, labels)
