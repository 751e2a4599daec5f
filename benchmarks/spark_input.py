"""Feeding psctl from a Spark DataFrame, against ``psctl train`` reading the CSV itself and Spark MLlib.

    python benchmarks/spark_input.py [--mnist DIR] [--limit N] [--workers 2] [--epochs 3]
                                     [--mllib-max-iter 3] [--workdir DIR] [--json FILE]

MNIST's training set (or its first ``--limit`` rows) is written once as a CSV (label, 784
pixels) into --workdir; then, on one ``local[W]`` Spark application:

1. ``psctl train softmax mnist-train.csv --workers W --epochs E`` as a process (the workers
   read their byte ranges of the CSV themselves);
2. ``psctl.spark.train(df, "softmax", workers=W, epochs=E)`` on the same CSV read by Spark
   (an explicit schema; persisted and counted first, so Spark's CSV read is timed apart): the
   planning pass, each task's Arrow batches written as its worker's arrays, the job;
3. ``pyspark.ml`` LogisticRegression (multinomial) on the same DataFrame through a
   VectorAssembler, ``maxIter`` = --mllib-max-iter (an L-BFGS iteration reads every row once,
   as an epoch does, plus its line search's extra passes).

For each: held-out accuracy on MNIST's 10k test set, total wall time (process or call),
the job's own seconds (psctl's clock in the model file: from the job's start, so in Spark it
includes the tasks writing their rows for their workers), rows trained per second of each and
of the epochs after the first (training alone), and the ratios to ``psctl train``. Not in ``python -m benchmarks``'s sections: it needs
the ``spark`` extra and Java 17+, and takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on the path, where profile.py hides the standard
# library's profile module (pyspark imports cProfile): the repository takes that place instead.
sys.path[:] = [str(REPO), *(p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks")]

from benchmarks.common import machine_info  # noqa: E402
from benchmarks.quality import mnist_csv  # noqa: E402
from psctl.data.idx import MNIST_FILES  # noqa: E402
from psctl.files import loading  # noqa: E402

DEFAULT_MNIST = REPO.parent / "shared" / "data" / "mnist"
warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas")  # pyspark 4.3 with pandas 3


def _psctl(*args: str) -> float:
    """Run ``psctl ARGS`` as a process; its wall time in seconds."""
    print("$ psctl " + " ".join(args), flush=True)
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "psctl", *args], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        sys.exit(f"psctl {args[0]} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return time.monotonic() - started


def _accuracy(model: str, test_csv: Path) -> float:
    out = subprocess.run([sys.executable, "-m", "psctl", "predict", model, str(test_csv), "--json"], capture_output=True,
                         text=True, cwd=REPO, check=True)
    return json.loads(out.stdout)["metrics"]["accuracy"]


def _figures(name: str, wall_s: float, rows: int, accuracy: float, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of the table; from a psctl model file's meta also the job's clock and the rows/s of
    the epochs after the first (training alone: the workers' start and first reads are in epoch 1)."""
    job_s = meta["metrics"]["seconds"] if meta else None
    epochs = meta["history"]["epochs"] if meta else []
    steady = (sum(e["samples"] for e in epochs[1:]) / (epochs[-1]["seconds"] - epochs[0]["seconds"])) if len(epochs) > 1 else None
    return {"name": name, "wall_s": wall_s, "job_s": job_s, "rows_trained": rows, "accuracy": accuracy,
            "rows_per_s_wall": rows / wall_s, "rows_per_s_job": rows / job_s if job_s else None, "rows_per_s_after_epoch_1": steady,
            "epoch_seconds": [e["seconds"] for e in epochs]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import VectorAssembler
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    import psctl.spark

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="psctl-spark-input-"))
    workdir.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.limit}" if args.limit else ""
    train_csv = mnist_csv(args.mnist, "train", workdir / f"mnist-train{suffix}.csv", args.limit)
    test_csv = mnist_csv(args.mnist, "test", workdir / "mnist-test.csv")
    W, E = str(args.workers), str(args.epochs)
    results = []

    cli_model = str(workdir / "cli.npz")
    wall = _psctl("train", "softmax", str(train_csv), "--workers", W, "--epochs", E, "--out", cli_model)
    meta = loading.load(cli_model)[2]
    results.append(_figures(f"psctl train (reads the CSV, {W} worker processes)", wall, meta["metrics"]["rows_trained"],
                            _accuracy(cli_model, test_csv), meta))

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    started = time.monotonic()
    spark = (SparkSession.builder.master(f"local[{args.workers}]").appName("psctl-spark-input")
             .config("spark.ui.enabled", "false").config("spark.driver.memory", "2g").getOrCreate())  # fmt: skip
    spark.sparkContext.setLogLevel("ERROR")
    startup_s = time.monotonic() - started
    try:
        t0 = time.monotonic()
        schema = ", ".join(["label INT", *(f"px{i} SHORT" for i in range(784))])
        df = spark.read.csv(str(train_csv), header=True, schema=schema).repartition(args.workers).persist()
        n_rows = df.count()
        read_s = time.monotonic() - t0

        spark_model = str(workdir / "spark.npz")
        t0 = time.monotonic()
        trained = psctl.spark.train(df, "softmax", workers=args.workers, shards=min(2, args.workers), epochs=args.epochs,
                                    out=spark_model)
        wall = time.monotonic() - t0
        results.append(_figures(f"psctl.spark.train (rows from the DataFrame, {W} barrier tasks)", wall,
                                trained.metrics["rows_trained"], _accuracy(spark_model, test_csv), trained.meta))

        assembler = VectorAssembler(inputCols=df.columns[1:], outputCol="features")
        t0 = time.monotonic()
        fitted = LogisticRegression(family="multinomial", maxIter=args.mllib_max_iter).fit(assembler.transform(df))
        wall = time.monotonic() - t0
        iterations = fitted.summary.totalIterations
        test = spark.read.csv(str(test_csv), header=True, schema=schema)
        scored = fitted.transform(assembler.transform(test))
        accuracy = scored.select(F.avg((F.col("label") == F.col("prediction")).cast("double"))).first()[0]
        results.append(_figures(f"Spark MLlib LogisticRegression multinomial ({iterations} L-BFGS iterations)", wall,
                                n_rows * iterations, accuracy))
        df.unpersist()
    finally:
        spark.stop()
    return {"machine": machine_info(), "load_average": os.getloadavg(), "rows": n_rows, "workers": args.workers,
            "epochs": args.epochs, "spark_startup_s": startup_s, "spark_csv_read_s": read_s, "results": results}


