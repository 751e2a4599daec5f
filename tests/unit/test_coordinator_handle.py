"""The coordinator driven through its one entry point, ``CoordinatorState.handle(event, now)``,
with no sockets: connections and requests are plain strings, effects are inspected, and the
answers the core asked for (``Ask``) are fed back as ``Answered`` events."""

from __future__ import annotations

import pytest

from psctl.core import coordinator as core
from psctl.core.coordinator import (
    Abort,
    Answered,
    ArmTimer,
    Ask,
    CoordinatorState,
    JobState,
    KillShard,
    NoAnswer,
    Notify,
    Refuse,
    Release,
    SlotState,
    WriteManifest,
)
from psctl.core.job import JobSpec
from psctl.core.tables import MIN_SHARD_BYTES, TableSpec, shards_needed, table_bytes
from psctl.errors import RequestError
from psctl.protocol.wire import MsgType

TABLES = {"tables": [{"name": "w", "rows": 10}]}


def spec(n_workers: int = 2, **over) -> JobSpec:
    body = {"model": "logreg", "n_workers": n_workers, "mode": "sync", "partitions": [{"i": i} for i in range(n_workers)]}
    # The tables here are tiny: min_shard_bytes 0 spreads them over every shard anyway, so
    # the tests of several shards have several (placement by size has its own tests below).
    body.update(heartbeat_interval_s=0.25, failure_timeout_s=1.0, min_shard_bytes=0)
    return JobSpec.from_wire({**body, **over})


class Sim:
    """The core and a clock; every effect seen is kept."""

    def __init__(self) -> None:
        self.core = CoordinatorState(token=lambda: "token")
        self.now = 0.0
        self.seen: list = []

    def __call__(self, event, dt: float = 0.0) -> list:
        self.now += dt
        if hasattr(event, "conn") and not isinstance(event, core.ConnectionClosed) and event.conn is not None:
            self.core.handle(core.Heard(event.conn), self.now)
        out = self.core.handle(event, self.now)
        self.seen += out
        return out

    def answer(self, effects: list, kind: MsgType, *replies) -> list:
        """Answer the one Ask of ``kind`` in ``effects`` (one reply per target; a single one is repeated)."""
        (ask,) = [e for e in effects if isinstance(e, Ask) and e.kind is kind]
        if len(replies) == 1:
            replies = replies * len(ask.targets)
        return self(Answered(ask.ask, tuple(replies)))

    def fire(self, effects: list, prefix: str) -> list:
        """Fire the latest timer of that kind armed in ``effects``."""
        timer = [e for e in effects if isinstance(e, ArmTimer) and e.timer[0] == prefix][-1]
        return self(core.TimerFired(timer.timer), dt=timer.delay_s)

    def driver_events(self, effects: list | None = None) -> list[dict]:
        return [
            e.body for e in (self.seen if effects is None else effects)
            if isinstance(e, Notify) and e.conns == ("d",) and e.kind is MsgType.EVENT
        ]

    @property
    def job(self) -> core.JobData:
        assert self.core.job is not None
        return self.core.job


def released(effects: list, request: str):
    values = [e.value for e in effects if isinstance(e, Release) and e.handle == request]
    assert len(values) == 1, effects
    return values[0]


def refused(effects: list, request: str) -> Refuse:
    (refusal,) = [e for e in effects if isinstance(e, Refuse) and e.handle == request]
    return refusal


def notified(effects: list, kind: MsgType, conn: str) -> list[dict]:
    return [e.body for e in effects if isinstance(e, Notify) and e.kind is kind and conn in e.conns]


def start(n_workers: int = 2, n_shards: int = 1, tables: bool = True, **over) -> Sim:
    sim = Sim()
    for i in range(n_shards):
        assert released(sim(core.ShardRegistered(f"rs{i}", f"s{i}", f"h:{i}", 100 + i)), f"rs{i}") == {"shard_id": i}
    out = sim(core.JobSubmitted("sub", "d", spec(n_workers, **over)))
    assert released(out, "sub")["shards"] == [f"h:{i}" for i in range(n_shards)]
    for i in range(n_workers):
        reply = released(sim(core.WorkerRegistered(f"rw{i}", f"w{i}", pid=i, host="x")), f"rw{i}")
        assert reply["worker_id"] == i and reply["partition"] == {"i": i} and reply["session"] == "token"
    if tables:
        out = sim(core.TablesGiven("tab", "d", TABLES))
        assert released(sim.answer(out, MsgType.JOB_SETUP, {}), "tab")["ranges"] == {"w": core.table_ranges(core.TableSpec("w", 10), n_shards)}
    return sim


def checkpoint_at(sim: Sim, clock: int) -> list:
    out = []
    for i, _ in enumerate(sim.job.shards):
        out += sim(core.Checkpointed(f"s{i}", sim.job.job_id, clock, i))
    (write,) = [e for e in out if isinstance(e, WriteManifest)]
    assert write.clock == clock and write.manifest["clock"] == clock
    return sim(core.ManifestWritten(sim.job.job_id, clock))


# -- opening a job ------------------------------------------------------------------


