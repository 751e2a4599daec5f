"""The same data as Parquet, compressed CSV, another delimiter or on object storage trains
and predicts as the plain CSV does: same weights (sync mode, one seed) and predictions.

Object storage is a real S3-compatible server (moto's server mode) on a loopback port,
reached by the real clients (s3fs, botocore) of every psctl process."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import re
import threading

import numpy as np
import pytest

from psctl.apps import predict as predicting
from psctl.apps import serving
from psctl.data import csvfile
from psctl.files import modelfile

from ..conftest import run_psctl, write_logreg_csv
from .test_bad_input import assert_clean_error

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

WORKERS = 4
# Tuned options (no convergence stop) so every run takes the same steps.
TRAIN = ("--workers", str(WORKERS), "--shards", "1", "--mode", "sync", "--optimizer", "sgd", "--lr", "0.3",
         "--epochs", "3", "--batch-size", "16", "--seed", "5")
BUCKET = "psctl-data"
MOTO_START_TIMEOUT_S = 30


def train(data, out, *extra, **kw):
    r = run_psctl("train", "logreg", str(data), *TRAIN, "--out", str(out), *extra, **kw)
    assert r.returncode == 0, r.stderr
    return r


def predict(model, data, out, *extra):
    r = run_psctl("predict", str(model), str(data), "--out", str(out), "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The plain CSV files, their model and predictions."""
    d = tmp_path_factory.mktemp("sources")
    files = {"train": write_logreg_csv(d / "train.csv", rows=240, features=4, seed=7),
             "test": write_logreg_csv(d / "test.csv", rows=60, features=4, seed=8)}
    train(files["train"], d / "ref.npz")
    summary = predict(d / "ref.npz", files["test"], d / "ref-pred.csv")
    return {"dir": d, **files, "model": d / "ref.npz", "pred": d / "ref-pred.csv", "summary": summary}


def assert_same_as_ref(ref, model, pred_csv, summary):
    got, meta = modelfile.load_model(str(model))
    want, _ = modelfile.load_model(str(ref["model"]))
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)  # as the same sync run twice
    assert summary["rows"] == ref["summary"]["rows"] and summary["metrics"] == ref["summary"]["metrics"]
    assert pred_csv.read_text() == ref["pred"].read_text()
    return meta


def as_parquet(csv, path, row_groups):
    """The CSV's values (as psctl parses them) in a Parquet file, one row group per size given."""
    schema = csvfile.read_schema(str(csv))
    X, labels = csvfile.read_csv(str(csv), schema)
    columns = {"label": pa.array(labels.astype(np.int64))}
    columns.update({schema.columns[i]: pa.array(X[:, j]) for j, i in enumerate(schema.feature_indices)})
    table = pa.table({c: columns[c] for c in schema.columns})
    with pq.ParquetWriter(str(path), table.schema) as writer:
        at = 0
        for n in row_groups:
            writer.write_table(table.slice(at, n), row_group_size=max(n, 1))
            at += n
    return path


def csv_row_groups(csv, workers=WORKERS):
    """Row groups as the CSV's partitions: the workers then train the same rows from both."""
    return [p.n_rows for p in csvfile.plan_partitions(str(csv), workers)]


COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}


@pytest.mark.parametrize("suffix", sorted(COMPRESS))
def test_compressed_csv_trains_and_predicts_as_the_plain_file(ref, tmp_path, suffix):
    files = {}
    for name in ("train", "test"):
        files[name] = tmp_path / f"{name}.csv{suffix}"
        files[name].write_bytes(COMPRESS[suffix](ref[name].read_bytes()))
    train(files["train"], tmp_path / "m.npz")
    summary = predict(tmp_path / "m.npz", files["test"], tmp_path / "p.csv", "--workers", "2")
    assert_same_as_ref(ref, tmp_path / "m.npz", tmp_path / "p.csv", summary)


