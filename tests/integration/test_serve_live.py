"""psctl serve --server: models kept on a live psctl server, served over HTTP with fresh weights.

Real processes on loopback: `psctl server`, `psctl train --keep` and `--resume-from`,
`psctl serve --server`, and an aiohttp client."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

import psctl

from ..conftest import EXAMPLES, REPO, psctl_json, run_psctl
from .cluster import ServerProcess
from .test_bad_input import assert_clean_error
from .test_serve import ServeProcess, get, post, read_rows
from .test_sparse_cli import write_hashed

aiohttp = pytest.importorskip("aiohttp", reason="psctl serve needs the serve extra: pip install -e '.[serve]'")

pytestmark = [pytest.mark.integration]

TRAIN = EXAMPLES / "breast_cancer" / "train.csv"
TEST = EXAMPLES / "breast_cancer" / "test.csv"
REFRESH_S = 0.2
# --resume-from needs unstandardized features (new data would standardize differently).
LOGREG = ["logreg", str(TRAIN), "--no-standardize", "--lr", "0.01"]


@pytest.fixture
def server():
    server = ServerProcess(2)
    yield server
    server.stop(timeout_s=30)


def train(server: ServerProcess, *args: str) -> dict:
    return psctl_json("train", *args, "--server", server.address, "--workers", "2", timeout_s=240)


def file_probabilities(model) -> list[float]:
    """What psctl predict gives for the model file (in this process: the wait for the new
    version's answers starts when the job ends)."""
    return [float(p) for p in psctl.predict(str(model), str(TEST)).outputs]


async def served_probabilities(session, url: str, rows) -> list[float]:
    status, body = await post(session, f"{url}/v1/models/bc:predict", {"instances": rows})
    assert status == 200, body
    return [p["probability"] for p in body["predictions"]]


@pytest.mark.timeout(600)
async def test_a_kept_model_trained_further_is_served_with_its_new_weights_within_the_refresh(tmp_path, server):
    first = tmp_path / "a.npz"
    train(server, *LOGREG, "--epochs", "2", "--keep", "bc", "--out", str(first))
    (row,) = psctl_json("models", "--server", server.address)
    served = ServeProcess("bc", "--server", server.address, "--refresh-s", str(REFRESH_S), "--port", "0")
    try:
        columns, rows = read_rows(TEST, "label")
        async with aiohttp.ClientSession() as s:
            status, meta = await get(s, f"{served.url}/v1/models/bc")
            assert status == 200 and meta["columns"] == columns and meta["kind"] == "logreg"
            source = meta["source"]
            assert (source["kind"], source["address"], source["model"], source["version"]) == ("server", server.address, "bc", row["version"])
            assert source["refresh_s"] == REFRESH_S and source["stale"] is False and source["weights_age_s"] < 60
            # the same numbers as psctl predict on the model file the job wrote
            before = await served_probabilities(s, served.url, rows)
            assert before == file_probabilities(first)

            # Train it further in place while it is served: the answers change while the job runs...
            second = tmp_path / "b.npz"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "psctl", "train", *LOGREG, "--server", server.address, "--workers", "2",
                "--epochs", "60", "--batch-size", "4", "--resume-from", "bc", "--out", str(second), "--json",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
            )  # fmt: skip
            changed_while_training = False
            while proc.returncode is None:  # each request is a round trip to psctl serve: the wait between tries
                if await served_probabilities(s, served.url, rows) != before and proc.returncode is None:
                    changed_while_training = True
                    break
            out, err = await asyncio.wait_for(proc.communicate(), 300)
            assert proc.returncode == 0, err.decode()
            ended = time.monotonic()
            assert changed_while_training, "psctl serve answered with the old weights for the whole job"

            # ...and once it ends (the name moves to a new version), the next read follows it:
            # the answers are the new model file's within the refresh and one read.
            expected = file_probabilities(second)
            while await served_probabilities(s, served.url, rows) != expected:
                assert time.monotonic() - ended < REFRESH_S + 30, "psctl serve did not catch up with the new version"
            caught_up_s = time.monotonic() - ended
            (now,) = psctl_json("models", "--server", server.address)
            status, meta = await get(s, f"{served.url}/v1/models/bc")
            assert meta["source"]["version"] == now["version"] != row["version"] and meta["source"]["stale"] is False
            print(f"served the new version {caught_up_s:.2f} s after the job ended (refresh {REFRESH_S} s)")

            # The server goes away: the last weights are still answered, marked stale, and the health check says so.
            code, _, _ = server.stop(timeout_s=30)
            assert code == 0
            deadline = time.monotonic() + 60
            while not (meta := (await get(s, f"{served.url}/v1/models/bc"))[1])["source"]["stale"]:
                assert time.monotonic() < deadline, "psctl serve never noticed its server was gone"
            assert any(why in meta["source"]["refresh_error"] for why in ("closed", "cannot reach")), meta["source"]
            status, body = await get(s, f"{served.url}/v1/health")
            assert status == 503 and body == {"status": "stale", "models": 1, "stale": ["bc"]}
            assert await served_probabilities(s, served.url, rows) == expected
            status, later = await get(s, f"{served.url}/v1/models/bc")
            assert later["source"]["stale"] and later["source"]["weights_as_of"] == meta["source"]["weights_as_of"]
            assert later["source"]["version"] == now["version"]  # of the weights it answers with
    finally:
        code, out, err = served.stop()
    assert code == 0 and "psctl serve stopped" in out and "Traceback" not in err, err
    assert "answering with the weights of" in err  # the failed read was logged, once
    assert err.count("answering with the weights of") == 1, err


