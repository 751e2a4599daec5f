"""The Python API: a custom loop over real shard processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from psctl.apps.api import Job, KVWorker, LocalServer, TableSpec
from psctl.errors import PsctlError

from ..conftest import EXAMPLES, REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def test_example_learns_the_true_weights():
    r = subprocess.run([sys.executable, str(EXAMPLES / "api_custom_loop.py")], capture_output=True, text=True,
                       timeout=80, cwd=REPO)
    assert r.returncode == 0, r.stderr
    learned = np.array(r.stdout.split("learned:")[1].split("\n")[0].strip(" []").split(), dtype=float)
    np.testing.assert_allclose(learned, [2, -1, 0.5, 3, 0, 1], atol=0.05)


async def test_sync_sparse_rows_and_clock_only_ticks():
    async with LocalServer(shards=2) as server:
        async with await Job.submit(server.address, [TableSpec("emb", 100, dim=2)], workers=2, mode="sync", lr=1.0) as job:
            # join returns once every worker of the job has joined: join them together
            a, b = await asyncio.gather(KVWorker.join(server.address), KVWorker.join(server.address))
            a.push("emb", np.ones((2, 2), np.float32), keys=np.array([3, 70]))
            await a.clock()
            await b.clock()  # b pushes nothing this clock; the shards still learn its clock
            rows = await a.pull("emb", keys=np.array([3, 4, 70]))
            np.testing.assert_allclose(rows[:, 0], [-0.5, 0.0, -0.5])  # the mean over both workers' samples
            with pytest.raises(PsctlError, match="unknown table 'w'"):
                await a.pull("w")
            await a.close()
            await b.close()
            final = await job.wait(timeout_s=30)
            assert final["emb"].shape == (100, 2)


async def test_sync_adds_per_key_sums_and_refuses_a_mean_in_the_same_clock():
    """clock(sums=True): the shards add both workers' sums for a key (3 and 70 on two shards),
    where batch means would be averaged; a mean pushed into a clock of sums is refused."""
    async with LocalServer(shards=2) as server:
        async with await Job.submit(server.address, [TableSpec("emb", 100, dim=2)], workers=2, mode="sync", lr=1.0) as job:
            a, b = await asyncio.gather(KVWorker.join(server.address), KVWorker.join(server.address))
            a.push("emb", np.ones((2, 2), np.float32), keys=np.array([3, 70]))
            b.push("emb", np.full((1, 2), 2.0, np.float32), keys=np.array([70]))
            await a.clock(count=16, sums=True)
            await b.clock(count=16, sums=True)
            rows = await a.pull("emb", keys=np.array([3, 4, 70]))
            np.testing.assert_allclose(rows[:, 0], [-1.0, 0.0, -3.0])  # summed, whatever the counts
            a.push("emb", np.ones((1, 2), np.float32), keys=np.array([3]))
            b.push("emb", np.ones((1, 2), np.float32), keys=np.array([3]))
            await a.clock(sums=True)
            await b.clock()  # a mean into clock 1, which holds a's sums
            with pytest.raises(PsctlError, match="clock 1 holds per-key sums"):
                await b.pull("emb", keys=np.array([3]))
            await a.close()
            await b.close()
            await job.wait(timeout_s=30)


KV_WORKER = """
import asyncio, sys, time
import numpy as np
from psctl.apps.api import KVWorker

async def main(address, compute_s):
    async with await KVWorker.join(address) as kv:
        for _ in range(2):
            await kv.pull("w")
            time.sleep(compute_s)  # the user's compute: it holds the event loop the whole time
            kv.push("w", np.ones(4, np.float32))
            await kv.clock()
    print("trained", kv.clock_value)

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


@pytest.mark.timeout(120)
async def test_a_kvworker_computing_three_failure_timeouts_between_calls_stays_live():
    from .cluster import ServerProcess

    failure_timeout_s = 1.0
    server = ServerProcess(1)
    try:
        async with await Job.submit(
            server.address, [TableSpec("w", 4)], workers=1, mode="async", lr=0.5,
            heartbeat_interval_s=0.2, failure_timeout_s=failure_timeout_s,
        ) as job:  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", KV_WORKER, server.address, str(3 * failure_timeout_s),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 90)
            assert proc.returncode == 0 and b"trained 2" in out, err.decode()
            final = await job.wait(timeout_s=30)  # JobError ("every worker was lost") before the fix
            np.testing.assert_allclose(final["w"], -0.5 * 2)
    finally:
        server.stop()
