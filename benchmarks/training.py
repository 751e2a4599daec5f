"""Section train: logistic regression through ``psctl.apps.train.train`` next to single-process numpy SGD.

The data is synthetic (a known linear rule plus noise) and written once as CSV
into the run's temp folder. CSV parsing is excluded from samples/s: the clock
starts at the driver's ``stats`` event, which the coordinator sends once every
worker has read its partition, and stops at the last ``progress`` event (each
worker sends one right after its last step). That window still holds each
worker's standardization of its rows and its connections to the shards, so it
is, if anything, unfair to psctl. A steady-state figure (every worker
training, from their cumulative progress reports) is given beside it.

The numpy baseline runs the same model code (``psctl.models.logreg.loss_grad``),
batch size, learning rate, epochs and per-epoch shuffling on the same rows,
standardized the same way, in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Clock, SectionResult, Settings, Table, median, ratio
from psctl.apps.train import TrainConfig, train
from psctl.data import csvfile
from psctl.models import logreg

BATCH_SIZE = 1000
LR = 0.1
STALENESS = 2
SHARDS = 2  # psctl train's default
FEATURES = 100
MODES = ("sync", "async", "ssp")


@dataclass(frozen=True)
class Plan:
    rows: int
    epochs: int
    workers: tuple[int, ...]
    modes: tuple[str, ...]


FULL = Plan(rows=1_000_000, epochs=3, workers=(1, 2, 4, 8), modes=MODES)
QUICK = Plan(rows=200_000, epochs=2, workers=(8,), modes=("async",))


def write_csv(path: Path, rows: int, features: int = FEATURES, seed: int = 0, chunk_rows: int = 100_000) -> Path:
    """A learnable binary problem as CSV: ``label,x0..`` with cells like ``+1.23`` (fixed width, fast to write).

    Labels follow a fixed linear rule of the features plus Gaussian noise, so
    the best accuracy is below 1 and known to be reachable by SGD.
    """
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=features)
    width = 1 + 6 * features + 1
    with open(path, "wb") as f:
        f.write((",".join(["label"] + [f"x{i}" for i in range(features)]) + "\n").encode())
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            X = np.clip(np.round(rng.normal(size=(n, features)), 2), -9.99, 9.99)
            y = X @ w_true + 2.0 * rng.normal(size=n) > 0
            hundredths = np.rint(np.abs(X) * 100).astype(np.int64)
            out = np.empty((n, width), np.uint8)
            out[:, 0] = ord("0") + y
            cells = out[:, 1 : 1 + 6 * features].reshape(n, features, 6)
            cells[:, :, 0] = ord(",")
            cells[:, :, 1] = np.where(X < 0, ord("-"), ord("+"))
            cells[:, :, 2] = ord("0") + hundredths // 100
            cells[:, :, 3] = ord(".")
            cells[:, :, 4] = ord("0") + hundredths // 10 % 10
            cells[:, :, 5] = ord("0") + hundredths % 10
            out[:, -1] = ord("\n")
            f.write(out.tobytes())
    return path


def numpy_sgd(X: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, lr: float, seed: int = 0) -> dict[str, float]:
    """Single-process mini-batch SGD; samples/s over the training loop only."""
    w = np.zeros(X.shape[1] + 1, X.dtype)
    samples = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(y))
        for s in range(0, len(y), batch_size):
            idx = order[s : s + batch_size]
            _, grad = logreg.loss_grad(w, X[idx], y[idx], 0.0)
            w -= lr * grad
            samples += len(idx)
    seconds = time.perf_counter() - start
    return {
        "samples_s": samples / seconds,
        "seconds": seconds,
        "samples": samples,
        "accuracy": float(np.mean((logreg.predict_proba(w, X) >= 0.5) == (y >= 0.5))),
        "loss": logreg.loss_grad(w, X, y, 0.0)[0],
    }


def load_standardized(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The rows as psctl's workers see them: standardized with the global mean/std, float32, labels 0/1."""
    schema = csvfile.read_schema(str(path), None, (), True)
    X, labels = csvfile.read_csv(str(path), schema)
    mean, std = csvfile.merge_stats([csvfile.partial_stats(X)])
    classes = csvfile.binary_classes(sorted(set(labels.tolist())))
    y = csvfile.encode_labels(labels, classes)
    return ((X - mean) / std).astype(np.float32), y.astype(np.float32)