def test_submit_waits_for_its_shards_and_gives_up_after_the_shard_wait():
    sim = Sim()
    out = sim(core.JobSubmitted("sub", "d", spec(min_shards=2)))
    assert not [e for e in out if isinstance(e, Release | Refuse)] and sim.core.job is None
    sim(core.ShardRegistered("rs0", "s0", "h:0", 100))
    out = sim.fire(out, "submit")
    assert refused(out, "sub").code == "no_shards" and "only 1 of 2 shards joined within 30 s" in refused(out, "sub").message


def test_submit_opens_the_job_when_the_last_shard_registers():
    sim = Sim()
    armed = sim(core.JobSubmitted("sub", "d", spec(min_shards=2)))
    sim(core.ShardRegistered("rs0", "s0", "h:0", 100))
    out = sim(core.ShardRegistered("rs1", "s1", "h:1", 101))
    assert released(out, "sub")["shards"] == ["h:0", "h:1"] and sim.job.state is JobState.RUNNING
    assert not [e for e in sim.fire(armed, "submit") if isinstance(e, Refuse)]  # the timer finds nothing to refuse
    with pytest.raises(RequestError, match="still running") as info:
        sim(core.JobSubmitted("sub2", "d2", spec()))
    assert info.value.code == "busy"


def test_a_worker_waits_for_a_free_slot_and_is_refused_when_it_leaves():
    sim = start(n_workers=1)
    assert sim(core.WorkerRegistered("rw9", "w9")) == []  # parked: no free slot
    out = sim(core.ConnectionClosed("w9"))
    assert "connection closed" in refused(out, "rw9").message


def test_a_worker_that_registers_before_the_job_gets_its_slot_when_the_job_opens():
    sim = Sim()
    sim(core.ShardRegistered("rs0", "s0", "h:0", 100))
    assert sim(core.WorkerRegistered("rw0", "w0")) == []
    out = sim(core.JobSubmitted("sub", "d", spec(n_workers=1)))
    assert released(out, "rw0")["worker_id"] == 0 and sim.job.workers[0].state is SlotState.RUNNING


def test_tables_come_once_from_the_driver():
    sim = start()
    with pytest.raises(RequestError, match="TABLES comes once"):
        sim(core.TablesGiven("tab2", "d", TABLES))
    other = start(tables=False)
    with pytest.raises(RequestError, match="bad tables"):
        other(core.TablesGiven("tab", "d", {"tables": [{"rows": 3}]}))


def test_a_failed_shard_setup_fails_the_job():
    sim = start(tables=False)
    out = sim.answer(sim(core.TablesGiven("tab", "d", TABLES)), MsgType.JOB_SETUP, NoAnswer("disk full"))
    assert "shard setup failed: disk full" in refused(out, "tab").message
    assert sim.core.job is None and sim.driver_events(out)[0] == {"kind": "failed", "reason": "shard setup failed: disk full"}


# -- the statistics pass, training, the end ----------------------------------------


def test_stats_wait_for_every_worker_and_for_the_tables():
    sim = start(tables=False)
    assert sim(core.StatsArrived("st0", "w0", {"labels": [1], "vocab": {}})) == []
    out = sim(core.StatsArrived("st1", "w1", {"labels": [0], "vocab": {}}))
    (pool,) = [e for e in out if isinstance(e, core.PoolStats)]
    assert set(pool.parts) == {0, 1}
    out = sim(core.StatsPooled(sim.job.job_id, {"stats": [], "labels": ["0", "1"]}, []))
    assert sim.driver_events(out) == [{"kind": "stats", "stats": [], "labels": ["0", "1"]}]
    assert not [e for e in out if isinstance(e, Release)]  # the tables are not set yet
    out = sim.answer(sim(core.TablesGiven("tab", "d", TABLES)), MsgType.JOB_SETUP, {})
    body, arrays = released(out, "st0")
    assert body["labels"] == ["0", "1"] and body["ranges"] == {"w": [(0, 10)]} and released(out, "st1")[0] == body


def test_a_sync_job_runs_to_done():
    sim = start()
    for i in range(2):
        sim(core.EpochReported(f"w{i}", {"epoch": 0, "n": 5, "loss_sum": 1.0}))
    assert [e["epoch"] for e in sim.driver_events() if e["kind"] == "epoch"] == [0]
    with pytest.raises(RequestError, match="needs an integer epoch"):
        sim(core.EpochReported("w0", {"epoch": "w"}))
    with pytest.raises(RequestError, match="no running job"):  # a stranger is refused before its body is read
        sim(core.EpochReported("stranger", {}))
    assert sim(core.Trained("t0", "w0", {})) == []
    out = sim(core.Trained("t1", "w1", {}))
    assert released(out, "t0") == {} and released(out, "t1") == {}
    sim(core.FinalReport("w0", {"n": 5, "loss_sum": 1.0, "bytes_pulled": 1}))
    out = sim(core.FinalReport("w1", {"n": 5, "loss_sum": 3.0, "bytes_pulled": 2}), dt=3.0)
    (done,) = [e for e in sim.driver_events(out) if e["kind"] == "done"]
    assert done["bytes_pulled"] == 3 and done["lost_workers"] == [] and done["seconds"] == 3.0
    assert (done["samples"], done["loss"]) == (10, 0.4)
    assert sim.job.state is JobState.DONE


