"""The coordinator's pure parts, driven with no sockets: the job spec, the state machines'
transition tables and the failure detector."""

from __future__ import annotations

import itertools

import pytest

from psctl.core.coordinator import (
    JOB_TRANSITIONS,
    SLOT_TRANSITIONS,
    UNKNOWN_CLOCK,
    Barrier,
    CheckpointLog,
    EpochPool,
    InvalidTransition,
    JobState,
    Liveness,
    Refuse,
    Release,
    Slot,
    SlotState,
    cannot_pause,
    check_move,
    free_slot,
    live_ids,
    lose,
    offer,
    one_clock,
    pick_survivor,
    rewind,
    shard_lost_verdict,
    tick_interval_s,
)
from psctl.core.job import DEFAULT_FAILURE_TIMEOUT_S, DEFAULT_HEARTBEAT_INTERVAL_S, JobSpec
from psctl.errors import RequestError

# -- transitions ----------------------------------------------------------------

SLOT_PAIRS = list(itertools.product(SlotState, SlotState))
JOB_PAIRS = list(itertools.product(JobState, JobState))


@pytest.mark.parametrize(("old", "new"), SLOT_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in SLOT_PAIRS])
def test_every_slot_transition_is_legal_exactly_when_the_table_says(old, new):
    slot = Slot(3, state=old)
    if new in SLOT_TRANSITIONS[old]:
        slot.move(new)
        assert slot.state is new
    else:
        with pytest.raises(InvalidTransition, match=f"worker slot 3: {old.value} -> {new.value}"):
            slot.move(new)
        assert slot.state is old


@pytest.mark.parametrize(("old", "new"), JOB_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in JOB_PAIRS])
def test_every_job_transition_is_legal_exactly_when_the_table_says(old, new):
    if new in JOB_TRANSITIONS[old]:
        check_move(JOB_TRANSITIONS, "job", old, new)
    else:
        with pytest.raises(InvalidTransition):
            check_move(JOB_TRANSITIONS, "job", old, new)


def test_the_slot_life_cycles_the_coordinator_uses():
    normal = Slot(0)
    for state in (SlotState.RUNNING, SlotState.TRAINED, SlotState.FINISHED):
        normal.move(state)
    lost = Slot(1)
    lost.move(SlotState.RUNNING)
    lost.move(SlotState.LOST)
    spare = Slot(4, state=SlotState.PENDING, partition=1)  # the lost worker's partition
    spare.move(SlotState.SPARE)
    spare.move(SlotState.RUNNING)
    assert spare.partition == 1 and Slot(5).partition == 5
    with pytest.raises(InvalidTransition):  # a finished worker is never declared lost
        normal.move(SlotState.LOST)
    with pytest.raises(InvalidTransition):  # a lost slot stays lost: its partition has a new slot
        lost.move(SlotState.RUNNING)


def test_states_travel_as_their_names():
    assert SlotState.RUNNING == "running" and JobState.DONE == "done"
    assert {str(s) for s in SlotState} == {"waiting", "running", "trained", "finished", "lost", "pending", "spare"}


# -- the failure detector -----------------------------------------------------


def detector(timeout_s: float = 2.0, tick_s: float = 0.25) -> Liveness:
    live = Liveness(timeout_s=timeout_s, max_gap_s=2 * tick_s)
    live.tick(0.0)
    return live


def run_ticks(live: Liveness, start_s: float, end_s: float, tick_s: float = 0.25, heard: tuple = ()) -> list:
    lost = []
    now = start_s
    while now < end_s:
        now += tick_s
        for party in heard:
            live.heard(party)
        lost += live.tick(now)
    return lost


def test_a_silent_party_is_declared_lost_just_after_the_timeout():
    live = detector()
    live.watch("w")
    live.watch("s")
    assert run_ticks(live, 0.0, 2.0, heard=("s",)) == []
    lost = run_ticks(live, 2.0, 2.25, heard=("s",))
    assert lost == [("w", 2.25)]
    assert run_ticks(live, 2.25, 10.0, heard=("s",)) == []  # declared once; "s" keeps talking


def test_hearing_from_a_party_resets_its_silence():
    live = detector()
    live.watch("w")
    assert run_ticks(live, 0.0, 1.5) == []
    live.heard("w")
    assert run_ticks(live, 1.5, 3.25) == []  # 1.75 s since it was heard
    assert [p for p, _ in run_ticks(live, 3.25, 4.0)] == ["w"]


