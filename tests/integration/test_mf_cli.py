"""psctl train mf / predict / recommend as a person runs them: real processes, loopback TCP."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from psctl.data import csvfile, ratings
from psctl.data.vocab import Vocab
from psctl.files import modelfile

from ..conftest import SHARED_DATA, psctl_json, run_psctl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MOVIELENS = SHARED_DATA / "movielens-ml-latest-small" / "ratings.csv"


def write_ratings(directory: Path, seed: int = 0) -> tuple[Path, Path, dict]:
    """Low-rank ratings with string ids, split 80/20; the test file gains two cold-start rows."""
    rng = np.random.default_rng(seed)
    users, items, rank = 60, 40, 2
    bu, bi = rng.normal(0, 0.5, users), rng.normal(0, 0.5, items)
    P, Q = rng.normal(0, 0.8, (users, rank)), rng.normal(0, 0.8, (items, rank))
    pairs = [(u, i) for u in range(users) for i in rng.choice(items, size=25, replace=False)]
    rows = [f"user-{u},film {i},{3.5 + bu[u] + bi[i] + P[u] @ Q[i] + rng.normal(0, 0.2):.3f},0" for u, i in pairs]
    train, test = ratings.random_split(len(rows), 0.2, seed=1)
    header = "who,what,stars,timestamp"
    train_path, test_path = directory / "train.csv", directory / "test.csv"
    train_path.write_text("\n".join([header, *(rows[k] for k in train)]) + "\n")
    cold = ["ghost,film 1,3.0,0", "user-1,film 999,4.0,0"]
    test_path.write_text("\n".join([header, *(rows[k] for k in test), *cold]) + "\n")
    y_train = np.array([float(rows[k].split(",")[2]) for k in train])
    y_test = np.array([float(rows[k].split(",")[2]) for k in test])
    baseline = float(np.sqrt(np.mean((y_test - y_train.mean()) ** 2)))
    return train_path, test_path, {"mean": float(y_train.mean()), "baseline_rmse": baseline, "test_rows": len(test)}


COLUMNS = ["--user-col", "who", "--item-col", "what", "--rating-col", "stars"]


def train_mf(train: Path, out: Path, mode: str, lr: float, epochs: int = 15) -> None:
    """``lr``: SGD's step per rating (each user's and item's rows get their ratings' summed
    gradient), the same in every mode."""
    r = run_psctl("train", "mf", str(train), "--workers", "4", "--shards", "2", "--mode", mode, *(["--staleness", "1"] if mode == "ssp" else []),
                  "--rank", "2", "--epochs", str(epochs), "--batch-size", "32", "--lr", str(lr), "--l2", "0.02",
                  *COLUMNS, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "traffic per epoch: pulled" in r.stdout and "model written" in r.stdout


def error_of(result) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr
    return " ".join(result.stderr.split())  # rich may wrap long lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One sync-mode model over the real cluster, shared by the predict and recommend tests."""
    directory = tmp_path_factory.mktemp("mf")
    train, test, facts = write_ratings(directory)
    model = directory / "model.npz"
    train_mf(train, model, "sync", lr=0.02)
    return model, train, test, facts


def test_model_file_holds_string_vocabularies_and_the_global_mean(trained):
    model, train, _, facts = trained
    params, meta = modelfile.load_model(str(model))
    assert meta["kind"] == "mf" and meta["data_format"] == "ratings" and meta["vocab"] == {"user": "str", "item": "str"}
    users = Vocab.from_array(params["vocab_user"], "str")
    assert len(users) == 60 and users.ids[0] == "user-0"
    assert params["user_factors"].shape == (60, 2) and params["item_bias"].shape == (40,)
    assert meta["model_params"]["mean"] == pytest.approx(facts["mean"], rel=1e-9)
    traffic = meta["metrics"]["traffic"]
    assert 0 < traffic["pulled_per_epoch"] < traffic["dense_per_epoch"]


