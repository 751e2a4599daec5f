"""The three update modes over real shard processes on loopback TCP.

The test process plays the driver and two workers through the public client,
so it controls exactly when each worker steps: no sleeps, only conditions.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import numpy as np
import pytest

from psctl import net
from psctl.cluster.client import ShardClient
from psctl.protocol.wire import HEADER, MsgType

from .cluster import ServerProcess, bare_spec, driver_session, equals, status, wait_until, worker_session

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(2)
    yield proc
    proc.stop()


@asynccontextmanager
async def job(address: str, spec: dict):
    """Submit a job and register its workers; yields (clients, shard addresses)."""
    driver = await driver_session(address)
    try:
        submitted = await driver.submit(spec, timeout_s=30)
        placed = (await driver.request(MsgType.TABLES, {"tables": spec["tables"]}, timeout_s=30)).body
        submitted.update(placed)
        clients, controls = [], []
        for _ in range(spec["n_workers"]):
            control, reg = await worker_session(address)
            clients.append(
                await ShardClient.connect(
                    placed["shards"], placed["ranges"], reg["job_id"], {"role": "worker", "worker_id": reg["worker_id"], "session": reg["session"]},
                    max_frame_bytes=1 << 20,
                )
            )
            controls.append(control)
        yield clients, submitted
        for c in clients:
            c.close()
        for c in controls:
            c.close()
        driver.notify(MsgType.JOB_END, {"job_id": submitted["job_id"]})
    finally:
        driver.close()
        await wait_until(lambda: _no_job(address), what="the job to end")


async def _no_job(address: str) -> bool:
    return (await status(address))["job"] is None


async def waiting_pulls(shard: str) -> int:
    return (await status(shard)).get("waiting_pulls", 0)


def pull_all(client: ShardClient, clock: int):
    """Pull at ``clock``; return per-shard replies so the test can read min_clock."""
    futs = [p.request_nowait(MsgType.PULL, {"job_id": client.job_id, "tables": ["w"], "clock": clock}) for p in client.peers]
    return asyncio.gather(*(p.wait_reply(f, 20) for p, f in zip(client.peers, futs)))


GRAD = {"w": np.ones(8, dtype=np.float32)}


async def test_ssp_bound_holds_with_a_slow_worker(server):
    s = 2
    async with job(server.address, bare_spec(2, "ssp", staleness=s)) as (clients, sub):
        fast, slow = clients
        answered = []  # (clock asked, min clock the shard saw when answering)
        for clock in range(s + 1):  # clocks 0..s need nothing from the slow worker
            for reply in await pull_all(fast, clock):
                answered.append((clock, reply.body["min_clock"]))
            await fast.push(GRAD, clock, 1)
        blocked = asyncio.ensure_future(pull_all(fast, s + 1))
        for shard in sub["shards"]:
            await wait_until(lambda shard=shard: equals(waiting_pulls(shard), 1), what="the fast pull to wait at the gate")
        assert not blocked.done()
        # The slow worker sees its own writes and moves one clock: the fast pull may go.
        await pull_all(slow, 0)
        await slow.push(GRAD, 0, 1)
        for reply in await asyncio.wait_for(blocked, 10):
            answered.append((s + 1, reply.body["min_clock"]))
        assert all(min_clock >= clock - s for clock, min_clock in answered), answered
        assert answered[-1] == (s + 1, 1)


async def test_async_pulls_never_wait_for_a_stalled_worker(server):
    async with job(server.address, bare_spec(2, "async")) as (clients, _):
        fast, _stalled = clients
        for clock in range(50):
            await asyncio.wait_for(fast.pull(["w"], clock), 5)
            await fast.push(GRAD, clock, 1)
        w = await fast.pull(["w"], 50)
        np.testing.assert_allclose(w["w"], -0.1 * 50 * np.ones(8), rtol=1e-5)


async def test_sync_applies_the_mean_once_per_clock(server):
    async with job(server.address, bare_spec(2, "sync")) as (clients, _):
        a, b = clients
        await a.push({"w": np.full(8, 1.0, dtype=np.float32)}, 0, 1)
        await b.push({"w": np.full(8, 3.0, dtype=np.float32)}, 0, 3)
        w = await a.pull(["w"], 1)
        np.testing.assert_allclose(w["w"], -0.1 * (1 * 1 + 3 * 3) / 4)


async def test_leaving_worker_unblocks_sync_gate(server):
    async with job(server.address, bare_spec(2, "sync")) as (clients, _):
        a, b = clients
        await a.push(GRAD, 0, 1)
        pending = asyncio.ensure_future(a.pull(["w"], 1))
        await b.leave()  # b had fewer rows: it finished without pushing clock 0
        w = await asyncio.wait_for(pending, 10)
        np.testing.assert_allclose(w["w"], -0.1)


async def test_malformed_frame_gets_error_and_shard_keeps_serving(server):
    async with job(server.address, bare_spec(1, "async")) as (clients, sub):
        (worker,) = clients
        await worker.push(GRAD, 0, 1)
        host, port = net.parse_address(sub["shards"][0])
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 32)
        reply = await asyncio.wait_for(reader.read(), 5)  # read to EOF: the shard closes on us
        writer.close()
        assert reply[:4] == b"PSCT" and reply[5] == MsgType.ERROR
        assert b"bad magic" in reply[HEADER.size :]
        w = await worker.pull(["w"], 1)
        np.testing.assert_allclose(w["w"], -0.1)


async def test_keyed_rows_travel_to_the_shards_that_own_them(server):
    spec = bare_spec(2, "sync", rows=8)
    spec["tables"] = [{"name": "f", "rows": 1000, "dim": 3}]
    async with job(server.address, spec) as (clients, sub):
        a, b = clients
        ka, kb = np.array([1, 499, 500, 999]), np.array([499, 700])
        a.push({"f": np.ones((4, 3), np.float32)}, 0, 1, a.plan({"f": ka}))
        await b.push({"f": np.full((2, 3), 3.0, np.float32)}, 0, 1, b.plan({"f": kb}))
        rows = (await a.pull({"f": np.array([0, 1, 499, 500, 700, 999])}, 1))["f"]
        np.testing.assert_allclose(rows[:, 0], -0.1 * np.array([0, 1, 4, 1, 3, 1]) / 2)
        # only the six rows asked for travelled, plus their keys (u32: the smallest type for 1000 keys)
        assert a.bytes_pulled == 6 * 3 * 4 + 6 * 4
        shards = [await status(addr) for addr in sub["shards"]]
        assert [s["updates"] for s in shards] == [1, 1]