def test_a_delimiter_trains_and_predicts_as_commas(ref, tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text(ref["train"].read_text().replace(",", "\t"))
    semi = tmp_path / "test.txt"
    semi.write_text(ref["test"].read_text().replace(",", ";"))
    train(tsv, tmp_path / "m.npz", "--delimiter", "tab")
    # the model reads tabs by default; another file says its own
    summary = predict(tmp_path / "m.npz", semi, tmp_path / "p.csv", "--delimiter", ";")
    meta = assert_same_as_ref(ref, tmp_path / "m.npz", tmp_path / "p.csv", summary)
    assert meta["schema"]["delimiter"] == "\t"
    tab_test = tmp_path / "test.tsv"
    tab_test.write_text(ref["test"].read_text().replace(",", "\t"))
    again = predict(tmp_path / "m.npz", tab_test, tmp_path / "p2.csv")
    assert (tmp_path / "p2.csv").read_text() == ref["pred"].read_text() and again["rows"] == 60


def test_parquet_trains_and_predicts_as_the_csv(ref, tmp_path):
    data = as_parquet(ref["train"], tmp_path / "train.parquet", csv_row_groups(ref["train"]))
    test = as_parquet(ref["test"], tmp_path / "test.parquet", [25, 35])
    train(data, tmp_path / "m.npz")
    summary = predict(tmp_path / "m.npz", test, tmp_path / "p.csv", "--workers", "2")
    assert_same_as_ref(ref, tmp_path / "m.npz", tmp_path / "p.csv", summary)
    predict(ref["model"], test, tmp_path / "p-ref.csv")  # in one process, a CSV's model on Parquet
    assert (tmp_path / "p-ref.csv").read_text() == ref["pred"].read_text()


def test_each_of_eight_workers_reads_only_its_share_of_a_parquet_dataset(ref, tmp_path, monkeypatch):
    data = write_logreg_csv(tmp_path / "wide.csv", rows=320, features=3, seed=4)
    path = as_parquet(data, tmp_path / "wide.parquet", [20] * 16)
    table = pq.read_table(path)
    # a wide text column the model is told to drop: no worker may read it
    notes = [bytes(row).hex() for row in np.random.default_rng(0).integers(0, 256, (320, 200), dtype=np.uint8)]
    pq.write_table(table.append_column("notes", pa.array(notes)), path, row_group_size=20)
    meta = pq.ParquetFile(path).metadata
    monkeypatch.setenv("PSCTL_LOG", "info")
    monkeypatch.setenv("PSCTL_LOG_DIR", str(tmp_path / "logs"))
    r = run_psctl("train", "logreg", str(path), "--workers", "8", "--shards", "1", "--epochs", "1", "--drop", "notes",
                  "--out", str(tmp_path / "m.npz"))
    assert r.returncode == 0, r.stderr
    reads = {}
    for log in (tmp_path / "logs").glob("worker-*.log"):
        for m in re.finditer(r"partition (\d+) of '[^']*': read row groups \(file:group\) ([\d:, ]+): (\d+) bytes of column chunks",
                             log.read_text()):
            reads[int(m[1])] = ([tuple(map(int, g.split(":"))) for g in m[2].split(", ")], int(m[3]))
    assert sorted(reads) == list(range(8)), r.stderr
    notes = meta.num_columns - 1
    for k, (groups, read) in reads.items():
        assert groups == [(0, 2 * k), (0, 2 * k + 1)]
        own = sum(meta.row_group(g).column(c).total_compressed_size for g in (2 * k, 2 * k + 1) for c in range(notes))
        assert 0 < read <= own, (k, read, own)  # its two row groups' label and feature chunks, nothing else
    assert sum(read for _, read in reads.values()) < path.stat().st_size / 4


# -- object storage: moto's S3 server on a loopback port ------------------------------------
@pytest.fixture(scope="module")
def s3(ref):
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    starter = threading.Thread(target=server.start, daemon=True)  # start() waits unbounded: bound it here
    starter.start()
    starter.join(MOTO_START_TIMEOUT_S)
    assert not starter.is_alive(), f"moto's S3 server did not come up in {MOTO_START_TIMEOUT_S} s"
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)  # every psctl process started by these tests inherits them
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir(BUCKET)
            fs.put(str(ref["train"]), f"{BUCKET}/train.csv")
            fs.put(str(ref["test"]), f"{BUCKET}/test.csv")
            yield fs
    finally:
        server.stop()


def test_s3_csv_trains_and_predicts_as_the_local_file_and_keeps_the_model_there(ref, s3, tmp_path):
    train(f"s3://{BUCKET}/train.csv", f"s3://{BUCKET}/models/m.npz")
    assert s3.exists(f"{BUCKET}/models/m.npz")
    s3.get(f"{BUCKET}/models/m.npz", str(tmp_path / "m.npz"))
    summary = predict(f"s3://{BUCKET}/models/m.npz", f"s3://{BUCKET}/test.csv", tmp_path / "p.csv", "--workers", "2")
    assert_same_as_ref(ref, tmp_path / "m.npz", tmp_path / "p.csv", summary)
    served = serving.FileSource.load("m", f"s3://{BUCKET}/models/m.npz")  # psctl serve m=s3://...
    local = predicting.load_predictor(str(tmp_path / "m.npz"))
    assert served.describe()["path"] == f"s3://{BUCKET}/models/m.npz"
    for name, value in local.params.items():
        np.testing.assert_array_equal(served.loaded.predictor.params[name], value)


