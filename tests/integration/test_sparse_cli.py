"""Sparse input end to end: psctl train / predict on LIBSVM and hashed CSV, real processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from psctl.files import modelfile

from ..conftest import SHARED_DATA, psctl_json, run_psctl
from .test_bad_input import assert_clean_error

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

A9A = SHARED_DATA / "libsvm-a9a"
N_FEATURES = 30
UNSEEN = 25  # a feature index (1-based) the training file never uses


def write_libsvm(path: Path, rows: int, seed: int, extra: str = "", classes: int = 2) -> Path:
    """A learnable problem over features 1..30 (never 25), a few non-zeros per row."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(size=(N_FEATURES + 1, classes))
    lines = []
    for _ in range(rows):
        idx = np.sort(rng.choice([i for i in range(1, N_FEATURES + 1) if i != UNSEEN], size=5, replace=False))
        val = np.round(rng.normal(size=5), 3)
        score = val @ w[idx]
        label = int(score.argmax()) if classes > 2 else int(score[0] > 0)
        lines.append(f"{label} " + " ".join(f"{i}:{v}" for i, v in zip(idx, val)))
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def test_libsvm_train_predict_and_unknown_features(tmp_path):
    train = write_libsvm(tmp_path / "train.svm", 600, seed=1)
    # unknown at predict time: an index past the model's 30 features, and one training never saw
    test = write_libsvm(tmp_path / "test.svm", 200, seed=2, extra=f"1 3:1 {UNSEEN}:2 41:1\n0 41:0.5 2:1\n")
    model = tmp_path / "m.npz"
    r = run_psctl("train", "logreg", str(train), "--workers", "3", "--optimizer", "ftrl", "--lr", "0.5",
                  "--epochs", "4", "--batch-size", "16", "--out", str(model))
    assert r.returncode == 0, r.stderr
    assert "features from the data" in r.stdout
    assert "unique of a 31-key space (per shard:" in r.stdout and "traffic per epoch" in r.stdout
    params, meta = modelfile.load_model(str(model))
    assert meta["input"] == {"format": "libsvm", "index_base": 1, "n_features": N_FEATURES}
    assert params["w.keys"].tolist() == [k for k in range(N_FEATURES + 1) if k != UNSEEN - 1]
    assert not any(name.startswith("w.opt.") for name in params)
    p = psctl_json("predict", str(model), str(test), "--out", str(tmp_path / "pred.csv"))
    assert p["unknown_features"] == {"occurrences": 3, "features": 2}
    assert p["metrics"]["accuracy"] >= 0.8, p
    assert len((tmp_path / "pred.csv").read_text().splitlines()) == 1 + 202


@pytest.mark.parametrize(("kind", "optimizer"), [("softmax", "adam"), ("svm", "adagrad")])
def test_multiclass_models_on_sparse_rows(tmp_path, kind, optimizer):
    train = write_libsvm(tmp_path / "train.svm", 600, seed=3, classes=3)
    test = write_libsvm(tmp_path / "test.svm", 300, seed=4, classes=3)
    model = tmp_path / "m.npz"
    r = run_psctl("train", kind, str(train), "--workers", "2", "--optimizer", optimizer, "--epochs", "5",
                  "--batch-size", "16", "--save-optimizer-state", "--out", str(model))
    assert r.returncode == 0, r.stderr
    params, meta = modelfile.load_model(str(model))
    assert params["w"].shape == (len(params["w.keys"]), 3) and meta["optimizer"]["name"] == optimizer
    state = {n for n in params if n.startswith("w.opt.")}
    assert state == ({"w.opt.m", "w.opt.v", "w.opt.t"} if optimizer == "adam" else {"w.opt.sum_sq"})
    p = psctl_json("predict", str(model), str(test))
    assert p["metrics"]["accuracy"] >= 0.6, p  # three classes: chance is about 0.33


