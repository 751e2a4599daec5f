"""A checkpoint is snapshotted on the loop and written in a thread: the shard serves pulls and pushes meanwhile.

The shard service is driven frame by frame with in-memory peers (no sockets); the
write is made slow by a hook that holds it until the test lets it go.
"""

import asyncio
import threading

import numpy as np

from psctl.cluster import shard
from psctl.cluster.shard import ShardService
from psctl.files import checkpoint
from psctl.protocol.wire import Message, MsgType

WAIT_S = 20.0


class FakePeer:
    def __init__(self) -> None:
        self.info: dict = {}
        self.notified: list[tuple[MsgType, dict]] = []
        self.is_open = True

    def check_keys(self, n_keys: int) -> None:
        pass

    def admit(self) -> None:
        pass

    def notify(self, kind: MsgType, body: dict | None = None, arrays=None) -> None:
        self.notified.append((kind, body or {}))


def setup_body(folder: str) -> dict:
    return {
        "job_id": "j",
        "tables": [{"name": "w", "rows": 8}],
        "ranges": {"w": [0, 8]},
        "optimizer": {"name": "sgd", "params": {"lr": 0.5}},
        "mode": "sync",
        "workers": [0, 1],
        "sessions": {"0": "token-0", "1": "token-1"},
        "checkpoint": {"dir": folder, "every": 1},
    }


def push(service, peer, clock: int, value: float):
    msg = Message(MsgType.PUSH, {"job_id": "j", "tables": ["w"], "clock": clock, "count": 1}, [np.full(8, value, np.float32)])
    return service.handle(peer, msg)


async def test_a_pull_and_a_push_are_served_while_a_checkpoint_is_being_written(tmp_path):
    started, release = threading.Event(), threading.Event()

    def slow_write(folder, index, clock, arrays, meta):
        started.set()
        assert release.wait(WAIT_S), "the test never released the write"
        shard._write_checkpoint(folder, index, clock, arrays, meta)

    service = ShardService(on_coordinator_lost=lambda: None, write_checkpoint=slow_write)
    coordinator, w0, w1 = FakePeer(), FakePeer(), FakePeer()
    service.coordinator = coordinator  # type: ignore[assignment]
    service.handle(coordinator, Message(MsgType.JOB_SETUP, setup_body(str(tmp_path))))
    for wid, peer in ((0, w0), (1, w1)):
        service.handle(peer, Message(MsgType.HELLO, {"job_id": "j", "role": "worker", "worker_id": wid, "session": f"token-{wid}"}))

    # clock 0 complete on both workers: the sync mean is applied and the checkpoint at clock 1 starts
    push(service, w0, 0, 1.0)
    push(service, w1, 0, 3.0)
    assert await asyncio.wait_for(asyncio.to_thread(started.wait, WAIT_S), WAIT_S), "the write never started"

    # the write is held in its thread; the loop still answers a pull at once and takes a push
    reply = service.handle(w0, Message(MsgType.PULL, {"job_id": "j", "tables": ["w"], "clock": 1}))
    assert isinstance(reply, Message)
    np.testing.assert_allclose(reply.arrays[0], -0.5 * 2.0)
    assert push(service, w0, 1, 2.0) is None
    assert push(service, w1, 1, 2.0) is None  # clock 1 applied on the tables while clock 1's file is written
    assert not any(kind is MsgType.CHECKPOINTED for kind, _ in coordinator.notified)
    assert not checkpoint.shard_file(tmp_path, 0, 1).exists()
    assert service.checkpoints is not None and service.checkpoints.last_clock is None

    release.set()
    await service.finish_writes(WAIT_S)
    reported = [body["clock"] for kind, body in coordinator.notified if kind is MsgType.CHECKPOINTED]
    assert reported == [1, 2]  # in clock order, each once its file was done
    arrays, meta = checkpoint.load_shard(tmp_path, 0, 1)
    # the file holds the tables as they were at clock 1, not the later push
    np.testing.assert_allclose(arrays["w/values"], -1.0)
    np.testing.assert_allclose(checkpoint.load_shard(tmp_path, 0, 2)[0]["w/values"], -2.0)
    assert meta["updates"] == 1 and service.checkpoints.last_clock == 2


async def test_a_failed_write_is_logged_and_reported_with_its_error(tmp_path, caplog):
    def failing_write(folder, index, clock, arrays, meta):
        raise OSError("disk full")

    service = ShardService(on_coordinator_lost=lambda: None, write_checkpoint=failing_write)
    coordinator, w0, w1 = FakePeer(), FakePeer(), FakePeer()
    service.coordinator = coordinator  # type: ignore[assignment]
    service.handle(coordinator, Message(MsgType.JOB_SETUP, setup_body(str(tmp_path))))
    for wid, peer in ((0, w0), (1, w1)):
        service.handle(peer, Message(MsgType.HELLO, {"job_id": "j", "role": "worker", "worker_id": wid, "session": f"token-{wid}"}))
    push(service, w0, 0, 1.0)
    push(service, w1, 0, 1.0)
    await service.finish_writes(WAIT_S)
    # reported, so the coordinator keeps the last checkpoint and tells the driver (issue 13, defect 3)
    assert coordinator.notified == [
        (MsgType.CHECKPOINTED, {"job_id": "j", "clock": 1, "shard_index": 0, "error": f"'{tmp_path}': disk full"})
    ]
    assert f"the checkpoint at clock 1 failed: '{tmp_path}': disk full" in caplog.text