def test_a_late_tick_declares_nobody_lost():
    """The coordinator itself was stopped 10 s: the gap is not its peers' silence."""
    live = detector()
    live.watch("w")
    live.watch("s")
    assert run_ticks(live, 0.0, 1.0) == []
    assert live.tick(11.0) == []  # the late tick judges nobody ...
    live.heard("w")  # ... so what "w" sent meanwhile (queued on its socket) is read first
    assert run_ticks(live, 11.0, 11.5) == []
    # "s" sent nothing: silence counted over running time only (1 s + one capped gap + 0.5 s)
    assert live.silent_s["s"] == pytest.approx(2.0)
    assert [p for p, _ in run_ticks(live, 11.5, 11.75)] == ["s"]


def test_repeated_stalls_are_never_counted_as_silence_in_full():
    live = detector(timeout_s=2.0)
    live.watch("w")
    for i in range(5):  # stopped again and again; "w" heard after each
        assert live.tick(10.0 * (i + 1)) == []
        live.heard("w")
    assert live.silent_s["w"] == 0.0


def test_forgetting_a_party_stops_watching_it():
    live = detector()
    live.watch("w")
    live.forget("w")
    live.heard("w")  # hearing from an unwatched party does not watch it
    assert run_ticks(live, 0.0, 10.0) == []


def test_tick_interval_looks_several_times_a_timeout():
    assert tick_interval_s(0.5, 5.0) == 0.5
    assert tick_interval_s(0.5, 1.0) == 0.25
    assert tick_interval_s(5.0, 60.0) == 1.0
    live = Liveness.for_intervals(DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_FAILURE_TIMEOUT_S)
    assert live.timeout_s == DEFAULT_FAILURE_TIMEOUT_S and live.max_gap_s == 1.0


# -- the job spec ---------------------------------------------------------------


def bare(**over):
    return {"model": "logreg", "n_workers": 2, "mode": "sync", "partitions": [{}, {}], **over}


def test_a_spec_round_trips_and_fills_in_the_defaults():
    spec = JobSpec.from_wire(bare(epochs=3, checkpoint={"dir": "/tmp/c", "every": 5, "every_s": 0.0}))
    assert spec.heartbeat_interval_s == DEFAULT_HEARTBEAT_INTERVAL_S and spec.failure_timeout_s == DEFAULT_FAILURE_TIMEOUT_S
    assert spec.takeover_grace_s == DEFAULT_FAILURE_TIMEOUT_S and spec.resume_clock == 0
    assert spec.checkpoint_dir == "/tmp/c" and spec.epochs == 3
    assert JobSpec.from_wire(spec.to_wire()) == spec
    assert spec.replace(takeover_after_s=0.0).takeover_grace_s == 0.0
    assert JobSpec.from_wire({**bare(), "tables": [1], "n_features": None}).n_features is None  # unknown and null fields


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("nope", "SUBMIT needs a job spec"),
        ({"n_workers": 1, "mode": "sync", "partitions": [{}]}, "'model' must be a string"),
        (bare(n_workers=True), "'n_workers' must be an integer >= 1"),
        (bare(n_workers=3), "one data partition per worker"),
        (bare(mode="fast"), "bad job spec"),
        (bare(staleness=-1), "'staleness' must be an integer >= 0"),
        (bare(failure_timeout_s=0), "'failure_timeout_s' must be a number of seconds > 0"),
        (bare(heartbeat_interval_s="1"), "'heartbeat_interval_s' must be a number of seconds > 0"),
        (bare(test_split=1.5), "'test_split' must be a fraction"),
        (bare(partitions=[{}, 3]), "'partitions' must be a list of objects"),
        (bare(checkpoint="dir"), "'checkpoint' must be an object"),
        (bare(partition_mode="disk"), "'partition_mode' must be one of auto, memory, stream"),
        (bare(partition_mode=["stream"]), "'partition_mode' must be one of auto, memory, stream"),
        (bare(worker_memory_bytes=0), "'worker_memory_bytes' must be an integer >= 1"),
    ],
)
def test_a_bad_field_is_one_sentence(body, says):
    with pytest.raises(RequestError, match=says) as info:
        JobSpec.from_wire(body)
    assert "\n" not in str(info.value)


# -- barriers, epochs, checkpoints ------------------------------------------------


