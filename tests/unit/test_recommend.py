"""Predicting ratings with each cold-start strategy, and top-k recommendations with exclusions."""

import csv

import numpy as np
import pytest

from psctl.apps import predict, recommend
from psctl.apps.train import vocab_file_parts
from psctl.data.vocab import Vocab
from psctl.errors import DataError, ModelFileError
from psctl.files import modelfile

USERS = ["ann", "bob", "cy"]
ITEMS = ["i1", "i2", "i3", "i4"]
MEAN = 3.0
BU = np.array([0.5, -0.5, 0.0])
BI = np.array([0.2, 0.0, -0.2, 0.4])
P = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
Q = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [-1.0, -1.0]])


def expected(u: int, i: int) -> float:
    return MEAN + BU[u] + BI[i] + P[u] @ Q[i]


@pytest.fixture
def model_path(tmp_path):
    """An mf model file laid out as 'psctl train mf' writes it, with string ids."""
    stats = {"vocab": {"user": Vocab.from_strings(USERS), "item": Vocab.from_strings(ITEMS)}}
    meta = {
        "kind": "mf",
        "task": "regression",
        "data_format": "ratings",
        "model_params": {"rank": 2, "users": 3, "items": 4, "mean": MEAN},
        "schema": {"columns": ["user", "item", "stars"], "label_index": 2, "feature_indices": [0, 1], "has_header": True},
        "feature_names": ["user", "item"],
        "classes": [],
    }
    params = {"user_factors": P.astype(np.float32), "item_factors": Q.astype(np.float32),
              "user_bias": BU.astype(np.float32), "item_bias": BI.astype(np.float32)}
    meta["vocab"], arrays = vocab_file_parts(stats)
    params.update(arrays)
    path = tmp_path / "mf.npz"
    modelfile.save_model(str(path), params, meta)
    return str(path)


