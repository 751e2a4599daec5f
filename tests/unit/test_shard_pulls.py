"""Pulls parked at the shard's clock gate: checked on arrival, answered each on its own, dropped with
their connection and capped per connection.

The shard service is driven frame by frame with in-memory peers (no sockets)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from psctl.cluster import shard
from psctl.cluster.shard import ShardService
from psctl.core.shard_errors import BadKeys
from psctl.core.shard_state import ShardState
from psctl.errors import RequestError
from psctl.protocol.wire import Message, MsgType


class FakePeer:
    def __init__(self) -> None:
        self.info: dict = {}

    def check_keys(self, n_keys: int) -> None:
        pass

    def admit(self) -> None:
        pass


def service(workers=(0, 1, 2), mode: str = "sync") -> tuple[ShardService, list[FakePeer]]:
    s = ShardService(on_coordinator_lost=lambda: None)
    coordinator = FakePeer()
    s.coordinator = coordinator  # type: ignore[assignment]
    body = {
        "job_id": "j",
        "tables": [{"name": "w", "rows": 8}, {"name": "s", "rows": 2**20, "sparse": True}],
        "ranges": {"w": [0, 8], "s": [0, 2**20]},
        "optimizer": {"name": "sgd", "params": {"lr": 0.5}},
        "mode": mode,
        "workers": list(workers),
        "sessions": {str(w): f"token-{w}" for w in workers},
    }
    s.handle(coordinator, Message(MsgType.JOB_SETUP, body))
    peers = []
    for w in workers:
        p = FakePeer()
        s.handle(p, Message(MsgType.HELLO, {"job_id": "j", "role": "worker", "worker_id": w, "session": f"token-{w}"}))
        peers.append(p)
    return s, peers


def push(s: ShardService, peer: FakePeer, clock: int):
    msg = Message(MsgType.PUSH, {"job_id": "j", "tables": ["w"], "clock": clock, "count": 1}, [np.ones(8, np.float32)])
    return s.handle(peer, msg)


def pull(s: ShardService, peer: FakePeer, clock: int, tables=("w",), keys=None):
    body = {"job_id": "j", "tables": list(tables), "clock": clock, "keyed": keys is not None}
    return s.handle(peer, Message(MsgType.PULL, body, list(keys or [])))


async def test_a_whole_table_pull_of_a_sparse_table_is_refused_when_it_arrives_not_when_released():
    s, (a, b, c) = service()
    push(s, a, 0)
    with pytest.raises(BadKeys, match="sparse"):
        pull(s, a, 1, tables=("s",))  # would wait for clock 1: refused now, not parked
    good = pull(s, c, 1)
    assert isinstance(good, asyncio.Future) and s.state.gate.waiting() == 1
    push(s, c, 0)
    assert push(s, b, 0) is None  # b's push opens the gate and is acked as usual
    reply = good.result()
    np.testing.assert_allclose(reply.arrays[0], -0.5)


async def test_a_parked_pull_that_fails_when_answered_fails_alone(monkeypatch):
    s, (a, b, c) = service()
    push(s, a, 0)
    push(s, c, 0)
    first, second = pull(s, a, 1), pull(s, c, 1)
    real_read = ShardState.read

    def read(self, names, keys=None, rows=None):
        if not read.failed:  # the first pull released fails to be read
            read.failed = True
            raise RequestError("reading failed", "test_fault")
        return real_read(self, names, keys, rows)

    read.failed = False
    monkeypatch.setattr(ShardState, "read", read)
    assert push(s, b, 0) is None  # not the pulls' error: b's push was applied and is acked
    assert s.state.gate.clocks[b.info["worker_id"]] == 1
    with pytest.raises(RequestError, match="reading failed"):
        first.result()
    np.testing.assert_allclose(second.result().arrays[0], -0.5)  # the other released pull is answered


async def settle() -> None:
    """Let the loop run the futures' done callbacks (call_soon)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_closed_connections_parked_pulls_leave_the_gate():
    s, (a, b, c) = service()
    push(s, a, 0)
    futs = [pull(s, a, 1), pull(s, a, 2)]
    kept = pull(s, c, 1)
    assert s.state.gate.waiting() == 3
    s.peer_lost(a, None)  # a's connection closed (a also leaves the live set)
    assert s.state.gate.waiting() == 1
    assert all(f.cancelled() for f in futs)
    await settle()
    assert s.handle(FakePeer(), Message(MsgType.STATUS, {})).body["waiting_pulls"] == 1
    push(s, c, 0)
    push(s, b, 0)
    np.testing.assert_allclose(kept.result().arrays[0], -0.5)


async def test_parked_pulls_are_capped_per_connection():
    s, (a, b, c) = service()
    cap = shard.MAX_PARKED_PULLS_PER_CONNECTION
    futs = [pull(s, a, 1 + i) for i in range(cap)]
    with pytest.raises(RequestError, match=f"already has {cap} pulls waiting") as info:
        pull(s, a, 1)
    assert info.value.code == "busy"
    assert isinstance(pull(s, c, 1), asyncio.Future)  # another connection is not held to a's count
    assert isinstance(pull(s, a, 0), Message)  # a pull the gate lets through now does not count
    for w in (a, b, c):
        push(s, w, 0)  # answers a's pull at clock 1: room for one more
    await settle()
    assert futs[0].done()
    assert isinstance(pull(s, a, 5), asyncio.Future)