def test_a_barrier_opens_when_every_expected_worker_arrived_and_releases_every_waiter():
    b = Barrier({0, 1})
    assert b.arrive(0, "a", handle="h0") == [] and not b.open
    assert b.arrive(1, "b", handle="h1") == [Release("h0", {0: "a", 1: "b"}), Release("h1", {0: "a", 1: "b"})]
    assert b.arrive(1, "late", handle="h2") == [Release("h2", {0: "a", 1: "b"})]  # already open: at once


def test_a_dropped_worker_opens_the_barrier_for_the_others_and_a_failed_one_refuses():
    b = Barrier({0, 1})
    b.arrive(0, "a", handle="h0")
    assert b.drop(1) == [Release("h0", {0: "a"})]
    c = Barrier({0, 1})
    c.arrive(0, "a", handle="h0")
    assert c.fail("job 1 ended") == [Refuse("h0", "job 1 ended")]
    assert c.arrive(1, "b", handle="h1") == [Refuse("h1", "job 1 ended")]


def test_epochs_are_summed_up_once_every_partition_reported_in_order():
    e = EpochPool()
    rep = {"loss_sum": 2.0, "n": 4, "sums": {"correct": 3}}
    e.report(1, 0, rep)
    e.report(0, 0, rep)
    assert e.complete({0, 1}) == []
    e.report(0, 1, rep)
    e.report(0, 1, rep)  # a replacement redoing a step of the same partition adds to its entry
    (epoch0,) = e.complete({0, 1})
    assert epoch0 == {"kind": "epoch", "epoch": 0, "loss": 6.0 / 12, "sums": {"correct": 9.0}, "samples": 12}
    e.report(0, 1, rep)  # after the epoch was summed up: ignored
    e.report(1, 1, rep)
    assert [ev["epoch"] for ev in e.complete({0, 1})] == [1] and e.last_reported == 1


def test_a_clock_becomes_the_checkpoint_when_every_shard_saved_it_and_its_manifest_is_written():
    log = CheckpointLog()
    assert log.wait(10, "halt") == []
    assert not log.shard_saved(10, 0, 2)
    assert log.shard_saved(10, 1, 2)  # write the manifest now
    assert log.last is None  # not before it is on disk
    assert log.written(10) == [Release("halt", 10)] and log.last == 10
    assert not log.shard_saved(5, 0, 1)  # older than the checkpoint: nothing to write
    assert log.wait(8, "h") == [Release("h", 10)]  # already reached


# -- scenarios that processes used to be the only way to reach ---------------------


def job_slots(n: int) -> list[Slot]:
    slots = [Slot(i) for i in range(n)]
    for s in slots:
        s.move(SlotState.RUNNING)
    return slots


def test_a_lost_worker_is_replaced_and_every_barrier_waits_for_its_partition():
    slots = job_slots(3)
    trained, final = Barrier({0, 1, 2}), Barrier({0, 1, 2})
    slots[0].move(SlotState.TRAINED)
    assert trained.arrive(0, {}, handle="t0") == []
    spare, effects = lose(slots, [trained, final], slots[1])
    assert effects == [] and spare is not None
    assert (spare.worker_id, spare.state, spare.partition, spare.start_clock) == (3, SlotState.PENDING, 1, UNKNOWN_CLOCK)
    assert live_ids(slots) == {0, 2} and free_slot(slots, spare_only=False) is None  # pending: not yet
    offer(spare, [7, 5])  # the shards acknowledged its pushes to clocks 7 and 5
    assert spare.state is SlotState.SPARE and spare.start_clock == 5
    new = free_slot(slots, spare_only=False)
    assert new is spare
    new.peer = "new worker"
    new.move(SlotState.RUNNING)
    slots[2].move(SlotState.TRAINED)
    assert trained.arrive(2, {}, handle="t2") == []  # still waiting for the replacement
    assert [type(e) for e in trained.arrive(3, {}, handle="t3")] == [Release] * 3
    assert set(trained.result) == {0, 2, 3}


def test_a_worker_lost_after_training_needs_no_replacement():
    slots = job_slots(2)
    slots[0].move(SlotState.TRAINED)
    final = Barrier({0, 1})
    spare, _ = lose(slots, [final], slots[0])
    assert spare is None and len(slots) == 2 and final.expected == {1}


