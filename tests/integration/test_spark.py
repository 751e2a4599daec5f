"""psctl.spark on a local[2] Spark application: shards and workers as barrier tasks.

One SparkSession for the module. Each job compares with ``psctl train`` / ``psctl predict``
on the same split; the fault test kills a worker's process mid-training.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyspark")

from psctl.errors import DataError, PsctlError  # noqa: E402

from ..conftest import EXAMPLES, REPO, SHARED_DATA  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    # Each test is one or two Spark jobs of a few seconds; the first also starts the JVM.
    pytest.mark.timeout(300),
    # pyspark 4.3 warns about pandas 3 on every Arrow UDF; psctl.spark uses no pandas.
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
]
BREAST, DIGITS, RATINGS = EXAMPLES / "breast_cancer", EXAMPLES / "digits", EXAMPLES / "ratings"
CHILD = "psctl.cluster.child"
ROWS_PER_EPOCH = 456  # the breast cancer training rows, each trained once per epoch


@pytest.fixture(scope="module")
def spark():
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the executors' Python: this venv's
    from pyspark.sql import SparkSession

    # The JVM's start is most of this module's CPU time. C1 only and the serial collector halve
    # it (8 s against 15-17 s to getOrCreate on 2 cores at load 4-6): under the suite's load the
    # default JVM took the first test past its timeout, and a test interrupted inside a py4j call
    # leaves the gateway broken for every test after it.
    session = (SparkSession.builder.master("local[2]").appName("psctl-tests").config("spark.ui.enabled", "false")
               .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
               .config("spark.sql.shuffle.partitions", "2").getOrCreate())  # fmt: skip
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def ps():
    import psctl.spark

    return psctl.spark


def _csv(spark, path: Path):
    return spark.read.csv(str(path), header=True, inferSchema=True)


def _psctl(*args: str) -> dict:
    """``psctl ARGS --json``'s object (the CLI, in a process of its own)."""
    r = subprocess.run([sys.executable, "-m", "psctl", *args, "--json"], capture_output=True, text=True, timeout=100, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def _children(address: str) -> list[int]:
    """Pids of psctl child processes of the job whose coordinator is at ``address``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if CHILD.encode() in cmd and address.encode() in cmd:
            pids.append(int(entry.name))
    return pids


def _none_left(address: str, timeout_s: float = 10.0) -> list[int]:
    """The job's psctl processes still running after ``timeout_s`` (they exit as the coordinator closes)."""
    deadline = time.monotonic() + timeout_s
    while (left := _children(address)) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a condition with a deadline, not waiting for a time
    return left


class Events(list):
    def __call__(self, event: dict) -> None:
        self.append(event)

    @property
    def address(self) -> str:
        return next(e["address"] for e in self if e["kind"] == "cluster_up")


def _accuracy(spark, ps, model, test: Path) -> float:
    rows = ps.predict(_csv(spark, test), model).select("label", "prediction").collect()
    return float(np.mean([r["label"] == r["prediction"] for r in rows]))


@pytest.fixture(scope="module")
def breast_model(spark, ps, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("spark") / "breast.npz")
    events = Events()
    model = ps.train(_csv(spark, BREAST / "train.csv"), "logreg", workers=2, out=out, on_event=events)
    return model, out, events


def test_logreg_from_a_dataframe_matches_psctl_train(spark, ps, breast_model, tmp_path):
    model, out, events = breast_model
    assert model.metrics["rows_trained"] == ROWS_PER_EPOCH * len(model.meta["history"]["epochs"])  # every row, every epoch
    cli = _psctl("train", "logreg", str(BREAST / "train.csv"), "--workers", "2", "--out", str(tmp_path / "cli.npz"))
    theirs = _psctl("predict", str(tmp_path / "cli.npz"), str(BREAST / "test.csv"))["metrics"]["accuracy"]
    ours = _accuracy(spark, ps, model, BREAST / "test.csv")
    assert ours >= 0.97 and abs(ours - theirs) <= 0.02, (ours, theirs, cli["metrics"])
    assert _none_left(events.address) == []  # the tasks' shards and workers ended with the job


def test_spark_predict_equals_psctl_predict(spark, ps, breast_model, tmp_path):
    model, out, _ = breast_model
    result = _psctl("predict", out, str(BREAST / "test.csv"), "--out", str(tmp_path / "p.csv"))
    with open(tmp_path / "p.csv") as fh:
        theirs = list(csv.DictReader(fh))
    test = _csv(spark, BREAST / "test.csv").coalesce(1)  # the file's row order
    for source in (out, model):  # a model file's path, and the trained model itself
        rows = ps.predict(test, source).select("prediction", "probability").collect()
        assert [str(r["prediction"]) for r in rows] == [t["predicted"] for t in theirs]
        np.testing.assert_allclose([r["probability"][1] for r in rows], [float(t["probability"]) for t in theirs], atol=1e-6)
    assert result["rows"] == len(theirs)


def test_softmax_on_digits_matches_psctl_train(spark, ps, tmp_path):
    model = ps.train(_csv(spark, DIGITS / "train.csv"), "softmax", workers=2)
    cli = _psctl("train", "softmax", str(DIGITS / "train.csv"), "--workers", "2", "--out", str(tmp_path / "cli.npz"))
    theirs = _psctl("predict", str(tmp_path / "cli.npz"), str(DIGITS / "test.csv"))["metrics"]["accuracy"]
    ours = _accuracy(spark, ps, model, DIGITS / "test.csv")
    assert ours >= 0.95 and abs(ours - theirs) <= 0.015, (ours, theirs, cli["metrics"])
    probs = ps.predict(_csv(spark, DIGITS / "test.csv").limit(5), model).collect()
    assert all(len(r["probability"]) == 10 and abs(sum(r["probability"]) - 1) < 1e-6 for r in probs)


def test_mf_from_a_ratings_dataframe_matches_psctl_train_mf(spark, ps, tmp_path):
    ratings = _csv(spark, RATINGS / "train.csv")
    ps.train(ratings, "mf", workers=2, out=str(tmp_path / "spark.npz"))
    _psctl("train", "mf", str(RATINGS / "train.csv"), "--workers", "2", "--out", str(tmp_path / "cli.npz"))
    ours = _psctl("predict", str(tmp_path / "spark.npz"), str(RATINGS / "test.csv"))["metrics"]["rmse"]
    theirs = _psctl("predict", str(tmp_path / "cli.npz"), str(RATINGS / "test.csv"))["metrics"]["rmse"]
    assert abs(ours - theirs) <= 0.02, (ours, theirs)
    # psctl.spark.predict rates the pairs as psctl predict does
    rated = ps.predict(_csv(spark, RATINGS / "test.csv").coalesce(1), str(tmp_path / "spark.npz")).collect()
    truth = np.array([r["rating"] for r in rated])
    got = np.array([r["prediction"] for r in rated])
    known = ~np.isnan(got)
    assert abs(float(np.sqrt(np.mean((got[known] - truth[known]) ** 2))) - ours) <= 1e-6


def test_workers_reading_the_files_themselves(spark, ps):
    events = Events()
    model = ps.train(str(BREAST / "train.csv"), "logreg", workers=2, on_event=events)
    assert model.metrics["rows_trained"] == ROWS_PER_EPOCH * len(model.meta["history"]["epochs"])
    assert _accuracy(spark, ps, model, BREAST / "test.csv") >= 0.97
    assert _none_left(events.address) == []


@pytest.mark.fault
def test_a_killed_worker_process_is_replaced_and_every_row_trained(spark, ps):
    epochs = 6
    events = Events()
    killed: list[int] = []

    def on_event(event: dict) -> None:
        events(event)
        if event["kind"] == "epoch" and not killed:  # mid-training: epochs 2.. are still to come
            pid = next(e["pid"] for e in events if e["kind"] == "worker_joined" and e["partition"] == 0)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    model = ps.train(_csv(spark, BREAST / "train.csv"), "logreg", workers=2, epochs=epochs, batch_size=4, on_event=on_event)
    assert killed
    assert model.metrics["lost_workers"] == [0]  # the ids of the workers lost
    assert any(e["kind"] == "worker_joined" and e["replacing"] and e["partition"] == 0 for e in events)
    assert model.metrics["rows_trained"] == ROWS_PER_EPOCH * epochs  # every row once per epoch, as the shards counted
    assert _none_left(events.address) == []


def test_an_interrupted_driver_leaves_no_psctl_process(spark, ps):
    events = Events()

    def on_event(event: dict) -> None:
        events(event)
        if event["kind"] == "epoch":
            raise KeyboardInterrupt  # Ctrl-C in the driver, mid-training

    with pytest.raises(KeyboardInterrupt):
        ps.train(_csv(spark, BREAST / "train.csv"), "logreg", workers=2, epochs=50, batch_size=4, on_event=on_event)
    assert _none_left(events.address) == []
    assert spark.range(3).count() == 3  # the application goes on


@pytest.mark.parametrize(
    ("columns", "kwargs", "message"),
    [
        ("a DOUBLE, b DOUBLE", {}, "no column 'label'"),
        ("label INT, a DOUBLE, b STRING", {}, "feature column 'b' is string, not numeric"),
        ("label INT, a DOUBLE", {"features": ["a", "c"]}, "no column 'c'"),
        ("userId INT, rating DOUBLE", {"model": "mf"}, "no column 'movieId'"),
    ],
)
def test_bad_columns_are_one_sentence(spark, ps, columns, kwargs, message):
    df = spark.createDataFrame([], columns)
    with pytest.raises(DataError, match=message):
        ps.train(df, **kwargs)


def test_an_empty_dataframe_and_missing_values_are_one_sentence(spark, ps):
    with pytest.raises(DataError, match="the DataFrame has no rows"):
        ps.train(spark.createDataFrame([], "label INT, a DOUBLE"), workers=2)
    with pytest.raises(DataError, match="column 'a' has missing values"):
        ps.train(spark.createDataFrame([(0, 1.0), (1, None)], "label INT, a DOUBLE"), workers=2)
    with pytest.raises(PsctlError, match="task slots"):
        ps.train(spark.createDataFrame([(0, 1.0)], "label INT, a DOUBLE"), workers=3)


def test_a_job_that_fails_on_the_cluster_is_one_sentence(spark, ps):
    events = Events()
    with pytest.raises(DataError, match="logreg needs exactly two label values; found 10"):
        ps.train(_csv(spark, DIGITS / "train.csv"), "logreg", workers=2, on_event=events)
    assert _none_left(events.address) == []


def test_a_missing_extra_names_the_pip_install():
    code = "import sys; sys.modules['pyspark'] = None\ntry:\n import psctl.spark\nexcept ImportError as e:\n print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "psctl.spark needs pyspark: run pip install 'psctl[spark]'"


def test_the_mnist_example_on_a_small_subset(spark):
    """examples/spark_mnist_als.py's MNIST path (DataFrames of 785 columns from the IDX files,
    psctl softmax trained and predicting) on the first 600 rows of each set. MLlib's side is left
    out: it doubled the test's time (10 s under load) and tests Spark, not psctl."""
    mnist = SHARED_DATA / "mnist"
    if not (mnist / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST is not in {mnist} (../shared/data beside the repository)")
    spec = importlib.util.spec_from_file_location("spark_mnist_als", EXAMPLES / "spark_mnist_als.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    r = example.mnist(spark, mnist, limit=600, workers=2, epochs=2, peer=False)
    assert (r["train_rows"], r["test_rows"]) == (600, 600)
    assert r["psctl"]["rows_trained"] == 600 * 2  # every row, both epochs
    assert r["psctl"]["accuracy"] >= 0.75, r


def test_hashed_categorical_columns_train_as_psctl_train_categorical(spark, ps, tmp_path):
    """String columns named in ``categorical`` are hashed as ``psctl train --categorical`` hashes a
    CSV's: the model file has the same input description, and both models score alike."""
    from .test_sparse_cli import write_hashed

    train, test = write_hashed(tmp_path / "train.csv", 800, seed=1), write_hashed(tmp_path / "test.csv", 300, seed=2)
    flags = dict(label="click", categorical=["site", "user"], hash_bits=20)
    ps.train(_csv(spark, train), "logreg", workers=2, out=str(tmp_path / "spark.npz"), **flags)
    _psctl("train", "logreg", str(train), "--label", "click", "--categorical", "site,user", "--hash-bits", "20",
           "--workers", "2", "--out", str(tmp_path / "cli.npz"))  # fmt: skip
    from psctl.files import modelfile

    ours_meta, theirs_meta = (modelfile.load_model(str(tmp_path / f"{n}.npz"))[1] for n in ("spark", "cli"))
    assert ours_meta["input"] == theirs_meta["input"] == {"format": "hashed_csv", "hash_bits": 20, "categorical": ["site", "user"]}
    ours = _psctl("predict", str(tmp_path / "spark.npz"), str(test))["metrics"]["accuracy"]
    theirs = _psctl("predict", str(tmp_path / "cli.npz"), str(test))["metrics"]["accuracy"]
    assert ours >= 0.8 and abs(ours - theirs) <= 0.03, (ours, theirs)
    # psctl.spark.predict hashes the DataFrame's columns as psctl predict hashes the file's
    rows = ps.predict(_csv(spark, test).coalesce(1), str(tmp_path / "spark.npz")).collect()
    hits = sum(int(r["prediction"]) == int(r["click"]) for r in rows)
    assert abs(hits / len(rows) - ours) <= 1e-9, (hits, len(rows), ours)


def test_predict_from_a_model_kept_on_a_server(spark, ps, tmp_path):
    """``(address, name)`` of a dense model kept on a psctl server predicts as its model file does;
    a kept model read per row (hashed) is refused in one sentence naming the way that works."""
    from .cluster import ServerProcess
    from .test_sparse_cli import write_hashed

    server = ServerProcess(1)
    try:
        out = tmp_path / "kept.npz"
        _psctl("train", "logreg", str(BREAST / "train.csv"), "--server", server.address, "--workers", "2", "--epochs", "2",
               "--keep", "bc", "--out", str(out))  # fmt: skip
        test = _csv(spark, BREAST / "test.csv").coalesce(1)
        kept = ps.predict(test, (server.address, "bc")).select("prediction", "probability").collect()
        filed = ps.predict(test, str(out)).select("prediction", "probability").collect()
        assert [r["prediction"] for r in kept] == [r["prediction"] for r in filed]
        np.testing.assert_allclose([r["probability"][1] for r in kept], [r["probability"][1] for r in filed], atol=1e-6)
        hashed = write_hashed(tmp_path / "h.csv", 200, seed=1)
        _psctl("train", "logreg", str(hashed), "--label", "click", "--categorical", "site,user", "--server", server.address,
               "--workers", "2", "--epochs", "1", "--keep", "ctr")  # fmt: skip
        with pytest.raises(PsctlError, match="kept model ctr reads its rows per call .*predict from its model file on Spark"):
            ps.predict(_csv(spark, hashed), (server.address, "ctr"))
    finally:
        code, _, err = server.stop(timeout_s=30)
    assert code == 0 and "Traceback" not in err, err
