"""psctl on Spark at the seed's scale, each workload against Spark MLlib's own peer in the same run:

- softmax on MNIST (60,000 training images, the 10,000 test images; 784 pixel columns and
  the label), the DataFrames built from the IDX files through Arrow, no CSV on the way;
  against ``pyspark.ml.classification.LogisticRegression(family="multinomial")``;
- mf (rank 10) on MovieLens ratings (userId, movieId, rating; a random 20% held out, seed
  42, as benchmarks/mf_movielens.py splits it); against ``pyspark.ml.recommendation.ALS``
  (rank 10, maxIter 10, regParam 0.1) on the same split, cold-start test rows dropped.

    spark-submit --driver-memory 2g examples/spark_mnist_als.py [--only mnist,als] [--limit N]
    python examples/spark_mnist_als.py                # the same on local[2]

Both sides run with their defaults but rank; prints held-out accuracy or RMSE and the wall
times. ``--mnist DIR`` (default ../shared/data/mnist beside the repository) and ``--ratings
FILE`` (ratings.csv of ml-latest-small) say where the data is; ``--limit N`` keeps the first
N rows of each set (a quick look). Needs ``pip install 'psctl[spark]'`` and Java 17+.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

import psctl.spark
from psctl.data import idx, ratings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas")  # pyspark 4.3 with pandas 3


def mnist_frame(spark: SparkSession, folder: Path, split: str, limit: int | None = None) -> DataFrame:
    """MNIST's ``split`` as a DataFrame: label, px0 .. px783 (pixels 0-255 as shorts), through Arrow."""
    X, y = idx.mnist(folder, split)
    X, y = X[:limit], y[:limit]
    columns = [pa.array(y.astype(np.int64)), *(pa.array(X[:, i].astype(np.int16)) for i in range(X.shape[1]))]
    table = pa.Table.from_arrays(columns, names=["label", *(f"px{i}" for i in range(X.shape[1]))])
    return spark.createDataFrame(table)


def _accuracy(scored: DataFrame) -> float:
    return scored.select(F.avg((F.col("label") == F.col("prediction")).cast("double"))).first()[0]


def mnist(spark: SparkSession, folder: Path, limit: int | None = None, workers: int | None = None, epochs: int | None = None,
          mllib_max_iter: int = 100, peer: bool = True) -> dict[str, Any]:
    """psctl softmax and (with ``peer``) MLlib's multinomial LogisticRegression on one MNIST split: figures of both."""
    workers = workers or spark.sparkContext.defaultParallelism
    started = time.monotonic()
    train, test = (mnist_frame(spark, folder, s, limit).persist() for s in ("train", "test"))
    n_train, n_test = train.count(), test.count()
    load_s = time.monotonic() - started
    out: dict[str, Any] = {"train_rows": n_train, "test_rows": n_test, "load_s": load_s}

    t0 = time.monotonic()
    options = {} if epochs is None else {"epochs": epochs}
    trained = psctl.spark.train(train, "softmax", workers=workers, shards=min(2, workers), **options)
    t1 = time.monotonic()
    accuracy = _accuracy(psctl.spark.predict(test, trained))
    out["psctl"] = {"accuracy": accuracy, "train_s": t1 - t0, "predict_s": time.monotonic() - t1,
                    "epochs": len(trained.meta["history"]["epochs"]), "rows_trained": trained.metrics["rows_trained"]}
    if peer:
        out["mllib"] = _mllib_logreg(train, test, mllib_max_iter)
    train.unpersist()
    test.unpersist()
    return out


def _mllib_logreg(train: DataFrame, test: DataFrame, max_iter: int) -> dict[str, Any]:
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import VectorAssembler

    assembler = VectorAssembler(inputCols=train.columns[1:], outputCol="features")
    t0 = time.monotonic()
    lr = LogisticRegression(family="multinomial", maxIter=max_iter, labelCol="label", featuresCol="features")
    fitted = lr.fit(assembler.transform(train))
    t1 = time.monotonic()
    accuracy = _accuracy(fitted.transform(assembler.transform(test)))
    return {"accuracy": accuracy, "train_s": t1 - t0, "predict_s": time.monotonic() - t1, "iterations": fitted.summary.totalIterations}


def _rmse(scored: DataFrame) -> tuple[float, int]:
    known = scored.where(~F.isnan("prediction"))  # psctl's cold start: NaN, as coldStartStrategy drop leaves them out
    row = known.select(F.sqrt(F.avg((F.col("rating") - F.col("prediction")) ** 2)), F.count("*")).first()
    return row[0], row[1]


