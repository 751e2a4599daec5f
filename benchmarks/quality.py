"""psctl's default flags against the single-machine libraries' defaults, on the seed workloads.

    python benchmarks/quality.py [--only digits,cancer,svm,mnist,a9a,movielens] [--modes sync,async,ssp]
                                 [--workers 8] [--repeat N] [--markdown FILE] [--workdir DIR]
                                 [--split examples|sklearn]

For every row and mode it runs, as processes, what a person would type with no
hyper-parameter flag at all:

    psctl train MODEL TRAIN --workers 8 --mode MODE --out model.npz
    psctl predict model.npz TEST --json            (mf: --cold-start drop)

and on the same split the other side's defaults: scikit-learn's LogisticRegression
(standardized with StandardScaler, as psctl standardizes) for softmax and logreg,
LinearSVC for svm, and Spark ALS (rank 10, maxIter 10, regParam 0.1, coldStartStrategy
drop) for mf when pyspark and java are present. It prints one table: held-out accuracy
(or RMSE), the target of the issue that set it, whether each psctl mode meets it, and
wall times. ``ssp`` runs with its default bound (staleness 0). ``--repeat N`` trains each
row N times per mode and shows the lowest and highest figure (async and ssp runs differ
from run to run); a mode meets the target only if every run does.

Splits: digits and breast cancer are examples/ (stratified 80/20, seed 42, psctl's own
``stratified_split``), or with ``--split sklearn`` scikit-learn's ``train_test_split``
(``test_size=0.2, stratify=y, random_state=42``) of its own copies (tests/splits.py: the
split issue 16's scikit-learn figures were measured on; docs/DEFAULTS.md, Limits); MNIST is its
own 60k/10k (../shared/data/mnist, written once as CSV into --workdir); a9a -> a9a.t;
MovieLens small is a random 80/20 split (seed 42), cold-start test rows dropped.
Rows whose data is absent are skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on the path, where profile.py hides the standard
# library's profile module (pyspark imports cProfile): the repository takes that place instead.
sys.path[:] = [str(REPO), *(p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks")]

from benchmarks import mf_movielens  # noqa: E402
from benchmarks.common import machine_info  # noqa: E402
from tests.splits import issue_split  # noqa: E402
from psctl.data.idx import mnist  # noqa: E402

EXAMPLES = REPO / "examples"
SHARED = REPO.parent / "shared" / "data"  # --shared
MODES = ("sync", "async", "ssp")


@dataclass
class Row:
    key: str
    what: str
    model: str
    metric: str  # "accuracy" (higher is better) or "rmse" (lower)
    target: float
    peer: str  # what the other side runs


ROWS = [
    Row("digits", "softmax, digits", "softmax", "accuracy", 0.96, "scikit-learn LogisticRegression"),
    Row("mnist", "softmax, MNIST (10k test set)", "softmax", "accuracy", 0.92, "scikit-learn LogisticRegression"),
    Row("cancer", "logreg, breast cancer", "logreg", "accuracy", 0.97, "scikit-learn LogisticRegression"),
    Row("a9a", "logreg, a9a -> a9a.t", "logreg", "accuracy", 0.848, "scikit-learn LogisticRegression"),
    Row("svm", "linear SVM, digits", "svm", "accuracy", 0.95, "scikit-learn LinearSVC"),
    Row("movielens", "mf, MovieLens small (RMSE)", "mf", "rmse", 0.86, "Spark ALS rank 10, maxIter 10, regParam 0.1"),
]


def meets(row: Row, value: float) -> bool:
    return value >= row.target if row.metric == "accuracy" else value <= row.target


# -- data ---------------------------------------------------------------------------
def mnist_csv(folder: Path, split: str, out: Path, limit: int | None = None) -> Path:
    """MNIST's ``split`` (its first ``limit`` rows) as a CSV: a header, then label and 784 pixels a line."""
    if not out.exists():
        X, y = mnist(folder, split)
        header = ",".join(["label", *(f"px{i}" for i in range(784))])
        np.savetxt(out, np.column_stack([y, X])[:limit], fmt="%d", delimiter=",", header=header, comments="")
    return out


