"""The seed workloads over the real cluster: softmax and SVM on digits, SVM on
breast cancer, linear regression against the closed form, validation and early
stopping, and a model added without touching psctl."""

from __future__ import annotations

import numpy as np
import pytest

from psctl.data import csvfile
from psctl.files import modelfile

from ..conftest import EXAMPLES, SHARED_DATA, psctl_json, run_psctl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DIGITS = SHARED_DATA / "sklearn-toy" / "digits.csv"


@pytest.fixture(scope="module")
def digits_split(tmp_path_factory):
    if not DIGITS.exists():
        pytest.skip(f"needs {DIGITS} (../shared/data is not in a user's clone)")
    header, *rows = DIGITS.read_text().splitlines()
    labels = np.array([r.split(",", 1)[0] for r in rows])
    train, test = csvfile.stratified_split(labels, 0.2, seed=42)
    folder = tmp_path_factory.mktemp("digits")
    for name, idx in (("train", train), ("test", test)):
        (folder / f"{name}.csv").write_text("\n".join([header, *(rows[i] for i in idx)]) + "\n")
    return folder / "train.csv", folder / "test.csv"


def train_predict(tmp_path, model, train, test, *args):
    out = tmp_path / "m.npz"
    r = run_psctl("train", model, str(train), "--workers", "8", "--out", str(out), *args)
    assert r.returncode == 0, r.stderr
    return r, psctl_json("predict", str(out), str(test))["metrics"]


def test_softmax_digits_sync(tmp_path, digits_split):
    _, p = train_predict(tmp_path, "softmax", *digits_split, "--batch-size", "8", "--epochs", "40", "--lr", "0.5",
                         "--l2", "0.001")
    assert p["accuracy"] >= 0.96 and p["macro_f1"] >= 0.95 and len(p["confusion"]) == 10
    # The human output: a table of the metrics and the confusion matrix.
    shown = run_psctl("predict", str(tmp_path / "m.npz"), str(digits_split[1]))
    assert shown.returncode == 0, shown.stderr
    rows = {ln.replace("│", " ").split()[0]: ln.replace("│", " ").split()[-1] for ln in shown.stdout.splitlines() if "│" in ln}
    assert float(rows["accuracy"]) == pytest.approx(p["accuracy"], abs=1e-4) and "confusion matrix" in shown.stdout


def test_svm_digits_one_vs_rest(tmp_path, digits_split):
    _, p = train_predict(tmp_path, "svm", *digits_split, "--batch-size", "8", "--epochs", "30", "--lr", "0.05",
                         "--l2", "0.001")
    assert p["accuracy"] >= 0.94
    _, meta = modelfile.load_model(str(tmp_path / "m.npz"))
    assert meta["classes"] == [str(i) for i in range(10)]


def test_svm_breast_cancer(tmp_path):
    bc = EXAMPLES / "breast_cancer"
    _, p = train_predict(tmp_path, "svm", bc / "train.csv", bc / "test.csv", "--epochs", "20", "--lr", "0.05",
                         "--l2", "0.001")
    assert p["accuracy"] >= 0.95


@pytest.mark.parametrize("loss", ["squared", "huber"])
def test_linreg_matches_closed_form_r2(tmp_path, loss):
    reg = EXAMPLES / "regression"
    _, p = train_predict(tmp_path, "linreg", reg / "train.csv", reg / "test.csv", "--label", "target", "--epochs", "20",
                         "--lr", "0.1", "--loss", loss,
                         *(["--huber-delta", "3"] if loss == "huber" else []))
    tr = np.loadtxt(reg / "train.csv", delimiter=",", skiprows=1)
    te = np.loadtxt(reg / "test.csv", delimiter=",", skiprows=1)
    w = np.linalg.lstsq(np.c_[tr[:, 1:], np.ones(len(tr))], tr[:, 0], rcond=None)[0]
    pred = np.c_[te[:, 1:], np.ones(len(te))] @ w
    closed = 1 - ((te[:, 0] - pred) ** 2).sum() / ((te[:, 0] - te[:, 0].mean()) ** 2).sum()
    assert p["r2"] >= closed - 0.01
    assert {"rmse", "mae"} <= set(p)