def write_hashed(path: Path, rows: int, seed: int, label: bool = True) -> Path:
    """Clicks depend on the site and a price; the user id is a long tail of values seen once."""
    rng = np.random.default_rng(seed)
    sites = [f"site{i}.com" for i in range(20)]
    effect = np.random.default_rng(7).normal(0, 2, size=20)
    lines = [("click," if label else "") + "site,user,price"]
    for _ in range(rows):
        s = rng.integers(20)
        price = round(float(rng.normal()), 3)
        y = int(effect[s] - price + rng.normal(0, 0.5) > 0)
        lines.append((f"{y}," if label else "") + f"{sites[s]},u{rng.integers(10**9)},{price}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_hashed_csv_train_and_predict_with_and_without_labels(tmp_path):
    train = write_hashed(tmp_path / "train.csv", 800, seed=1)
    model = tmp_path / "m.npz"
    r = run_psctl("train", "logreg", str(train), "--label", "click", "--categorical", "site,user", "--hash-bits", "32",
                  "--workers", "2", "--optimizer", "ftrl", "--lr", "1", "--epochs", "6", "--batch-size", "16", "--out", str(model))
    assert r.returncode == 0, r.stderr
    assert "of a 4294967296-key space" in r.stdout
    params, meta = modelfile.load_model(str(model))
    assert meta["input"] == {"format": "hashed_csv", "hash_bits": 32, "categorical": ["site", "user"]}
    assert 800 < len(params["w.keys"]) <= 800 + 20 + 2 and params["w.keys"][-1] == 2**32 - 1  # bias key last
    p = run_psctl("predict", str(model), str(write_hashed(tmp_path / "test.csv", 300, seed=2)))
    assert p.returncode == 0, p.stderr
    assert "ignored 300 occurrences of 300 features" in p.stdout  # every user id is new (the human output)
    p = psctl_json("predict", str(model), str(write_hashed(tmp_path / "test.csv", 300, seed=2)))
    assert p["metrics"]["accuracy"] >= 0.8, p
    unlabeled = run_psctl("predict", str(model), str(write_hashed(tmp_path / "u.csv", 10, seed=3, label=False)))
    assert unlabeled.returncode == 0, unlabeled.stderr
    assert "10 rows predicted (no label column" in unlabeled.stdout


def test_bad_libsvm_input_gets_one_sentence_with_the_line(tmp_path):
    bad = tmp_path / "bad.svm"
    bad.write_text("1 1:1 2:1\n0 3:1\n1 4:one\n")
    r = run_psctl("train", "logreg", str(bad), "--workers", "2", "--epochs", "1", timeout_s=120)
    # a worker finds it (the driver never parses the data): exit 4, "training failed: worker N: ..."
    assert_clean_error(r, f"'{bad}' line 3: the value 'one' of feature 4 is not a number")
    # --l1 alone is FTRL's, the sparse default; another optimizer, or dense input's AdaGrad, has none
    r = run_psctl("train", "logreg", str(bad), "--format", "libsvm", "--l1", "1", "--optimizer", "adam", timeout_s=60)
    assert_clean_error(r, "--l1 is FTRL's (the default optimizer for sparse input); --optimizer adam has none")
    dense = tmp_path / "dense.csv"
    dense.write_text("label,x\n0,1\n1,2\n")
    r = run_psctl("train", "logreg", str(dense), "--l1", "1", timeout_s=60)
    assert_clean_error(r, "--optimizer adagrad has none")
    r = run_psctl("train", "linreg", str(bad), "--categorical", "x", timeout_s=60)
    assert_clean_error(r, "--hash-bits and --categorical are for CSV input")


@pytest.mark.skipif(not A9A.is_dir(), reason=f"the a9a data set is not at {A9A}")
# --l1 applies to z, the sum of a key's per-key summed gradients: 30 leaves 91 of 124 weights (1: 122).
# (FTRL without --l1 in each mode, the default for a9a, is test_default_quality's.)
@pytest.mark.parametrize(("mode", "l1"), [("async", "30")])
def test_a9a_ftrl_reaches_0848(tmp_path, mode, l1):
    model = tmp_path / "a9a.npz"
    extra = ["--l1", l1] if l1 else []
    r = run_psctl("train", "logreg", str(A9A / "a9a"), "--format", "libsvm", "--workers", "8", "--optimizer", "ftrl",
                  "--mode", mode, *extra, "--out", str(model), timeout_s=280)
    assert r.returncode == 0, r.stderr
    params, meta = modelfile.load_model(str(model))
    assert meta["n_features"] == 123
    nonzero = int(np.count_nonzero(params["w"]))
    if l1:
        assert nonzero < 123, r.stdout  # truly sparse: fewer non-zero weights than features
    p = psctl_json("predict", str(model), str(A9A / "a9a.t"))
    assert p["metrics"]["accuracy"] >= 0.848, p
