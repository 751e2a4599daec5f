"""Sparse models that learn per key: psctl's FTRL defaults on hashed CTR-like rows next to
Vowpal Wabbit (and scikit-learn), one pass each, held-out log loss, in the same run.

    python benchmarks/hashed_vw.py [--rows 200000] [--test-rows 20000] [--workers 8]
                                   [--runs sync,async,sync-b32,sync-b512] [--workdir DIR] [--no-sklearn]

Writes the data with benchmarks/hashed_synth.py (26 categorical columns with a long tail
of values seen once, 3 numeric ones; seed 0) into --workdir unless it is there, then runs,
as processes, what a person types with no hyper-parameter flag but one pass:

    psctl train logreg train.csv --categorical C1,...,C26 --workers 8 --epochs 1 --mode MODE [--batch-size B]
    psctl predict model.npz test.csv --json

(a run is named MODE[-bBATCH][-aALPHA]: ``sync-b512`` adds ``--batch-size 512``, ``sync-a0.5``
``--optimizer ftrl --lr 0.5 --batch-size 16``, the defaults but for FTRL's alpha; psctl's
default hash space, 2^24 keys). The peers,
in this process, one pass over the same rows in the same order:

- Vowpal Wabbit (``pip install -e '.[benchmarks]'``): ``--loss_function logistic -b 24``,
  its defaults otherwise (adaptive, normalized, invariant updates); each categorical cell
  the feature ``Cj=value``, each numeric one ``Ij:value``;
- scikit-learn: FeatureHasher (2^24) of the same features, SGDClassifier(loss="log_loss")
  with its defaults, one partial_fit per 10,000 rows.

It prints the held-out log loss and ROC AUC of each, psctl's difference to Vowpal Wabbit
(the goal: within 0.01), and batch 512 against batch 32 (the goal: within 0.005), with the
base rate's log loss for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on the path, where profile.py hides the standard
# library's profile module: the repository takes that place instead.
sys.path[:] = [str(REPO), *(p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks")]

from benchmarks.common import machine_info  # noqa: E402
from psctl.models import metrics  # noqa: E402
from psctl.models.base import LinearModel  # noqa: E402

CATEGORICAL = [f"C{j + 1}" for j in range(26)]
NUMERIC = ["I1", "I2", "I3"]
MODES = ("sync", "async", "ssp")
VW_GOAL = 0.01
BATCH_GOAL = 0.005


def make_data(workdir: Path, rows: int, test_rows: int) -> tuple[Path, Path]:
    train, test = workdir / f"hashed-{rows}.csv", workdir / f"hashed-{rows}-test-{test_rows}.csv"
    if not (train.exists() and test.exists()):
        subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "hashed_synth.py"), "--rows", str(rows), "--test-rows", str(test_rows),
             "--out", str(train), "--test-out", str(test)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return train, test


def read_rows(path: Path) -> tuple[np.ndarray, list[list[str]]]:
    """Labels and the cells of every row (header first in the file)."""
    labels, cells = [], []
    with open(path) as fh:
        header = fh.readline().rstrip("\n").split(",")
        if header != ["label", *NUMERIC, *CATEGORICAL]:
            sys.exit(f"{path}: not a hashed_synth.py file (header {header[:5]}...)")
        for line in fh:
            parts = line.rstrip("\n").split(",")
            labels.append(int(parts[0]))
            cells.append(parts[1:])
    return np.array(labels, np.float64), cells


# -- psctl ----------------------------------------------------------------------------
def _psctl(*args: str) -> tuple[str, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "psctl", *args], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    if result.returncode != 0:
        sys.exit(f"psctl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout, time.monotonic() - started


def run_flags(name: str) -> tuple[str, list[str]]:
    """A run's mode and flags from its name, MODE[-bBATCH][-aALPHA]; SystemExit if malformed."""
    mode, *parts = name.split("-")
    flags: dict[str, str] = {}
    for part in parts:
        key, value = part[:1], part[1:]
        try:
            ok = key in "ba" and key not in flags and (int(value) > 0 if key == "b" else float(value) > 0)
        except ValueError:
            ok = False
        if not ok:
            sys.exit(f"run {name!r}: expected MODE[-bBATCH][-aALPHA], e.g. sync-b512 or async-a0.3")
        flags[key] = value
    if mode not in MODES:
        sys.exit(f"run {name!r}: the mode must be one of {', '.join(MODES)}")
    extra = []
    if "a" in flags:  # an optimizer option: the rest of the tuned defaults must be named
        tuned = LinearModel.sparse_defaults or {}
        extra += ["--optimizer", "ftrl", "--lr", flags["a"], "--l2", str(tuned["l2"]), "--batch-size", flags.get("b", str(tuned["batch_size"]))]
    elif "b" in flags:
        extra += ["--batch-size", flags["b"]]
    return mode, extra


def run_psctl(name: str, train: Path, test: Path, workdir: Path, workers: int) -> dict:
    mode, extra = run_flags(name)
    model = workdir / f"hashed-{name}.npz"
    _, train_s = _psctl("train", "logreg", str(train), "--categorical", ",".join(CATEGORICAL), "--workers", str(workers),
                        "--epochs", "1", "--mode", mode, *extra, "--out", str(model))  # fmt: skip
    out, _ = _psctl("predict", str(model), str(test), "--json", "--out", str(workdir / "hashed-predictions.csv"))
    from psctl.files import modelfile

    _, meta = modelfile.load_model(str(model))
    got = json.loads(out)["metrics"]
    return {"log_loss": got["log_loss"], "roc_auc": got["roc_auc"], "seconds": train_s,
            "batch_size": meta["training"]["batch_size"], "optimizer": meta["optimizer"]}  # fmt: skip


