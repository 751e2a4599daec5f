"""Models kept on a running server (psctl train --keep, psctl models, psctl predict --server),
with real processes on loopback: `psctl server`, `psctl train`, `psctl predict`, `psctl models`."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from psctl.apps.results import json_safe
from psctl.files import modelfile

from ..conftest import EVERY_SHARD, EXAMPLES, psctl_json, run_psctl
from .cluster import ServerProcess
from .test_bad_input import assert_clean_error
from .test_sparse_cli import write_hashed

TRAIN = EXAMPLES / "breast_cancer" / "train.csv"
TEST = EXAMPLES / "breast_cancer" / "test.csv"


@pytest.fixture
def server():
    server = ServerProcess(2)
    yield server
    code, _, err = server.stop(timeout_s=30)
    assert code == 0 and "Traceback" not in err, err


def train(server: ServerProcess, *args: str) -> dict:
    return psctl_json("train", *args, "--server", server.address, "--workers", "2", "--epochs", "2", timeout_s=240)


def models(server: ServerProcess) -> list[dict]:
    return json.loads(ok(run_psctl("models", "--server", server.address, "--json")).stdout)


def ok(r):
    assert r.returncode == 0, r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout
    return r


def same_predictions(tmp_path, server, name: str, model_file, data) -> tuple[dict, dict]:
    """Predict ``data`` from the file and from the kept model: the files and metrics are equal."""
    from_file = psctl_json("predict", str(model_file), str(data), "--out", str(tmp_path / "file.csv"))
    live = psctl_json("predict", name, str(data), "--server", server.address, "--out", str(tmp_path / "live.csv"))
    assert (tmp_path / "live.csv").read_bytes() == (tmp_path / "file.csv").read_bytes()
    assert live["metrics"] == from_file["metrics"] and live["rows"] == from_file["rows"]
    for key in ("unknown_features", "cold_start"):  # what the model had no weight for, counted the same way
        assert live.get(key) == from_file.get(key), key
    return from_file, live


def same_with_workers(tmp_path, server, name: str, data, workers: int = 3) -> dict:
    """``--server --workers N``: each worker reads its own byte range and pulls its rows' keys;
    the predictions file and metrics are one process's (same_predictions wrote file.csv)."""
    spread = psctl_json("predict", name, str(data), "--server", server.address, "--workers", str(workers),
                        "--out", str(tmp_path / "spread.csv"))  # fmt: skip
    assert (tmp_path / "spread.csv").read_bytes() == (tmp_path / "file.csv").read_bytes()
    alone = psctl_json("predict", name, str(data), "--server", server.address)
    assert spread["metrics"] == alone["metrics"] and spread["rows"] == alone["rows"]
    return spread


@pytest.mark.timeout(600)
def test_a_kept_model_is_listed_predicted_from_and_dropped(tmp_path, server):
    model = tmp_path / "bc.npz"
    train(server, "logreg", str(TRAIN), "--keep", "bc", "--out", str(model))
    (row,) = models(server)
    assert (row["name"], row["kind"], row["state"]) == ("bc", "logreg", "kept")
    # 31 float32 weights: the job put them on one of the two shards (--min-shard-bytes).
    assert [(s["index"], s["keys"], s["bytes"]) for s in row["shards"]] == [(0, 31, 4 * 31)]
    assert abs(row["trained_at"] - time.time()) < 600 and row["metrics"]["train_accuracy"] > 0.8
    human = ok(run_psctl("models", "--server", server.address)).stdout
    assert "bc" in human and "logreg" in human and "kept" in human

    _, live = same_predictions(tmp_path, server, "bc", model, TEST)
    assert live["pulled"]["keys_pulled"] == 31  # a dense model is read once, whole

    # A second job may not take the name, unless it replaces the model.
    r = run_psctl("train", "logreg", str(TRAIN), "--server", server.address, "--keep", "bc", "--epochs", "1",
                  "--workers", "1", "--out", str(tmp_path / "x.npz"), timeout_s=240)  # fmt: skip
    assert_clean_error(r, "a model named 'bc' is kept on this server already")
    model2 = tmp_path / "bc2.npz"
    train(server, "logreg", str(TRAIN), "--keep", "bc", "--replace", "--lr", "0.5", *EVERY_SHARD, "--out", str(model2))
    (row2,) = models(server)
    assert row2["version"] != row["version"] and [s["keys"] for s in row2["shards"]] == [15, 16]
    same_predictions(tmp_path, server, "bc", model2, TEST)

    dropped = ok(run_psctl("models", "--server", server.address, "--drop", "bc"))
    assert "dropped model bc: its parts on 2 shards are freed" in dropped.stdout
    assert models(server) == []
    status = psctl_json("status", "--server", server.address)
    assert all(s["kept"] == [] for s in status["shards"])  # the shards hold nothing of it any more
    assert_clean_error(run_psctl("models", "--server", server.address, "--drop", "bc"), "no model named 'bc' is kept on this server")
    assert_clean_error(run_psctl("predict", "bc", str(TEST), "--server", server.address), "no model named 'bc' is kept on this server")