@pytest.mark.timeout(600)
async def test_a_kept_mf_model_is_served_as_its_file_predicts(tmp_path, server):
    model = tmp_path / "films.npz"
    train(server, "mf", str(EXAMPLES / "ratings" / "train.csv"), "--epochs", "2", "--rank", "4", "--keep", "films", "--out", str(model))
    served = ServeProcess("films", "--server", server.address, "--port", "0")
    try:
        async with aiohttp.ClientSession() as s:
            status, body = await post(s, f"{served.url}/v1/models/films:predict", {"instances": [[2, 5579], ["7", "no-such-film"]]})
            assert status == 200, body
            status, top = await post(s, f"{served.url}/v1/models/films:recommend", {"user": 7, "top": 3})
            assert status == 200 and len(top["items"]) == 3, top
    finally:
        code, _, err = served.stop()
    assert code == 0 and "Traceback" not in err, err
    one = psctl_json("predict", str(model), "--user", "2", "--item", "5579")
    assert body["predictions"] == [{"rating": pytest.approx(one["predicted_rating"], rel=1e-12), "known": True},
                                   {"rating": None, "known": False}]  # fmt: skip
    expected = psctl_json("recommend", str(model), "--user", "7", "--top", "3")
    assert [i["item"] for i in top["items"]] == [str(i["item"]) for i in expected["items"]]


@pytest.mark.timeout(600)
def test_what_psctl_serve_server_refuses_is_one_sentence(tmp_path, server):
    def refused(*args: str, sentence: str, code: int = 2) -> None:
        r = run_psctl("serve", *args, "--port", "0", timeout_s=60)
        assert_clean_error(r, sentence)
        assert r.returncode == code, r.stderr

    refused("bc", "--server", server.address, sentence="no model named 'bc' is kept on this server")
    refused("bc", "--refresh-s", "1", sentence="--refresh-s, --secret-file, --tls-ca and --handshake-timeout-s are for serving kept models")
    refused("bc", "--server", server.address, "--refresh-s", "0", sentence="--refresh-s must be at least 0.05")
    refused("a/b", "--server", server.address, sentence="'a/b' cannot be a kept model's name")
    refused("x=bc", "x=cd", "--server", server.address, sentence="two models are served as 'x'")
    # a sparse kept model: psctl predict NAME --server reads it by key; serve refuses it at start
    data = write_hashed(tmp_path / "train.csv", 200, seed=1)
    train(server, "logreg", str(data), "--label", "click", "--categorical", "site,user", "--hash-bits", "20",
          "--epochs", "1", "--keep", "ctr", "--out", str(tmp_path / "ctr.npz"))  # fmt: skip
    refused("ctr", "--server", server.address, sentence="kept model 'ctr' is a sparse model; psctl serve answers for dense and mf models")
