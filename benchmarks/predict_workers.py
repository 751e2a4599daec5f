"""Rows per second of ``psctl predict --workers N`` against one process and plain numpy.

    python benchmarks/predict_workers.py --rows 1000000          # the figure for the issue (minutes)
    python benchmarks/predict_workers.py --rows 50000            # a quick run that it works

For a dense logreg model (a CSV of ``--features`` numeric columns) and a hashed logreg
model (the Criteo-like file of ``benchmarks/hashed_synth.py``), both trained briefly on
a small file of the same kind, it times on one ``--rows`` file, in one run:

- plain numpy in this process: dense, ``np.loadtxt`` of the file and ``X @ w``; hashed,
  psctl's own vectorized reader (``formats.read_hashed_csv``) and the sparse product,
  since numpy alone cannot hash the cells (no predictions file is written);
- dense: pandas ``read_csv`` and the same arithmetic, in this process (issue 18's reading
  baseline), and ``psctl predict MODEL FILE`` without ``--out``, in ``--rounds`` alternating
  rounds (medians);
- ``psctl predict MODEL FILE --out P`` (one process, a fresh ``python -m psctl``);
- ``psctl predict MODEL FILE --out P --workers N`` for N in ``--workers`` (default 1 2 4),

and prints rows/s and the ratios to numpy and to one process; it also checks that
every predictions file is byte-identical to the one-process file. Wall time includes
each command's start-up, model loading and writing of the predictions file.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TRAIN_ROWS = 20_000
CHUNK_ROWS = 100_000


def write_dense(path: Path, rows: int, features: int, seed: int) -> None:
    """A binary label from a hidden linear model over ``features`` normal columns."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(7).normal(size=features)
    with open(path, "w") as fh:
        fh.write(",".join(["label", *(f"x{j}" for j in range(features))]) + "\n")
        for start in range(0, rows, CHUNK_ROWS):
            X = np.round(rng.normal(size=(min(CHUNK_ROWS, rows - start), features)), 4)
            y = (X @ w + rng.normal(0, 0.5, len(X)) > 0).astype(int)
            np.savetxt(fh, np.column_stack([y, X]), fmt=["%d", *(["%.4f"] * features)], delimiter=",")


def psctl(*args: str) -> float:
    """Run ``python -m psctl ARGS``; its wall time in seconds. Exits on failure."""
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "psctl", *args], capture_output=True, text=True, cwd=REPO)
    took = time.perf_counter() - started
    if r.returncode != 0:
        sys.exit(f"psctl {' '.join(args)} failed:\n{r.stderr}")
    return took


def numpy_dense(model: Path, data: Path) -> float:
    from psctl.files import modelfile

    params, meta = modelfile.load_model(str(model))
    started = time.perf_counter()
    table = np.loadtxt(data, delimiter=",", skiprows=1)
    X = table[:, 1:]
    if meta.get("standardize"):
        X = (X - np.asarray(meta["standardize"]["mean"])) / np.asarray(meta["standardize"]["std"])
    w = params["w"].astype(np.float64).reshape(-1)
    p = 1 / (1 + np.exp(-(X @ w[:-1] + w[-1])))
    assert len(p) == len(table)
    return time.perf_counter() - started


def pandas_dense(model: Path, data: Path) -> float | None:
    """``pandas.read_csv`` and the same numpy arithmetic: the issue's reading baseline."""
    try:
        import pandas as pd
    except ImportError:
        return None
    from psctl.files import modelfile

    params, meta = modelfile.load_model(str(model))
    started = time.perf_counter()
    X = pd.read_csv(data).to_numpy(np.float64)[:, 1:]
    if meta.get("standardize"):
        X = (X - np.asarray(meta["standardize"]["mean"])) / np.asarray(meta["standardize"]["std"])
    w = params["w"].astype(np.float64).reshape(-1)
    p = 1 / (1 + np.exp(-(X @ w[:-1] + w[-1])))
    assert len(p) == len(X)
    return time.perf_counter() - started


def numpy_hashed(model: Path, data: Path) -> float:
    from psctl.apps import predict

    pred = predict.load_predictor(str(model))
    started = time.perf_counter()
    plan = predict.plan_input(pred, str(data))
    rows = predict.read_rows(pred, plan, str(data), predict.whole_file(str(data), plan))
    weights, _ = predict.aligned_weights(pred.model, pred.params, rows.X)
    w = weights["w"].reshape(-1)
    p = 1 / (1 + np.exp(-(rows.X @ w[:-1] + w[-1])))
    assert len(p) == len(rows.X)
    return time.perf_counter() - started