def write_overfit(path, rows, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 30))
    y = (X[:, 0] + 0.8 * rng.normal(size=rows) > 0).astype(int)
    lines = ["label," + ",".join(f"x{i}" for i in range(30))]
    lines += [f"{y[i]}," + ",".join(f"{v:.4f}" for v in X[i]) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_early_stopping_keeps_the_best_weights(tmp_path):
    """40 rows, 30 noise features: held-out loss turns up early; training stops and keeps the best epoch."""
    train, val = write_overfit(tmp_path / "t.csv", 40, 5), write_overfit(tmp_path / "v.csv", 200, 6)
    out = tmp_path / "m.npz"
    r = run_psctl("train", "logreg", str(train), "--workers", "2", "--epochs", "60", "--lr", "0.5",
                  "--validate", str(val), "--patience", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "early stop after epoch" in r.stdout and "epoch 60/60" not in r.stdout
    epochs = [ln for ln in r.stdout.splitlines() if ln.startswith("epoch ")]
    held_out = [float(ln.split("held-out loss ")[1].split()[0]) for ln in epochs]
    _, meta = modelfile.load_model(str(out))
    best = meta["metrics"]["best_epoch"]
    assert held_out[best] == pytest.approx(min(held_out), abs=1e-4)
    assert best < len(held_out) - 1 and meta["metrics"]["weights_from_epoch"] == best
    stops = [e for e in meta["history"]["events"] if e["kind"] == "early_stop"]  # the plot marks it
    assert len(stops) == 1 and stops[0]["after_epoch"] == len(held_out), meta["history"]["events"]
    # The workers hold at each epoch's end while the driver pulls the best epoch's weights:
    # the saved model is that epoch's (the held-out loss of the report, to the printed digits).
    saved = psctl_json("predict", str(out), str(val))["metrics"]["log_loss"]
    assert saved == pytest.approx(min(held_out), abs=1e-3) and saved < held_out[-1]


def test_test_split_reports_held_out_metrics(tmp_path):
    bc = EXAMPLES / "breast_cancer" / "train.csv"
    r = run_psctl("train", "logreg", str(bc), "--workers", "4", "--epochs", "3", "--test-split", "0.25",
                  "--out", str(tmp_path / "m.npz"))
    assert r.returncode == 0, r.stderr
    assert sum(ln.startswith("epoch ") and "held-out loss" in ln for ln in r.stdout.splitlines()) == 3
    assert "over 343 rows" in " ".join(r.stdout.split())  # 456 rows less a quarter per worker


def test_patience_needs_held_out_rows(tmp_path):
    r = run_psctl("train", "logreg", str(EXAMPLES / "breast_cancer" / "train.csv"), "--patience", "2")
    assert r.returncode != 0 and "--patience needs held-out rows" in r.stderr


def test_a_model_written_outside_psctl_trains_on_the_cluster(tmp_path):
    reg = EXAMPLES / "regression"
    kind = "tests.integration.custom_model:MeanModel"
    out = tmp_path / "m.npz"
    r = run_psctl("train", "custom", str(reg / "train.csv"), "--model-class", kind, "--label", "target", "--workers", "4", "--epochs", "30",
                  "--lr", "0.5", "--lr-decay", "0.05", "--out", str(out))
    assert r.returncode == 0, r.stderr
    params, meta = modelfile.load_model(str(out))
    mean = np.loadtxt(reg / "train.csv", delimiter=",", skiprows=1)[:, 0].mean()
    assert params["b"][0] == pytest.approx(mean, abs=0.1)  # SGD noise shrinks with the decaying step
    refused = run_psctl("predict", str(out), str(reg / "test.csv"))
    assert refused.returncode != 0 and "pass --model-class" in refused.stderr
    assert psctl_json("predict", str(out), str(reg / "test.csv"), "--model-class", kind)["metrics"]["rmse"] > 0


def test_no_header_label_first_like_mnist_csv(tmp_path):
    rows = (EXAMPLES / "digits" / "train.csv").read_text().splitlines()[1:400]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "m.npz"
    r = run_psctl("train", "softmax", str(tmp_path / "d.csv"), "--no-header", "--workers", "4", "--epochs", "5",
                  "--lr", "0.3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    _, meta = modelfile.load_model(str(out))
    assert meta["label"] == "0" and len(meta["feature_names"]) == 64 and len(meta["classes"]) == 10
    p = psctl_json("predict", str(out), str(tmp_path / "d.csv"))["metrics"]
    assert p["accuracy"] > 0.9
