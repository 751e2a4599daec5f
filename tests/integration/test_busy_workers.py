"""Workers that compute for longer than the failure timeout are not declared lost: the final
evaluation, a partition's parsing and a kept model's prediction run off the event loop (and
parsing in slices, so the heartbeat thread gets the interpreter's lock), and the final
metrics cover every row trained."""

from __future__ import annotations

import numpy as np
import pytest

from ..conftest import psctl_json, run_psctl, write_logreg_csv
from .cluster import ServerProcess

pytestmark = [pytest.mark.integration]

FAILURE_TIMEOUT_S = 1.5
LIVENESS = ["--heartbeat-interval-s", "0.2", "--failure-timeout-s", str(FAILURE_TIMEOUT_S)]
SLOW_EVAL = "tests.integration.custom_model:SlowEvalModel"
SLOW_PREDICT = "tests.integration.custom_model:SlowPredictModel"


@pytest.mark.timeout(240)
def test_a_final_evaluation_of_three_failure_timeouts_loses_no_worker_and_covers_every_row(tmp_path, monkeypatch):
    # Each worker's final evaluation computes 3x the failure timeout (CPU time: longer in wall
    # time on a busy machine); before the fix it ran on the worker's event loop.
    monkeypatch.setenv("PSCTL_TEST_SLOW_CPU_S", str(3 * FAILURE_TIMEOUT_S))
    data = write_logreg_csv(tmp_path / "d.csv", rows=400)
    result = psctl_json(
        "train", "custom", str(data), "--model-class", SLOW_EVAL, "--label", "label", "--workers", "2", "--epochs", "2",
        "--batch-size", "16", "--lr", "0.1", *LIVENESS, "--out", str(tmp_path / "m.npz"), timeout_s=200,
    )  # fmt: skip
    assert result["lost_workers"] == [] and result["metrics"]["lost_workers"] == []
    assert result["rows_trained"] == 2 * 400  # every row, once per epoch, as the shards counted
    assert result["metrics"]["samples"] == 400  # the final metrics: every worker's every row


@pytest.mark.timeout(300)
def test_a_partition_numpy_parses_for_longer_than_the_failure_timeout_loses_no_worker(tmp_path):
    # 200,000 rows of 40 numbers: one np.loadtxt call over them held the interpreter's lock
    # 3-8 s here, and the heartbeat thread needs it; parsed in slices it changes hands.
    rows, cols = 200_000, 40
    rng = np.random.default_rng(0)
    X = rng.integers(0, 1000, size=(rows, cols)) / 1000
    y = (X[:, 0] > 0.5).astype(int)
    path = tmp_path / "big.csv"
    with path.open("w") as fh:
        fh.write(",".join(["label", *(f"x{j}" for j in range(cols))]) + "\n")
        np.savetxt(fh, np.column_stack([y, X]), delimiter=",", fmt=["%d", *["%.3f"] * cols])
    result = psctl_json(
        "train", "logreg", str(path), "--workers", "1", "--epochs", "1", "--batch-size", "8192", "--lr", "0.5",
        *LIVENESS, "--out", str(tmp_path / "m.npz"), timeout_s=280,
    )  # fmt: skip
    assert result["lost_workers"] == []
    assert result["rows_trained"] == rows and result["metrics"]["samples"] == rows


@pytest.mark.timeout(300)
def test_prediction_with_workers_from_a_kept_model_runs_the_model_off_the_loop(tmp_path, monkeypatch):
    server = ServerProcess(2)
    try:
        data = write_logreg_csv(tmp_path / "d.csv", rows=300)
        trained = psctl_json(
            "train", "custom", str(data), "--model-class", SLOW_PREDICT, "--label", "label", "--server", server.address,
            "--workers", "2", "--epochs", "1", "--lr", "0.1", "--keep", "slow", "--out", str(tmp_path / "m.npz"), timeout_s=240,
        )  # fmt: skip
        assert trained["rows_trained"] == 300
        monkeypatch.setenv("PSCTL_TEST_SLOW_CPU_S", str(3 * FAILURE_TIMEOUT_S))
        r = run_psctl(
            "predict", "slow", str(data), "--server", server.address, "--model-class", SLOW_PREDICT, "--workers", "2",
            "--failure-timeout-s", str(FAILURE_TIMEOUT_S), "--json", timeout_s=240,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        import json

        assert json.loads(r.stdout)["rows"] == 300
    finally:
        server.stop()