def als(spark: SparkSession, ratings_csv: Path, limit: int | None = None, workers: int | None = None,
        rank: int = 10) -> dict[str, Any]:
    """psctl mf and MLlib's ALS on one random 80/20 split of the ratings: figures of both."""
    from pyspark.ml.recommendation import ALS

    workers = workers or spark.sparkContext.defaultParallelism
    started = time.monotonic()
    table = pyarrow.csv.read_csv(ratings_csv).select(["userId", "movieId", "rating"]).slice(0, limit)
    train_idx, test_idx = ratings.random_split(table.num_rows, 0.2, 42)
    train, test = (spark.createDataFrame(table.take(i)).persist() for i in (train_idx, test_idx))
    out: dict[str, Any] = {"train_rows": train.count(), "test_rows": test.count(), "load_s": time.monotonic() - started}

    t0 = time.monotonic()
    trained = psctl.spark.train(train, "mf", workers=workers, shards=min(2, workers), rank=rank)
    t1 = time.monotonic()
    rmse, rows = _rmse(psctl.spark.predict(test, trained))
    out["psctl"] = {"rmse": rmse, "rows": rows, "train_s": t1 - t0, "predict_s": time.monotonic() - t1,
                    "epochs": len(trained.meta["history"]["epochs"])}

    t0 = time.monotonic()
    fitted = ALS(rank=rank, maxIter=10, regParam=0.1, userCol="userId", itemCol="movieId", ratingCol="rating",
                 coldStartStrategy="drop", seed=42).fit(train)
    t1 = time.monotonic()
    rmse, rows = _rmse(fitted.transform(test))
    out["mllib"] = {"rmse": rmse, "rows": rows, "train_s": t1 - t0, "predict_s": time.monotonic() - t1}
    train.unpersist()
    test.unpersist()
    return out


def _print_mnist(r: dict[str, Any], workers: int) -> None:
    p, m = r["psctl"], r["mllib"]
    print(f"MNIST: {r['train_rows']} training rows, {r['test_rows']} test rows, 785 columns, as DataFrames in {r['load_s']:.1f} s")
    print(f"  psctl softmax, {workers} workers: held-out accuracy {p['accuracy']:.4f}; trained in {p['train_s']:.1f} s "
          f"({p['epochs']} epochs, {p['rows_trained']} rows), predicted in {p['predict_s']:.1f} s")
    print(f"  MLlib LogisticRegression multinomial: held-out accuracy {m['accuracy']:.4f}; trained in {m['train_s']:.1f} s "
          f"({m['iterations']} iterations), predicted in {m['predict_s']:.1f} s")


def _print_als(r: dict[str, Any], workers: int) -> None:
    p, m = r["psctl"], r["mllib"]
    print(f"ratings: {r['train_rows']} training rows, {r['test_rows']} test rows, as DataFrames in {r['load_s']:.1f} s")
    print(f"  psctl mf rank 10, {workers} workers: held-out RMSE {p['rmse']:.4f} ({p['rows']} rows with a known user and item); "
          f"trained in {p['train_s']:.1f} s ({p['epochs']} epochs), predicted in {p['predict_s']:.1f} s")
    print(f"  MLlib ALS rank 10, maxIter 10, regParam 0.1: held-out RMSE {m['rmse']:.4f} ({m['rows']} rows); "
          f"trained in {m['train_s']:.1f} s, predicted in {m['predict_s']:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mnist", type=Path, default=SHARED / "mnist", help="folder of MNIST's four IDX .gz files")
    parser.add_argument("--ratings", type=Path, default=SHARED / "movielens-ml-latest-small" / "ratings.csv")
    parser.add_argument("--only", default="mnist,als", help="mnist, als, or both (comma-separated)")
    parser.add_argument("--limit", type=int, default=None, help="keep the first N rows of each set")
    parser.add_argument("--epochs", type=int, default=None, help="psctl softmax's epochs (default: until converged, up to 20)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if "mnist" in only and not (args.mnist / idx.MNIST_FILES["train"][0]).is_file():
        print(f"MNIST is not in {args.mnist}: pass --mnist DIR, a folder holding {', '.join(sum(idx.MNIST_FILES.values(), ()))}.",
              file=sys.stderr)
        return 2
    if "als" in only and not args.ratings.is_file():
        print(f"the ratings file {args.ratings} does not exist: pass --ratings FILE (MovieLens' ratings.csv).", file=sys.stderr)
        return 2
    sys.stdout.reconfigure(line_buffering=True)  # each workload's lines as it ends, under spark-submit too
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the executors run this Python
    builder = SparkSession.builder.appName("psctl-mnist-als").config("spark.ui.showConsoleProgress", "false")
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # plain python, not spark-submit (which sets --master)
        builder = builder.master("local[2]").config("spark.driver.memory", "2g")
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    workers = spark.sparkContext.defaultParallelism  # a barrier stage needs a task slot per worker
    try:
        if "mnist" in only:
            _print_mnist(mnist(spark, args.mnist, args.limit, workers, args.epochs), workers)
        if "als" in only:
            _print_als(als(spark, args.ratings, args.limit, workers), workers)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
