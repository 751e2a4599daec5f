"""The statistics pass unions the workers' id vocabularies: an in-process coordinator on
loopback TCP, with the test playing a shard, the driver and two workers."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import numpy as np
import pytest

from psctl import net
from psctl.cluster.coordinator import start_coordinator
from psctl.data import vocab
from psctl.protocol.wire import Message, MsgType

from psctl.cluster.session import Session

from .cluster import bare_spec, driver_session, worker_session

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DEADLINE_S = 10


class FakeShard(net.NullService):
    def handle(self, peer: net.Peer, msg: Message) -> net.Reply:
        return None  # JOB_SETUP, JOB_CLEAR, WORKER_LEFT: accepted


async def next_event(driver: Session, kind: str) -> dict:
    """The driver's next event of ``kind``."""
    while (event := await driver.next_event(timeout_s=DEADLINE_S))["kind"] != kind:
        pass
    return event


@asynccontextmanager
async def two_workers():
    """A coordinator, a fake shard, a driver with a submitted job, two registered workers."""
    server, _, address = await start_coordinator(max_frame_bytes=1 << 20)
    peers = []
    try:
        shard = await net.connect(address, FakeShard())
        peers.append(shard)
        await shard.request(MsgType.REGISTER_SHARD, {"address": "127.0.0.1:9", "pid": 0})
        driver = await driver_session(address, keep_events=True, decode=lambda msg: vocab.attach(msg.body, msg.arrays))
        peers.append(driver)
        await driver.submit(bare_spec(2, "sync"), timeout_s=DEADLINE_S)
        workers = []
        for _ in range(2):
            w, _ = await worker_session(address)
            peers.append(w)
            workers.append(w)
        yield driver, workers
    finally:
        for p in peers:
            p.close()
        await server.close()


def stats(users: list[str], items: list[str]) -> tuple[dict, list[np.ndarray]]:
    names, arrays = vocab.to_message({"user": users, "item": items})
    return {"stats": None, "labels": [], "vocab": names}, arrays


async def test_driver_and_workers_get_the_same_sorted_union():
    async with two_workers() as (driver, (w0, w1)):
        r0 = asyncio.ensure_future(w0.request(MsgType.STATS, *stats(["u3", "u1"], ["7", "10"]), timeout_s=DEADLINE_S))
        r1 = asyncio.ensure_future(w1.request(MsgType.STATS, *stats(["u2", "u1"], ["010", "8"]), timeout_s=DEADLINE_S))
        event = await next_event(driver, "stats")
        assert event["vocab"]["user"].ids.tolist() == ["u1", "u2", "u3"]
        assert event["vocab"]["item"].kind == "int" and event["vocab"]["item"].ids.tolist() == [7, 8, 10]
        assert not r0.done()  # replies wait for the tables
        await driver.request(MsgType.TABLES, {"tables": [{"name": "w", "rows": 3}]}, timeout_s=DEADLINE_S)
        for reply in await asyncio.gather(r0, r1):
            union = vocab.from_message(reply.body, reply.arrays)
            assert union["user"].tolist() == ["u1", "u2", "u3"]
            assert union["item"].tolist() == ["010", "10", "7", "8"]  # text; Vocab reads "010" as 10
            assert reply.body["ranges"] == {"w": [[0, 3]]}


async def test_a_union_past_the_limit_fails_the_job_with_one_sentence(monkeypatch):
    monkeypatch.setattr(vocab, "MAX_VOCAB_SIZE", 3)
    async with two_workers() as (driver, (w0, w1)):
        replies = await asyncio.gather(
            w0.request(MsgType.STATS, *stats(["a", "b"], ["1"]), timeout_s=DEADLINE_S),
            w1.request(MsgType.STATS, *stats(["c", "d"], ["1"]), timeout_s=DEADLINE_S),
            return_exceptions=True,
        )
        assert all(isinstance(r, net.RemoteError) for r in replies), replies
        failed = await next_event(driver, "failed")
        assert "more than 3 distinct 'user' ids" in failed["reason"]


async def test_a_vocab_without_its_arrays_is_refused():
    async with two_workers() as (_, (w0, _)):
        body, _ = stats(["a"], ["1"])
        with pytest.raises(net.RemoteError, match="names 2 vocabularies but the message carries 0 arrays"):
            await w0.request(MsgType.STATS, body, [], timeout_s=DEADLINE_S)
