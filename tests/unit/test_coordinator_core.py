"""The coordinator's pure parts, driven with no sockets: the job spec, the state machines'
transition tables and the failure detector."""

from __future__ import annotations

import itertools

import pytest

from psctl.core.coordinator import (
    JOB_TRANSITIONS,
    SLOT_TRANSITIONS,
    InvalidTransition,
    JobState,
    Liveness,
    Slot,
    SlotState,
    check_move,
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
    ],
)
def test_a_bad_field_is_one_sentence(body, says):
    with pytest.raises(RequestError, match=says) as info:
        JobSpec.from_wire(body)
    assert "\n" not in str(info.value)
