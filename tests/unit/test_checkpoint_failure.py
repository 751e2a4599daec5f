"""A checkpoint a shard cannot write (a full disk): the shard reports it at once, the push that
triggered it is not failed, the coordinator tells the driver in one sentence and keeps the last
checkpoint; a halt waiting for that clock fails with the sentence."""

from __future__ import annotations

import asyncio
import errno

import pytest

from psctl.apps.results import checkpoint_failed_line
from psctl.cluster.shard import ShardService, write_error
from psctl.core import coordinator as core
from psctl.core.coordinator import Refuse, WriteManifest
from psctl.files import checkpoint
from psctl.errors import RequestError
from psctl.files.modelfile import ModelFileError
from psctl.protocol.wire import Message, MsgType

from .test_coordinator_handle import checkpoint_at, notified, refused, released, start
from .test_shard_checkpoint_write import WAIT_S, FakePeer, push, setup_body

FULL = "'/ck': No space left on device"


def test_a_failed_save_goes_to_the_driver_and_the_last_checkpoint_stays():
    sim = start(n_shards=2, checkpoint={"dir": "/ck", "every": 10})
    checkpoint_at(sim, 10)
    out = sim(core.Checkpointed("s0", sim.job.job_id, 20, 0))
    out += sim(core.Checkpointed("s1", sim.job.job_id, 20, 1, FULL))
    assert not [e for e in out if isinstance(e, WriteManifest)]
    (event,) = [e for e in sim.driver_events(out) if e["kind"] == "checkpoint_failed"]
    assert event == {
        "kind": "checkpoint_failed", "clock": 20, "shard_index": 1, "dir": "/ck", "last_clock": 10,
        "reason": "checkpoint at clock 20 failed on shard 1: '/ck': No space left on device",
    }  # fmt: skip
    assert checkpoint_failed_line(event) == (
        "checkpoint at clock 20 failed on shard 1: '/ck': No space left on device; training goes on without it, "
        "and the checkpoint at clock 10 stays the one to resume from (--resume /ck)"
    )
    # the job goes on, and the next clock every shard saves is the checkpoint
    assert sim.job.state is core.JobState.RUNNING and sim.job.last_checkpoint == 10
    checkpoint_at(sim, 30)
    assert sim.job.last_checkpoint == 30


def test_a_halt_whose_final_checkpoint_cannot_be_written_fails_with_the_sentence():
    sim = start(checkpoint={"dir": "/ck"})
    out = sim.answer(sim.answer(sim(core.HaltRequested("halt", "d")), MsgType.PAUSE, {"clock": 5}), MsgType.CHECKPOINT, {})
    assert not [e for e in out if isinstance(e, Refuse)]
    out = sim(core.Checkpointed("s0", sim.job.job_id, 5, 0, FULL))
    refusal = refused(out, "halt")
    assert refusal.message == f"checkpoint at clock 5 failed on shard 0: {FULL}" and refusal.code == "checkpoint_failed"


def test_the_server_stopping_a_job_whose_final_checkpoint_fails_says_so():
    sim = start(checkpoint={"dir": "/ck"})
    out = sim.answer(sim(core.ServerStopping("stop", "the psctl server is stopping")), MsgType.PAUSE, {"clock": 6})
    sim.answer(out, MsgType.CHECKPOINT, {})
    out = sim(core.Checkpointed("s0", sim.job.job_id, 6, 0, FULL))
    assert released(out, "stop") == f"job job-1 stopped without a final checkpoint: checkpoint at clock 6 failed on shard 0: {FULL}"
    assert sim.core.job is None
    assert notified(out, MsgType.JOB_CLEAR, "s0")


def test_the_error_names_the_folder_and_the_os_error():
    try:
        raise OSError(errno.ENOSPC, "No space left on device", "/ck/.psctl-model-x.npz")
    except OSError:
        try:
            raise ModelFileError("cannot write model file '/ck/shard-0-clock-5.npz': No space left on device") from None
        except ModelFileError as wrapped:
            assert write_error("/ck", wrapped) == FULL
    assert write_error("/ck", OSError(errno.EFBIG, "File too large")) == "'/ck': File too large"


async def test_the_shard_reports_a_failed_save_at_once_and_the_push_that_triggered_it_is_acked(tmp_path):
    def full_disk(folder, index, clock, arrays, meta):
        raise OSError(errno.ENOSPC, "No space left on device")

    service = ShardService(on_coordinator_lost=lambda: None, write_checkpoint=full_disk)
    coordinator, w0, w1 = FakePeer(), FakePeer(), FakePeer()
    service.coordinator = coordinator  # type: ignore[assignment]
    service.handle(coordinator, Message(MsgType.JOB_SETUP, setup_body(str(tmp_path))))
    for wid, peer in ((0, w0), (1, w1)):
        service.handle(peer, Message(MsgType.HELLO, {"job_id": "j", "role": "worker", "worker_id": wid, "session": f"token-{wid}"}))
    push(service, w0, 0, 1.0)
    assert push(service, w1, 0, 3.0) is None  # this push makes clock 1 due: it is acked, not failed
    await asyncio.wait_for(service.finish_writes(WAIT_S), WAIT_S)
    assert coordinator.notified == [
        (MsgType.CHECKPOINTED, {"job_id": "j", "clock": 1, "shard_index": 0, "error": f"'{tmp_path}': No space left on device"})
    ]
    assert service.checkpoints is not None and service.checkpoints.last_clock is None
    assert not checkpoint.shard_file(tmp_path, 0, 1).exists()
    # training goes on: the next clock is due and tried again
    push(service, w0, 1, 1.0)
    assert push(service, w1, 1, 1.0) is None
    await asyncio.wait_for(service.finish_writes(WAIT_S), WAIT_S)
    assert [b["clock"] for _, b in coordinator.notified] == [1, 2]


def test_a_checkpointed_notice_counts_only_from_the_shard_it_names():
    sim = start(n_shards=2, checkpoint={"dir": "/ck", "every": 10})
    with pytest.raises(RequestError, match="comes from that shard only") as info:
        sim(core.Checkpointed("w0", sim.job.job_id, 20, 0, FULL))  # a worker cannot fail (or make) a checkpoint
    assert info.value.code == "forbidden"
    with pytest.raises(RequestError, match="comes from that shard only"):
        sim(core.Checkpointed("s1", sim.job.job_id, 20, 0))  # nor one shard for another
    with pytest.raises(RequestError, match="comes from that shard only"):
        sim(core.Checkpointed("s0", sim.job.job_id, 20, 5))
