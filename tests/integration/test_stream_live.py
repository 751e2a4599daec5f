"""Streaming mode with real processes: a partition larger than its worker's budget is read from
the file every epoch, trains as well as memory mode, replays the same batches after a takeover,
and equals memory mode exactly where the order is the same."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from psctl.data import csvfile
from psctl.files import modelfile

from ..conftest import psctl_json, run_psctl
from .test_processes import start_train, worker_pids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROWS = 120_000  # about 7 MB: two workers' partitions of two 2 MiB slices each


@pytest.fixture(scope="module")
def big_csv(tmp_path_factory) -> Path:
    """Logistic data whose partitions span several slices (csvfile.SLICE_BYTES)."""
    path = tmp_path_factory.mktemp("stream") / "big.csv"
    rng = np.random.default_rng(4)
    X = rng.normal(size=(ROWS, 6)) * [1, 2, 0.5, 3, 1, 10] + [0, 5, 0, -2, 0, 100]
    w = np.array([1.5, -0.8, 2.0, 0.3, -1.2, 0.05])
    y = (rng.random(ROWS) < 1 / (1 + np.exp(-((X - [0, 5, 0, -2, 0, 100]) @ w)))).astype(int)
    with open(path, "w") as fh:
        fh.write("label,a,b,c,d,e,f\n")
        np.savetxt(fh, np.column_stack([y, X]), fmt=["%d"] + ["%.5f"] * 6, delimiter=",")
    assert all(len(csvfile.slice_partition(str(path), p)) >= 2 for p in csvfile.plan_partitions(str(path), 2))
    return path


def train(path: Path, out: Path, *extra: str) -> dict:
    return psctl_json("train", "logreg", str(path), "--workers", "2", "--mode", "sync", "--epochs", "2",
                      "--batch-size", "256", "--lr", "0.1", "--optimizer", "adagrad", "--out", str(out), *extra, timeout_s=200)


def modes(result: dict) -> list[str]:
    return [w["mode"] for w in result["metrics"]["worker_memory"]]


def test_a_partition_over_its_budget_streams_and_learns_as_memory_mode_does(tmp_path, big_csv):
    memory = train(big_csv, tmp_path / "memory.npz", "--partition-mode", "memory")
    streamed = train(big_csv, tmp_path / "stream.npz", "--worker-memory", "1MB")  # auto: over the budget, so streamed
    assert modes(memory) == ["memory", "memory"] and modes(streamed) == ["stream", "stream"]
    for w in streamed["metrics"]["worker_memory"]:
        assert w["budget_bytes"] == 1 << 20 and w["compact_bytes"] > 1 << 20 and w["peak_rss_bytes"] > 0
    assert memory["rows_trained"] == streamed["rows_trained"] == 2 * ROWS
    assert abs(memory["metrics"]["train_accuracy"] - streamed["metrics"]["train_accuracy"]) <= 0.01
    assert streamed["metrics"]["train_accuracy"] >= 0.7


def test_streaming_with_the_partition_in_one_window_equals_memory_mode(tmp_path, big_csv):
    """A shuffle window that holds the whole partition reads it in file order and permutes it as
    memory mode does: the same batches at every clock, so sync mode gives the same weights."""
    memory = train(big_csv, tmp_path / "memory.npz", "--partition-mode", "memory")
    streamed = train(big_csv, tmp_path / "stream.npz", "--partition-mode", "stream", "--worker-memory", "64MB")
    assert modes(streamed) == ["stream", "stream"]
    a, _ = modelfile.load_model(memory["model_path"])
    b, _ = modelfile.load_model(streamed["model_path"])
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-5, atol=1e-6)
    assert memory["metrics"]["train_loss"] == pytest.approx(streamed["metrics"]["train_loss"], rel=1e-5)


def test_held_out_rows_are_the_same_in_both_modes(tmp_path, big_csv):
    args = ("--test-split", "0.2", "--patience", "5")
    memory = train(big_csv, tmp_path / "memory.npz", "--partition-mode", "memory", *args)
    streamed = train(big_csv, tmp_path / "stream.npz", "--partition-mode", "stream", "--worker-memory", "1MB", *args)
    assert memory["rows_trained"] == streamed["rows_trained"]  # two epochs of the same training rows
    assert abs(memory["rows_trained"] - 2 * 0.8 * ROWS) <= 2 * 4  # each class's share, rounded per partition
    assert abs(memory["metrics"]["best_val_loss"] - streamed["metrics"]["best_val_loss"]) <= 0.01


def test_a_validation_file_is_evaluated_slice_by_slice(tmp_path, big_csv):
    val = tmp_path / "val.csv"
    lines = big_csv.read_text().splitlines()
    val.write_text("\n".join([lines[0], *lines[1:20001]]) + "\n")
    streamed = train(big_csv, tmp_path / "stream.npz", "--partition-mode", "stream", "--worker-memory", "1MB",
                     "--validate", str(val), "--patience", "3")
    memory = train(big_csv, tmp_path / "memory.npz", "--partition-mode", "memory", "--validate", str(val), "--patience", "3")
    assert abs(memory["metrics"]["best_val_loss"] - streamed["metrics"]["best_val_loss"]) <= 0.01


@pytest.mark.fault
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find child processes")
@pytest.mark.parametrize("by", ["new process", "survivor"])
def test_a_streamed_partition_taken_over_replays_its_batches(tmp_path, big_csv, by):
    """A killed worker's partition resumes at the clock the shards acknowledged, its batches
    drawn again from the file in the same order: every row trained, as in the clean run. By a
    survivor (--max-restarts 0): the surviving worker process streams the lost partition too."""
    args = ["logreg", str(big_csv), "--workers", "2", "--mode", "sync", "--epochs", "3", "--batch-size", "256",
            "--lr", "0.1", "--optimizer", "adagrad", "--worker-memory", "1MB"]
    clean = psctl_json("train", *args, "--out", str(tmp_path / "clean.npz"), timeout_s=200)
    extra = [] if by == "new process" else ["--max-restarts", "0"]
    proc, address = start_train([*args, *extra, "--out", str(tmp_path / "m.npz")], until="epoch 1/")
    os.kill(worker_pids(address)[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 0, err
    assert "warning: workers lost during training" in out
    if by == "survivor":
        assert "a surviving worker process took over lost partition" in out
    _, meta = modelfile.load_model(str(tmp_path / "m.npz"))
    assert 3 * ROWS <= meta["metrics"]["rows_trained"] <= 3 * ROWS + 256  # a push redone at most
    assert abs(meta["metrics"]["train_accuracy"] - clean["metrics"]["train_accuracy"]) <= 0.01
    assert {w["mode"] for w in meta["metrics"]["worker_memory"]} == {"stream"}


@pytest.mark.parametrize(("flag", "value", "sentence"), [
    ("--worker-memory", "lots", "--worker-memory must be a size such as 64MB, 2GiB or a number of bytes; got 'lots'"),
    ("--worker-memory", "10k", "--worker-memory must be at least 1MB; got '10k'"),
    ("--partition-mode", "disk", "--partition-mode must be one of auto, memory, stream; got 'disk'"),
])
def test_bad_partition_options_are_one_sentence(tmp_path, big_csv, flag, value, sentence):
    r = run_psctl("train", "logreg", str(big_csv), "--workers", "2", flag, value, "--out", str(tmp_path / "m.npz"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert sentence in r.stderr