def report(out: dict[str, Any]) -> None:
    cli = out["results"][0]
    print(f"\nMNIST softmax, {out['rows']} training rows, {out['workers']} workers, {out['epochs']} epochs; Spark start-up "
          f"{out['spark_startup_s']:.1f} s, its CSV read to a persisted DataFrame {out['spark_csv_read_s']:.1f} s (not counted below)")
    print(f"{'':78} {'accuracy':>8} {'wall s':>7} {'job s':>6} {'rows/s wall':>11} {'rows/s job':>10} "
          f"{'rows/s ep 2+':>12} {'wall vs CLI':>11}")
    for r in out["results"]:
        cells = [f"{r[k]:{w}.{p}f}" if r[k] else f"{'-':>{w}}" for k, w, p in
                 (("job_s", 6, 1), ("rows_per_s_job", 10, 0), ("rows_per_s_after_epoch_1", 12, 0))]
        print(f"{r['name']:78} {r['accuracy']:8.4f} {r['wall_s']:7.1f} {cells[0]} {r['rows_per_s_wall']:11.0f} {cells[1]} "
              f"{cells[2]} {r['wall_s'] / cli['wall_s']:10.2f}x")
    spark = out["results"][1]
    steady = (f", {spark['rows_per_s_after_epoch_1'] / cli['rows_per_s_after_epoch_1']:.2f}x (epochs after the first)"
              if spark["rows_per_s_after_epoch_1"] and cli["rows_per_s_after_epoch_1"] else "")
    print(f"\npsctl.spark.train / psctl train: wall {spark['wall_s'] / cli['wall_s']:.2f}x; training rows/s "
          f"{spark['rows_per_s_wall'] / cli['rows_per_s_wall']:.2f}x (wall), {spark['rows_per_s_job'] / cli['rows_per_s_job']:.2f}x "
          f"(job clock){steady}")
    for r in out["results"][:2]:
        print(f"{r['name']}: epochs ended at {', '.join(f'{s:.1f}' for s in r['epoch_seconds'])} s of the job")
    m = out["machine"]
    la = ", ".join(f"{x:.1f}" for x in out["load_average"])
    print(f"machine: {m['cpus_usable']} cores {m['cpu_model']}; load average at the end {la}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST, help="folder of MNIST's four IDX .gz files")
    parser.add_argument("--limit", type=int, default=None, help="the first N training rows (default: all 60,000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--mllib-max-iter", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where the CSVs and model files go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if not (args.mnist / MNIST_FILES["train"][0]).is_file():
        print(f"MNIST is not in {args.mnist}: pass --mnist DIR, a folder holding its four IDX .gz files.", file=sys.stderr)
        return 2
    out = run(args)
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
