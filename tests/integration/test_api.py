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