def test_the_last_partition_is_taken_over_by_a_worker_that_finished_training():
    slots = job_slots(3)
    slots[0].move(SlotState.TRAINED)
    slots[1].move(SlotState.TRAINED)
    spare, _ = lose(slots, [Barrier({0, 1, 2})], slots[2])
    assert spare is not None
    offer(spare, [3, 3])
    takeovers: dict[int, int] = {}
    first = pick_survivor(slots, takeovers)
    assert first is slots[0]
    assert pick_survivor(slots, takeovers) is slots[1]  # it did not come: ask another
    assert pick_survivor(slots, takeovers) is slots[0]
    taker = free_slot(slots, spare_only=True)
    assert taker is spare and taker.start_clock == 3
    assert pick_survivor([s for s in slots if s.state is SlotState.LOST], {}) is None


def test_halt_at_one_clock():
    slots = job_slots(2)
    ok = dict(halting=False, has_checkpoint_dir=True, tables_set=True, recovering=False, slots=slots)
    assert cannot_pause("j", JobState.RUNNING, **ok) is None
    assert cannot_pause("j", JobState.RUNNING, **{**ok, "has_checkpoint_dir": False}) == (
        "job j has no checkpoint folder (--checkpoint-dir)"
    )
    target = one_clock([12, 14])  # the paused workers' clocks: the furthest one's
    assert target == 14
    with pytest.raises(ValueError, match="without its clock"):
        one_clock([12, None])
    log = CheckpointLog()
    assert log.wait(target, "halt") == []
    assert cannot_pause("j", JobState.RUNNING, **{**ok, "halting": True}) == "the job is stopping"  # no second pause
    for shard in (0, 1):
        wrote = log.shard_saved(target, shard, 2)
    assert wrote and log.written(target) == [Release("halt", 14)]


def test_a_halt_waiting_for_its_checkpoint_is_refused_when_a_worker_is_lost():
    log = CheckpointLog()
    log.wait(20, "halt")
    assert log.settle(error="worker 1 was lost before the final checkpoint", code="bad_request") == [
        Refuse("halt", "worker 1 was lost before the final checkpoint", "bad_request")
    ]


def test_rollback_after_a_lost_shard_takes_an_untaken_partition_back_to_the_checkpoint():
    slots = job_slots(3)
    log = CheckpointLog()
    for shard in (0, 1):
        log.shard_saved(50, shard, 2)
    log.written(50)
    spare, _ = lose(slots, [Barrier({0, 1, 2})], slots[1])
    assert spare is not None
    offer(spare, [80, 81])
    ok = dict(halting=False, has_checkpoint_dir=True, tables_set=True, slots=slots)
    assert cannot_pause("j", JobState.RUNNING, recovering=True, **ok) == "a lost shard is being replaced"
    rewind(slots, log.last)  # every shard reloads clock 50
    assert spare.start_clock == 50
    assert slots[0].start_clock == 0  # a running worker is told by a rewind event instead


def test_a_lost_shard_fails_the_job_unless_every_shard_can_roll_back_to_a_checkpoint():
    slots = job_slots(2)
    what = "shard 1 at 127.0.0.1:9 was lost: it did not answer for 5.1 s (stopped, hung or cut off)"
    args = dict(recovering=False, slots=slots)
    assert shard_lost_verdict(what, JobState.RUNNING, last_checkpoint=None, **args) == f"{what} (no checkpoint to recover from)"
    assert shard_lost_verdict(what, JobState.RUNNING, last_checkpoint=50, **args) is None  # roll back
    assert shard_lost_verdict(what, JobState.RUNNING, last_checkpoint=50, recovering=True, slots=slots) == what
    slots[0].move(SlotState.TRAINED)  # its rows are in the lost shard's state since the checkpoint
    assert shard_lost_verdict(what, JobState.RUNNING, last_checkpoint=50, **args) == what


def test_the_done_event_keeps_each_workers_memory_figures_of_the_right_types():
    from psctl.core.coordinator import worker_memory

    reports = {1: {"memory": {"mode": "stream", "peak_rss_bytes": 5, "budget_bytes": True, "compact_bytes": "9", "extra": 1}},
               0: {"memory": {"mode": "memory", "compact_bytes": 3}}, 2: {"memory": "lots"}, 3: {}}
    assert worker_memory(reports) == [{"worker_id": 0, "mode": "memory", "compact_bytes": 3},
                                      {"worker_id": 1, "mode": "stream", "peak_rss_bytes": 5}]
