"""A lost worker's partition when no new worker comes: the coordinator's side, message by message.

The test process plays the driver and the workers against a real server, so it
decides exactly when each one steps, finishes and goes away.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from psctl import net
from psctl.cluster.client import ShardClient
from psctl.cluster.session import Session
from psctl.protocol.wire import MsgType

from .cluster import ServerProcess, bare_spec, driver_session, worker_session

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

GRAD = {"w": np.ones(8, dtype=np.float32)}


async def worker(address: str, placed: dict, body: dict | None = None) -> tuple[Session, dict, ShardClient]:
    """A worker played by the test: its session (which keeps the coordinator's events) and shard client."""
    session, reg = await worker_session(address, body=body)
    client = await ShardClient.connect(
        placed["shards"], placed["ranges"], reg["job_id"], {"role": "worker", "worker_id": reg["worker_id"], "session": reg["session"]},
        max_frame_bytes=1 << 20,
    )
    return session, reg, client


async def test_the_last_training_worker_lost_after_the_others_finished_is_taken_over():
    server = ServerProcess(2)
    driver = await driver_session(server.address)
    try:
        spec = {**bare_spec(2, "async"), "failure_timeout_s": 0.3, "heartbeat_interval_s": 0.05}
        job_id = (await driver.submit(spec, timeout_s=30))["job_id"]
        placed = (await driver.request(MsgType.TABLES, {"tables": spec["tables"]}, timeout_s=30)).body
        done_peer, _, done_client = await worker(server.address, placed)
        lost_peer, lost_reg, lost_client = await worker(server.address, placed)
        await done_client.push(GRAD, 0, 1)
        await done_client.leave()
        trained = asyncio.ensure_future(done_peer.request(MsgType.TRAINED, timeout_s=None))
        for clock in range(3):
            await lost_client.push(GRAD, clock, 1)
        lost_client.close()
        lost_peer.close()  # lost after 3 of its steps, while the other worker waits for the end

        # Before, the job ended here without the lost partition's other steps. Now it waits,
        # and after the failure timeout the finished worker is asked to take the partition over.
        event = await done_peer.next_event(timeout_s=10)
        assert event == {"kind": "take_over", "job_id": job_id, "partition": lost_reg["partition_index"]}
        assert not trained.done()
        helper, reg, helper_client = await worker(server.address, placed, {"spare_of": job_id})
        assert reg["partition_index"] == lost_reg["partition_index"] and reg["start_clock"] == 3
        with pytest.raises(net.RemoteError, match="no lost worker's partition is waiting"):
            await worker(server.address, placed, {"spare_of": job_id})
        for clock in range(3, 5):
            await helper_client.push(GRAD, clock, 1)
        await helper_client.leave()
        await asyncio.wait_for(asyncio.gather(trained, helper.request(MsgType.TRAINED, timeout_s=None)), 10)
        for c in (done_client, helper_client):
            c.close()
        status = (await driver.request(MsgType.STATUS, timeout_s=30)).body
        assert [s.get("samples") for s in status["shards"]] == [1 + 5, 1 + 5]  # every step of both partitions
        for peer in (done_peer, helper):
            peer.close()
    finally:
        driver.close()
        server.stop()
