"""psctl train / predict / server as a person runs them: real processes, loopback TCP."""

from __future__ import annotations

import numpy as np
import pytest

from psctl.core.batching import batch_indices, epoch_steps
from psctl.data import csvfile
from psctl.files import modelfile
from psctl.models import logreg

from ..conftest import EVERY_SHARD, EXAMPLES, psctl_json, run_psctl, write_logreg_csv
from .cluster import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TRAIN = EXAMPLES / "breast_cancer" / "train.csv"
TEST = EXAMPLES / "breast_cancer" / "test.csv"


@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_breast_cancer_each_mode_reaches_096(tmp_path, mode):
    model = tmp_path / "model.npz"
    r = run_psctl("train", "logreg", str(TRAIN), "--workers", "8", "--mode", mode, *(["--staleness", "2"] if mode == "ssp" else []),
                  "--epochs", "20", "--lr", "0.5", "--out", str(model))
    assert r.returncode == 0, r.stderr
    assert "epoch 20/20" in r.stdout and "model written" in r.stdout
    p = psctl_json("predict", str(model), str(TEST), "--out", str(tmp_path / "pred.csv"))
    assert p["metrics"]["accuracy"] >= 0.96, p
    rows = (tmp_path / "pred.csv").read_text().splitlines()
    assert rows[0] == "probability,predicted" and len(rows) == 114
    _, meta = modelfile.load_model(str(model))
    assert meta["kind"] == "logreg" and meta["training"]["mode"] == mode
    assert meta["classes"] == ["0", "1"] and len(meta["standardize"]["mean"]) == 30


def reference_sync_sgd(path, n_workers, batch_size, epochs, lr, l2, seed):
    """Single-process mini-batch SGD over the union of the workers' batches at each clock."""
    schema = csvfile.read_schema(str(path))
    parts = csvfile.plan_partitions(str(path), n_workers)
    shards = []
    largest = max(p.n_rows for p in parts)
    for p in parts:
        X, labels = csvfile.read_partition(str(path), schema, p)
        shards.append((X.astype(np.float32), csvfile.encode_labels(labels, ("0", "1")).astype(np.float32)))
    w = np.zeros(len(schema.feature_indices) + 1, dtype=np.float32)
    batches = [
        [idx for e in range(epochs) for idx in batch_indices(len(y), batch_size, seed, i, e, largest)]
        for i, (_, y) in enumerate(shards)
    ]
    for clock in range(max(len(b) for b in batches)):
        total, count = np.zeros_like(w, dtype=np.float64), 0
        for (X, y), b in zip(shards, batches):
            if clock < len(b):
                # OpenBLAS can raise the invalid flag on finite float32 input (numpy#24067), which
                # the suite's warnings filter turns into an error: check finiteness instead.
                with np.errstate(invalid="ignore"):
                    _, g = logreg.loss_grad(w, X[b[clock]], y[b[clock]], l2)
                assert np.isfinite(g).all()
                total += g.astype(np.float64) * len(b[clock])
                count += len(b[clock])
        w -= (lr * total / count).astype(np.float32)
    return w, [len(b) for b in batches]


@pytest.mark.parametrize("partition_mode", ["memory", "stream"])
@pytest.mark.parametrize(("rows", "workers", "spread"), [(203, 3, True), (3, 4, True), (203, 3, False)])
def test_sync_equals_single_process_sgd(tmp_path, rows, workers, spread, partition_mode):
    """Uneven partitions (and one empty) included: sync must equal the reference and not deadlock.
    Every non-empty partition takes the steps of the largest, so no clock trains a few workers alone.
    Streamed, a partition in one shuffle window gives memory mode's batches, so the same result.
    The same whether the weights are split over both shards (``spread``) or, as their few
    bytes get by default, on one."""
    path = write_logreg_csv(tmp_path / "d.csv", rows=rows, features=5, seed=3)
    # Short lines in the second half: byte-balanced partitions then hold different row counts.
    header, *lines = path.read_text().splitlines()
    half = len(lines) // 2
    short = [",".join(c if i == 0 else f"{float(c):.2f}" for i, c in enumerate(ln.split(","))) for ln in lines[half:]]
    path.write_text("\n".join([header, *lines[:half], *short]) + "\n")
    model = tmp_path / "m.npz"
    r = run_psctl("train", "logreg", str(path), "--workers", str(workers), "--shards", "2", "--mode", "sync",
                  "--epochs", "3", "--batch-size", "16", "--lr", "0.3", "--l2", "0.01", "--seed", "9",
                  "--no-standardize", "--partition-mode", partition_mode, *(EVERY_SHARD if spread else ()), "--out", str(model))
    assert r.returncode == 0, r.stderr
    assert ("tables of" in r.stdout) != spread, r.stdout  # "tables of 24 B on 1 of the 2 shards"
    params, meta = modelfile.load_model(str(model))
    assert {w["mode"] for w in meta["metrics"]["worker_memory"]} == {partition_mode}
    expected, steps = reference_sync_sgd(path, workers, 16, 3, 0.3, 0.01, 9)
    parts = csvfile.plan_partitions(str(path), workers)
    assert len({p.n_rows for p in parts}) > 1  # the partitions really are uneven
    np.testing.assert_allclose(params["w"], expected, rtol=1e-5, atol=1e-6)
    largest = max(p.n_rows for p in parts)
    assert steps == [3 * epoch_steps(p.n_rows, 16, largest) for p in parts]
    assert len({s for s in steps if s}) == 1


def test_server_then_train_against_it(tmp_path):
    server = ServerProcess(2)
    try:
        model = tmp_path / "m.npz"
        r = run_psctl("train", "logreg", str(TRAIN), "--workers", "4", "--server", server.address,
                      "--epochs", "20", "--lr", "0.5", "--out", str(model))
        assert r.returncode == 0, r.stderr
        assert psctl_json("predict", str(model), str(TEST))["metrics"]["accuracy"] >= 0.96
        # The server takes a second job after the first.
        r2 = run_psctl("train", "logreg", str(TRAIN), "--workers", "2", "--server", server.address,
                       "--mode", "async", "--epochs", "2", "--out", str(model))
        assert r2.returncode == 0, r2.stderr
    finally:
        code, out, err = server.stop()
    assert code == 0, err
    assert "Traceback" not in err
    assert "stopped" in out


def test_seed_pytorch_layout_label_1_drop_0(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 10))
    y = (X[:, 0] - X[:, 3] > 0).astype(int)
    lines = ["id,label," + ",".join(f"f{i}" for i in range(1, 11))]
    lines += [f"{i + 1},{y[i]}," + ",".join(f"{v:.5f}" for v in X[i]) for i in range(400)]
    path = tmp_path / "seed.csv"
    path.write_text("\n".join(lines) + "\n")
    model = tmp_path / "m.npz"
    r = run_psctl("train", "logreg", str(path), "--label", "1", "--drop", "0", "--workers", "8",
                  "--epochs", "10", "--lr", "0.5", "--out", str(model))
    assert r.returncode == 0, r.stderr
    _, meta = modelfile.load_model(str(model))
    assert meta["label"] == "label" and meta["feature_names"] == [f"f{i}" for i in range(1, 11)]
    assert meta["metrics"]["train_accuracy"] > 0.95