@pytest.mark.timeout(600)
def test_a_hashed_2_pow_32_model_is_read_only_where_the_rows_touch_it(tmp_path, server):
    data = write_hashed(tmp_path / "train.csv", 600, seed=1)
    model = tmp_path / "ctr.npz"
    train(server, "logreg", str(data), "--label", "click", "--categorical", "site,user", "--hash-bits", "32",
          "--optimizer", "ftrl", "--lr", "1", "--keep", "ctr", "--out", str(model))  # fmt: skip
    (row,) = models(server)
    stored = sum(s["keys"] for s in row["shards"])
    assert 600 < stored <= 600 + 20 + 2
    test = write_hashed(tmp_path / "test.csv", 50, seed=2)
    _, live = same_predictions(tmp_path, server, "ctr", model, test)
    # 50 rows touch at most 50 users, 20 sites, the price and the bias: never the 2^32 keys,
    # nor even the ~620 stored ones.
    touched = live["pulled"]["keys_pulled"]

    assert 20 < touched <= 50 + 20 + 2, live["pulled"]
    assert live["pulled"]["bytes_pulled"] <= touched * (4 + 1), live["pulled"]  # float32 values and a stored flag each
    (row,) = models(server)
    assert sum(s["keys_pulled"] for s in row["shards"]) == touched  # the shards counted the same reads
    spread = same_with_workers(tmp_path, server, "ctr", test)
    # three workers: each its own rows' keys (a site or the bias may be pulled by two or three)
    assert touched <= spread["pulled"]["keys_pulled"] <= touched + 2 * (20 + 2), spread["pulled"]

    # The Python API hashes a DataFrame's cells as training did and reads only the keys they touch.
    import asyncio

    import pandas as pd

    import psctl

    expected = psctl.predict(str(model), str(test)).outputs

    async def from_python() -> tuple[np.ndarray, np.ndarray, dict]:
        async with await psctl.ServerModel.load(server.address, "ctr") as kept:
            frame = pd.read_csv(test, dtype=str, keep_default_na=False)
            cells = frame[["site", "user", "price"]].to_numpy()
            got = await kept.predict(frame), await kept.predict(cells), dict(kept.counters)
            with pytest.raises(psctl.PsctlError, match="row 0, column 'price': 'abc' is not a finite number"):
                await kept.predict([["site1.com", "u1", "abc"]])
            return got

    from_frame, from_cells, counters = asyncio.run(from_python())
    np.testing.assert_allclose(from_frame, expected, rtol=1e-12)
    np.testing.assert_array_equal(from_cells, from_frame)
    assert counters["keys_pulled"] == 2 * touched  # two calls, each only the keys its rows touch

    # Batch by batch (a few rows each): the same outputs and metrics as the model file, each
    # batch pulling only its own rows' keys (so more pulls in all, never the whole model).
    from psctl.apps import kept as kept_app

    file_pred = psctl.predict(str(model), str(test))
    pred, pulled = asyncio.run(kept_app.predict(server.address, "ctr", str(test), batch_bytes=300))
    np.testing.assert_array_equal(pred.outputs, file_pred.outputs)
    assert json_safe(pred.metrics) == json_safe(file_pred.metrics) and pred.unknown == file_pred.unknown
    assert touched < pulled["keys_pulled"] <= 50 * (1 + 1 + 2), pulled


