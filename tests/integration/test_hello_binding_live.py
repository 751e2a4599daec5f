"""The default cluster does not trust every local user (issue 13, defect 8).

- On a `psctl server` without a secret, another local process said HELLO to a shard as a
  live worker id and took its place; when it hung up the shard dropped the worker from the
  live set and the job failed ("worker 0 is not in the live set"). A worker's HELLO now
  carries its slot's session token, which only the worker was given.
- `psctl train` without `--server` gives its own cluster a fresh random secret: nobody
  without it can connect; `--insecure` keeps the old cluster without one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from psctl import net
from psctl.cluster.client import ShardClient
from psctl.errors import SecurityError
from psctl.protocol import handshake
from psctl.protocol.wire import MsgType

from ..conftest import EXAMPLES
from .cluster import ServerProcess, bare_spec, cluster_children, driver_session, worker_session

pytestmark = pytest.mark.integration

ROWS = 8


@pytest.mark.timeout(90)
async def test_a_hello_as_a_live_worker_from_another_connection_does_not_evict_it():
    server = ServerProcess(1)
    driver = control = worker = None
    try:
        driver = await driver_session(server.address)
        spec = bare_spec(1, "async", rows=ROWS)
        await driver.submit(spec, timeout_s=30)
        placed = (await driver.request(MsgType.TABLES, {"tables": spec["tables"]}, timeout_s=30)).body
        control, reg = await worker_session(server.address)
        job_id, worker_id = reg["job_id"], reg["worker_id"]
        worker = await ShardClient.connect(
            placed["shards"], placed["ranges"], job_id, {"role": "worker", "worker_id": worker_id, "session": reg["session"]},
            max_frame_bytes=1 << 20,
        )  # fmt: skip
        await worker.push({"w": np.ones(ROWS, np.float32)}, 0, 1)
        shard = placed["shards"][0]
        # The reproduction: any local process, no secret needed, says HELLO as that worker id.
        for guess in ({}, {"session": "0" * len(reg["session"])}):
            intruder = await net.connect(shard, what="psctl shard")
            with pytest.raises(net.RemoteError, match=f"HELLO as worker {worker_id} needs that worker's session token") as info:
                await intruder.request(MsgType.HELLO, {"job_id": job_id, "role": "worker", "worker_id": worker_id, **guess}, timeout_s=10)
            assert info.value.code == "bad_session"
            intruder.close()
            await intruder.wait_closed()
        for clock in range(1, 4):  # the live worker was not dropped from the live set
            await worker.push({"w": np.ones(ROWS, np.float32)}, clock, 1)
        np.testing.assert_allclose((await worker.pull(["w"], 4))["w"], -0.1 * 4, rtol=1e-5)
    finally:
        for closing in (worker, control, driver):
            if closing is not None:
                closing.close()
        code, _, err = server.stop()
    assert code == 0 and "Traceback" not in err, err[-3000:]


@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the children's command lines from /proc")
@pytest.mark.parametrize("insecure", [False, True], ids=["default", "insecure"])
async def test_the_embedded_cluster_has_a_fresh_secret_by_default(tmp_path, insecure):
    env = {k: v for k, v in os.environ.items() if k != handshake.SECRET_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-m", "psctl", "train", "logreg", str(EXAMPLES / "breast_cancer" / "train.csv"),
         "--workers", "2", "--shards", "1", "--epochs", "100000", "--out", str(tmp_path / "m.npz"),
         *(["--insecure"] if insecure else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        address = ""
        for line in proc.stdout:  # bounded by the test's timeout
            if line.startswith("cluster up"):
                address = line.split(" at ")[1].strip()
            if line.startswith("epoch 1/"):
                break
        assert address, "psctl train never printed its cluster's address"
        children = cluster_children(proc.pid)
        assert len(children) == 3  # 1 shard, 2 workers
        given = [b"--secret-fd" in (child / "cmdline").read_bytes().split(b"\0") for child in children]
        if insecure:
            assert given == [False] * 3
            anyone = await net.connect(address)  # anyone local may, as before
            await anyone.request(MsgType.PING, timeout_s=10)
            anyone.close()
        else:
            assert given == [True] * 3  # down a pipe, like a given secret
            with pytest.raises(SecurityError, match="refused this process: this psctl process requires authentication"):
                await net.connect(address)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