def test_s3_compressed_csv_and_parquet_folder_train_as_the_local_file(ref, s3, tmp_path):
    s3.pipe_file(f"{BUCKET}/gz/train.csv.gz", gzip.compress(ref["train"].read_bytes()))
    train(f"s3://{BUCKET}/gz/train.csv.gz", tmp_path / "gz.npz")
    summary = predict(tmp_path / "gz.npz", ref["test"], tmp_path / "gz.csv")
    assert_same_as_ref(ref, tmp_path / "gz.npz", tmp_path / "gz.csv", summary)

    groups = csv_row_groups(ref["train"])  # two files of two row groups: the four partitions
    whole = as_parquet(ref["train"], tmp_path / "all.parquet", groups)
    table = pq.read_table(whole)
    folder = tmp_path / "ds"
    folder.mkdir()
    split = groups[0] + groups[1]
    for name, part, sizes in (("part-0.parquet", table.slice(0, split), groups[:2]), ("part-1.parquet", table.slice(split), groups[2:])):
        with pq.ParquetWriter(str(folder / name), table.schema) as writer:
            at = 0
            for n in sizes:
                writer.write_table(part.slice(at, n), row_group_size=n)
                at += n
        s3.put(str(folder / name), f"{BUCKET}/ds/{name}")
    s3.pipe_file(f"{BUCKET}/ds/_SUCCESS", b"")
    s3.put(str(as_parquet(ref["test"], tmp_path / "test.parquet", [60])), f"{BUCKET}/test.parquet")
    train(f"s3://{BUCKET}/ds", tmp_path / "pq.npz")
    summary = predict(tmp_path / "pq.npz", f"s3://{BUCKET}/test.parquet", tmp_path / "pq.csv")
    assert_same_as_ref(ref, tmp_path / "pq.npz", tmp_path / "pq.csv", summary)


def test_a_missing_bucket_or_object_is_one_sentence(s3, tmp_path):
    r = run_psctl("train", "logreg", "s3://no-such-bucket/train.csv", "--workers", "2", "--epochs", "1")
    assert_clean_error(r, "data file 's3://no-such-bucket/train.csv' does not exist", code=2)
    r = run_psctl("predict", f"s3://{BUCKET}/models/none.npz", f"s3://{BUCKET}/test.csv")
    assert_clean_error(r, f"model file 's3://{BUCKET}/models/none.npz' does not exist", code=2)


def test_an_unreachable_object_store_is_one_sentence(ref, tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    import socket

    with socket.socket() as closed:  # a port with nothing listening
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    r = run_psctl("train", "logreg", "s3://bucket/train.csv", "--workers", "2", "--epochs", "1", timeout_s=90)
    assert_clean_error(r, "cannot read data file 's3://bucket/train.csv': Could not connect to the endpoint URL", code=2)


# -- bad input: one sentence, a non-zero exit, no traceback ------------------------------------
def test_a_corrupt_gzip_is_one_sentence(ref, tmp_path):
    packed = bytearray(gzip.compress(ref["train"].read_bytes()))
    packed[len(packed) // 2] ^= 0xFF
    bad = tmp_path / "train.csv.gz"
    bad.write_bytes(bytes(packed))
    r = run_psctl("train", "logreg", str(bad), "--workers", "2", "--epochs", "1")
    assert_clean_error(r, f"'{bad}' is damaged or not gzip-compressed", code=2)


def test_a_parquet_file_without_a_model_column_is_one_sentence(ref, tmp_path):
    data = as_parquet(ref["train"], tmp_path / "train.parquet", [240])
    pq.write_table(pq.read_table(data).drop_columns(["x2"]), tmp_path / "less.parquet")
    r = run_psctl("predict", str(ref["model"]), str(tmp_path / "less.parquet"))
    assert_clean_error(r, "lacks 1 column(s) the model was trained on: 'x2'", code=2)
    r = run_psctl("train", "logreg", str(data), "--label", "y", "--workers", "2", "--epochs", "1")
    assert_clean_error(r, "label column 'y' is not in", code=2)


def test_a_missing_extra_is_one_sentence_naming_the_pip_install(ref, tmp_path, monkeypatch):
    data = as_parquet(ref["train"], tmp_path / "train.parquet", [240])
    shadow = tmp_path / "shadow" / "pyarrow"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('pyarrow is not installed here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")]))
    r = run_psctl("train", "logreg", str(data), "--workers", "2", "--epochs", "1")
    assert_clean_error(r, "Parquet input needs pyarrow, which is not installed; run: pip install 'psctl[parquet]'", code=2)