def files(row: Row, workdir: Path, shared: Path = SHARED, split: str = "examples") -> tuple[Path, Path] | str:
    """(train, test) for a row, or why it cannot run."""
    if row.key in ("digits", "svm", "cancer"):
        name = "breast_cancer" if row.key == "cancer" else "digits"
        if split == "examples":
            return EXAMPLES / name / "train.csv", EXAMPLES / name / "test.csv"
        try:
            return issue_split(name, workdir / f"sklearn-{name}")
        except ImportError:
            return "scikit-learn not installed (it ships the data and makes the split): pip install 'psctl[sklearn]'"
    if row.key == "mnist":
        src = shared / "mnist"
        if not (src / "train-images-idx3-ubyte.gz").is_file():
            return f"MNIST not found in {src}"
        return mnist_csv(src, "train", workdir / "mnist-train.csv"), mnist_csv(src, "test", workdir / "mnist-test.csv")
    if row.key == "a9a":
        src = shared / "libsvm-a9a"
        if not (src / "a9a").is_file():
            return f"a9a not found in {src}"
        return src / "a9a", src / "a9a.t"
    src = shared / "movielens-ml-latest-small" / "ratings.csv"
    if not src.is_file():
        return f"MovieLens not found at {src}"
    if not (workdir / "train.csv").exists():
        mf_movielens.split(src, workdir)
    return workdir / "train.csv", workdir / "test.csv"