# -- the peers ------------------------------------------------------------------------
def _vw_line(label: float | None, cells: list[str]) -> str:
    nums = " ".join(f"{n}:{v}" for n, v in zip(NUMERIC, cells[:3]) if v)
    cats = " ".join(f"{n}={v}" for n, v in zip(CATEGORICAL, cells[3:]) if v)
    head = "" if label is None else ("1" if label else "-1")
    return f"{head} |f {nums} {cats}"


def run_vw(train: tuple[np.ndarray, list[list[str]]], test: tuple[np.ndarray, list[list[str]]]) -> dict | str:
    try:
        from vowpalwabbit import Workspace
    except ImportError:
        return "vowpalwabbit is not installed (pip install -e '.[benchmarks]')"
    started = time.monotonic()
    vw = Workspace("--loss_function logistic -b 24 --link logistic --quiet")
    for label, cells in zip(*train):
        vw.learn(_vw_line(label, cells))
    p = np.array([vw.predict(_vw_line(None, cells)) for cells in test[1]], np.float64)
    seconds = time.monotonic() - started
    vw.finish()
    return {"log_loss": metrics.log_loss(test[0], p), "roc_auc": metrics.roc_auc(test[0], p), "seconds": seconds}


def _sk_features(cells: list[list[str]]) -> list[list[tuple[str, float]]]:
    return [[(n, float(v)) for n, v in zip(NUMERIC, row[:3]) if v] + [(f"{n}={v}", 1.0) for n, v in zip(CATEGORICAL, row[3:]) if v]
            for row in cells]  # fmt: skip


def run_sklearn(train: tuple[np.ndarray, list[list[str]]], test: tuple[np.ndarray, list[list[str]]]) -> dict | str:
    try:
        from sklearn.feature_extraction import FeatureHasher
        from sklearn.linear_model import SGDClassifier
    except ImportError:
        return "scikit-learn is not installed"
    started = time.monotonic()
    hasher = FeatureHasher(n_features=2**24, input_type="pair")
    clf = SGDClassifier(loss="log_loss", random_state=0)
    y, cells = train
    for start in range(0, len(y), 10_000):
        X = hasher.transform(_sk_features(cells[start : start + 10_000]))
        clf.partial_fit(X, y[start : start + 10_000], classes=[0.0, 1.0])
    p = clf.predict_proba(hasher.transform(_sk_features(test[1])))[:, 1]
    seconds = time.monotonic() - started
    return {"log_loss": metrics.log_loss(test[0], p), "roc_auc": metrics.roc_auc(test[0], p), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--test-rows", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--runs", default="sync,async,sync-b32,sync-b512", help="psctl runs, each MODE[-bBATCH][-aALPHA]")
    ap.add_argument("--workdir", default="/tmp/psctl-hashed-vw")
    ap.add_argument("--no-sklearn", action="store_true")
    args = ap.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    for name in runs:
        run_flags(name)  # a malformed name fails before anything runs
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, Python {info['python']}, load {info['loadavg_at_start']}, "
          f"psctl {info.get('git_commit')}{' (dirty)' if info.get('git_dirty') else ''}")  # fmt: skip
    train_path, test_path = make_data(workdir, args.rows, args.test_rows)
    train, test = read_rows(train_path), read_rows(test_path)
    base = float(train[0].mean())
    base_loss = metrics.log_loss(test[0], np.full(len(test[0]), base))
    results: dict[str, dict | str] = {}
    for name in runs:  # the peers between psctl's runs: the load changes while they run
        results[f"psctl {name}"] = run_psctl(name, train_path, test_path, workdir, args.workers)
        if name == runs[0]:
            results["Vowpal Wabbit"] = run_vw(train, test)
            if not args.no_sklearn:
                results["scikit-learn"] = run_sklearn(train, test)
    vw = results.get("Vowpal Wabbit")
    vw_loss = vw["log_loss"] if isinstance(vw, dict) else None
    print(f"\n{args.rows} training rows, {args.test_rows} held out, one pass; base rate's log loss {base_loss:.4f}")
    print(f"{'run':<22} {'log loss':>9} {'vs VW':>8} {'ROC AUC':>8} {'seconds':>8}  details")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name:<22} skipped: {r}")
            continue
        delta = f"{r['log_loss'] - vw_loss:+.4f}" if vw_loss is not None else "-"
        details = f"{r['optimizer']['name']} lr {r['optimizer']['params']['lr']}, batch {r['batch_size']}" if "optimizer" in r else ""
        print(f"{name:<22} {r['log_loss']:>9.4f} {delta:>8} {r['roc_auc']:>8.4f} {r['seconds']:>8.1f}  {details}")
    default = results.get(f"psctl {runs[0]}")
    if vw_loss is not None and isinstance(default, dict):
        gap = default["log_loss"] - vw_loss
        print(f"goal: psctl {runs[0]} within {VW_GOAL} of Vowpal Wabbit: {gap:+.4f}, {'met' if gap <= VW_GOAL else 'MISSED'}")
    b32, b512 = results.get("psctl sync-b32"), results.get("psctl sync-b512")
    if isinstance(b32, dict) and isinstance(b512, dict):
        gap = b512["log_loss"] - b32["log_loss"]
        print(f"goal: batch 512 within {BATCH_GOAL} of batch 32 (sync): {gap:+.4f}, {'met' if gap <= BATCH_GOAL else 'MISSED'}")
    (workdir / "hashed_vw.json").write_text(json.dumps({"machine": info, "base_log_loss": base_loss, "results": results}, indent=2))


if __name__ == "__main__":
    main()