def test_early_stopping_holds_the_workers_at_each_epoch_end_until_the_driver_has_read_it():
    sim = start(hold_epochs=True)
    for i in range(2):
        out = sim(core.EpochReported(f"w{i}", {"epoch": 0, "n": 5, "loss_sum": 1.0}))
        assert not notified(out, MsgType.EVENT, f"w{i}")  # held: nobody is told to go on yet
    assert [e["epoch"] for e in sim.driver_events(out) if e["kind"] == "epoch"] == [0]
    out = sim(core.EpochSeen("d", {"epoch": 0}))
    assert notified(out, MsgType.EVENT, "w0") == notified(out, MsgType.EVENT, "w1") == [{"kind": "epoch_seen", "epoch": 0}]
    assert sim(core.EpochSeen("d", {"epoch": 0})) == []  # an epoch is let go once
    # A worker that redoes an epoch the driver has read (a replacement, a rewind) goes on at once.
    out = sim(core.EpochReported("w1", {"epoch": 0, "n": 5, "loss_sum": 1.0}))
    assert notified(out, MsgType.EVENT, "w1") == [{"kind": "epoch_seen", "epoch": 0}] and not sim.driver_events(out)
    with pytest.raises(RequestError, match="from the driver"):
        sim(core.EpochSeen("w0", {"epoch": 1}))
    with pytest.raises(RequestError, match="integer epoch"):
        sim(core.EpochSeen("d", {"epoch": "1"}))
    assert sim.job.released_epoch == 0


def test_epoch_seen_is_refused_for_a_job_that_does_not_hold_epochs():
    sim = start()
    with pytest.raises(RequestError, match="holds epochs"):
        sim(core.EpochSeen("d", {"epoch": 0}))
    out = sim(core.EpochReported("w0", {"epoch": 0, "n": 5, "loss_sum": 1.0}))
    assert not notified(out, MsgType.EVENT, "w0")


def test_done_waits_for_the_manifest_being_written_and_the_driver_hears_of_the_checkpoint_first():
    sim = start(checkpoint={"dir": "ck", "every": 10})
    writes = [e for e in sim(core.Checkpointed("s0", sim.job.job_id, 10, 0)) if isinstance(e, WriteManifest)]
    assert [w.clock for w in writes] == [10]
    for i in range(2):
        sim(core.Trained(f"t{i}", f"w{i}", {}))
    sim(core.FinalReport("w0", {"n": 5, "loss_sum": 1.0}))
    out = sim(core.FinalReport("w1", {"n": 5, "loss_sum": 1.0}))
    assert sim.job.state is JobState.DONE and not [e for e in sim.driver_events(out) if e["kind"] == "done"]
    out = sim(core.ManifestWritten(sim.job.job_id, 10))
    assert [e["kind"] for e in sim.driver_events(out)] == ["checkpoint", "done"]


def test_shards_hear_of_each_written_manifest_and_the_checkpoint_before_it():
    sim = start(n_shards=2, checkpoint={"dir": "ck", "every": 10})
    out = checkpoint_at(sim, 10)
    assert [notified(out, MsgType.CHECKPOINTED, f"s{i}") for i in range(2)] == [[{"job_id": sim.job.job_id, "clock": 10, "previous_clock": None}]] * 2
    # Two manifests under way at once: the later one's predecessor is the earlier one.
    for clock in (20, 30):
        writes = [e for i in range(2) for e in sim(core.Checkpointed(f"s{i}", sim.job.job_id, clock, i)) if isinstance(e, WriteManifest)]
        assert [w.manifest["previous_clock"] for w in writes] == [clock - 10]
    assert notified(sim(core.ManifestWritten(sim.job.job_id, 20)), MsgType.CHECKPOINTED, "s0") == [
        {"job_id": sim.job.job_id, "clock": 20, "previous_clock": 10}
    ]
    assert notified(sim(core.ManifestWritten(sim.job.job_id, 30)), MsgType.CHECKPOINTED, "s1")[0]["previous_clock"] == 20
    # A failed manifest names nothing: the shards remove no files because of it.
    sim(core.Checkpointed("s0", sim.job.job_id, 40, 0))
    sim(core.Checkpointed("s1", sim.job.job_id, 40, 1))
    assert not notified(sim(core.ManifestWritten(sim.job.job_id, 40, error="disk full")), MsgType.CHECKPOINTED, "s0")


def test_a_resumed_jobs_first_manifest_names_the_checkpoint_it_resumed_from():
    sim = start(checkpoint={"dir": "ck", "every": 10}, resume={"dir": "ck", "clock": 50})
    writes = [e for e in sim(core.Checkpointed("s0", sim.job.job_id, 60, 0)) if isinstance(e, WriteManifest)]
    assert writes[0].manifest["previous_clock"] == 50


def test_a_manifest_not_written_because_a_later_one_was_still_lets_done_through():
    sim = start(checkpoint={"dir": "ck", "every": 10})
    sim(core.Checkpointed("s0", sim.job.job_id, 10, 0))
    for i in range(2):
        sim(core.Trained(f"t{i}", f"w{i}", {}))
        sim(core.FinalReport(f"w{i}", {"n": 5, "loss_sum": 1.0}))
    out = sim(core.ManifestWritten(sim.job.job_id, 10, skipped=True))
    assert [e["kind"] for e in sim.driver_events(out)] == ["done"]