@pytest.mark.timeout(600)
def test_an_mf_model_predicts_the_same_from_the_server(tmp_path, server):
    model = tmp_path / "mf.npz"
    train(server, "mf", str(EXAMPLES / "ratings" / "train.csv"), "--rank", "4", "--keep", "films", "--out", str(model))
    test = EXAMPLES / "ratings" / "test.csv"
    _, live = same_predictions(tmp_path, server, "films", model, test)
    same_with_workers(tmp_path, server, "films", test)
    params = modelfile.load_model(str(model))[1]["model_params"]
    users, items = params["users"], params["items"]
    # Only the rows of the users and items the test file names (factors and biases), not the whole tables.
    assert live["pulled"]["keys_pulled"] < 2 * (users + items), (live["pulled"], users, items)

    # The kept meta carries the training ratings' range, and the predictions are clipped to it.
    (row,) = models(server)
    stats = np.loadtxt(EXAMPLES / "ratings" / "train.csv", delimiter=",", skiprows=1, usecols=2)
    import asyncio

    from psctl.apps import kept as kept_app
    from psctl.apps import predict as predicting

    async def meta() -> dict:
        async with await kept_app.KeptModel.open(server.address, "films") as k:
            return k.meta

    options = asyncio.run(meta())["model_params"]
    assert (options["rating_min"], options["rating_max"]) == (stats.min(), stats.max())
    # Several batches, each pulling its own users and items: the same as the file, clipped.
    file_pred = predicting.predict(str(model), str(test))
    pred, _ = asyncio.run(kept_app.predict(server.address, "films", str(test), batch_bytes=2000))
    np.testing.assert_array_equal(pred.outputs, file_pred.outputs)
    assert json_safe(pred.metrics) == json_safe(file_pred.metrics) and pred.cold_start == file_pred.cold_start
    finite = pred.outputs[np.isfinite(pred.outputs)]
    assert finite.min() >= stats.min() and finite.max() <= stats.max()
    # Two worker processes, several batches each (consecutive byte ranges): the same again.
    spread, pulled = kept_app.predict_spread(server.address, "films", str(test), 2, batch_bytes=2000)
    np.testing.assert_array_equal(spread.outputs, file_pred.outputs)
    assert json_safe(spread.metrics) == json_safe(file_pred.metrics) and spread.cold_start == file_pred.cold_start
    assert 0 < pulled["keys_pulled"] < 2 * 2 * (users + items), pulled