@pytest.fixture
def test_csv(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("item,user,stars,extra\ni2,ann,4,x\ni9,bob,3,x\ni4,zed,5,x\ni3,cy,2,x\nq,q,1,x\n")
    return str(path)


def test_known_rows_use_factors_and_biases(model_path, test_csv):
    pred = predict.predict(model_path, test_csv, cold_start="drop")
    assert pred.ids.tolist() == [["ann", "i2"], ["cy", "i3"]]
    np.testing.assert_allclose(pred.outputs, [expected(0, 1), expected(2, 2)], rtol=1e-6)
    err = pred.outputs - np.array([4.0, 2.0])
    assert pred.metrics["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-6)
    assert pred.metrics["rows"] == 2
    assert pred.cold_start == {"strategy": "drop", "rows": 5, "cold_rows": 3, "unknown_users": 2,
                               "unknown_items": 2, "scored_rows": 2}


def test_nan_keeps_every_row_and_scores_the_known(model_path, test_csv):
    pred = predict.predict(model_path, test_csv, cold_start="nan")
    assert len(pred.outputs) == 5 and np.isnan(pred.outputs[[1, 2, 4]]).all()
    assert pred.metrics["rows"] == 2
    assert "predicted as NaN and left out of RMSE/MAE" in recommend.describe_cold_start(pred.cold_start)


def test_mean_falls_back_to_the_known_side(model_path, test_csv):
    pred = predict.predict(model_path, test_csv, cold_start="mean")
    np.testing.assert_allclose(
        pred.outputs, [expected(0, 1), MEAN + BU[1], MEAN + BI[3], expected(2, 2), MEAN], rtol=1e-6
    )
    assert pred.metrics["rows"] == 5


def test_unknown_strategy_and_missing_columns(model_path, test_csv, tmp_path):
    with pytest.raises(DataError, match="--cold-start must be one of nan, drop, mean"):
        predict.predict(model_path, test_csv, cold_start="zero")
    other = tmp_path / "o.csv"
    other.write_text("userId,movieId,rating\n1,2,3\n")
    with pytest.raises(DataError, match="user column 'user' is not in"):
        predict.predict(model_path, str(other))


def test_predictions_file_keeps_ids_and_truth(model_path, test_csv, tmp_path):
    out = tmp_path / "p.csv"
    predict.write_predictions(predict.predict(model_path, test_csv, cold_start="nan"), str(out))
    rows = list(csv.reader(out.read_text().splitlines()))
    assert rows[0] == ["user", "item", "stars", "predicted"]
    assert rows[1][:3] == ["ann", "i2", "4.0"] and float(rows[1][3]) == pytest.approx(expected(0, 1), rel=1e-5)
    assert rows[2][3] == "nan" and len(rows) == 6


def test_no_rating_column_means_no_metrics(model_path, tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("user,item\nbob,i1\n")
    pred = predict.predict(model_path, str(path))
    assert pred.metrics is None and pred.outputs == pytest.approx([expected(1, 0)])


def brute_force(u: int, excluded: set[int], k: int) -> list[str]:
    scores = [(-expected(u, i), ITEMS[i]) for i in range(4) if i not in excluded]
    return [name for _, name in sorted(scores)[:k]]


def test_recommend_one_user_with_and_without_exclusion(model_path, tmp_path):
    mf = recommend.load_mf(model_path)
    top = recommend.recommend_user(mf, "ann", 2)
    assert [item for item, _ in top] == brute_force(0, set(), 2)
    assert top[0][1] == pytest.approx(expected(0, ITEMS.index(top[0][0])), rel=1e-6)
    seen = tmp_path / "seen.csv"
    seen.write_text(f"user,item,stars\nann,{top[0][0]},5\nbob,i1,1\nann,unknown,3\n")
    excluded = recommend.read_exclusions(mf, str(seen))
    assert recommend.rated_count(mf, "ann", excluded) == 1  # the unknown item is no pair of the model's
    again = recommend.recommend_user(mf, "ann", 2, excluded)
    assert top[0][0] not in [item for item, _ in again]
    assert [item for item, _ in again] == brute_force(0, {ITEMS.index(top[0][0])}, 2)
    # Excluding everything but one item leaves one recommendation, not -inf rows.
    seen.write_text("user,item\n" + "".join(f"cy,{i}\n" for i in ITEMS[1:]))
    assert [i for i, _ in recommend.recommend_user(mf, "cy", 3, recommend.read_exclusions(mf, str(seen)))] == ["i1"]


def test_recommend_everyone_matches_one_by_one(model_path, tmp_path, monkeypatch):
    monkeypatch.setattr(recommend, "BLOCK_SCORES", 2 * len(ITEMS))  # two users per block: more than one block
    mf = recommend.load_mf(model_path)
    seen = tmp_path / "seen.csv"
    seen.write_text("user,item,stars\nbob,i2,5\ncy,i1,4\ncy,i3,4\n")
    excluded = recommend.read_exclusions(mf, str(seen))
    out = tmp_path / "all.csv"
    assert recommend.recommend_all(mf, 3, str(out), excluded) == 3 + 3 + 2  # cy has rated two of the four
    rows = list(csv.reader(out.read_text().splitlines()))
    assert rows[0] == ["user", "rank", "item", "score"]
    for user in USERS:
        mine = [r for r in rows[1:] if r[0] == user]
        assert [r[2] for r in mine] == [i for i, _ in recommend.recommend_user(mf, user, 3, excluded)]
        assert [r[1] for r in mine] == [str(k) for k in range(1, len(mine) + 1)]
    assert not any(r[0] == "bob" and r[2] == "i2" for r in rows)


def test_recommend_refuses_unknown_users_and_other_models(model_path, tmp_path):
    mf = recommend.load_mf(model_path)
    with pytest.raises(DataError, match="user 'zed' is not in the model"):
        recommend.recommend_user(mf, "zed", 3)
    other = tmp_path / "lin.npz"
    modelfile.save_model(str(other), {"w": np.zeros(3)}, {"kind": "linreg", "feature_names": ["a", "b"], "classes": []})
    with pytest.raises(ModelFileError, match="is a linreg model; this needs an mf model"):
        recommend.load_mf(str(other))
