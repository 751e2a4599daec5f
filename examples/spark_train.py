"""psctl on Spark: the first example (logistic regression on breast cancer), softmax on
digits and mf on ratings, each trained from a DataFrame by psctl's shards and workers
running as Spark barrier tasks, with the coordinator in this driver.

    spark-submit examples/spark_train.py            # --master as you like (local[*] by default)
    python examples/spark_train.py                   # the same on local[2]

Needs ``pip install 'psctl[spark]'`` and Java 17+. Run from the repository's root.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

from pyspark.sql import SparkSession

import psctl.spark

HERE = Path(__file__).resolve().parent
warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas")  # pyspark 4.3 with pandas 3


def main() -> None:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the executors run this Python
    builder = SparkSession.builder.appName("psctl-on-spark").config("spark.ui.showConsoleProgress", "false")
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # plain python, not spark-submit (which sets --master)
        builder = builder.master("local[2]")
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    read = lambda path: spark.read.csv(str(path), header=True, inferSchema=True)  # noqa: E731
    workers = spark.sparkContext.defaultParallelism  # a barrier stage needs a task slot per worker
    try:
        for model, folder in (("logreg", "breast_cancer"), ("softmax", "digits")):
            started = time.monotonic()
            trained = psctl.spark.train(read(HERE / folder / "train.csv"), model, workers=workers, shards=min(2, workers),
                                        out=f"{folder}.npz")
            rows = psctl.spark.predict(read(HERE / folder / "test.csv"), trained).select("label", "prediction").collect()
            accuracy = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
            m = trained.metrics
            print(f"{model} on {folder}: {workers} workers, {len(trained.meta['history']['epochs'])} epochs, "
                  f"{m['rows_trained']} rows trained in {time.monotonic() - started:.1f} s; "
                  f"held-out accuracy {accuracy:.3f} ({len(rows)} rows); model file {folder}.npz")
        started = time.monotonic()
        trained = psctl.spark.train(read(HERE / "ratings" / "train.csv"), "mf", workers=workers, shards=min(2, workers),
                                    rank=10, out="ratings.npz")
        rated = psctl.spark.predict(read(HERE / "ratings" / "test.csv"), trained).select("rating", "prediction").collect()
        known = [(r["rating"], r["prediction"]) for r in rated if r["prediction"] == r["prediction"]]  # NaN: cold start
        rmse = (sum((a - b) ** 2 for a, b in known) / len(known)) ** 0.5
        print(f"mf on ratings: {trained.metrics['rows_trained']} rows trained in {time.monotonic() - started:.1f} s; "
              f"held-out RMSE {rmse:.3f} ({len(known)} of {len(rated)} rows with a known user and item); model file ratings.npz")
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