@pytest.mark.timeout(600)
def test_a_kept_model_survives_a_killed_shard_with_checkpoints_on(tmp_path, server):
    model = tmp_path / "bc.npz"
    folder = tmp_path / "ck"
    train(server, "logreg", str(TRAIN), "--keep", "bc", "--checkpoint-dir", str(folder), *EVERY_SHARD, "--out", str(model))
    assert len(list((folder / "kept").glob("bc-*-shard-*.npz"))) == 2
    before = psctl_json("status", "--server", server.address)["shards"]
    os.kill(before[1]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:  # each round trip is the wait: psctl models asks every shard
        (row,) = models(server)
        addresses = [s["address"] for s in row["shards"]]
        if row["state"] == "kept" and before[1]["address"] not in addresses:
            break
        assert time.monotonic() < deadline, row
    assert row["shards"][1]["keys"] == 16
    same_predictions(tmp_path, server, "bc", model, TEST)
    ok(run_psctl("models", "--server", server.address, "--drop", "bc"))
    assert list((folder / "kept").glob("*.npz")) == []  # dropping removes the parts' files too


@pytest.mark.timeout(300)
def test_keep_is_refused_in_one_sentence_where_it_cannot_work(tmp_path, server):
    r = run_psctl("train", "logreg", str(TRAIN), "--keep", "bc", "--out", str(tmp_path / "m.npz"))
    assert_clean_error(r, "--keep leaves the model on a running server (--server HOST:PORT)")
    r = run_psctl("train", "logreg", str(TRAIN), "--server", server.address, "--keep", "no/slash")
    assert_clean_error(r, "--keep: a kept model's name is 1 to 64 letters")
    r = run_psctl("train", "logreg", str(TRAIN), "--replace")
    assert_clean_error(r, "--replace is for --keep NAME")
    assert models(server) == []
    assert "no models are kept on" in ok(run_psctl("models", "--server", server.address)).stdout
    shard = psctl_json("status", "--server", server.address)["shards"][0]["address"]
    assert_clean_error(run_psctl("models", "--server", shard), "is a psctl process but not a coordinator")
    np.testing.assert_equal(models(server), [])
    r = run_psctl("predict", "bc", str(TEST), "--server", server.address, "--workers", "2")
    assert_clean_error(r, "no model named 'bc' is kept on this server")
    r = run_psctl("predict", "bc", str(TEST), "--server", server.address, "--failure-timeout-s", "2")
    assert_clean_error(r, "--failure-timeout-s is how long a silent predict worker is waited for; it needs --workers N")
    r = run_psctl("predict", "films", "--user", "1", "--item", "2", "--server", server.address)
    assert_clean_error(r, "--user/--item read a model file")


@pytest.mark.timeout(600)
async def test_the_python_api_predicts_a_numpy_array_and_a_dataframe_from_a_kept_model(tmp_path, server):
    import pandas as pd

    import psctl
    from psctl.apps.predict import schema_for
    from psctl.data import csvfile

    model = tmp_path / "bc.npz"
    films = tmp_path / "mf.npz"
    train(server, "logreg", str(TRAIN), "--keep", "bc", "--out", str(model))
    train(server, "mf", str(EXAMPLES / "ratings" / "train.csv"), "--rank", "4", "--keep", "films", "--out", str(films))
    from_file = psctl.predict(str(model), str(TEST))
    async with await psctl.ServerModel.load(server.address, "bc") as kept:
        X, _ = csvfile.read_csv(str(TEST), schema_for(from_file.meta, str(TEST)))
        np.testing.assert_array_equal(await kept.predict(X), from_file.outputs)
        frame = pd.read_csv(TEST)  # pandas' float parser may round the last bit of a value otherwise
        np.testing.assert_allclose(await kept.predict(frame), from_file.outputs, rtol=1e-12)
        assert await kept.predict_labels(frame) == list(from_file.predicted)
        assert kept.counters["keys_pulled"] == 31  # read once, at load
        with pytest.raises(psctl.PsctlError, match="takes rows of 30 values"):
            await kept.predict(np.ones((2, 3)))
        with pytest.raises(psctl.PsctlError, match="lack 1 column"):
            await kept.predict(frame.drop(columns=["mean_radius"]))
    rated = psctl.predict(str(films), str(EXAMPLES / "ratings" / "test.csv"))
    async with await psctl.ServerModel.load(server.address, "films") as kept:
        assert kept.columns == ["userId", "movieId"]
        got = await kept.predict(rated.ids)
        np.testing.assert_array_equal(got, rated.outputs)
        frame = pd.read_csv(EXAMPLES / "ratings" / "test.csv").head(3)
        np.testing.assert_array_equal(await kept.predict(frame), rated.outputs[:3])
        assert np.isnan(await kept.predict([["no-such-user", "1"]])).all()
    with pytest.raises(psctl.PsctlError, match="no model named 'nope'"):
        await psctl.ServerModel.load(server.address, "nope")


@pytest.mark.timeout(600)
async def test_a_kept_model_trained_further_is_read_with_fresh_weights_while_it_trains(tmp_path, server):
    import asyncio
    import sys

    from psctl.apps.kept import KeptModel, KeptModelError

    from ..conftest import REPO

    data = write_hashed(tmp_path / "train.csv", 600, seed=1)
    more = write_hashed(tmp_path / "more.csv", 600, seed=5)
    hashed = ["--label", "click", "--categorical", "site,user", "--hash-bits", "32", "--optimizer", "ftrl", "--lr", "1"]
    train(server, "logreg", str(data), *hashed, "--keep", "ctr", "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "a.npz"))
    (first,) = models(server)
    sites = np.array([2**32 - 1], dtype=np.int64)  # the bias key, which every row touches
    async with await KeptModel.open(server.address, "ctr") as reader:
        (before, _), = (await reader.rows({"w": sites})).values()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "psctl", "train", "logreg", str(more), *hashed, "--server", server.address,
            "--workers", "2", "--epochs", "40", "--batch-size", "8", "--resume-from", "ctr",
            "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "b.npz"), "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        seen_while_training = False
        while proc.returncode is None:  # each read is a round trip to the shards: the wait between tries
            try:
                (now, _), = (await reader.rows({"w": sites})).values()
            except KeptModelError:  # the job ended and the old version was freed
                break
            if now[0] != before[0] and proc.returncode is None:
                seen_while_training = True
                break
        out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, err.decode()
    assert seen_while_training
    (second,) = models(server)
    assert second["version"] != first["version"] and second["state"] == "kept"
    assert [p.name for p in sorted((tmp_path / "ck" / "kept").glob("*.npz"))] == [
        f"ctr-{second['version']}-shard-{i}.npz" for i in range(2)]  # the old version's files are gone
    same_predictions(tmp_path, server, "ctr", tmp_path / "b.npz", write_hashed(tmp_path / "test.csv", 50, seed=2))
    r = run_psctl("train", "logreg", str(TRAIN), "--server", server.address, "--resume-from", "ctr", "--no-standardize")
    assert_clean_error(r, "kept model ctr reads")