def test_an_illegal_slot_move_asked_by_a_worker_is_its_error():
    sim = start()
    sim(core.FinalReport("w0", {}))
    with pytest.raises(RequestError, match="worker slot 0: finished -> trained") as info:
        sim(core.Trained("t0", "w0", {}))
    assert info.value.code == "unexpected"
    with pytest.raises(RequestError, match="no running job"):
        sim(core.FinalReport("stranger", {}))


def test_a_heartbeat_on_another_connection_needs_the_session_token():
    sim = start()
    sim(core.Heartbeat("beats", {"session": "token", "job_id": sim.job.job_id, "worker_id": 1, "clock": 7, "samples_s": 2.5}))
    assert (sim.job.workers[1].clock, sim.job.workers[1].samples_s, sim.job.workers[1].heartbeats) == (7, 2.5, 1)
    with pytest.raises(RequestError, match="wrong session token") as info:
        sim(core.Heartbeat("beats", {"session": "guess", "job_id": sim.job.job_id, "worker_id": 1}))
    assert info.value.code == "bad_session"
    with pytest.raises(RequestError, match="wrong session token"):  # not a TypeError from compare_digest
        sim(core.Heartbeat("beats", {"session": "t\u00f6ken", "job_id": sim.job.job_id, "worker_id": 1}))


def test_the_driver_leaving_ends_the_job_and_tells_workers_and_shards():
    sim = start()
    out = sim(core.ConnectionClosed("d"))
    assert sim.core.job is None
    assert notified(out, MsgType.EVENT, "w0") == [{"kind": "abort", "reason": "the driver disconnected"}]
    assert notified(out, MsgType.JOB_CLEAR, "s0")


def test_losing_every_worker_fails_the_job_unless_a_replacement_registers_in_time():
    sim = start(n_workers=1, tables=False)
    out = sim(core.ConnectionClosed("w0"))
    assert not [e for e in sim.driver_events(out) if e["kind"] == "failed"]  # its partition awaits a replacement
    out = sim.fire(out, "orphaned")
    (failed,) = [e for e in sim.driver_events(out) if e["kind"] == "failed"]
    assert failed["reason"] == "every worker was lost, and no new worker registered within 2 s" and sim.core.job is None


def test_a_replacement_that_registers_while_every_worker_is_lost_keeps_the_job():
    sim = start(n_workers=2)
    lost = sim(core.ConnectionClosed("w0")) + sim(core.ConnectionClosed("w1"))
    assert sim.job.state is JobState.RUNNING and not sim.job.live_ids()
    for i, left in enumerate([e for e in lost if isinstance(e, Ask) and e.kind is MsgType.WORKER_LEFT]):
        sim(Answered(left.ask, ({"clock": 3},)))
    out = sim(core.WorkerRegistered("rw2", "w2"))
    out += sim.answer(out, MsgType.WORKER_JOINED, {})
    assert released(out, "rw2")["start_clock"] == 3
    assert sim.fire(lost, "orphaned") == [] and sim.job.state is JobState.RUNNING
    # A worker that is then lost too starts the wait again: the old timer does not count.
    out = sim(core.ConnectionClosed("w2"))
    (timer,) = [e for e in out if isinstance(e, ArmTimer) and e.timer[0] == "orphaned"]
    assert timer.timer[2] == 2 and sim.job.state is JobState.RUNNING


# -- replacement and takeover -------------------------------------------------------


def test_a_lost_worker_is_replaced_from_the_clock_the_shards_acknowledged():
    sim = start()
    pending = sim(core.Trained("t1", "w1", {}))
    assert pending == []
    out = sim(core.ConnectionClosed("w0"), dt=1.0)
    (lost,) = [e for e in sim.driver_events(out) if e["kind"] == "worker_lost"]
    assert lost == {"kind": "worker_lost", "worker_id": 0, "reason": "connection lost", "at_s": 1.0}
    assert [s.state for s in sim.job.workers] == [SlotState.LOST, SlotState.TRAINED, SlotState.PENDING]
    assert sim(core.WorkerRegistered("rw2", "w2")) == []  # the spare is pending until the shards answer
    out = sim.answer(out, MsgType.WORKER_LEFT, {"clock": 7})
    (joined,) = [e for e in out if isinstance(e, Ask) and e.kind is MsgType.WORKER_JOINED]
    assert joined.targets == (("s0", {"job_id": sim.job.job_id, "worker_id": 2, "session": "token", "clock": 7}),)
    out = sim.answer(out, MsgType.WORKER_JOINED, {})
    reply = released(out, "rw2")
    assert (reply["worker_id"], reply["partition_index"], reply["start_clock"]) == (2, 0, 7)
    (event,) = [e for e in sim.driver_events(out) if e["kind"] == "worker_joined"]
    assert event["replacing"] and not event["takeover"]
    out = sim(core.Trained("t2", "w2", {}))  # the trained barrier waited for the replacement
    assert released(out, "t1") == {} and released(out, "t2") == {}


