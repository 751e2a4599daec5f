"""A real shard refuses poison: a NaN push is refused (nothing applied) while an honest worker goes on."""

from __future__ import annotations

import re

import numpy as np
import pytest

from psctl import net
from psctl.cluster.client import ShardClient
from psctl.protocol.wire import MsgType

from ..conftest import EXAMPLES, run_psctl
from .cluster import ServerProcess, bare_spec, driver_session, status, worker_session

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]



async def test_a_nan_push_is_refused_while_an_honest_worker_keeps_training():
    server = ServerProcess(1)
    driver = await driver_session(server.address)
    controls, clients, ids = [], [], []
    try:
        spec = bare_spec(2, "async")
        await driver.submit(spec, timeout_s=30)
        placed = (await driver.request(MsgType.TABLES, {"tables": spec["tables"]}, timeout_s=30)).body
        for _ in range(2):
            control, reg = await worker_session(server.address)
            controls.append(control)
            ids.append(reg["worker_id"])
            clients.append(
                await ShardClient.connect(
                    placed["shards"], placed["ranges"], reg["job_id"], {"role": "worker", "worker_id": reg["worker_id"], "session": reg["session"]},
                    max_frame_bytes=1 << 20,
                )
            )  # fmt: skip
        honest, poisoner = clients
        nan = np.ones(8, np.float32)
        nan[3] = np.nan
        with pytest.raises(net.RemoteError, match=r"non-finite gradient \(NaN/Inf\)") as info:
            await poisoner.push({"w": nan}, 0, 1)
        assert info.value.code == "non_finite_gradient"
        for clock in range(5):
            await honest.push({"w": np.ones(8, np.float32)}, clock, 1)
        w = (await honest.pull(["w"], 5))["w"]
        np.testing.assert_allclose(w, -0.1 * 5 * np.ones(8), rtol=1e-5)  # only the honest pushes, all finite
        shard = await status(placed["shards"][0])
        assert shard["pushes"] == 5 and shard["nonfinite_pushes"] == {str(ids[1]): 1}, shard
        assert shard["clocks"] == {str(ids[0]): 5, str(ids[1]): 0}  # the poisoner's clock did not move
    finally:
        for c in clients:
            c.close()
        for c in controls:
            c.close()
        driver.close()
        server.stop()


def test_a_worker_whose_push_is_refused_as_non_finite_fails_the_job_naming_itself(tmp_path):
    reg = EXAMPLES / "regression"
    kind = "tests.integration.custom_model:DivergingModel"
    r = run_psctl("train", "custom", str(reg / "train.csv"), "--model-class", kind, "--label", "target", "--workers", "2",
                  "--epochs", "1", "--out", str(tmp_path / "m.npz"))  # fmt: skip
    assert r.returncode != 0
    assert re.search(r"worker \d+ pushed non-finite gradients \(NaN/Inf\): ", r.stderr), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "m.npz").exists()


def test_a_job_whose_every_worker_failed_says_what_the_first_one_raised(tmp_path):
    """"every worker was lost" alone hides the cause; the error names the exception a
    worker process died of (here a user's model that raises in every step)."""
    reg = EXAMPLES / "regression"
    kind = "tests.integration.custom_model:RaisingModel"
    r = run_psctl("train", "custom", str(reg / "train.csv"), "--model-class", kind, "--label", "target", "--workers", "2",
                  "--epochs", "1", "--max-restarts", "0", "--failure-timeout-s", "1", "--out", str(tmp_path / "m.npz"))  # fmt: skip
    assert r.returncode == 4, r.stderr
    assert re.search(r"training failed: every worker was lost.*\(worker process \d exited with code 1: "
                     r"ValueError: boom in the user's loss_grad\)$", r.stderr.strip().splitlines()[-1]), r.stderr  # fmt: skip
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "m.npz").exists()
