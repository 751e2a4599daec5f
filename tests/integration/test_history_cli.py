"""Training curves: the history psctl train keeps in the model file, `psctl train --plot`,
`psctl plot`, and the estimators' history_ (real processes on loopback)."""

from __future__ import annotations

import json

import pytest

from psctl.apps.train import steps_per_job_epoch
from psctl.data import csvfile
from psctl.files import modelfile

from ..conftest import EXAMPLES, psctl_json, run_psctl
from .test_bad_input import assert_clean_error

pytest.importorskip("matplotlib", reason="plots need the plot extra: pip install -e '.[plot]'")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TRAIN = EXAMPLES / "digits" / "train.csv"
TEST = EXAMPLES / "digits" / "test.csv"
PNG = b"\x89PNG\r\n\x1a\n"


def test_train_keeps_the_history_and_draws_it(tmp_path):
    model, png = tmp_path / "m.npz", tmp_path / "curves.png"
    r = run_psctl("train", "softmax", str(TRAIN), "--workers", "3", "--epochs", "3", "--mode", "ssp", "--staleness", "2",
                  "--validate", str(TEST), "--out", str(model), "--plot", str(png), timeout_s=240)  # fmt: skip
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"training curves drawn to {png}" in r.stderr and png.read_bytes()[:8] == PNG
    _, meta = modelfile.load_model(str(model))
    h = meta["history"]
    assert (h["task"], h["metric"]) == ("classes", "accuracy") and [e["epoch"] for e in h["epochs"]] == [1, 2, 3]
    steps = steps_per_job_epoch(csvfile.plan_partitions(TRAIN, 3, True), meta["training"]["batch_size"])
    for e in h["epochs"]:
        assert e["samples"] == 1438 and 0 < e["metrics"]["accuracy"] <= 1 and 0 < e["val_metrics"]["accuracy"] <= 1
        assert e["val_loss"] > 0 and e["samples_per_s"] > 0
        # every step's pull, answered at most 2 clocks ahead of the slowest worker (ssp, staleness 2)
        assert sum(e["staleness"].values()) == steps and all(0 <= int(k) <= 2 for k in e["staleness"]), e["staleness"]
    assert h["events"] == []
    assert [e["seconds"] for e in h["epochs"]] == sorted(e["seconds"] for e in h["epochs"])

    # psctl plot: the same history, as an image or as JSON
    r = run_psctl("plot", str(model), "--out", str(tmp_path / "again.svg"))
    assert r.returncode == 0, r.stderr
    assert b"<svg" in (tmp_path / "again.svg").read_bytes()[:500]
    assert json.loads(run_psctl("plot", str(model), "--json").stdout) == h

    # sync mode: no pull is ever answered ahead of the slowest worker
    sync = tmp_path / "sync.npz"
    psctl_json("train", "softmax", str(TRAIN), "--workers", "2", "--epochs", "2", "--out", str(sync), timeout_s=240)
    _, meta = modelfile.load_model(str(sync))
    assert [set(e["staleness"]) for e in meta["history"]["epochs"]] == [{"0"}, {"0"}]
    assert all("val_loss" not in e for e in meta["history"]["epochs"])


def test_what_plot_refuses_is_one_sentence(tmp_path):
    r = run_psctl("train", "softmax", str(TRAIN), "--workers", "2", "--plot", str(tmp_path / "c.txt"))
    assert_clean_error(r, "--plot/--out '" + str(tmp_path / "c.txt") + "': give a .png, .svg or .pdf file")
    assert r.returncode == 2 and not (tmp_path / "model.npz").exists()
    r = run_psctl("train", "softmax", str(TRAIN), "--workers", "2", "--plot", str(tmp_path / "no" / "c.png"))
    assert_clean_error(r, "is a folder or in a folder that does not exist")
    assert_clean_error(run_psctl("plot", str(tmp_path / "none.npz")), "does not exist")
    old = tmp_path / "old.npz"  # a model file from before psctl kept a history
    import numpy as np

    modelfile.save_model(str(old), {"w": np.zeros(3, np.float32)}, {"kind": "logreg"})
    r = run_psctl("plot", str(old), "--out", str(tmp_path / "c.png"))
    assert_clean_error(r, "the model has no training history to plot")
    assert not (tmp_path / "c.png").exists()


def test_estimators_expose_the_history():
    sklearn = pytest.importorskip("sklearn", reason="the estimators need the sklearn extra")
    from sklearn.datasets import load_breast_cancer

    from psctl.sklearn import PSLogisticRegression

    assert sklearn
    X, y = load_breast_cancer(return_X_y=True)
    est = PSLogisticRegression(in_process=True, workers=2, epochs=3).fit(X, y)
    assert [e["epoch"] for e in est.history_["epochs"]] == [1, 2, 3]
    assert est.history_["epochs"][-1]["loss"] < est.history_["epochs"][0]["loss"]