def test_a_survivor_takes_over_the_last_partition_after_the_others_finished():
    sim = start()
    assert sim(core.Trained("t1", "w1", {})) == []  # w1 is done with its own partition
    out = sim.answer(sim(core.ConnectionClosed("w0")), MsgType.WORKER_LEFT, {"clock": 4})
    with pytest.raises(RequestError, match="no lost worker's partition") as info:
        sim(core.WorkerRegistered("rx", "x", spare_of="another-job"))
    assert info.value.code == "no_spare"
    out = sim.fire(out, "takeover")  # nobody registered within takeover_after_s: ask a survivor
    assert notified(out, MsgType.EVENT, "w1") == [{"kind": "take_over", "job_id": sim.job.job_id, "partition": 0}]
    assert sim.job.takeovers == {1: 1}
    out = sim(core.WorkerRegistered("rh", "w1-helper", spare_of=sim.job.job_id))
    reply = released(sim.answer(out, MsgType.WORKER_JOINED, {}), "rh")
    assert (reply["partition_index"], reply["start_clock"]) == (0, 4)
    assert sim.fire(sim.seen, "takeover") == []  # the re-armed timer: the partition is taken now
    out = sim(core.Trained("th", "w1-helper", {}))
    assert released(out, "t1") == {} and released(out, "th") == {}
    sim(core.FinalReport("w1", {"n": 3, "loss_sum": 0.0}))
    out = sim(core.FinalReport("w1-helper", {"n": 2, "loss_sum": 0.0}))
    (done,) = [e for e in sim.driver_events(out) if e["kind"] == "done"]
    assert done["lost_workers"] == [0] and sim.job.state is JobState.DONE


# -- checkpoints, halt, rollback ------------------------------------------------------


def test_halt_stops_every_worker_at_one_clock_and_ends_after_the_final_checkpoint():
    sim = start(checkpoint={"dir": "/tmp/ck"})
    out = sim(core.HaltRequested("halt", "d"))
    (pause,) = [e for e in out if isinstance(e, Ask)]
    assert pause.kind is MsgType.PAUSE and {c for c, _ in pause.targets} == {"w0", "w1"}
    out = sim(Answered(pause.ask, ({"clock": 3}, {"clock": 5})))
    (ask,) = [e for e in out if isinstance(e, Ask)]
    assert ask.kind is MsgType.CHECKPOINT and ask.targets == (("s0", {"job_id": sim.job.job_id, "clock": 5}),)
    out = sim.answer(out, MsgType.CHECKPOINT, {})
    assert notified(out, MsgType.RESUME, "w0") == [{"until": 5}] and sim.job.halting
    job_id = sim.job.job_id
    out = checkpoint_at(sim, 5)
    assert released(out, "halt") == {"clock": 5} and sim.core.job is None
    kinds = [e["kind"] for e in sim.driver_events(out)]
    assert kinds == ["checkpoint", "halted"]
    assert notified(out, MsgType.EVENT, "w0") == [{"kind": "abort", "reason": "stopped by its driver at clock 5, with a final checkpoint"}]
    assert notified(out, MsgType.JOB_CLEAR, "s0") == [{"job_id": job_id}]


def test_halt_without_a_checkpoint_folder_is_refused_and_a_timed_one_waits_for_the_pause():
    sim = start()
    out = sim(core.HaltRequested("halt", "d"))
    assert refused(out, "halt").code == "not_now" and "has no checkpoint folder" in refused(out, "halt").message
    with pytest.raises(RequestError, match="HALT comes from the driver"):
        sim(core.HaltRequested("h2", "w0"))
    sim = start(checkpoint={"dir": "/tmp/ck", "every_s": 10.0})
    out = sim.fire(sim.seen, "checkpoint_timer")
    assert [e.kind for e in out if isinstance(e, Ask)] == [MsgType.PAUSE]
    assert sim(core.HaltRequested("halt", "d")) == []  # queued behind the timed pause
    out = sim.answer(out, MsgType.PAUSE, {"clock": 2})
    out = sim.answer(out, MsgType.CHECKPOINT, {})
    assert notified(out, MsgType.RESUME, "w0") == [{"until": None}]
    assert [e.kind for e in out if isinstance(e, Ask)] == [MsgType.PAUSE]  # now the halt's own pause


def test_a_worker_lost_during_a_halt_refuses_it():
    sim = start(checkpoint={"dir": "/tmp/ck"})
    out = sim.answer(sim.answer(sim(core.HaltRequested("halt", "d")), MsgType.PAUSE, {"clock": 5}), MsgType.CHECKPOINT, {})
    out = sim(core.ConnectionClosed("w1"))
    assert refused(out, "halt").message == "worker 1 was lost before the final checkpoint"