@pytest.mark.parametrize("strategy", ["drop", "nan", "mean"])
def test_predict_beats_the_global_mean_and_reports_cold_start(trained, tmp_path, strategy):
    model, _, test, facts = trained
    out = tmp_path / "pred.csv"
    r = run_psctl("predict", str(model), str(test), "--cold-start", strategy)
    assert r.returncode == 0, r.stderr
    assert "cold start: 2 of" in r.stdout and "user (1) or item (1)" in r.stdout  # the human output
    assert f"--cold-start {strategy}:" in r.stdout
    p = psctl_json("predict", str(model), str(test), "--cold-start", strategy, "--out", str(out))
    assert p["metrics"]["rmse"] < 0.7 * facts["baseline_rmse"], p
    assert p["cold_start"]["cold_rows"] == 2 and p["cold_start"]["strategy"] == strategy
    assert p["cold_start"]["unknown_users"] == 1 and p["cold_start"]["unknown_items"] == 1
    rows = list(csv.reader(out.read_text().splitlines()))
    assert rows[0] == ["who", "what", "stars", "predicted"]
    n = facts["test_rows"]
    assert len(rows) - 1 == (n if strategy == "drop" else n + 2)
    assert p["metrics"]["rows"] == (n + 2 if strategy == "mean" else n)
    ghost = [row for row in rows if row[0] == "ghost"]
    if strategy == "nan":
        assert ghost[0][3] == "nan"
    elif strategy == "mean":
        assert float(ghost[0][3]) != facts["mean"]  # global mean plus the item's bias


def test_recommend_leaves_out_what_the_user_rated(trained, tmp_path):
    model, train, _, _ = trained
    rated = {row[1] for row in csv.reader(train.read_text().splitlines()[1:]) if row[0] == "user-3"}
    r = psctl_json("recommend", str(model), "--user", "user-3", "--top", "40", "--exclude", str(train))
    listed = {entry["item"] for entry in r["items"]}
    assert listed and not listed & rated and len(listed) == 40 - len(rated) and r["left_out"] == len(rated)
    assert [entry["rank"] for entry in r["items"]] == list(range(1, len(listed) + 1))
    scores = [entry["predicted_rating"] for entry in r["items"]]
    assert scores == sorted(scores, reverse=True)
    shown = run_psctl("recommend", str(model), "--user", "user-3", "--top", "3")  # the human output: a table
    assert shown.returncode == 0 and "top 3 items for who user-3" in shown.stdout, shown.stderr
    out = tmp_path / "all.csv"
    r = run_psctl("recommend", str(model), "--top", "5", "--exclude", str(train), "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(out.read_text().splitlines()))
    assert rows[0] == ["who", "rank", "what", "score"] and len(rows) == 1 + 60 * 5
    assert not {row[2] for row in rows if row[0] == "user-3"} & rated


@pytest.mark.parametrize("mode", ["ssp", "async"])
def test_other_modes_learn_too(tmp_path, mode):
    train, test, facts = write_ratings(tmp_path, seed=2)
    model = tmp_path / "m.npz"
    train_mf(train, model, mode, lr=0.02)
    p = psctl_json("predict", str(model), str(test), "--cold-start", "drop")
    assert p["metrics"]["rmse"] < 0.7 * facts["baseline_rmse"], p


def test_bad_input_gets_one_sentence(trained, tmp_path):
    model, train, _, _ = trained
    r = run_psctl("train", "mf", str(train), "--user-col", "nobody", "--out", str(tmp_path / "m.npz"))
    assert error_of(r).startswith("psctl: error: user column 'nobody' is not in")
    bad = tmp_path / "bad.csv"
    bad.write_text("who,what,stars\na,b,4\na,c,five\n")
    r = run_psctl("train", "mf", str(bad), "--workers", "2", *COLUMNS, "--out", str(tmp_path / "m.npz"))
    assert "line 3, column 'stars': rating 'five' is not a number" in error_of(r)
    r = run_psctl("predict", str(model), str(train), "--cold-start", "zero")
    assert "--cold-start must be one of nan, drop, mean" in error_of(r)
    r = run_psctl("recommend", str(model), "--user", "nobody")
    assert "user 'nobody' is not in the model" in error_of(r)
    r = run_psctl("train", "mf", str(train), "--label", "stars", "--out", str(tmp_path / "m.npz"))
    assert "--label and --drop are for feature CSVs" in error_of(r)
    r = run_psctl("recommend", str(model), "--top", "0", "--user", "user-1")
    assert "--top must be at least 1" in error_of(r)


@pytest.mark.skipif(not MOVIELENS.is_file(), reason=f"MovieLens ratings not found at {MOVIELENS} (kept outside the repo)")
def test_movielens_partitions_read_every_rating():
    schema = ratings.read_schema(MOVIELENS)
    parts = csvfile.plan_partitions(MOVIELENS, 8)
    read = [ratings.read_partition(MOVIELENS, schema, p) for p in parts]
    ids = np.concatenate([r[0] for r in read])
    values = np.concatenate([r[1] for r in read])
    assert len(ids) == sum(p.n_rows for p in parts) == 100836
    assert len(Vocab.from_strings(np.unique(ids[:, 0]))) == 610
    assert len(Vocab.from_strings(np.unique(ids[:, 1]))) == 9724
    assert values.min() == 0.5 and values.max() == 5.0 and abs(values.mean() - 3.5016) < 1e-3