def children_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def reading_rounds(model: Path, data: Path, rounds: int) -> tuple[float | None, float, float]:
    """The issue's reading goal, in alternating rounds (medians): pandas ``read_csv`` + numpy in
    this process, ``psctl predict MODEL FILE`` (reading, the model, metrics; a fresh process,
    start-up included) and the same with ``--out`` (the predictions file written too). Prints
    the CPU time (user + sys) of each beside the wall times, which a loaded machine stretches:
    pyarrow parses in threads, so psctl's CPU is the stricter of the two comparisons."""
    wall: dict[str, list[float]] = {"pandas": [], "metrics": [], "written": []}
    cpu: dict[str, list[float]] = {"pandas": [], "metrics": [], "written": []}
    with contextlib.suppress(ImportError):
        import pandas  # noqa: F401  (imported before the rounds: psctl's lines include its imports, pandas' do not)
    for _ in range(rounds):
        before = time.process_time()
        got = pandas_dense(model, data)
        if got is not None:
            wall["pandas"].append(got)
            cpu["pandas"].append(time.process_time() - before)
        for name, extra in (("metrics", []), ("written", ["--out", str(data.with_suffix(".round.csv"))])):
            before = children_cpu()
            wall[name].append(psctl("predict", str(model), str(data), *extra))
            cpu[name].append(children_cpu() - before)
    med = {name: statistics.median(v) if v else None for name, v in cpu.items()}
    if med["pandas"]:
        print(f"\nreading goal, CPU seconds (user + sys), medians of {rounds} alternating rounds: pandas read_csv + numpy "
              f"{med['pandas']:.2f}, psctl predict {med['metrics']:.2f} ({med['pandas'] / med['metrics']:.2f}x pandas), "
              f"with --out {med['written']:.2f} ({med['pandas'] / med['written']:.2f}x)")
    pandas_s = statistics.median(wall["pandas"]) if wall["pandas"] else None
    return pandas_s, statistics.median(wall["metrics"]), statistics.median(wall["written"])


def measure(name: str, model: Path, data: Path, rows: int, baseline: float, workers: list[int], folder: Path,
            pandas_s: float | None = None, metrics_s: float | None = None) -> None:
    single_out = folder / f"{name}-single.csv"
    single = psctl("predict", str(model), str(data), "--out", str(single_out))
    lines = [("plain numpy, in process", baseline)]
    if pandas_s is not None:
        lines.append(("pandas read_csv + numpy, in process", pandas_s))
    if metrics_s is not None:
        lines.append(("psctl predict, one process, no --out", metrics_s))
    lines.append(("psctl predict, one process", single))
    identical = []
    for n in workers:
        out = folder / f"{name}-w{n}.csv"
        lines.append((f"psctl predict --workers {n}", psctl("predict", str(model), str(data), "--out", str(out), "--workers", str(n))))
        identical.append(filecmp.cmp(single_out, out, shallow=False))
    print(f"\n{name} model, {rows} rows ({data.stat().st_size / 1e6:.1f} MB):")
    against = pandas_s or baseline
    print(f"  {'':36} {'seconds':>8} {'rows/s':>10} {'x numpy':>8} {'x pandas' if pandas_s else '':>8} {'x one process':>14}")
    for label, seconds in lines:
        ratio = f"{against / seconds:8.2f}" if pandas_s else " " * 8
        print(f"  {label:36} {seconds:8.2f} {rows / seconds:10.0f} {baseline / seconds:8.2f} {ratio} {single / seconds:14.2f}")
    print("  (wall time of psctl includes its start-up and model loading, and but for 'no --out' writing the predictions file;")
    print("   the in-process lines only read and compute; the pandas line and 'no --out' are medians of --rounds alternating rounds)")
    print(f"  predictions files byte-identical to one process's: {all(identical)} ({len(identical)} of {len(identical)} checked)")
    if not all(identical):
        sys.exit("a --workers predictions file differs from the one-process file")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=20, help="dense model: numeric columns")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds of pandas and psctl predict on the dense file (medians)")
    ap.add_argument("--keep", default=None, help="keep the generated files in this folder (default: a temporary one)")
    args = ap.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="psctl-bench-predict-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores; files in {folder}")

    started = time.perf_counter()
    dense_train, dense = folder / "dense-train.csv", folder / "dense.csv"
    write_dense(dense_train, TRAIN_ROWS, args.features, seed=1)
    write_dense(dense, args.rows, args.features, seed=2)
    hashed_train, hashed = folder / "hashed-train.csv", folder / "hashed.csv"
    synth = [sys.executable, str(REPO / "benchmarks" / "hashed_synth.py"), "--cat-columns", "8", "--num-columns", "3"]
    subprocess.run([*synth, "--rows", str(TRAIN_ROWS), "--out", str(hashed_train)], check=True, capture_output=True)
    subprocess.run([*synth, "--rows", str(args.rows), "--seed", "1", "--out", str(hashed)], check=True, capture_output=True)
    print(f"generated the files in {time.perf_counter() - started:.1f} s")

    dense_model, hashed_model = folder / "dense.npz", folder / "hashed.npz"
    psctl("train", "logreg", str(dense_train), "--workers", "2", "--epochs", "1", "--out", str(dense_model))
    cats = ",".join(f"C{j + 1}" for j in range(8))
    psctl("train", "logreg", str(hashed_train), "--categorical", cats, "--hash-bits", "24", "--optimizer", "ftrl",
          "--workers", "2", "--epochs", "1", "--batch-size", "512", "--out", str(hashed_model))

    pandas_s, metrics_s, _ = reading_rounds(dense_model, dense, args.rounds)
    measure("dense", dense_model, dense, args.rows, numpy_dense(dense_model, dense), args.workers, folder,
            pandas_s=pandas_s, metrics_s=metrics_s)
    measure("hashed", hashed_model, hashed, args.rows, numpy_hashed(hashed_model, hashed), args.workers, folder)
    if args.keep is None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