def test_a_lost_shard_is_replaced_and_every_shard_rolls_back_to_the_checkpoint():
    sim = start(n_shards=2, checkpoint={"dir": "/tmp/ck"})
    checkpoint_at(sim, 4)
    out = sim(core.ConnectionClosed("s1"))
    (lost,) = [e for e in sim.driver_events(out) if e["kind"] == "shard_lost"]
    assert lost == {"kind": "shard_lost", "index": 1, "clock": 4, "reason": "shard 1 at h:1 was lost"}
    assert sim.job.recovering == 1
    out = sim(core.ShardRegistered("rs2", "s2", "h:2", 102))
    assert released(out, "rs2") == {"shard_id": 1}  # ids after the highest registered one
    (setup,) = [e for e in out if isinstance(e, Ask)]
    assert [c for c, _ in setup.targets] == ["s0", "s2"]
    assert all(b["restore"] == {"dir": "/tmp/ck", "clock": 4, "job_id": sim.job.job_id} and b["workers"] == [0, 1] for _, b in setup.targets)
    out = sim(Answered(setup.ask, ({"previous_clock": 9}, {})))
    assert notified(out, MsgType.EVENT, "w0") == [
        {"kind": "rewind", "clock": 4, "shards": ["h:0", "h:2"], "ranges": sim.job.ranges}
    ]
    (rec,) = [e for e in sim.driver_events(out) if e["kind"] == "shard_recovered"]
    assert rec["replayed_steps"] == 5 and sim.job.recovering is None


def test_a_lost_shard_without_a_checkpoint_fails_the_job():
    sim = start()
    out = sim(core.ConnectionClosed("s0"))
    assert {"kind": "failed", "reason": "shard 0 at h:0 was lost (no checkpoint to recover from)"} in sim.driver_events(out)
    assert sim.core.job is None


# -- placement: as few shards as the tables' size needs ----------------------------


def test_shards_needed_is_one_per_min_shard_bytes_of_dense_tables_and_every_shard_for_sparse_ones():
    small, big = TableSpec("w", 1000), TableSpec("v", 1 << 20, dim=2)  # 4 KB and 8 MiB of float32
    assert shards_needed([small], 4) == 1
    assert shards_needed([small, big], 4, min_shard_bytes=4 << 20) == 2
    assert shards_needed([big], 4, min_shard_bytes=1 << 20) == 4  # never more than there are
    assert shards_needed([small], 4, min_shard_bytes=0) == 4
    assert shards_needed([small, TableSpec("h", 1 << 32, sparse=True)], 3) == 3
    assert table_bytes(TableSpec("d", 10, dim=3, dtype="float64")) == 240


def test_a_small_model_lives_on_one_shard_and_a_lost_unused_shard_leaves_the_job_alone():
    sim = start(n_shards=3, tables=False, min_shard_bytes=MIN_SHARD_BYTES)
    out = sim(core.TablesGiven("tab", "d", TABLES))
    (setup,) = [e for e in out if isinstance(e, Ask)]
    assert [c for c, _ in setup.targets] == ["s0"]  # only the shard that holds the tables is set up
    placed = released(sim.answer(out, MsgType.JOB_SETUP, {}), "tab")
    assert placed == {"shards": ["h:0"], "ranges": {"w": [(0, 10)]}}
    out = sim(core.ConnectionClosed("s2"))
    assert sim.core.job is not None and not [e for e in sim.driver_events(out) if e["kind"] in ("failed", "shard_lost")]
    out = sim(core.ConnectionClosed("s0"))
    assert [e["kind"] for e in sim.driver_events(out)] == ["failed"] and sim.core.job is None


def test_a_larger_model_is_split_over_as_many_shards_as_its_bytes_need():
    sim = start(n_shards=3, tables=False, min_shard_bytes=40 * 1024)
    out = sim(core.TablesGiven("tab", "d", {"tables": [{"name": "w", "rows": 20 * 1024}]}))  # 80 KB: two shards
    placed = released(sim.answer(out, MsgType.JOB_SETUP, {}), "tab")
    assert placed == {"shards": ["h:0", "h:1"], "ranges": {"w": [(0, 10240), (10240, 20480)]}}
    assert [s.conn for s in sim.job.shards] == ["s0", "s1"]


def test_a_resumed_job_goes_on_the_shards_its_checkpoint_was_written_by():
    resume = {"dir": "/tmp/ck", "clock": 3, "n_shards": 2}
    sim = start(n_shards=3, tables=False, min_shard_bytes=MIN_SHARD_BYTES, resume=resume)
    out = sim(core.TablesGiven("tab", "d", TABLES))
    (setup,) = [e for e in out if isinstance(e, Ask)]
    assert [c for c, _ in setup.targets] == ["s0", "s1"] and all(b["restore"]["clock"] == 3 for _, b in setup.targets)
    assert released(sim.answer(out, MsgType.JOB_SETUP, {}), "tab")["shards"] == ["h:0", "h:1"]


def test_a_resumed_job_needs_as_many_shards_as_wrote_its_checkpoint():
    with pytest.raises(RequestError, match="an integer >= 1"):
        spec(resume={"dir": "/tmp/ck", "clock": 3, "n_shards": 0})


# -- the failure detector -----------------------------------------------------------


def tick_until(sim: Sim, end_s: float, heard: tuple = (), step_s: float = 0.25) -> list:
    out = []
    while sim.now < end_s:
        for conn in heard:
            sim(core.Heard(conn))
        out += sim(core.Tick(), dt=step_s)
    return out


