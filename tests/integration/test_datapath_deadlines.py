"""Every wait on the data path is bounded: a shard that stops answering gives a named error, never a hang.

A pull may legitimately wait at the clock gate for longer than the deadline: the client
then pings the shard, and only a shard that answers neither is given up on.
"""

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from psctl import net
from psctl.cluster.client import ShardClient, ShardTimeout
from psctl.protocol.wire import Message, MsgType

from .cluster import ServerProcess, bare_spec, status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ANSWER_TIMEOUT_S = 0.5
RANGES = {"w": [(0, 8)]}


class SilentShard(net.NullService):
    """Answers the connection's first PING (connect() checks it is psctl) and HELLO, then holds
    every pull, takes pushes (sent quiet, they are answered only if they fail) and answers
    later pings unless ``mute``: a push's ack is then never known."""

    quiet_types = frozenset({MsgType.PUSH})

    def __init__(self, mute: bool):
        self.mute = mute
        self.held: list[asyncio.Future[Message]] = []
        self.pings = 0
        self.third_ping = asyncio.Event()
        self.greeted: set[int] = set()  # connections whose first PING was answered

    def handle(self, peer: net.Peer, msg: Message):
        if msg.type is MsgType.PING and id(peer) not in self.greeted:
            self.greeted.add(id(peer))
            return Message(MsgType.PING, {})
        if msg.type is MsgType.HELLO:
            return Message(MsgType.HELLO, {"shard_id": 0, "ranges": RANGES})
        if msg.type is MsgType.PING and not self.mute:
            self.pings += 1
            if self.pings >= 3:
                self.third_ping.set()
            return Message(MsgType.PING, {})
        if msg.type is MsgType.PUSH:
            return None
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.held.append(fut)
        return fut

    def answer(self, msg: Message) -> None:
        for fut in self.held:
            if not fut.done():
                fut.set_result(msg)

    def drop(self) -> None:
        for fut in self.held:
            fut.cancel()


async def silent_shard(mute: bool):
    service = SilentShard(mute)
    server = net.Server(service, max_frame_bytes=1 << 20, name="silent shard")
    host, port = await server.start("127.0.0.1", 0)
    client = await ShardClient.connect(
        [f"{host}:{port}"], RANGES, "j", {"role": "worker", "worker_id": 0},
        max_frame_bytes=1 << 20, answer_timeout_s=ANSWER_TIMEOUT_S,
    )  # fmt: skip
    return service, server, client, f"{host}:{port}"


@pytest.mark.parametrize("what", ["pull", "push"])
async def test_a_shard_that_answers_nothing_gives_a_named_error_within_the_deadline(what):
    service, server, client, address = await silent_shard(mute=True)
    try:
        started = time.monotonic()
        with pytest.raises(ShardTimeout) as info:
            if what == "pull":
                await client.pull(["w"], 0)
            else:
                await client.push({"w": np.ones(8, np.float32)}, 0, 1)
        took_s = time.monotonic() - started
        assert f"shard 0 at {address} did not answer a {what} within 1 s" in str(info.value)
        assert isinstance(info.value, net.ConnectionLost)  # what a worker with a checkpoint recovers from
        assert 2 * ANSWER_TIMEOUT_S <= took_s < 2 * ANSWER_TIMEOUT_S + 10
    finally:
        client.close()
        service.drop()
        await server.close()


async def test_a_pull_held_at_the_gate_by_a_live_shard_waits_past_the_deadline():
    service, server, client, _ = await silent_shard(mute=False)
    try:
        pull = asyncio.ensure_future(client.pull(["w"], 3))
        # three deadlines pass, each ended by an answered ping: the pull is still waiting
        await asyncio.wait_for(service.third_ping.wait(), 30)
        assert not pull.done() and len(service.held) == 1
        service.answer(Message(MsgType.PULL, {"min_clock": 3, "clock": 3}, [np.full(8, 2.0, np.float32)]))
        got = await asyncio.wait_for(pull, 10)
        np.testing.assert_array_equal(got["w"], 2.0)
    finally:
        client.close()
        service.drop()
        await server.close()


@pytest.fixture
def two_shards():
    proc = ServerProcess(2)
    yield proc
    proc.stop()


async def test_a_stopped_shard_process_gives_a_named_error(two_shards):
    address = two_shards.address
    driver = await net.connect(address)
    control = await net.connect(address)
    client = None
    stopped = None
    try:
        spec = bare_spec(1, "async")
        job_id = (await driver.request(MsgType.SUBMIT, {"spec": spec})).body["job_id"]
        placed = (await driver.request(MsgType.TABLES, {"tables": spec["tables"]})).body
        reg = (await control.request(MsgType.REGISTER_WORKER, {"pid": 0, "host": "test"})).body
        client = await ShardClient.connect(
            placed["shards"], placed["ranges"], job_id, {"role": "worker", "worker_id": reg["worker_id"], "session": reg["session"]},
            max_frame_bytes=1 << 20, answer_timeout_s=1.0,
        )  # fmt: skip
        await client.push({"w": np.ones(8, np.float32)}, 0, 1)
        await client.pull(["w"], 1)
        stopped = (await status(placed["shards"][1]))["pid"]
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(ShardTimeout, match=f"shard 1 at {placed['shards'][1]} did not answer a pull within 2 s"):
            await client.pull(["w"], 1)
        assert time.monotonic() - started < 2.0 + 10
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        if client is not None:
            client.close()
        control.close()
        driver.close()
