"""Matrix factorization on MovieLens (ml-latest-small): psctl mf, and Spark ALS when present.

    python benchmarks/mf_movielens.py [--data PATH] [--modes sync,ssp] [--workdir DIR]

1. Split: a uniformly random 20% of the ratings (psctl.data.ratings.random_split,
   seed 42) is the test set; train.csv and test.csv are written to --workdir
   line for line. The MovieLens file itself stays in ../shared/data (its
   license forbids redistribution): this script reads it, the repo never holds it.
2. For each mode it runs the commands a person would (printed below), as
   processes, and times them end to end:
       psctl train mf train.csv --workers 8 --rank 10 --epochs 30 --batch-size 512 --lr 0.015 --l2 0.1 --mode MODE
       psctl predict model.npz test.csv --cold-start drop
   then reads test RMSE/MAE and the traffic per epoch (bytes pulled and pushed
   vs pulling whole tables at every step) from the model file.
3. With pyspark and java installed it runs Spark ALS on the same split
   (rank 10, maxIter 10, regParam 0.1, and the seed's maxIter 5, regParam 0.01;
   coldStartStrategy drop) and times start-up, fit and evaluation; otherwise it
   says so and prints psctl's figures alone.

The learning rate is SGD's step per rating in every mode: each user's and item's rows
get the sum of their ratings' gradients (mf pushes per-key sums), and a sync clock adds
the workers' sums. (Before per-key sums, the mean over the batch and, in sync mode, over
the workers needed --lr 60 in sync and 7.5 in ssp and async for this same step.)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on the path, where profile.py hides the standard
# library's profile module (pyspark imports cProfile): the repository takes that place instead.
sys.path[:] = [str(REPO), *(p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks")]

from psctl.data import ratings  # noqa: E402
from psctl.files import modelfile  # noqa: E402
from psctl.models import metrics  # noqa: E402
from psctl.apps.recommend import load_mf, predict_ratings  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "movielens-ml-latest-small" / "ratings.csv"
LR = 0.015  # SGD's step per rating, every mode


def split(source: Path, workdir: Path, seed: int = 42) -> tuple[Path, Path]:
    header, *rows = source.read_text().splitlines()
    train, test = ratings.random_split(len(rows), 0.2, seed)
    paths = workdir / "train.csv", workdir / "test.csv"
    for path, idx in zip(paths, (train, test)):
        path.write_text("\n".join([header, *(rows[i] for i in idx)]) + "\n")
    print(f"split {source} (seed {seed}): {len(train)} train rows, {len(test)} test rows -> {workdir}")
    return paths


def run(cmd: list[str]) -> float:
    """Run a psctl command as a process; its wall time in seconds."""
    shown = " ".join(["psctl", *cmd[3:]])
    print(f"$ {shown}", flush=True)
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {result.stderr.strip()}")
    return seconds


def psctl_mode(mode: str, train: Path, test: Path, workdir: Path, args: argparse.Namespace, defaults: bool = False) -> dict:
    """``psctl train mf`` then ``psctl predict``; with ``defaults``, only ``--workers`` is given
    (the model's own rank, epochs, batch, learning rate and mode)."""
    model = workdir / f"model-{'defaults' if defaults else mode}.npz"
    psctl = [sys.executable, "-m", "psctl"]
    if defaults:
        flags = ["--workers", str(args.workers)]
    else:
        flags = ["--workers", str(args.workers), "--rank", str(args.rank), "--epochs", str(args.epochs),
                 "--batch-size", str(args.batch_size), "--lr", str(LR), "--l2", str(args.l2), "--mode", mode,
                 *(["--staleness", str(args.staleness)] if mode == "ssp" else [])]  # fmt: skip
    train_s = run([*psctl, "train", "mf", str(train), *flags, "--out", str(model)])
    predict_s = run([*psctl, "predict", str(model), str(test), "--cold-start", "drop",
                     "--out", str(workdir / f"predictions-{mode}.csv")])
    pred = predict_ratings(load_mf(str(model)), str(test), "drop")
    _, meta = modelfile.load_model(str(model))
    return {
        "name": "psctl mf, default flags" if defaults else f"psctl mf {mode}",
        "rmse": pred.metrics["rmse"],
        "mae": pred.metrics["mae"],
        "rows": pred.metrics["rows"],
        "cold": pred.cold_start["cold_rows"],
        "seconds": {"train": train_s, "predict": predict_s, "total": train_s + predict_s},
        "traffic": meta["metrics"]["traffic"],
        "shard_bytes": meta["metrics"]["shard_table_bytes"],  # what each shard the job used holds
    }


def spark_missing() -> str | None:
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark is not installed"
    if shutil.which("java") is None:
        return "java is not on PATH"
    return None


def spark_als(train: Path, test: Path, settings: list[tuple[int, float]]) -> list[dict]:
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import SparkSession

    started = time.monotonic()
    spark = SparkSession.builder.master("local[2]").appName("psctl-benchmark").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    startup_s = time.monotonic() - started
    out = []
    try:
        read = lambda p: spark.read.csv(str(p), header=True, inferSchema=True)  # noqa: E731
        for max_iter, reg in settings:
            t0 = time.monotonic()
            tr, te = read(train), read(test)
            als = ALS(rank=10, maxIter=max_iter, regParam=reg, userCol="userId", itemCol="movieId",
                      ratingCol="rating", coldStartStrategy="drop", seed=42)
            model = als.fit(tr)
            fit_s = time.monotonic() - t0
            t1 = time.monotonic()
            pred = model.transform(te)
            rmse = RegressionEvaluator(metricName="rmse", labelCol="rating").evaluate(pred)
            mae = RegressionEvaluator(metricName="mae", labelCol="rating").evaluate(pred)
            eval_s = time.monotonic() - t1
            out.append({
                "name": f"Spark ALS maxIter {max_iter} regParam {reg}",
                "rmse": rmse, "mae": mae, "rows": pred.count(), "cold": None,
                "seconds": {"startup": startup_s, "train": fit_s, "predict": eval_s,
                            "total": startup_s + fit_s + eval_s},
            })
    finally:
        spark.stop()
    return out


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def report(results: list[dict], baseline: float) -> None:
    print()
    print(f"{'':44} {'test RMSE':>9} {'MAE':>7} {'rows':>6} {'train s':>8} {'predict s':>9} {'total s':>8}")
    print(f"{'global mean (no model)':44} {baseline:9.4f}")
    for r in results:
        s = r["seconds"]
        startup = f" (+{s['startup']:.1f} s start-up)" if "startup" in s else ""
        print(f"{r['name']:44} {r['rmse']:9.4f} {r['mae']:7.4f} {r['rows']:6d} {s['train']:8.2f} {s['predict']:9.2f} "
              f"{s['total']:8.2f}{startup}")
    print()
    for r in results:
        t = r.get("traffic")
        if t:
            print(f"{r['name']}: per epoch pulled {mb(t['pulled_per_epoch'])}, pushed {mb(t['pushed_per_epoch'])}; "
                  f"whole tables at each of {t['steps_per_epoch']} steps: {mb(t['dense_per_epoch'])} "
                  f"(pulled {t['pulled_per_epoch'] / t['dense_per_epoch']:.1%} of it)")
    held = next((r["shard_bytes"] for r in results if "shard_bytes" in r), None)
    if held:
        print(f"tables: {mb(sum(held))} in all; each of the {len(held)} shards the job used holds its key range: "
              f"{', '.join(mb(b) for b in held)}")
    cold = [r["cold"] for r in results if r["cold"] is not None]
    if cold:
        print(f"cold-start test rows (item or user not in train.csv), dropped: {cold[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workdir", type=Path, default=None, help="Where the split and models go (default: a temp dir).")
    parser.add_argument("--modes", default="sync,ssp")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--l2", type=float, default=0.1)
    parser.add_argument("--staleness", type=int, default=2)
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"MovieLens ratings not found at {args.data}; pass --data PATH/ratings.csv")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="psctl-mf-"))
    workdir.mkdir(parents=True, exist_ok=True)
    train, test = split(args.data, workdir)
    y_train = np.loadtxt(train, delimiter=",", skiprows=1, usecols=2)
    y_test = np.loadtxt(test, delimiter=",", skiprows=1, usecols=2)
    baseline = metrics.rmse(y_test, np.full(len(y_test), y_train.mean()))
    results = [psctl_mode(mode, train, test, workdir, args) for mode in args.modes.split(",")]
    missing = spark_missing()
    if missing:
        print(f"Spark ALS not run: {missing}; psctl's figures alone.")
    else:
        results += spark_als(train, test, [(10, 0.1), (5, 0.01)])
    report(results, baseline)


if __name__ == "__main__":
    main()