def test_a_silent_shard_is_declared_lost_killed_and_then_handled_as_lost():
    sim = start(checkpoint={"dir": "/tmp/ck"})
    out = sim(core.Tick())
    assert [(e.kind, e.targets) for e in out if isinstance(e, Ask)] == [(MsgType.PING, (("s0", {}),))]
    out = tick_until(sim, 1.0, heard=("w0", "w1"))
    assert not [e for e in out if isinstance(e, Ask)]  # one PING in flight at a time, never answered
    assert not [e for e in out if isinstance(e, Abort)]
    out = tick_until(sim, 1.5, heard=("w0", "w1"))
    assert [e for e in out if isinstance(e, Abort | KillShard)] == [
        Abort("s0", "declared lost: it did not answer for 1.2 s (stopped, hung or cut off)"), KillShard(100)
    ]
    out = sim(core.ConnectionClosed("s0"))
    (failed,) = [e for e in sim.driver_events(out) if e["kind"] == "failed"]
    assert "it did not answer for 1.2 s" in failed["reason"]


def test_a_shard_that_answers_its_pings_and_workers_that_beat_stay_live():
    sim = start()
    for _ in range(40):
        out = sim(core.Tick(), dt=0.25)
        for ask in [e for e in out if isinstance(e, Ask)]:
            sim(Answered(ask.ask, ({},)))
        sim(core.Heard("w0")), sim(core.Heard("w1"))
        assert not [e for e in out if isinstance(e, Abort)]


def test_a_silent_worker_is_declared_lost():
    sim = start()
    out = tick_until(sim, 2.0, heard=("s0", "w1"))
    assert Abort("w0", "declared lost: no heartbeat") in out
    (lost,) = [e for e in sim.driver_events(out) if e["kind"] == "worker_lost"]
    assert lost["reason"].startswith("no heartbeat for 1.2")


def test_a_late_tick_declares_nobody_lost():
    sim = start()
    sim(core.Tick())
    out = sim(core.Tick(), dt=30.0)  # the coordinator itself was stopped for 30 s
    assert not [e for e in out if isinstance(e, Abort)]
    out = tick_until(sim, 40.0, heard=("s0", "w0", "w1"))  # what they sent meanwhile is read: all live
    assert not [e for e in out if isinstance(e, Abort)]
    assert sim.job.workers[0].state is SlotState.RUNNING


# -- STATUS and the server stopping ---------------------------------------------------


def test_status_asks_every_shard_and_shows_the_job():
    sim = start()
    sim(core.Heartbeat("w0", {"clock": 3, "samples_s": 10.0}), dt=1.0)
    out = sim(core.StatusAsked("st"))
    out = sim.answer(out, MsgType.STATUS, {"keys": 10})
    body = released(out, "st")
    assert body["shards"] == [{"keys": 10, "shard_id": 0, "address": "h:0", "host": "h", "pid": 100, "state": "up"}]
    job = body["job"]
    assert (job["mode"], job["state"], job["epoch"], job["last_checkpoint"]) == ("sync", "running", 0, None)
    w0 = job["workers"][0]
    assert (w0["state"], w0["clock"], w0["samples_s"], w0["heartbeats"], w0["last_heartbeat_s"]) == ("running", 3, 10.0, 1, 0.0)
    assert set(w0) == {"worker_id", "state", "pid", "host", "clock", "samples_s", "heartbeats", "last_heartbeat_s"}
    out = sim.answer(sim(core.StatusAsked("st2")), MsgType.STATUS, NoAnswer("timed out"))
    assert released(out, "st2")["shards"][0]["error"] == "timed out"


def test_the_server_stopping_a_job_without_a_checkpoint_folder_fails_it():
    sim = start()
    out = sim(core.ServerStopping("stop", "the psctl server is stopping"))
    assert released(out, "stop") == "job job-1 stopped (it has no --checkpoint-dir, so no final checkpoint)"
    assert {"kind": "failed", "reason": "the psctl server is stopping"} in sim.driver_events(out)
    assert sim.core.job is None
    assert released(Sim()(core.ServerStopping("s", "x")), "s") is None


def test_the_server_stopping_a_job_takes_its_final_checkpoint_first():
    sim = start(checkpoint={"dir": "/tmp/ck"})
    out = sim.answer(sim(core.ServerStopping("stop", "the psctl server is stopping")), MsgType.PAUSE, {"clock": 6})
    out = sim.answer(out, MsgType.CHECKPOINT, {})
    assert not [e for e in out if isinstance(e, Release) and e.handle == "stop"]
    out = checkpoint_at(sim, 6)
    assert released(out, "stop") == "job job-1 stopped at clock 6; its final checkpoint is in /tmp/ck"
    assert sim.core.job is None


def test_a_pause_a_worker_does_not_answer_resumes_the_others_and_refuses_the_halt():
    sim = start(checkpoint={"dir": "/tmp/ck"})
    (pause,) = [e for e in sim(core.HaltRequested("halt", "d")) if isinstance(e, Ask)]
    out = sim(Answered(pause.ask, ({"clock": 3}, NoAnswer("worker 1 did not answer within 10.0 s"))))
    assert refused(out, "halt").message == "no checkpoint now: worker 1 did not answer within 10.0 s"
    assert notified(out, MsgType.RESUME, "w0") == [{"until": None}] and not sim.job.halting


