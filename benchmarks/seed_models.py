"""psctl against a single-process numpy run of the same model, batches and step size.

    python benchmarks/seed_models.py [--workers 8]

For each seed workload it trains with psctl (embedded cluster, sync mode) and
with a plain numpy loop over the whole training set (the same model class,
batch size, learning rate and epochs), then prints held-out accuracy (or R²)
side by side, plus scikit-learn's SGDClassifier and LogisticRegression when
scikit-learn is installed. The goal: psctl within one point of the numpy run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from psctl.data import csvfile
from psctl.models import model_class
from psctl.models.base import classes_for, encode_targets, evaluate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

WORKLOADS = [
    ("softmax", "digits", [], dict(batch_size=8, epochs=40, lr=0.5, l2=0.001)),
    ("svm", "digits", [], dict(batch_size=8, epochs=30, lr=0.05, l2=0.001)),
    ("logreg", "breast_cancer", [], dict(batch_size=32, epochs=20, lr=0.5, l2=0.0)),
    ("svm", "breast_cancer", [], dict(batch_size=32, epochs=20, lr=0.05, l2=0.001)),
    ("linreg", "regression", ["--label", "target"], dict(batch_size=32, epochs=20, lr=0.1, l2=0.0)),
]


def load(path: Path, label: str | None) -> tuple[np.ndarray, np.ndarray]:
    schema = csvfile.read_schema(str(path), label)
    return csvfile.read_csv(str(path), schema)


def numpy_run(kind: str, folder: str, label: str | None, hp: dict) -> float:
    """Mini-batch SGD in one process over the whole training set."""
    cls = model_class(kind)
    X, labels = load(EXAMPLES / folder / "train.csv", label)
    Xt, labels_t = load(EXAMPLES / folder / "test.csv", label)
    mean, std = X.mean(axis=0), X.std(axis=0)
    std[std == 0] = 1
    X, Xt = ((X - mean) / std).astype(np.float32), ((Xt - mean) / std).astype(np.float32)
    classes = classes_for(cls.task, np.unique(labels).tolist(), kind)
    y = encode_targets(cls.task, labels, classes)
    model = cls(X.shape[1], classes, l2=hp["l2"])
    params = {t.name: np.zeros(t.shape(t.rows), dtype=np.float32) for t in model.tables()}
    rng = np.random.default_rng(0)
    for _ in range(hp["epochs"]):
        order = rng.permutation(len(y))
        for start in range(0, len(y), hp["batch_size"]):
            idx = order[start : start + hp["batch_size"]]
            _, grads, _ = model.loss_grad(params, X[idx], y[idx].astype(np.float32) if cls.task != "classes" else y[idx])
            for name, g in grads.items():
                params[name] -= hp["lr"] * g
    out = evaluate(cls.task, encode_targets(cls.task, labels_t, classes), model.predict(params, Xt), len(classes))
    return out["r2"] if cls.task == "regression" else out["accuracy"]


def psctl_run(kind: str, folder: str, extra: list[str], hp: dict, workers: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        model = f"{tmp}/m.npz"
        flags = ["--batch-size", str(hp["batch_size"]), "--epochs", str(hp["epochs"]), "--lr", str(hp["lr"]), "--l2", str(hp["l2"])]
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "psctl", "train", kind, str(EXAMPLES / folder / "train.csv"), "--workers",
                        str(workers), "--out", model, *extra, *flags], check=True, capture_output=True)
        seconds = time.monotonic() - started
        out = subprocess.run([sys.executable, "-m", "psctl", "predict", model, str(EXAMPLES / folder / "test.csv")],
                             check=True, capture_output=True, text=True).stdout
        name = "r2" if kind == "linreg" else "accuracy"
        line = next(ln for ln in out.splitlines() if ln.replace("│", " ").split()[:1] == [name])
        return float(line.replace("│", " ").split()[-1]), seconds


def sklearn_runs(folder: str, label: str | None) -> str:
    try:
        from sklearn.linear_model import LogisticRegression, SGDClassifier
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        return "scikit-learn not installed"
    X, y = load(EXAMPLES / folder / "train.csv", label)
    Xt, yt = load(EXAMPLES / folder / "test.csv", label)
    scaler = StandardScaler().fit(X)
    X, Xt = scaler.transform(X), scaler.transform(Xt)
    sgd = SGDClassifier(random_state=0).fit(X, y).score(Xt, yt)
    lr = LogisticRegression(max_iter=2000).fit(X, y).score(Xt, yt)
    return f"sklearn SGDClassifier {sgd:.4f}, LogisticRegression {lr:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    print(f"{'model':8} {'data':14} {'psctl':>8} {'numpy':>8} {'diff':>7} {'psctl s':>8}  reference")
    for kind, folder, extra, hp in WORKLOADS:
        label = extra[1] if extra else None
        ours, seconds = psctl_run(kind, folder, extra, hp, args.workers)
        single = numpy_run(kind, folder, label, hp)
        ref = "" if kind == "linreg" else sklearn_runs(folder, label)
        print(f"{kind:8} {folder:14} {ours:8.4f} {single:8.4f} {ours - single:+7.4f} {seconds:8.2f}  {ref}", flush=True)


if __name__ == "__main__":
    main()
