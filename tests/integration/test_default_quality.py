"""The defaults learn: with no hyper-parameter flag, `psctl train ... --workers 8` meets the
quality table's rows (benchmarks/quality.py, docs/DEFAULTS.md) in every mode. Real
processes on loopback, the data in examples/ and ../shared/data."""

from __future__ import annotations

import pytest

from psctl.files import modelfile

from ..conftest import EXAMPLES, SHARED_DATA, psctl_json, run_psctl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

MODES = ("sync", "async", "ssp")
A9A = SHARED_DATA / "libsvm-a9a"


def train_and_score(tmp_path, model: str, train, test, mode: str) -> tuple[float, dict]:
    out = tmp_path / f"{model}-{mode}.npz"
    r = run_psctl("train", model, str(train), "--workers", "8", "--mode", mode, "--out", str(out), timeout_s=400)
    assert r.returncode == 0, r.stderr
    _, meta = modelfile.load_model(str(out))
    return psctl_json("predict", str(out), str(test), timeout_s=120)["metrics"]["accuracy"], meta


@pytest.mark.parametrize("mode", MODES)
def test_softmax_on_digits(tmp_path, mode):
    accuracy, meta = train_and_score(tmp_path, "softmax", EXAMPLES / "digits" / "train.csv", EXAMPLES / "digits" / "test.csv", mode)
    # 0.96 is the target (docs/DEFAULTS.md, Limits): 345 of the 359 test rows, what the exact optimum
    # of the same objective gets. Sync runs repeat exactly; async and ssp ones land a row either side
    # (0.955-0.967; 3 of 38 runs below 0.96), so asserting 0.96 there would fail some suite runs.
    assert accuracy >= (0.96 if mode == "sync" else 0.95), accuracy
    assert meta["optimizer"] == {"name": "adagrad", "params": {"lr": 0.1}} and meta["training"]["batch_size"] == 16


@pytest.mark.parametrize("mode", MODES)
def test_logreg_on_breast_cancer(tmp_path, mode):
    cancer = EXAMPLES / "breast_cancer"
    accuracy, _ = train_and_score(tmp_path, "logreg", cancer / "train.csv", cancer / "test.csv", mode)
    assert accuracy >= 0.97, accuracy


@pytest.mark.skipif(not (A9A / "a9a").is_file(), reason=f"a9a is not in {A9A} (../shared/data is beside the repo only here)")
@pytest.mark.parametrize("mode", MODES)
def test_logreg_on_a9a_converges_in_a_few_epochs(tmp_path, mode):
    accuracy, meta = train_and_score(tmp_path, "logreg", A9A / "a9a", A9A / "a9a.t", mode)
    assert accuracy >= 0.848, accuracy
    # read as LIBSVM (no --format), with sparse input's default optimizer
    assert meta["n_features"] == 123 and meta["optimizer"]["name"] == "ftrl", meta["optimizer"]
    # a9a's training loss flattens after its first passes: the job stops long before 20 epochs
    epochs = len(meta["history"]["epochs"])
    assert epochs < 20 and any(e["kind"] == "converged" for e in meta["history"]["events"]), meta["history"]["events"]


def test_the_convergence_stop_ends_the_job_at_that_epochs_end_every_time(tmp_path):
    """The job stops exactly after the epoch that converged: every row of those epochs trained
    once, no step of the next, so two sync runs give the same weights. (Before the workers held
    at each epoch's end for the driver, they trained on until the STOP reached them: 20,144 to
    20,576 rows for these 10 epochs of 2,000 rows, different in every run.)"""
    import numpy as np

    rng = np.random.default_rng(3)
    X = rng.normal(size=(2000, 3))
    y = X @ [1.0, -2.0, 0.5] + 0.3 + rng.normal(size=2000)
    data = tmp_path / "lin.csv"
    np.savetxt(data, np.c_[X, y], delimiter=",", header="a,b,c,y", comments="", fmt="%.6f")
    runs = []
    for i in range(2):
        out = tmp_path / f"m{i}.npz"
        r = run_psctl("train", "linreg", str(data), "--label", "y", "--workers", "2", "--out", str(out), timeout_s=200)
        assert r.returncode == 0, r.stderr
        params, meta = modelfile.load_model(str(out))
        [stop] = [e for e in meta["history"]["events"] if e["kind"] == "converged"]
        assert stop["after_epoch"] < 20  # it did stop early
        assert meta["metrics"]["rows_trained"] == stop["after_epoch"] * 2000
        runs.append(params["w"])
    np.testing.assert_array_equal(runs[0], runs[1])
