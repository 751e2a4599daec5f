"""The coordinator's state machines and its failure detector, as plain data.

No asyncio, sockets or peers here: parties are opaque keys, time is passed in.

- ``SlotState`` / ``JobState``: enum states with ONE table of legal transitions each;
  ``move()`` on anything else raises ``InvalidTransition``.
- ``Liveness``: who has been silent for how long, judged on ticks. Silence is counted
  only over time the coordinator itself was running: a tick that comes late (the
  process was stopped, or the loop blocked) counts at most ``max_gap_s`` of the gap and
  judges nobody, so what the peers sent meanwhile (queued on the sockets) is read
  before anyone is judged.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from psctl.core.reports import merge_reports, pool


class InvalidTransition(Exception):
    """A state machine was asked for a move its table does not allow (a bug, not bad input)."""


class SlotState(enum.StrEnum):
    """A worker slot: waiting -> running -> trained -> finished, or lost. A lost running
    worker's partition gets a new slot: pending (the clock it stopped at is not known
    yet) -> spare (a replacement may register) -> running ..."""

    WAITING = "waiting"
    RUNNING = "running"
    TRAINED = "trained"
    FINISHED = "finished"
    LOST = "lost"
    PENDING = "pending"
    SPARE = "spare"


SLOT_TRANSITIONS: dict[SlotState, frozenset[SlotState]] = {
    SlotState.WAITING: frozenset({SlotState.RUNNING}),
    SlotState.PENDING: frozenset({SlotState.SPARE}),
    SlotState.SPARE: frozenset({SlotState.RUNNING}),
    # a worker that stops early (or trained nothing) may report its end without TRAINED
    SlotState.RUNNING: frozenset({SlotState.TRAINED, SlotState.FINISHED, SlotState.LOST}),
    SlotState.TRAINED: frozenset({SlotState.FINISHED, SlotState.LOST}),
    SlotState.FINISHED: frozenset(),
    SlotState.LOST: frozenset(),
}

# Slots the gates count as live workers (a lost one's spare is awaited, not live).
LIVE_SLOT_STATES = frozenset({SlotState.WAITING, SlotState.RUNNING, SlotState.TRAINED, SlotState.FINISHED})
# Slots whose worker is watched by the failure detector.
WATCHED_SLOT_STATES = frozenset({SlotState.RUNNING, SlotState.TRAINED})


class JobState(enum.StrEnum):
    SETUP = "setup"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.SETUP: frozenset({JobState.RUNNING, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
}


def check_move(table: dict[enum.StrEnum, frozenset[enum.StrEnum]], what: str, old: enum.StrEnum, new: enum.StrEnum) -> None:
    if new not in table[old]:
        raise InvalidTransition(f"{what}: {old.value} -> {new.value} is not a legal transition")


@dataclass
class Slot:
    """A worker slot as plain data; ``peer`` is whatever the service uses to reach the worker."""

    worker_id: int
    state: SlotState = SlotState.WAITING
    peer: object | None = None
    pid: int | None = None
    host: str | None = None
    clock: int = 0  # as last reported by its heartbeat
    samples_s: float = 0.0  # likewise
    heartbeats: int = 0  # received so far
    partition: int = -1  # index into the job's partitions; a replacement takes its predecessor's
    start_clock: int = 0  # where a replacement resumes
    session: str | None = None  # the token a heartbeat on another connection must carry
    last_heard_s: float | None = None  # monotonic time of its last frame or heartbeat

    def __post_init__(self) -> None:
        if self.partition < 0:
            self.partition = self.worker_id

    def move(self, new: SlotState) -> None:
        check_move(SLOT_TRANSITIONS, f"worker slot {self.worker_id}", self.state, new)  # type: ignore[arg-type]
        self.state = new


@dataclass
class Liveness:
    """Silence per watched party, judged on ticks (see the module's docstring)."""

    timeout_s: float
    max_gap_s: float  # the most of one tick's gap that counts as silence
    silent_s: dict[Hashable, float] = field(default_factory=dict)
    last_tick_s: float | None = None

    @classmethod
    def for_intervals(cls, heartbeat_interval_s: float, failure_timeout_s: float) -> Liveness:
        return cls(failure_timeout_s, 2 * tick_interval_s(heartbeat_interval_s, failure_timeout_s))

    def watch(self, party: Hashable) -> None:
        self.silent_s.setdefault(party, 0.0)

    def forget(self, party: Hashable) -> None:
        self.silent_s.pop(party, None)

    def heard(self, party: Hashable) -> None:
        if party in self.silent_s:
            self.silent_s[party] = 0.0

    def tick(self, now_s: float) -> list[tuple[Hashable, float]]:
        """Count the time since the last tick as silence; return (party, silent_s) for
        each party silent longer than the timeout (they stop being watched)."""
        gap_s = 0.0 if self.last_tick_s is None else max(now_s - self.last_tick_s, 0.0)
        self.last_tick_s = now_s
        late = gap_s > self.max_gap_s
        for party in self.silent_s:
            self.silent_s[party] += min(gap_s, self.max_gap_s)
        if late:  # our own stall: read what the peers sent before judging them
            return []
        lost = [(p, s) for p, s in self.silent_s.items() if s > self.timeout_s]
        for party, _ in lost:
            del self.silent_s[party]
        return lost


def tick_interval_s(heartbeat_interval_s: float, failure_timeout_s: float) -> float:
    """How often the failure detector looks: several times a timeout, at least once a second."""
    return max(min(heartbeat_interval_s, failure_timeout_s / 4, 1.0), 0.01)


# -- effects ----------------------------------------------------------------------
# The pure parts answer with effects; the service runs them. A request handle is whatever
# the service uses to answer a pending request later (a future there); here it is opaque.


@dataclass(frozen=True)
class Release:
    """Answer the pending request ``handle`` with ``value``."""

    handle: object
    value: object


@dataclass(frozen=True)
class Refuse:
    """Answer the pending request ``handle`` with an error (one sentence, a code)."""

    handle: object
    message: str
    code: str = "job_ended"


Effect = Release | Refuse


class Barrier:
    """Opens when every expected worker has arrived or been dropped; holds the requests that
    wait on it and releases them all with the arrived payloads (dropped ones left out)."""

    def __init__(self, expected: set[int]):
        self.expected = set(expected)
        self.arrived: dict[int, object] = {}
        self.waiting: list[object] = []
        self.result: dict[int, object] | None = None
        self.failed: str | None = None

    @property
    def open(self) -> bool:
        return self.result is not None

    def arrive(self, worker: int, payload: object, handle: object | None = None) -> list[Effect]:
        self.arrived[worker] = payload
        if handle is not None:
            if self.failed is not None:
                return [Refuse(handle, self.failed)]
            self.waiting.append(handle)
        return self._check()

    def add(self, worker: int) -> None:
        """Expect one more worker (a replacement), unless the barrier has already opened."""
        if not self.open:
            self.expected.add(worker)

    def drop(self, worker: int) -> list[Effect]:
        self.expected.discard(worker)
        return self._check()

    def fail(self, reason: str) -> list[Effect]:
        if self.open or self.failed is not None:
            return []
        self.failed = reason
        waiting, self.waiting = self.waiting, []
        return [Refuse(h, reason) for h in waiting]

    def _check(self) -> list[Effect]:
        if self.failed is not None:
            return []
        if not self.open and self.expected <= self.arrived.keys():
            self.result = {w: p for w, p in self.arrived.items() if w in self.expected}
        if not self.open:
            return []
        waiting, self.waiting = self.waiting, []
        return [Release(h, self.result) for h in waiting]


class EpochPool:
    """Epoch reports pooled over partitions (a replacement continues its predecessor's, and a
    step it redoes adds to the same entry); an epoch is summed up once every awaited
    partition has reported it, in epoch order."""

    def __init__(self) -> None:
        self.reports: dict[int, dict[int, dict[str, Any]]] = {}
        self.last_reported = -1

    def report(self, epoch: int, partition: int, body: dict[str, Any]) -> None:
        if epoch <= self.last_reported:
            return  # a replacement redoing the end of an epoch that was already summed up
        reports = self.reports.setdefault(epoch, {})
        reports[partition] = merge_reports(reports.get(partition), body)

    def complete(self, expected: set[int]) -> list[dict[str, Any]]:
        """The driver's "epoch" events for every epoch the ``expected`` partitions all reported."""
        events = []
        for epoch in sorted(self.reports):
            reports = self.reports[epoch]
            if not expected <= reports.keys():
                break
            del self.reports[epoch]
            self.last_reported = epoch
            event = {"kind": "epoch", "epoch": epoch, **pool(list(reports.values()))}
            vals = [r["val"] for r in reports.values() if r.get("val")]
            if vals:
                event["val"] = pool(vals)
            events.append(event)
        return events


class CheckpointLog:
    """Which shards saved which clock; a clock every shard saved becomes the job's checkpoint
    once its manifest is written. Requests waiting for a clock (a halt) are released then."""

    def __init__(self) -> None:
        self.saved: dict[int, set[int]] = {}
        self.last: int | None = None
        self.waiters: list[tuple[int, object]] = []  # (clock, request handle)

    def shard_saved(self, clock: int, shard_index: int, n_shards: int) -> bool:
        """Record it; True when every shard has saved ``clock`` (write the manifest now)."""
        if self.last is not None and clock <= self.last:
            return False
        saved = self.saved.setdefault(clock, set())
        saved.add(shard_index)
        if len(saved) < n_shards:
            return False
        for c in [c for c in self.saved if c <= clock]:
            del self.saved[c]
        return True

    def written(self, clock: int) -> list[Effect]:
        """The manifest of ``clock`` is on disk: it is the checkpoint; release who waited for it."""
        if self.last is not None and clock <= self.last:
            return []
        self.last = clock
        return self.settle(clock=clock)

    def wait(self, clock: int, handle: object) -> list[Effect]:
        """``handle`` waits until the checkpoint reaches ``clock`` (released with that checkpoint's clock)."""
        if self.last is not None and self.last >= clock:
            return [Release(handle, self.last)]
        self.waiters.append((clock, handle))
        return []

    def settle(self, clock: int | None = None, error: str | None = None, code: str = "not_now") -> list[Effect]:
        """Release waiters: reached ``clock``; refused with ``error``; or (neither) the job finished (None)."""
        effects: list[Effect] = []
        keep = []
        for target, handle in self.waiters:
            if error is not None:
                effects.append(Refuse(handle, error, code))
            elif clock is None:
                effects.append(Release(handle, None))
            elif target <= clock:
                effects.append(Release(handle, clock))
            else:
                keep.append((target, handle))
        self.waiters = keep
        return effects


# -- worker slots: loss, replacement, takeover ------------------------------------

UNKNOWN_CLOCK = 2**62  # a pending slot's start clock until the shards say where its predecessor stopped


def live_ids(slots: list[Slot]) -> set[int]:
    return {s.worker_id for s in slots if s.state in LIVE_SLOT_STATES}


def free_slot(slots: list[Slot], *, spare_only: bool) -> Slot | None:
    """The slot a registering worker gets: the first waiting or spare one (only a spare for
    a survivor taking a lost partition over)."""
    states = (SlotState.SPARE,) if spare_only else (SlotState.WAITING, SlotState.SPARE)
    return next((s for s in slots if s.state in states and s.peer is None), None)


def lose(slots: list[Slot], barriers: list[Barrier], slot: Slot) -> tuple[Slot | None, list[Effect]]:
    """``slot``'s worker is lost. One that was still training leaves its partition to a new,
    pending slot that every barrier waits for from now on, so the job cannot end before the
    partition's remaining rows are trained. Returns (that slot or None, the barriers' effects)."""
    unfinished = slot.state is SlotState.RUNNING  # a worker lost after training needs no replacement
    slot.move(SlotState.LOST)
    spare = None
    if unfinished:
        spare = Slot(len(slots), state=SlotState.PENDING, partition=slot.partition, start_clock=UNKNOWN_CLOCK)
        slots.append(spare)
        for barrier in barriers:
            barrier.add(spare.worker_id)
    effects: list[Effect] = []
    for barrier in barriers:
        effects += barrier.drop(slot.worker_id)
    return spare, effects


def offer(spare: Slot, acknowledged: list[int]) -> None:
    """The shards acknowledged the lost worker's pushes up to these clocks: its partition
    resumes at the lowest (a push that reached only some shards is redone, never skipped; a
    roll-back meanwhile may have lowered it already), and a worker may now take it."""
    spare.start_clock = min(min(acknowledged, default=0), spare.start_clock)
    spare.move(SlotState.SPARE)


def rewind(slots: list[Slot], clock: int) -> None:
    """Every shard went back to the checkpoint at ``clock``: so does a partition not taken over yet."""
    for s in slots:
        if s.state in (SlotState.SPARE, SlotState.PENDING):
            s.start_clock = min(s.start_clock, clock)


def pick_survivor(candidates: list[Slot], takeovers: dict[int, int]) -> Slot | None:
    """Who takes a lost partition over: the training (or trained) worker with the fewest takeovers so far."""
    eligible = [s for s in candidates if s.state in WATCHED_SLOT_STATES]
    if not eligible:
        return None
    pick = min(eligible, key=lambda s: (takeovers.get(s.worker_id, 0), s.worker_id))
    takeovers[pick.worker_id] = takeovers.get(pick.worker_id, 0) + 1
    return pick


def cannot_pause(
    job_id: str, state: JobState, *, halting: bool, has_checkpoint_dir: bool, tables_set: bool, recovering: bool, slots: list[Slot]
) -> str | None:
    """Why no checkpoint at one clock can be taken now (None: it can)."""
    if state is not JobState.RUNNING:
        return "the job is not running"
    if halting:
        return "the job is stopping"
    if not has_checkpoint_dir:
        return f"job {job_id} has no checkpoint folder (--checkpoint-dir)"
    if not tables_set:
        return "training has not started yet"
    if recovering:
        return "a lost shard is being replaced"
    if any(s.state in (SlotState.SPARE, SlotState.PENDING) for s in slots):
        return "a lost worker is being replaced"
    return None


def one_clock(paused_clocks: list[object]) -> int:
    """The clock every paused worker can reach: the furthest one's."""
    if not paused_clocks or not all(isinstance(c, int) and not isinstance(c, bool) for c in paused_clocks):
        raise ValueError("a worker answered PAUSE without its clock")
    return max(paused_clocks)  # type: ignore[type-var]


def shard_lost_verdict(
    what: str, state: JobState, *, last_checkpoint: int | None, recovering: bool, slots: list[Slot]
) -> str | None:
    """A shard of the job was lost (``what`` says which and why): None when every shard can
    roll back to the last checkpoint once a replacement registers; else why the job fails."""
    finished = any(s.state in (SlotState.TRAINED, SlotState.FINISHED) for s in slots)
    if last_checkpoint is None:
        return f"{what} (no checkpoint to recover from)"
    if state is not JobState.RUNNING or finished or recovering:
        return what
    return None
