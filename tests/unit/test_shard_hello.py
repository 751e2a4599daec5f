"""A worker id is bound to the connection that holds its session token (issue 13, defect 8):
the shard learns each slot's token from the coordinator (JOB_SETUP, WORKER_JOINED), and a
HELLO as a worker without it is refused, so no other connection takes the worker's place."""

from __future__ import annotations

import numpy as np
import pytest

from psctl.cluster.shard import ShardService
from psctl.errors import RequestError
from psctl.protocol.wire import Message, MsgType


class FakePeer:
    def __init__(self) -> None:
        self.info: dict = {}

    def check_keys(self, n_keys: int) -> None:
        pass

    def admit(self) -> None:
        pass


def setup(sessions: object = None) -> tuple[ShardService, FakePeer]:
    s = ShardService(on_coordinator_lost=lambda: None)
    coordinator = FakePeer()
    s.coordinator = coordinator  # type: ignore[assignment]
    body = {
        "job_id": "j", "tables": [{"name": "w", "rows": 4}], "ranges": {"w": [0, 4]},
        "optimizer": {"name": "sgd", "params": {"lr": 1.0}}, "mode": "async", "workers": [0],
        "sessions": {"0": "token-0"} if sessions is None else sessions,
    }  # fmt: skip
    s.handle(coordinator, Message(MsgType.JOB_SETUP, body))
    return s, coordinator


def hello(s: ShardService, peer: FakePeer, worker: int, **token: str) -> None:
    s.handle(peer, Message(MsgType.HELLO, {"job_id": "j", "role": "worker", "worker_id": worker, **token}))


def push(s: ShardService, peer: FakePeer, clock: int) -> None:
    s.handle(peer, Message(MsgType.PUSH, {"job_id": "j", "tables": ["w"], "clock": clock, "count": 1}, [np.ones(4, np.float32)]))


@pytest.mark.parametrize("token", [{}, {"session": "token-1"}, {"session": "tokén-0"}, {"session": 7}], ids=["none", "wrong", "non-ascii", "not-text"])
def test_a_hello_as_a_live_worker_without_its_token_is_refused_and_evicts_nobody(token):
    s, _ = setup()
    live, intruder = FakePeer(), FakePeer()
    hello(s, live, 0, session="token-0")
    push(s, live, 0)
    with pytest.raises(RequestError, match=r"HELLO as worker 0 needs that worker's session token") as info:
        hello(s, intruder, 0, **token)
    assert info.value.code == "bad_session"
    assert s.workers[0] is live and "worker_id" not in intruder.info
    s.peer_lost(intruder, None)  # the intruder hangs up: the live worker stays in the live set
    push(s, live, 1)
    assert s.state is not None and s.state.gate.clocks == {0: 2}


def test_a_worker_without_a_session_on_this_shard_is_refused():
    s, _ = setup()
    with pytest.raises(RequestError, match="HELLO as worker 1 needs") as info:
        hello(s, FakePeer(), 1, session="token-0")
    assert info.value.code == "bad_session"


def test_worker_joined_hands_over_a_new_token_and_the_old_one_stops_counting():
    s, coordinator = setup()
    s.handle(coordinator, Message(MsgType.WORKER_JOINED, {"job_id": "j", "worker_id": 0, "session": "token-0b", "clock": 3}))
    with pytest.raises(RequestError, match="needs that worker's session token"):
        hello(s, FakePeer(), 0, session="token-0")
    replacement = FakePeer()
    hello(s, replacement, 0, session="token-0b")
    assert s.workers[0] is replacement and s.state is not None and s.state.gate.clocks == {0: 3}
    # A newcomer's token without a clock: it is already in the gate.
    s.handle(coordinator, Message(MsgType.WORKER_JOINED, {"job_id": "j", "worker_id": 0, "session": "token-0c"}))
    assert s.state.gate.clocks == {0: 3}


def test_the_same_token_on_a_new_connection_is_the_worker_reconnecting():
    s, _ = setup()
    first, second = FakePeer(), FakePeer()
    hello(s, first, 0, session="token-0")
    hello(s, second, 0, session="token-0")  # after a roll-back a worker says HELLO on new connections
    assert s.workers[0] is second


@pytest.mark.parametrize("sessions", [["token-0"], {"0": 5}, {"zero": "token-0"}])
def test_a_job_setup_with_malformed_sessions_is_one_sentence(sessions):
    with pytest.raises(RequestError, match="bad job setup"):
        setup(sessions)