def training_rates(events: list[tuple[float, dict[str, Any]]]) -> dict[str, float]:
    """samples/s from the driver's events: the training window, and the all-workers-busy steady state."""
    stats_t = next(t for t, e in events if e["kind"] == "stats")
    progress = [(t, e) for t, e in events if e["kind"] == "progress"]
    total = sum(e["samples"] for _, e in progress)
    last_t = progress[-1][0]
    out = {"samples": total, "train_window_s": last_t - stats_t, "samples_s": total / (last_t - stats_t)}
    # Steady state: between the moment every worker has reported once and the first worker's last report,
    # from each worker's cumulative samples, interpolated at both ends.
    per_worker: dict[int, list[tuple[float, int]]] = {}
    for t, e in progress:
        series = per_worker.setdefault(e["worker_id"], [])
        series.append((t, (series[-1][1] if series else 0) + e["samples"]))
    t0 = max(s[0][0] for s in per_worker.values())
    t1 = min(s[-1][0] for s in per_worker.values())
    if t1 - t0 > 0.5:
        done = sum(
            float(np.interp(t1, [p[0] for p in s], [p[1] for p in s]) - np.interp(t0, [p[0] for p in s], [p[1] for p in s]))
            for s in per_worker.values()
        )
        out["steady_samples_s"] = done / (t1 - t0)
    else:
        out["steady_samples_s"] = float("nan")
    return out


async def run_job(path: Path, out_dir: Path, workers: int, mode: str, epochs: int, batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    clock = Clock()
    events: list[tuple[float, dict[str, Any]]] = []
    cfg = TrainConfig(
        model="logreg",
        data=str(path),
        workers=workers,
        shards=SHARDS,
        mode=mode,
        staleness=STALENESS if mode == "ssp" else 0,
        epochs=epochs,
        batch_size=batch_size,
        lr=LR,
        out=str(out_dir / f"model-{workers}w-{mode}.npz"),
    )
    result = await train(cfg, lambda e: events.append((clock(), e)))
    figures: dict[str, Any] = {"wall_s": clock(), **training_rates(events)}
    figures["accuracy"] = result.metrics["train_accuracy"]
    figures["loss"] = result.metrics["train_loss"]
    figures["to_first_progress_s"] = next(t for t, e in events if e["kind"] == "progress")
    return figures


async def run_training(settings: Settings) -> SectionResult:
    plan = QUICK if settings.quick else FULL
    result = SectionResult("train")
    path = write_csv(settings.tmp_dir / f"logreg-{plan.rows}x{FEATURES}.csv", plan.rows)
    X, y = load_standardized(path)
    numpy_runs = [numpy_sgd(X, y, plan.epochs, BATCH_SIZE, LR)]
    jobs: list[tuple[int, str, dict[str, Any], float]] = []
    for workers in plan.workers:
        for mode in plan.modes:
            figures = await run_job(path, settings.tmp_dir, workers, mode, plan.epochs)
            # numpy again right after each job: the ratio pairs figures taken under the same machine load
            numpy_runs.append(numpy_sgd(X, y, plan.epochs, BATCH_SIZE, LR))
            paired = (numpy_runs[-2]["samples_s"] + numpy_runs[-1]["samples_s"]) / 2
            figures["numpy_paired_samples_s"] = paired
            result.figures[f"{workers}w_{mode}"] = figures
            jobs.append((workers, mode, figures, paired))
    del X, y
    baseline = {**numpy_runs[0], "samples_s": median([r["samples_s"] for r in numpy_runs]), "runs": numpy_runs}
    result.figures["numpy"] = baseline
    table = Table(
        f"Logistic regression, {plan.rows:,} x {FEATURES} synthetic, batch {BATCH_SIZE}, lr {LR}, {plan.epochs} epochs, "
        f"{SHARDS} shards",
        ["trainer", "mode", "workers", "samples/s", "x numpy", "steady samples/s", "train accuracy", "wall s"],
        command=settings.command("train"),
        notes=[
            "samples/s: all samples / (last progress event - stats event), i.e. CSV parsing excluded; "
            "steady: only while every worker is training. Accuracy: the final model on all training rows.",
            f"numpy: one process, the same loss_grad, batch, lr, epochs and shuffling; loop time only; run before the "
            f"first job and after each; its row is the median of {len(numpy_runs)} runs, and each 'x numpy' divides by "
            f"the mean of the numpy runs just before and after that job. ssp uses staleness {STALENESS}.",
        ],
    )
    table.rows.append(["numpy, one process", "-", 1, baseline["samples_s"], 1.0, float("nan"), baseline["accuracy"], baseline["seconds"]])
    for workers, mode, figures, paired in jobs:
        table.rows.append(
            [
                "psctl train",
                mode,
                workers,
                figures["samples_s"],
                ratio(figures["samples_s"], paired),
                figures["steady_samples_s"],
                figures["accuracy"],
                figures["wall_s"],
            ]
        )
    path.unlink()
    result.tables.append(table)
    head = result.figures.get("8w_async")
    result.figures["headline"] = {
        "numpy_logreg_samples_s": baseline["samples_s"],
        "numpy_logreg_accuracy": baseline["accuracy"],
    }
    if head:
        result.figures["headline"].update(
            {
                "train_logreg_8w_async_samples_s": head["samples_s"],
                "train_logreg_8w_async_accuracy": head["accuracy"],
                "train_logreg_8w_async_vs_numpy": ratio(head["samples_s"], head["numpy_paired_samples_s"]),
            }
        )
    return result