# -- the slot moves a worker's messages ask for, legal and illegal -----------------

REACH = {  # the events that bring worker 0's slot from RUNNING to each state
    SlotState.RUNNING: [],
    SlotState.TRAINED: [lambda: core.Trained("t", "w0", {})],
    SlotState.FINISHED: [lambda: core.FinalReport("w0", {"n": 1, "loss_sum": 0.0})],
}
ASKS = {SlotState.TRAINED: lambda: core.Trained("t2", "w0", {}), SlotState.FINISHED: lambda: core.FinalReport("w0", {"n": 1, "loss_sum": 0.0})}
MOVES = [(a, b) for a in REACH for b in ASKS]


@pytest.mark.parametrize(("old", "new"), MOVES, ids=[f"{a.value}->{b.value}" for a, b in MOVES])
def test_a_workers_message_moves_its_slot_exactly_when_the_table_says(old, new):
    sim = start()
    for make in REACH[old]:
        sim(make())
    assert sim.job.workers[0].state is old
    if new in core.SLOT_TRANSITIONS[old]:
        sim(ASKS[new]())
        assert sim.job.workers[0].state is new
    else:
        with pytest.raises(RequestError, match=f"worker slot 0: {old.value} -> {new.value}"):
            sim(ASKS[new]())
        assert sim.job.workers[0].state is old


def test_a_lost_slot_stays_lost_and_a_finished_worker_leaving_is_not_a_loss():
    sim = start()
    sim(core.FinalReport("w0", {"n": 1, "loss_sum": 0.0}))
    out = sim(core.ConnectionClosed("w0"))
    assert sim.job.workers[0].state is SlotState.FINISHED and not sim.driver_events(out)
    sim(core.ConnectionClosed("w1"))
    assert sim.job.workers[1].state is SlotState.LOST and len(sim.job.workers) == 3  # its partition awaits a spare


def test_the_job_moves_setup_running_done_and_a_done_job_never_fails():
    sim = Sim()
    sim(core.ShardRegistered("rs0", "s0", "h:0", 100))
    sim(core.JobSubmitted("sub", "d", spec(n_workers=1)))
    assert sim.job.state is JobState.RUNNING
    sim(core.WorkerRegistered("rw0", "w0"))
    sim(core.FinalReport("w0", {"n": 1, "loss_sum": 0.0}))
    job = sim.job
    assert job.state is JobState.DONE
    out = sim(core.ConnectionClosed("d"))  # the driver goes away after the end: no DONE -> FAILED
    assert job.state is JobState.DONE and sim.core.job is None and notified(out, MsgType.JOB_CLEAR, "s0")


def test_a_failing_worker_moves_the_job_running_to_failed():
    sim = start()
    job = sim.job
    out = sim(core.Failed("w1", "out of memory"))
    assert job.state is JobState.FAILED and {"kind": "failed", "reason": "worker 1: out of memory"} in sim.driver_events(out)


def test_the_shards_learn_each_workers_session_token_before_its_hello():
    tokens = iter(f"t{i}" for i in range(10))
    sim = Sim()
    sim.core = CoordinatorState(token=lambda: next(tokens))
    released(sim(core.ShardRegistered("rs0", "s0", "h:0", 100)), "rs0")
    released(sim(core.JobSubmitted("sub", "d", spec(2))), "sub")
    assert released(sim(core.WorkerRegistered("rw0", "w0", pid=0, host="x")), "rw0")["session"] == "t0"
    out = sim(core.TablesGiven("tab", "d", TABLES))
    (setup,) = [e for e in out if isinstance(e, Ask) and e.kind is MsgType.JOB_SETUP]
    assert [body["sessions"] for _, body in setup.targets] == [{"0": "t0"}]  # only slots that have one
    released(sim.answer(out, MsgType.JOB_SETUP, {}), "tab")
    # A worker that registers once the tables exist: the shards get its token before it is answered.
    out = sim(core.WorkerRegistered("rw1", "w1", pid=1, host="x"))
    (joined,) = [e for e in out if isinstance(e, Ask) and e.kind is MsgType.WORKER_JOINED]
    assert joined.targets == (("s0", {"job_id": sim.job.job_id, "worker_id": 1, "session": "t1"}),)
    assert not [e for e in out if isinstance(e, Release)]
    assert released(sim.answer(out, MsgType.WORKER_JOINED, {}), "rw1")["session"] == "t1"


def test_between_jobs_a_shard_is_watched_with_the_servers_own_failure_timeout():
    """psctl server --failure-timeout-s: an idle server's shards get its timeout, not the default 5 s."""
    for idle_s, lost_by in ((5.0, 6.0), (30.0, None)):
        sim = Sim()
        sim.core = CoordinatorState(token=lambda: "token", idle_failure_timeout_s=idle_s)
        assert released(sim(core.ShardRegistered("rs0", "s0", "h:0", 100)), "rs0") == {"shard_id": 0}
        out = tick_until(sim, 12.0)  # the PING is never answered
        killed = [e for e in out if isinstance(e, KillShard)]
        assert killed == ([KillShard(100)] if lost_by else []), (idle_s, out)
        assert sim.core.liveness.timeout_s == idle_s