# -- psctl ----------------------------------------------------------------------------
def _psctl(*args: str) -> tuple[str, float]:
    started = time.monotonic()
    cmd = [sys.executable, "-m", "psctl", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        sys.exit(f"psctl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout, time.monotonic() - started


def run_psctl(row: Row, mode: str, train: Path, test: Path, workdir: Path, workers: int) -> dict:
    model = workdir / f"{row.key}-{mode}.npz"
    _, train_s = _psctl("train", row.model, str(train), "--workers", str(workers), "--mode", mode, "--out", str(model))
    extra = ["--cold-start", "drop"] if row.model == "mf" else []
    out, _ = _psctl("predict", str(model), str(test), "--json", "--out", str(workdir / "predictions.csv"), *extra)
    from psctl.files import modelfile

    _, meta = modelfile.load_model(str(model))
    epochs = len(meta.get("history", {}).get("epochs", []))
    return {"value": float(json.loads(out)["metrics"][row.metric]), "seconds": train_s, "epochs": epochs}


# -- the other side -----------------------------------------------------------------
def run_peer(row: Row, train: Path, test: Path, workdir: Path) -> dict | str:
    if row.model == "mf":
        missing = mf_movielens.spark_missing()
        if missing:
            return f"Spark ALS not run: {missing}"
        started = time.monotonic()
        als = mf_movielens.spark_als(train, test, [(10, 0.1)])[0]
        return {"value": als["rmse"], "seconds": time.monotonic() - started}
    try:
        from sklearn.datasets import load_svmlight_file
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC
    except ImportError:
        return "scikit-learn not installed: pip install 'psctl[sklearn]'"
    if row.key == "a9a":
        X, y = load_svmlight_file(str(train), n_features=123)
        Xt, yt = load_svmlight_file(str(test), n_features=123)
        estimator = LogisticRegression()  # 0/1 features: not standardized, as psctl leaves LIBSVM input
    else:
        a, b = (np.loadtxt(p, delimiter=",", skiprows=1) for p in (train, test))
        X, y, Xt, yt = a[:, 1:], a[:, 0], b[:, 1:], b[:, 0]
        estimator = make_pipeline(StandardScaler(), LinearSVC() if row.model == "svm" else LogisticRegression())
    started = time.monotonic()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs's ConvergenceWarning at its default max_iter on MNIST: defaults are the point
        estimator.fit(X, y)
    return {"value": float(estimator.score(Xt, yt)), "seconds": time.monotonic() - started}


# -- report ---------------------------------------------------------------------------
def table(results: list[dict], modes: list[str]) -> list[str]:
    head = ["workload", "target", *(f"psctl {m}" for m in modes), "other side (its defaults)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row: Row = r["row"]
        if "skipped" in r:
            lines.append(f"| {row.what} | {'≥' if row.metric == 'accuracy' else '≤'} {row.target} | "
                         + " | ".join("skipped" for _ in modes) + f" | {r['skipped']} |")  # fmt: skip
            continue
        cells = []
        for m in modes:
            runs = r["psctl"][m]
            lo, hi = min(p["value"] for p in runs), max(p["value"] for p in runs)
            ok = all(meets(row, p["value"]) for p in runs)
            value = f"{lo:.3f}" if len(runs) == 1 else f"{lo:.3f}-{hi:.3f} in {len(runs)} runs"
            secs = f"{max(p['seconds'] for p in runs):.0f} s" if len(runs) == 1 else (
                f"{min(p['seconds'] for p in runs):.0f}-{max(p['seconds'] for p in runs):.0f} s")
            epochs = sorted({p["epochs"] for p in runs})
            ep = str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"
            cells.append(f"{value} {'✓' if ok else '✗'} ({secs}, {ep} ep)")
        peer = r["peer"]
        other = peer if isinstance(peer, str) else f"{row.peer}: {peer['value']:.3f} ({peer['seconds']:.0f} s)"
        sign = "≥" if row.metric == "accuracy" else "≤"
        lines.append(f"| {row.what} | {sign} {row.target} | " + " | ".join(cells) + f" | {other} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", default=",".join(r.key for r in ROWS), help="Rows, comma-separated.")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="Runs per row and mode (the table shows min-max).")
    parser.add_argument("--markdown", type=Path, default=None, help="Also write the table (and the machine) here.")
    parser.add_argument("--workdir", type=Path, default=None, help="Models and converted data (default: a temp dir).")
    parser.add_argument("--shared", type=Path, default=SHARED, help="The shared datasets folder (MNIST, a9a, MovieLens).")
    parser.add_argument("--split", choices=("examples", "sklearn"), default="examples",
                        help="Digits and breast cancer: examples/ or scikit-learn's train_test_split of its own copies.")
    args = parser.parse_args()
    keys = args.only.split(",")
    unknown = set(keys) - {r.key for r in ROWS}
    if unknown:
        sys.exit(f"unknown rows {', '.join(sorted(unknown))}; known: {', '.join(r.key for r in ROWS)}")
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        sys.exit(f"--modes takes {', '.join(MODES)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="psctl-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for row in (r for r in ROWS if r.key in keys):
        found = files(row, workdir, args.shared, args.split)
        if isinstance(found, str):
            print(f"{row.what}: skipped, {found}", flush=True)
            results.append({"row": row, "skipped": found})
            continue
        train, test = found
        entry: dict = {"row": row, "psctl": {}}
        for mode in modes:
            entry["psctl"][mode] = []
            for _ in range(max(args.repeat, 1)):
                entry["psctl"][mode].append(got := run_psctl(row, mode, train, test, workdir, args.workers))
                print(f"{row.what}, psctl {mode}: {row.metric} {got['value']:.4f} in {got['seconds']:.1f} s, "
                      f"{got['epochs']} epochs", flush=True)  # fmt: skip
        entry["peer"] = peer = run_peer(row, train, test, workdir)
        print(f"{row.what}, {row.peer}: " + (peer if isinstance(peer, str) else f"{peer['value']:.4f} in {peer['seconds']:.1f} s"),
              flush=True)  # fmt: skip
        results.append(entry)
    lines = table(results, modes)
    info = machine_info()
    machine = f"{info['nproc']} cores ({info['cpu_model']}), Python {info['python']}, {args.workers} workers, 2 shards"
    print("\n" + "\n".join(lines) + f"\n\n{machine}")
    failed = [f"{r['row'].what} {m}" for r in results if "psctl" in r for m in modes
              if not all(meets(r["row"], p["value"]) for p in r["psctl"][m])]
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + f"\n\n{machine}\n")
    if failed:
        print(f"below target: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
