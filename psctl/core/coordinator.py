"""The coordinator as plain data: its state machines, its failure detector, and the one
entry point that makes every decision, ``CoordinatorState.handle(event, now_s) -> effects``.

No asyncio, sockets or peers here: parties and requests are opaque keys, time is passed in.
The service (cluster/coordinator.py) turns frames into events and runs the effects; the
events and effects themselves are in core/events.py (imported here, so ``coordinator.X`` names them too).

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
import itertools
import logging
import secrets
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from psctl.core.events import (  # noqa: F401 (the events and effects are part of this module's interface)
    Abort,
    Answered,
    ArmTimer,
    Ask,
    Checkpointed,
    ConnectionClosed,
    Effect,
    EpochReported,
    EpochSeen,
    Event,
    Failed,
    FinalReport,
    HaltRequested,
    Heard,
    Heartbeat,
    JobEndRequested,
    JobSubmitted,
    KillShard,
    ManifestWritten,
    ModelDropRequested,
    ModelKept,
    ModelsAsked,
    NoAnswer,
    Notify,
    PoolStats,
    Progress,
    Refuse,
    Release,
    ServerStopping,
    ServiceEffect,
    ShardRegistered,
    StatsArrived,
    StatsPooled,
    StatusAsked,
    StopRequested,
    TablesGiven,
    Tick,
    TimerFired,
    Trained,
    WorkerRegistered,
    WriteManifest,
)
from psctl.core.job import DEFAULT_FAILURE_TIMEOUT_S, DEFAULT_HEARTBEAT_INTERVAL_S
from psctl.core.kept import KEPT_TRANSITIONS, KeptState, name_problem
from psctl.core.reports import count_dicts, merge_reports, pool
from psctl.core.tables import TableSpec, shards_needed, table_ranges
from psctl.errors import RequestError
from psctl.protocol.wire import MsgType

log = logging.getLogger("psctl.coordinator")


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

    def shard_failed(self, clock: int, error: str) -> list[Effect]:
        """A shard could not save ``clock``: that clock never becomes the checkpoint (the last one
        stays), and whoever waits for a checkpoint at or before it is refused with ``error``."""
        self.saved.pop(clock, None)
        effects: list[Effect] = []
        keep = []
        for target, handle in self.waiters:
            if target <= clock and (self.last is None or self.last < target):
                effects.append(Refuse(handle, error, "checkpoint_failed"))
            else:
                keep.append((target, handle))
        self.waiters = keep
        return effects

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


def free_slot(slots: list[Slot], *, spare_only: bool, partition: int | None = None) -> Slot | None:
    """The slot a registering worker gets: the first waiting or spare one (only a spare for
    a survivor taking a lost partition over; only one of ``partition`` for a worker that
    holds that partition's rows alone)."""
    states = (SlotState.SPARE,) if spare_only else (SlotState.WAITING, SlotState.SPARE)
    return next((s for s in slots if s.state in states and s.peer is None and partition in (None, s.partition)), None)


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


def orphan_wait_s(spec: Any) -> float:
    """How long a job whose every worker was lost waits for a replacement to register:
    twice the time a lost worker's partition waits for a new worker (a process start on a
    loaded host takes seconds)."""
    return 2.0 * max(spec.failure_timeout_s, spec.takeover_grace_s)


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


# == the coordinator as one state machine ==========================================
# ``CoordinatorState.handle(event, now_s) -> [effect]`` is the whole coordinator's logic:
# membership, the job, its slots, shards, barriers, epochs and checkpoints. The service
# turns frames into events and runs the effects; what it needs back (a shard's answer, a
# timer, a manifest on disk) comes back as another event. Parties and requests are opaque
# keys here (``conn``, ``request``): the service maps them to its connections and futures.

SHARD_WAIT_S = 30.0
SHARD_SETUP_TIMEOUT_S = 30.0
PAUSE_TIMEOUT_S = 10.0  # a worker answers PAUSE at once; one that does not is hung
STATUS_TIMEOUT_S = 2.0




# -- the state ----------------------------------------------------------------------


@dataclass
class Party:
    """What the coordinator knows of one connection."""

    role: str | None = None  # "shard", "driver", "worker" once it said
    job_id: str | None = None
    worker_id: int | None = None
    shard_id: int | None = None
    helper: bool = False  # a survivor's second connection, taking a lost partition over


@dataclass
class ShardEntry:
    shard_id: int
    address: str
    pid: int
    conn: Hashable
    lost_reason: str | None = None


@dataclass
class PauseOp:
    """A checkpoint at one clock under way (one at a time); ``then`` says who waits for it."""

    stop: bool
    then: tuple[Any, ...]  # ("halt", request) | ("server", request, reason) | ("timer",)
    live: list[int] = field(default_factory=list)  # the paused workers' ids
    target: int | None = None


@dataclass
class JobData:
    job_id: str
    spec: Any  # JobSpec
    driver: Hashable
    shards: list[ShardEntry]
    workers: list[Slot]
    stats: Barrier
    trained: Barrier
    final: Barrier
    started_s: float
    ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    epochs: EpochPool = field(default_factory=EpochPool)
    stats_sent: bool = False
    stats_waiting: list[Hashable] = field(default_factory=list)  # STATS requests answered once tables are set
    tables: list[dict[str, Any]] = field(default_factory=list)
    tables_set: bool = False
    checkpoints: CheckpointLog = field(default_factory=CheckpointLog)
    recovering: int | None = None  # index of a lost shard awaiting its replacement
    stats_reply: tuple[dict[str, Any], list[Any]] | None = None  # body and vocabulary arrays
    state: JobState = JobState.SETUP
    pausing: PauseOp | None = None
    pause_queue: list[PauseOp] = field(default_factory=list)
    halting: bool = False  # the workers were told to stop at one clock: no more pauses
    stop_requested: bool = False  # early stop: workers that join later are told too
    takeovers: dict[int, int] = field(default_factory=dict)  # worker id -> partitions it was asked to take over
    manifests_writing: set[int] = field(default_factory=set)  # clocks whose manifest is being written
    manifest_previous: dict[int, int | None] = field(default_factory=dict)  # those manifests' previous_clock
    done_report: dict[str, Any] | None = None  # the 'done' event, held while a manifest is being written
    released_epoch: int = -1  # hold_epochs: the last epoch the driver has read; workers go on past its end
    orphaned: int = 0  # how many times every worker was lost (a timer armed then fails the job unless one registered)
    kept_from: KeptEntry | None = None  # the kept model this job trains further, in place
    kept: bool = False  # MODEL_KEEP came: the tables are (being) handed over, once

    @property
    def last_checkpoint(self) -> int | None:
        return self.checkpoints.last

    def move(self, new: JobState) -> None:
        check_move(JOB_TRANSITIONS, f"job {self.job_id}", self.state, new)  # type: ignore[arg-type]
        self.state = new

    def live_ids(self) -> set[int]:
        return live_ids(self.workers)


@dataclass
class KeptEntry:
    """A kept model in the coordinator's registry: the meta the model file has, and where its parts are.

    ``shards[i]`` holds part i (None: that shard was lost and no other took its place yet).
    The registry lives as long as the coordinator; the parts' files (in ``dir``) outlive shards."""

    name: str
    version: str  # the job that trained it
    meta: dict[str, Any]
    tables: list[dict[str, Any]]
    ranges: dict[str, list[tuple[int, int]]]
    shards: list[ShardEntry | None]
    dir: str | None
    trained_at: float | None
    state: KeptState = KeptState.KEPT
    reason: str | None = None  # why it is restoring or lost

    def move(self, new: KeptState, reason: str | None = None) -> None:
        check_move(KEPT_TRANSITIONS, f"kept model {self.name}", self.state, new)  # type: ignore[arg-type]
        self.state, self.reason = new, reason

    def part_body(self, index: int) -> dict[str, Any]:
        """What a shard needs to load part ``index`` (KEEP_LOAD) or free it (KEEP_DROP)."""
        return {
            "name": self.name, "version": self.version, "shard_index": index, "n_shards": len(self.shards),
            "dir": self.dir, "tables": self.tables, "ranges": {n: r[index] for n, r in self.ranges.items()},
        }

    def listing(self, sizes: list[dict[str, Any] | None], with_meta: bool) -> dict[str, Any]:
        meta = self.meta
        row = {
            "name": self.name, "version": self.version, "kind": meta.get("kind"), "state": str(self.state),
            "reason": self.reason, "trained_at": self.trained_at, "metrics": meta.get("metrics", {}),
            "checkpoint_dir": self.dir, "tables": self.tables, "ranges": self.ranges,
            "shards": [
                {"index": i, "address": None if s is None else s.address, **(sizes[i] or {})} for i, s in enumerate(self.shards)
            ],
        }
        if with_meta:
            row["meta"] = meta
        return row


def _not_trainable(
    kept: KeptEntry, tables: list[dict[str, Any]], ranges: dict[str, list[tuple[int, int]]], shards: list[ShardEntry]
) -> str | None:
    """Why a job's tables cannot be a kept model's trained further in place (one sentence), or None."""
    def shape(ts: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
        return {t["name"]: (t["rows"], t.get("dim", 1), t.get("dtype", "float32"), bool(t.get("sparse"))) for t in ts}

    if shape(tables) != shape(kept.tables):
        return f"kept model {kept.name!r} has tables {shape(kept.tables)}; this job's are {shape(tables)} (another model or data layout)"
    if [s.conn if s else None for s in kept.shards] != [s.conn for s in shards]:
        return f"kept model {kept.name!r} lives on other shards than this job's; train it further on the shards that hold it"
    if {n: [tuple(r) for r in rs] for n, rs in kept.ranges.items()} != {n: [tuple(r) for r in rs] for n, rs in ranges.items()}:
        return f"kept model {kept.name!r} is split across its shards in other key ranges than this job's tables"
    return None


@dataclass
class _Parked:
    request: Hashable
    conn: Hashable
    event: Any


class CoordinatorState:
    """Every decision of the coordinator; see the section's comment above."""

    def __init__(
        self, job_id_prefix: str = "job", token: Callable[[], str] | None = None,
        idle_failure_timeout_s: float = DEFAULT_FAILURE_TIMEOUT_S,
    ) -> None:  # fmt: skip
        self.parties: dict[Hashable, Party] = {}  # open connections
        self.shards: list[ShardEntry] = []
        self.job: JobData | None = None
        # Between jobs a shard is watched with this timeout (psctl server --failure-timeout-s);
        # a job watches everyone with its own.
        self.idle_failure_timeout_s = idle_failure_timeout_s
        self.liveness = Liveness.for_intervals(DEFAULT_HEARTBEAT_INTERVAL_S, idle_failure_timeout_s)
        self._job_ids = itertools.count(1)
        self._prefix = job_id_prefix
        self._token = token or (lambda: secrets.token_hex(16))
        self._asks = itertools.count(1)
        self._pending: dict[Hashable, tuple[Callable[..., list[ServiceEffect]], tuple[Any, ...]]] = {}
        self._timers: dict[Hashable, tuple[Callable[..., list[ServiceEffect]], tuple[Any, ...]]] = {}
        self._pinging: set[int] = set()  # shard ids with a PING in flight
        self._submits: list[_Parked] = []  # SUBMITs waiting for enough shards
        self._registrants: list[_Parked] = []  # REGISTER_WORKERs waiting for a free slot
        self.models: dict[str, KeptEntry] = {}  # kept models by name (core/kept.py)
        self.keeping: str | None = None  # the name a KEEP_TABLES round is under way for
        self.now_s = 0.0

    # -- the entry point -----------------------------------------------------------
    def handle(self, event: Event, now_s: float) -> list[ServiceEffect]:
        """Apply ``event`` at monotonic time ``now_s``; return what the service must do.
        Raises ``RequestError`` when the frame behind ``event`` is refused at once."""
        self.now_s = now_s
        handler = self._events[type(event)]
        return handler(self, event)

    def tick_interval_s(self) -> float:
        spec = self.job.spec if self.job is not None else None
        if spec is None:
            return tick_interval_s(DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_FAILURE_TIMEOUT_S)
        return tick_interval_s(spec.heartbeat_interval_s, spec.failure_timeout_s)

    # -- helpers ---------------------------------------------------------------------
    def _ask(self, kind: Any, targets: list[tuple[Hashable, dict[str, Any]]], timeout_s: float | None,
             then: Callable[..., list[ServiceEffect]], *args: Any, arrays: list[Any] | None = None) -> list[ServiceEffect]:
        ask = ("ask", next(self._asks))
        self._pending[ask] = (then, args)
        return [Ask(ask, kind, tuple(targets), timeout_s, None if arrays is None else tuple(arrays))]

    def _arm(self, timer: Hashable, delay_s: float, then: Callable[..., list[ServiceEffect]], *args: Any) -> list[ServiceEffect]:
        self._timers[timer] = (then, args)
        return [ArmTimer(timer, delay_s)]

    def _open(self, conn: Hashable | None) -> bool:
        return conn is not None and conn in self.parties

    def _to_driver(self, job: JobData, body: dict[str, Any], arrays: list[Any] | None = None) -> list[ServiceEffect]:
        return [Notify((job.driver,), MsgType.EVENT, body, arrays)] if self._open(job.driver) else []

    def _worker_conns(self, job: JobData, slots: list[Slot] | None = None) -> tuple[Hashable, ...]:
        return tuple(s.peer for s in (job.workers if slots is None else slots) if self._open(s.peer))  # type: ignore[misc]

    def _job_of(self, conn: Hashable) -> tuple[JobData, Slot]:
        job, party = self.job, self.parties.get(conn)
        if job is None or party is None or party.job_id != job.job_id or job.state is not JobState.RUNNING:
            raise RequestError("no running job for this worker", code="no_job")
        assert party.worker_id is not None
        return job, job.workers[party.worker_id]

    def _move(self, slot: Slot, new: SlotState) -> None:
        """A slot's move that a worker's message asked for: an illegal one is that worker's error."""
        try:
            slot.move(new)
        except InvalidTransition as exc:
            raise RequestError(str(exc), code="unexpected") from None
        if new in WATCHED_SLOT_STATES:
            self.liveness.watch(("worker", slot.worker_id))
        else:
            self.liveness.forget(("worker", slot.worker_id))

    def _slot_heard(self, slot: Slot) -> None:
        slot.last_heard_s = self.now_s
        self.liveness.heard(("worker", slot.worker_id))

    def _answer(self, job: JobData, effects: list[Effect]) -> list[ServiceEffect]:
        """Turn what the barriers and the checkpoint log released into answers: their handles
        are tagged with the flow that waits ("stats", "trained", "halt")."""
        out: list[ServiceEffect] = []
        for effect in effects:
            tag, *rest = effect.handle  # type: ignore[misc]
            if tag == "trained":
                out.append(Release(rest[0], {}) if isinstance(effect, Release) else Refuse(rest[0], effect.message, effect.code))
            elif tag == "stats":
                if isinstance(effect, Refuse):
                    out.append(Refuse(rest[0], effect.message, effect.code))
                else:
                    job.stats_waiting.append(rest[0])
                    if not job.stats_sent:  # the driver names the tables from these and keeps them for the model file
                        job.stats_sent = True
                        out.append(PoolStats(job.job_id, effect.value))  # type: ignore[arg-type]
            elif tag == "halt":
                out += self._halt_reached(job, rest[0], effect)
        return out + self._flush_stats(job)

    def _flush_stats(self, job: JobData) -> list[ServiceEffect]:
        if job.stats_reply is None or not job.tables_set or not job.stats_waiting:
            return []
        body, arrays = job.stats_reply
        waiting, job.stats_waiting = job.stats_waiting, []
        reply = {**body, "shards": [s.address for s in job.shards], "ranges": job.ranges}
        return [Release(r, (reply, arrays)) for r in waiting]

    def _changed(self) -> list[ServiceEffect]:
        """Membership or the job changed: parked SUBMITs and REGISTER_WORKERs may go on now."""
        out: list[ServiceEffect] = []
        for parked in list(self._submits):
            if len(self.shards) >= parked.event.spec.min_shards:
                self._submits.remove(parked)
                if self.job is not None:
                    out.append(Refuse(parked.request, f"job {self.job.job_id} is still running on this server", "busy"))
                else:
                    out += self._open_job(parked.event)
        for parked in list(self._registrants):
            slot = self._free_slot(None, parked.event.partition)
            if slot is None:
                continue  # a worker of another partition may still find its slot
            self._registrants.remove(parked)
            out += self._assign(parked.event, slot)
        return out

    # -- connections -------------------------------------------------------------------
    def _heard(self, event: Heard) -> list[ServiceEffect]:
        party = self.parties.setdefault(event.conn, Party())
        if party.role == "shard":
            self.liveness.heard(("shard", party.shard_id))
        elif party.role == "worker" and self.job is not None and party.job_id == self.job.job_id:
            assert party.worker_id is not None
            self._slot_heard(self.job.workers[party.worker_id])
        return []

    def _closed(self, event: ConnectionClosed) -> list[ServiceEffect]:
        party = self.parties.pop(event.conn, None)
        out: list[ServiceEffect] = []
        for parked in [p for p in self._registrants if p.conn == event.conn]:
            self._registrants.remove(parked)
            out.append(Refuse(parked.request, "connection closed while waiting for a job", "bad_request"))
        self._submits = [p for p in self._submits if p.conn != event.conn]
        if party is None:
            return out
        job = self.job
        if party.role == "shard":
            self.liveness.forget(("shard", party.shard_id))
            self._pinging.discard(party.shard_id)  # type: ignore[arg-type]
            lost = next((s for s in self.shards if s.conn == event.conn), None)
            self.shards = [s for s in self.shards if s.conn != event.conn]
            if lost is not None:
                out += self._shard_lost(lost) + self._parts_lost(lost)
        elif party.role == "worker" and job is not None and party.job_id == job.job_id:
            assert party.worker_id is not None
            out += self._worker_lost(job.workers[party.worker_id])
        elif party.role == "driver" and job is not None and job.driver == event.conn:
            log.warning("driver of job %s went away; ending the job", job.job_id)
            out += self._end_job("the driver disconnected")
        return out + self._changed()

    # -- shards ------------------------------------------------------------------------
    def _register_shard(self, event: ShardRegistered) -> list[ServiceEffect]:
        shard_id = max((s.shard_id for s in self.shards), default=-1) + 1
        entry = ShardEntry(shard_id, event.address, event.pid, event.conn)
        self.shards.append(entry)
        party = self.parties.setdefault(event.conn, Party())
        party.role, party.shard_id = "shard", shard_id
        self.liveness.watch(("shard", shard_id))
        log.info("shard %d registered at %s", shard_id, event.address)
        out: list[ServiceEffect] = [Release(event.request, {"shard_id": shard_id})]
        job = self.job
        if job is not None and job.recovering is not None:
            out += self._recover(job, job.recovering, entry)
        return out + self._restore_parts(entry) + self._changed()

    def _setup_targets(self, job: JobData, restore: dict[str, Any] | None, workers: list[int]) -> list[tuple[Hashable, dict[str, Any]]]:
        spec = job.spec
        # A worker's HELLO to a shard must carry its slot's session token: no other connection
        # can say HELLO as that worker and take its place.
        sessions = {str(w.worker_id): w.session for w in job.workers if w.session is not None and w.worker_id in workers}
        return [
            (
                s.conn,
                {
                    "job_id": job.job_id, "tables": job.tables, "ranges": {name: r[i] for name, r in job.ranges.items()},
                    "mode": spec.mode, "staleness": spec.staleness, "workers": workers, "optimizer": spec.optimizer,
                    "seed": spec.seed, "shard_index": i, "checkpoint": spec.checkpoint, "restore": restore,
                    "n_shards": len(job.shards), "sessions": sessions,
                    **({"from_kept": {"name": job.kept_from.name, "version": job.kept_from.version}} if job.kept_from else {}),
                },
            )
            for i, s in enumerate(job.shards)
        ]

    def _shard_lost(self, shard: ShardEntry) -> list[ServiceEffect]:
        """Wait for a replacement shard when the job has a checkpoint to roll back to; else fail."""
        job = self.job
        index = next((i for i, s in enumerate(job.shards) if s.conn == shard.conn), None) if job else None
        if job is None or index is None:
            return []
        why = shard.lost_reason
        what = f"shard {shard.shard_id} at {shard.address} was lost" + (f": {why}" if why else "")
        out = self._answer(job, job.checkpoints.settle(error=f"{what} before the final checkpoint was saved", code="bad_request"))
        failed = shard_lost_verdict(
            what, job.state, last_checkpoint=job.last_checkpoint, recovering=job.recovering is not None, slots=job.workers
        )
        if failed is not None:
            return out + self._fail(failed)
        job.recovering = index
        log.warning("job %s: %s; waiting for a shard to take its place", job.job_id, what)
        return out + self._to_driver(job, {"kind": "shard_lost", "index": index, "clock": job.last_checkpoint, "reason": what})

    def _recover(self, job: JobData, index: int, shard: ShardEntry) -> list[ServiceEffect]:
        """Roll every shard back to the last checkpoint and send the workers there."""
        job.shards[index] = shard
        clock = job.last_checkpoint
        assert clock is not None
        live = [w for w in job.workers if w.state is SlotState.RUNNING]
        restore = {"dir": job.spec.checkpoint_dir, "clock": clock, "job_id": job.job_id}  # this job wrote that checkpoint
        targets = self._setup_targets(job, restore, [w.worker_id for w in live])
        return self._ask(MsgType.JOB_SETUP, targets, SHARD_SETUP_TIMEOUT_S, self._recovered, job, index, clock, live)

    def _recovered(self, replies: tuple[Any, ...], job: JobData, index: int, clock: int, live: list[Slot]) -> list[ServiceEffect]:
        if job is not self.job:
            return []
        failure = next((r for r in replies if isinstance(r, NoAnswer)), None)
        if failure is not None:
            return self._fail(f"recovering shard {index} from the checkpoint at clock {clock} failed: {failure.reason}")
        job.recovering = None
        rewind(job.workers, clock)  # a lost worker's partition, not taken over yet, also goes back
        # The surviving shards knew how far the fastest worker had got: those steps are done again.
        reached = [int(r["previous_clock"]) for r in replies if r.get("previous_clock") is not None]
        replayed = max(reached, default=clock) - clock
        shards = [s.address for s in job.shards]
        out: list[ServiceEffect] = [
            Notify(self._worker_conns(job, live), MsgType.EVENT, {"kind": "rewind", "clock": clock, "shards": shards, "ranges": job.ranges})
        ]
        return out + self._to_driver(
            job, {"kind": "shard_recovered", "index": index, "clock": clock, "replayed_steps": replayed, "shards": shards}
        )

    # -- the driver ----------------------------------------------------------------------
    def _submit(self, event: JobSubmitted) -> list[ServiceEffect]:
        """Open a job once enough shards joined: workers may register and run the statistics
        pass; tables come later (TABLES)."""
        if self.job is not None:
            raise RequestError(f"job {self.job.job_id} is still running on this server", code="busy")
        self._check_keep(event.spec.keep)
        self._kept_to_train(event.spec)
        if len(self.shards) >= event.spec.min_shards:
            return self._open_job(event)
        self._submits.append(_Parked(event.request, event.conn, event))
        return self._arm(("submit", event.request), SHARD_WAIT_S, self._submit_timed_out, event)

    def _submit_timed_out(self, event: JobSubmitted) -> list[ServiceEffect]:
        parked = next((p for p in self._submits if p.request == event.request), None)
        if parked is None:
            return []
        self._submits.remove(parked)
        message = f"only {len(self.shards)} of {event.spec.min_shards} shards joined within {SHARD_WAIT_S:g} s"
        return [Refuse(event.request, message, "no_shards")]

    def _open_job(self, event: JobSubmitted) -> list[ServiceEffect]:
        spec = event.spec
        job_id = f"{self._prefix}-{next(self._job_ids)}"
        workers = set(range(spec.n_workers))
        job = JobData(
            job_id, spec, event.conn, list(self.shards),
            [Slot(i, start_clock=spec.resume_clock) for i in range(spec.n_workers)],
            Barrier(workers), Barrier(workers), Barrier(workers), self.now_s,
        )
        self.job = job
        job.kept_from = self._kept_to_train(spec)
        job.move(JobState.RUNNING)
        self.liveness.timeout_s = spec.failure_timeout_s
        self.liveness.max_gap_s = 2 * tick_interval_s(spec.heartbeat_interval_s, spec.failure_timeout_s)
        party = self.parties.setdefault(event.conn, Party())
        party.role, party.job_id = "driver", job_id
        log.info("job %s: %d workers, %d shards, mode %s", job_id, spec.n_workers, len(self.shards), spec.mode)
        out: list[ServiceEffect] = [Release(event.request, {"job_id": job_id, "shards": [s.address for s in job.shards]})]
        return out + self._changed()

    def _tables(self, event: TablesGiven) -> list[ServiceEffect]:
        """The driver names the job's tables (known once labels are): set them up on every shard."""
        job = self.job
        if job is None or job.driver != event.conn or job.ranges:
            raise RequestError("TABLES comes once, from the driver of the running job")
        try:
            tables = [TableSpec.from_dict(t) for t in event.body["tables"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise RequestError(f"bad tables: {exc}") from None
        kept = job.kept_from
        # The tables go on as few of the shards as their size needs; a checkpoint resumes on
        # as many as wrote it, a kept model stays where it lives. The rest sit this job out.
        if kept is not None:
            used = len(kept.shards)
        elif job.spec.resume:
            used = int(job.spec.resume.get("n_shards") or len(job.shards))
        else:
            used = shards_needed(tables, len(job.shards), job.spec.min_shard_bytes)
        if used > len(job.shards):
            raise RequestError(f"the job needs {used} shards and only {len(job.shards)} are registered", code="no_shards")
        job.shards = job.shards[:used]
        ranges = {t.name: table_ranges(t, len(job.shards)) for t in tables}
        if kept is not None:
            problem = _not_trainable(kept, [t.to_dict() for t in tables], ranges, job.shards)
            if problem is not None:
                raise RequestError(problem, code="bad_request")
        job.ranges = ranges
        job.tables = [t.to_dict() for t in tables]
        targets = self._setup_targets(job, job.spec.resume, [w.worker_id for w in job.workers])
        return self._ask(MsgType.JOB_SETUP, targets, SHARD_SETUP_TIMEOUT_S, self._tables_set, job, event.request)

    def _tables_set(self, replies: tuple[Any, ...], job: JobData, request: Hashable) -> list[ServiceEffect]:
        failure = next((r for r in replies if isinstance(r, NoAnswer)), None)
        if failure is not None:
            return self._fail(f"shard setup failed: {failure.reason}") + [Refuse(request, f"shard setup failed: {failure.reason}", "bad_request")]
        if job is not self.job:
            return [Refuse(request, f"job {job.job_id} ended", "job_ended")]
        job.tables_set = True
        out: list[ServiceEffect] = [Release(request, {"shards": [s.address for s in job.shards], "ranges": job.ranges})]
        out += self._flush_stats(job)
        every_s = job.spec.checkpoint_every_s
        if every_s > 0:
            out += self._arm(("checkpoint_timer", job.job_id), every_s, self._checkpoint_timer, job, every_s)
        return out

    def _stop(self, event: StopRequested) -> list[ServiceEffect]:
        """The driver stops training early: workers finish their step and wrap up as usual."""
        job = self.job
        if job is None or job.driver != event.conn:
            return []
        job.stop_requested = True
        return [Notify(self._worker_conns(job), MsgType.EVENT, {"kind": "stop"})]

    def _job_end(self, event: JobEndRequested) -> list[ServiceEffect]:
        """The driver is done with the job; a ``reason`` ends it early (workers are told)."""
        job = self.job
        if job is None or job.driver != event.conn:
            return []
        reason = event.reason
        return self._end_job(reason if isinstance(reason, str) and job.state is JobState.RUNNING else None)

    def _end_job(self, reason: str | None) -> list[ServiceEffect]:
        job = self.job
        if job is None:
            return []
        self.job = None
        ended = f"job {job.job_id} ended: {reason or 'done'}"
        out = self._answer(job, job.checkpoints.settle(error=ended, code="job_ended"))
        for w in job.workers:
            self.liveness.forget(("worker", w.worker_id))
        self.liveness.timeout_s = self.idle_failure_timeout_s
        self.liveness.max_gap_s = 2 * tick_interval_s(DEFAULT_HEARTBEAT_INTERVAL_S, self.idle_failure_timeout_s)
        if reason is not None:
            if job.state is JobState.RUNNING:
                job.move(JobState.FAILED)
            out.append(Notify(self._worker_conns(job), MsgType.EVENT, {"kind": "abort", "reason": reason}))
        for barrier in (job.stats, job.trained, job.final):
            out += self._answer(job, barrier.fail(ended))
        waiting, job.stats_waiting = job.stats_waiting, []
        out += [Refuse(r, ended, "job_ended") for r in waiting]
        out.append(Notify(tuple(s.conn for s in job.shards if self._open(s.conn)), MsgType.JOB_CLEAR, {"job_id": job.job_id}))
        return out + self._changed()

    def _fail(self, reason: str) -> list[ServiceEffect]:
        job = self.job
        if job is None:
            return []
        log.warning("job %s failed: %s", job.job_id, reason)
        return self._to_driver(job, {"kind": "failed", "reason": reason}) + self._end_job(reason)

    # -- a checkpoint at one clock: pause, checkpoint, resume (or halt) ------------------
    def _cannot_pause(self, job: JobData) -> str | None:
        if job is not self.job:
            return "the job is not running"
        return cannot_pause(
            job.job_id, job.state, halting=job.halting, has_checkpoint_dir=bool(job.spec.checkpoint),
            tables_set=bool(job.ranges), recovering=job.recovering is not None, slots=job.workers,
        )

    def _halt(self, event: HaltRequested) -> list[ServiceEffect]:
        job = self.job
        if job is None or job.driver != event.conn:
            raise RequestError("HALT comes from the driver of the running job", code="forbidden")
        return self._pause(job, PauseOp(stop=True, then=("halt", event.request, "stopped by its driver")))

    def _server_stopping(self, event: ServerStopping) -> list[ServiceEffect]:
        job = self.job
        if job is None or job.state is not JobState.RUNNING:
            return [Release(event.request, None)]
        if not job.spec.checkpoint:
            return self._fail(event.reason) + [
                Release(event.request, f"job {job.job_id} stopped (it has no --checkpoint-dir, so no final checkpoint)")
            ]
        return self._pause(job, PauseOp(stop=True, then=("server", event.request, event.reason)))

    def _checkpoint_timer(self, job: JobData, every_s: float) -> list[ServiceEffect]:
        """--checkpoint-every Ns: a checkpoint at one clock every N seconds while the job runs."""
        if job is not self.job or job.state is not JobState.RUNNING:
            return []
        out = self._arm(("checkpoint_timer", job.job_id), every_s, self._checkpoint_timer, job, every_s)
        if job.pausing is not None:
            return out  # a stop is under way
        return out + self._pause(job, PauseOp(stop=False, then=("timer",)))

    def _pause(self, job: JobData, op: PauseOp) -> list[ServiceEffect]:
        """One pause at a time: a stop waits for a timed checkpoint's pause."""
        if job.pausing is not None:
            job.pause_queue.append(op)
            return []
        why = self._cannot_pause(job)
        if why is not None:
            return self._paused(job, op, error=f"no checkpoint now: {why}")
        job.pausing = op
        live = [w for w in job.workers if w.state is SlotState.RUNNING and self._open(w.peer)]
        if not live:
            return self._paused(job, op, target=None)
        op.live = [w.worker_id for w in live]
        targets = [(w.peer, {"job_id": job.job_id}) for w in live]
        return self._ask(MsgType.PAUSE, targets, PAUSE_TIMEOUT_S, self._pause_answered, job, op)  # type: ignore[arg-type]

    def _pause_answered(self, replies: tuple[Any, ...], job: JobData, op: PauseOp) -> list[ServiceEffect]:
        failure = next((r for r in replies if isinstance(r, NoAnswer)), None)
        if failure is not None:
            return self._paused(job, op, error=f"no checkpoint now: {failure.reason}")
        try:
            target = one_clock([r.get("clock") for r in replies])
        except ValueError as exc:
            return self._paused(job, op, error=str(exc), code="bad_request")
        if job is not self.job:
            return self._paused(job, op, error="no checkpoint now: the job is not running")
        op.target = target
        targets = [(s.conn, {"job_id": job.job_id, "clock": target}) for s in job.shards]
        return self._ask(MsgType.CHECKPOINT, targets, SHARD_SETUP_TIMEOUT_S, self._checkpoint_answered, job, op)

    def _checkpoint_answered(self, replies: tuple[Any, ...], job: JobData, op: PauseOp) -> list[ServiceEffect]:
        failure = next((r for r in replies if isinstance(r, NoAnswer)), None)
        if failure is not None:
            return self._paused(job, op, error=f"no checkpoint now: {failure.reason}")
        job.halting = op.stop
        log.info("job %s: checkpoint at clock %d asked for (%s)", job.job_id, op.target, "stop there" if op.stop else "go on")
        return self._paused(job, op, target=op.target)

    def _paused(
        self, job: JobData, op: PauseOp, *, target: int | None = None, error: str | None = None, code: str = "not_now"
    ) -> list[ServiceEffect]:
        """The pause is over: let the workers go on (only up to ``target`` when stopping), then
        whoever asked for it goes on, and the next pause may start."""
        out: list[ServiceEffect] = []
        if op.live:
            until = target if op.stop and error is None else None
            slots = [job.workers[i] for i in op.live]
            out.append(Notify(self._worker_conns(job, slots), MsgType.RESUME, {"until": until}))
        if job.pausing is op:
            job.pausing = None
        kind = op.then[0]
        if kind == "timer":
            if error is not None:
                log.info("job %s: skipped a timed checkpoint: %s", job.job_id, error)
        elif error is not None:
            out += self._halt_failed(job, op, error, code)
        elif target is None:
            out += self._halt_done(job, op, None)
        else:
            out += self._answer(job, job.checkpoints.wait(target, ("halt", op)))
        if job.pausing is None and job.pause_queue:
            out += self._pause(job, job.pause_queue.pop(0))
        return out

    def _halt_reached(self, job: JobData, op: PauseOp, effect: Effect) -> list[ServiceEffect]:
        """The halt's final checkpoint is on disk (Release with its clock; None: the job
        finished first), or cannot be had (Refuse)."""
        if isinstance(effect, Refuse):
            return self._halt_failed(job, op, effect.message, effect.code)
        return self._halt_done(job, op, effect.value)  # type: ignore[arg-type]

    def _halt_done(self, job: JobData, op: PauseOp, clock: int | None) -> list[ServiceEffect]:
        kind, request, reason = op.then
        out: list[ServiceEffect] = []
        if clock is not None:
            out += self._to_driver(job, {"kind": "halted", "clock": clock, "dir": job.spec.checkpoint_dir, "reason": reason})
            if job is self.job:
                out += self._end_job(f"{reason} at clock {clock}, with a final checkpoint")
        if kind == "halt":
            return out + [Release(request, {"clock": clock})]
        if clock is None:
            return out + [Release(request, f"job {job.job_id} was finishing; it was not stopped")]
        return out + [Release(request, f"job {job.job_id} stopped at clock {clock}; its final checkpoint is in {job.spec.checkpoint_dir}")]

    def _halt_failed(self, job: JobData, op: PauseOp, error: str, code: str = "not_now") -> list[ServiceEffect]:
        kind, request, reason = op.then
        if kind == "halt":
            return [Refuse(request, error, code)]
        out = self._fail(reason) if job is self.job else []
        return out + [Release(request, f"job {job.job_id} stopped without a final checkpoint: {error}")]

    # -- workers -------------------------------------------------------------------------
    def _free_slot(self, spare_of: str | None, partition: int | None = None) -> Slot | None:
        job = self.job
        if job is None or job.state is not JobState.RUNNING:
            return None
        if spare_of is not None and spare_of != job.job_id:
            return None
        return free_slot(job.workers, spare_only=spare_of is not None, partition=partition)

    def _register_worker(self, event: WorkerRegistered) -> list[ServiceEffect]:
        """A worker joins the running job (waiting for one): a free slot, or a lost worker's.
        With ``spare_of`` (a survivor taking over a lost worker's partition) only a lost
        worker's slot of that job will do, and the answer comes at once."""
        slot = self._free_slot(event.spare_of, event.partition)
        if slot is None and event.spare_of is not None:
            raise RequestError("no lost worker's partition is waiting to be taken over", code="no_spare")
        if slot is None:
            self._registrants.append(_Parked(event.request, event.conn, event))
            return []
        return self._assign(event, slot)

    def _assign(self, event: WorkerRegistered, slot: Slot) -> list[ServiceEffect]:
        job = self.job
        assert job is not None
        replacing = slot.state is SlotState.SPARE
        slot.peer = event.conn
        try:
            self._move(slot, SlotState.RUNNING)
        except RequestError as exc:
            return [Refuse(event.request, str(exc), exc.code)]
        slot.session = self._token()
        slot.last_heard_s = self.now_s
        slot.pid, slot.host = event.pid, event.host  # type: ignore[assignment]
        party = self.parties.setdefault(event.conn, Party())
        party.role, party.job_id, party.worker_id, party.helper = "worker", job.job_id, slot.worker_id, event.spare_of is not None
        if job.ranges:  # tables exist: the shards must know the newcomer (its token; a replacement's clock) before its HELLO
            body: dict[str, Any] = {"job_id": job.job_id, "worker_id": slot.worker_id, "session": slot.session}
            if replacing:
                body["clock"] = slot.start_clock
            return self._ask(MsgType.WORKER_JOINED, [(s.conn, body) for s in job.shards], None, self._joined, job, slot, event, replacing)
        return self._joined((), job, slot, event, replacing)

    def _joined(self, replies: tuple[Any, ...], job: JobData, slot: Slot, event: WorkerRegistered, replacing: bool) -> list[ServiceEffect]:
        failure = next((r for r in replies if isinstance(r, NoAnswer)), None)
        if failure is not None:
            return [Refuse(event.request, failure.reason, "bad_request")]
        out = self._to_driver(
            job,
            {"kind": "worker_joined", "worker_id": slot.worker_id, "pid": slot.pid, "host": slot.host,
             "partition": slot.partition, "start_clock": slot.start_clock, "replacing": replacing,
             "takeover": event.spare_of is not None},
        )
        reply = {
            "job_id": job.job_id,
            "worker_id": slot.worker_id,
            "spec": job.spec.to_wire(),
            "partition": job.spec.partitions[slot.partition],
            "partition_index": slot.partition,
            "start_clock": slot.start_clock,
            "stop": job.stop_requested,
            "session": slot.session,  # a HEARTBEAT carrying it counts on any connection
        }
        return out + [Release(event.request, reply)]

    def _heartbeat(self, event: Heartbeat) -> list[ServiceEffect]:
        """A worker's clock and rate. On its registering connection, or on any other one when
        it carries the slot's session token (a session's heartbeat thread)."""
        body = event.body
        token = body.get("session")
        if token is None:
            job, slot = self._job_of(event.conn)
        else:
            job = self.job  # type: ignore[assignment]
            worker_id = body.get("worker_id")
            if job is None or body.get("job_id") != job.job_id or job.state is not JobState.RUNNING:
                raise RequestError("no running job for this heartbeat", code="no_job")
            if not isinstance(worker_id, int) or isinstance(worker_id, bool) or not 0 <= worker_id < len(job.workers):
                raise RequestError("a heartbeat with a session token needs its worker_id", code="bad_session")
            slot = job.workers[worker_id]
            # compared as bytes: compare_digest refuses non-ASCII text with a TypeError
            if not isinstance(token, str) or slot.session is None or not secrets.compare_digest(token.encode(), slot.session.encode()):
                raise RequestError(f"wrong session token for worker {worker_id}", code="bad_session")
            self._slot_heard(slot)
        clock, samples_s = body.get("clock", slot.clock), body.get("samples_s", 0.0)
        if isinstance(clock, int) and not isinstance(clock, bool):
            slot.clock = clock
        if isinstance(samples_s, int | float) and not isinstance(samples_s, bool):
            slot.samples_s = float(samples_s)
        slot.heartbeats += 1
        return []

    def _worker_lost(self, slot: Slot, reason: str = "connection lost") -> list[ServiceEffect]:
        job = self.job
        if job is None or slot.state in (SlotState.FINISHED, SlotState.LOST):
            return []
        spare, effects = lose(job.workers, [job.stats, job.trained, job.final], slot)
        self.liveness.forget(("worker", slot.worker_id))
        # Its rows between its last acknowledged clock and the stop clock would be missing.
        out = self._answer(job, job.checkpoints.settle(error=f"worker {slot.worker_id} was lost before the final checkpoint", code="bad_request"))
        log.warning("job %s: worker %d lost (%s)", job.job_id, slot.worker_id, reason)
        out += self._to_driver(
            job, {"kind": "worker_lost", "worker_id": slot.worker_id, "reason": reason, "at_s": self.now_s - job.started_s}
        )
        out += self._answer(job, effects)
        out += self._check_epochs(job)
        if not job.live_ids():
            awaited = [s for s in job.workers if s.state in (SlotState.PENDING, SlotState.SPARE)]
            if not awaited:
                return out + self._fail("every worker was lost")
            # Partitions are left to train and a replacement may be starting (psctl train
            # restarts lost local workers; a user may start `psctl worker`): wait for one.
            job.orphaned += 1
            wait_s = orphan_wait_s(job.spec)
            out += self._arm(("orphaned", job.job_id, job.orphaned), wait_s, self._orphaned, job, job.orphaned, wait_s)
        if spare is not None:
            out += self._replace(job, slot, spare)
        return out

    def _orphaned(self, job: JobData, generation: int, wait_s: float) -> list[ServiceEffect]:
        """Every worker was lost ``wait_s`` ago: unless one registered since, the job fails."""
        if job is not self.job or job.state is not JobState.RUNNING or job.orphaned != generation or job.live_ids():
            return []
        return self._fail(f"every worker was lost, and no new worker registered within {wait_s:g} s")

    def _replace(self, job: JobData, lost: Slot, spare: Slot) -> list[ServiceEffect]:
        """Take the lost worker out of every gate, then let a worker take its partition at
        the clock the shards acknowledged, so no row of it is skipped: a new worker that
        registers (psctl train restarts local ones), or else, after the job's
        ``takeover_after_s``, a surviving worker (it trains the partition alongside its own)."""
        if not job.ranges:  # before the tables exist nothing was pushed
            return self._offer(None, job, lost, spare)
        body = {"job_id": job.job_id, "worker_id": lost.worker_id}
        targets = [(s.conn, body) for s in job.shards if self._open(s.conn)]
        return self._ask(MsgType.WORKER_LEFT, targets, None, self._offer, job, lost, spare)

    def _offer(self, replies: tuple[Any, ...] | None, job: JobData, lost: Slot, spare: Slot) -> list[ServiceEffect]:
        clocks = [r["clock"] for r in replies or () if isinstance(r, dict) and r.get("clock") is not None] or [0]
        if job is not self.job or job.state is not JobState.RUNNING:
            return []
        offer(spare, clocks)
        log.info("job %s: worker %d may replace worker %d from clock %d", job.job_id, spare.worker_id, lost.worker_id, spare.start_clock)
        return self._changed() + self._arm(("takeover", job.job_id, spare.worker_id), job.spec.takeover_grace_s, self._take_over, job, spare)

    def _take_over(self, job: JobData, spare: Slot) -> list[ServiceEffect]:
        if job is not self.job or job.state is not JobState.RUNNING or spare.state is not SlotState.SPARE or spare.peer is not None:
            return []
        candidates = [w for w in job.workers if self._open(w.peer) and not self.parties[w.peer].helper]
        pick = pick_survivor(candidates, job.takeovers)
        if pick is None or pick.peer is None:
            return []
        log.info("job %s: asking worker %d to take over partition %d", job.job_id, pick.worker_id, spare.partition)
        out: list[ServiceEffect] = [
            Notify((pick.peer,), MsgType.EVENT, {"kind": "take_over", "job_id": job.job_id, "partition": spare.partition})
        ]
        # if it does not come, ask another
        return out + self._arm(("takeover", job.job_id, spare.worker_id), job.spec.failure_timeout_s, self._take_over, job, spare)

    # -- the failure detector ------------------------------------------------------------
    def _tick(self, event: Tick) -> list[ServiceEffect]:
        """PING each shard (its reply, like any frame, shows it is alive) and declare lost the
        parties silent too long: a stopped, hung or partitioned host keeps its sockets open."""
        out: list[ServiceEffect] = []
        for shard in self.shards:
            if shard.shard_id not in self._pinging and self._open(shard.conn):
                self._pinging.add(shard.shard_id)
                out += self._ask(MsgType.PING, [(shard.conn, {})], self.liveness.timeout_s, self._pinged, shard.shard_id)
        for (role, ident), silent_s in self.liveness.tick(self.now_s):  # type: ignore[misc]
            if role == "shard":
                shard = next((s for s in self.shards if s.shard_id == ident), None)
                if shard is None:
                    continue
                reason = f"it did not answer for {silent_s:.1f} s (stopped, hung or cut off)"
                log.warning("shard %d at %s: %s", shard.shard_id, shard.address, reason)
                shard.lost_reason = reason
                out += [Abort(shard.conn, f"declared lost: {reason}"), KillShard(shard.pid)]  # its close does the rest
            elif self.job is not None and ident < len(self.job.workers):
                slot = self.job.workers[ident]
                if slot.state in WATCHED_SLOT_STATES:
                    out += self._worker_lost(slot, f"no heartbeat for {silent_s:.1f} s")
                    if slot.peer is not None:
                        out.append(Abort(slot.peer, "declared lost: no heartbeat"))
        return out

    def _pinged(self, replies: tuple[Any, ...], shard_id: int) -> list[ServiceEffect]:
        self._pinging.discard(shard_id)
        if replies and not isinstance(replies[0], NoAnswer):
            self.liveness.heard(("shard", shard_id))  # a reply is not a frame the service hands over
        else:  # not a verdict: silence is judged by the liveness tracker, on time we were running
            log.debug("PING to shard %d: %s", shard_id, replies[0].reason if replies else "no answer")
        return []

    # -- the statistics pass, epochs, the end ----------------------------------------------
    def _stats(self, event: StatsArrived) -> list[ServiceEffect]:
        job, slot = self._job_of(event.conn)
        return self._answer(job, job.stats.arrive(slot.worker_id, event.body, ("stats", event.request)))

    def _stats_pooled(self, event: StatsPooled) -> list[ServiceEffect]:
        job = self.job
        if job is None or job.job_id != event.job_id:
            return []
        if event.error is not None:
            waiting, job.stats_waiting = job.stats_waiting, []
            return self._fail(event.error) + [Refuse(r, event.error, "bad_request") for r in waiting]
        assert event.body is not None
        job.stats_reply = (event.body, event.arrays or [])
        return self._to_driver(job, {"kind": "stats", **event.body}, event.arrays or []) + self._flush_stats(job)

    def _progress(self, event: Progress) -> list[ServiceEffect]:
        job, slot = self._job_of(event.conn)
        return self._to_driver(job, {"kind": "progress", "worker_id": slot.worker_id, **event.body})

    def _epoch_report(self, event: EpochReported) -> list[ServiceEffect]:
        job, slot = self._job_of(event.conn)
        epoch = event.body.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise RequestError("EPOCH_REPORT needs an integer epoch")
        if "staleness" in event.body:
            try:
                count_dicts([event.body["staleness"]])
            except (TypeError, ValueError, OverflowError) as exc:
                raise RequestError(f"EPOCH_REPORT: {exc}") from None
        job.epochs.report(epoch, slot.partition, event.body)
        out = self._check_epochs(job)
        if job.spec.hold_epochs and epoch <= job.released_epoch and slot.peer is not None:
            # a replacement (or a rewound worker) redoing an epoch the driver has already read
            out.append(Notify((slot.peer,), MsgType.EVENT, {"kind": "epoch_seen", "epoch": job.released_epoch}))
        return out

    def _epoch_seen(self, event: EpochSeen) -> list[ServiceEffect]:
        """The driver has read an epoch's report: the workers held at its end go on."""
        job = self.job
        epoch = event.body.get("epoch")
        if job is None or job.driver != event.conn or not job.spec.hold_epochs:
            raise RequestError("EPOCH_SEEN comes from the driver of a running job that holds epochs", code="forbidden")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise RequestError("EPOCH_SEEN needs an integer epoch")
        if epoch <= job.released_epoch:
            return []
        job.released_epoch = epoch
        return [Notify(self._worker_conns(job), MsgType.EVENT, {"kind": "epoch_seen", "epoch": epoch})]

    def _check_epochs(self, job: JobData) -> list[ServiceEffect]:
        # A spare slot's partition is awaited too: its replacement will report for it.
        out: list[ServiceEffect] = []
        for body in job.epochs.complete({w.partition for w in job.workers if w.state is not SlotState.LOST}):
            out += self._to_driver(job, body)
        return out

    def _trained(self, event: Trained) -> list[ServiceEffect]:
        job, slot = self._job_of(event.conn)
        self._move(slot, SlotState.TRAINED)
        return self._answer(job, job.trained.arrive(slot.worker_id, event.body, ("trained", event.request)))

    def _final_report(self, event: FinalReport) -> list[ServiceEffect]:
        job, slot = self._job_of(event.conn)
        self._move(slot, SlotState.FINISHED)
        out = self._answer(job, job.final.arrive(slot.worker_id, event.body))
        if job.final.result is None:
            return out
        reports: list[dict[str, Any]] = list(job.final.result.values())  # type: ignore[arg-type]
        job.move(JobState.DONE)
        out += self._answer(job, job.checkpoints.settle())
        done = {
            "kind": "done",
            **pool(reports),
            "lost_workers": [w.worker_id for w in job.workers if w.state is SlotState.LOST],
            "bytes_pulled": sum(r.get("bytes_pulled", 0) for r in reports),
            "bytes_pushed": sum(r.get("bytes_pushed", 0) for r in reports),
            "seconds": self.now_s - job.started_s,
            "worker_memory": worker_memory(job.final.result),  # type: ignore[arg-type]
        }
        if job.manifests_writing:  # the driver hears of that checkpoint first: 'done' waits for it
            job.done_report = done
            return out
        return out + self._to_driver(job, done)

    def _failed(self, event: Failed) -> list[ServiceEffect]:
        _, slot = self._job_of(event.conn)
        return self._fail(f"worker {slot.worker_id}: {event.message}")

    # -- checkpoints -----------------------------------------------------------------------
    def _checkpointed(self, event: Checkpointed) -> list[ServiceEffect]:
        """A shard saved a clock; once every shard has, the manifest makes it the job's checkpoint."""
        job = self.job
        if job is None or event.job_id != job.job_id or not job.spec.checkpoint:
            return []
        clock, index = event.clock, event.shard_index
        if not isinstance(clock, int) or not isinstance(index, int) or isinstance(clock, bool) or isinstance(index, bool):
            raise RequestError("CHECKPOINTED needs a clock and a shard_index")
        if not 0 <= index < len(job.shards) or job.shards[index].conn != event.conn:
            raise RequestError(f"CHECKPOINTED for shard {index} comes from that shard only", code="forbidden")
        if event.error is not None:
            return self._checkpoint_failed(job, clock, index, str(event.error))
        if not job.checkpoints.shard_saved(clock, index, len(job.shards)):
            return []
        # The checkpoint before this one stays on disk (its manifest and its shard files) in
        # case this one is damaged: the latest clock committed or being committed below it.
        before = [c for c in job.manifests_writing if c < clock]
        base = job.last_checkpoint if job.last_checkpoint is not None else job.spec.resume.get("clock") if job.spec.resume else None
        previous = max(before + ([base] if base is not None else []), default=None)
        manifest = {
            # No paths: the folder is self-contained, and --resume continues wherever it is now.
            "clock": clock, "previous_clock": previous, "tables": job.tables,
            "spec": job.spec.replace(checkpoint={**job.spec.checkpoint, "dir": "."}, resume=None).to_wire(),
            "n_shards": len(job.shards), "job_id": job.job_id,
        }  # fmt: skip
        job.manifests_writing.add(clock)
        job.manifest_previous[clock] = previous
        return [WriteManifest(job.job_id, job.spec.checkpoint_dir, clock, manifest)]

    def _checkpoint_failed(self, job: JobData, clock: int, index: int, error: str) -> list[ServiceEffect]:
        """A shard could not write its file of ``clock`` (a full disk): the job trains on without
        that checkpoint, the last one stays the one to resume from; a halt waiting for it fails."""
        sentence = f"checkpoint at clock {clock} failed on shard {index}: {error}"
        log.warning("job %s: %s", job.job_id, sentence)
        event = {"kind": "checkpoint_failed", "clock": clock, "shard_index": index, "reason": sentence,
                 "last_clock": job.last_checkpoint, "dir": job.spec.checkpoint_dir}  # fmt: skip
        return self._to_driver(job, event) + self._answer(job, job.checkpoints.shard_failed(clock, sentence))

    def _manifest_written(self, event: ManifestWritten) -> list[ServiceEffect]:
        job = self.job
        if job is None or job.job_id != event.job_id:
            if event.error is not None:
                log.warning("job %s: writing the checkpoint manifest of clock %d failed: %s", event.job_id, event.clock, event.error)
            return []
        job.manifests_writing.discard(event.clock)
        previous = job.manifest_previous.pop(event.clock, None)
        out: list[ServiceEffect] = []
        if event.error is not None:
            log.warning("job %s: writing the checkpoint manifest of clock %d failed: %s", event.job_id, event.clock, event.error)
        elif not event.skipped:
            out += self._to_driver(job, {"kind": "checkpoint", "clock": event.clock})
            out += self._answer(job, job.checkpoints.written(event.clock))
            # Only now may the shards remove files older than it (except the checkpoint before it).
            body = {"job_id": job.job_id, "clock": event.clock, "previous_clock": previous}
            out.append(Notify(tuple(s.conn for s in job.shards), MsgType.CHECKPOINTED, body))
        if job.done_report is not None and not job.manifests_writing:
            out += self._to_driver(job, job.done_report)
            job.done_report = None
        return out

    def manifest_superseded(self, job_id: str, clock: int) -> bool:
        """Whether a manifest of ``clock`` would overwrite a later one (the service writes in clock order)."""
        job = self.job
        return job is not None and job.job_id == job_id and job.last_checkpoint is not None and job.last_checkpoint >= clock

    # -- kept models (core/kept.py) ---------------------------------------------------------
    def _check_keep(self, keep: dict[str, Any] | None) -> None:
        """A SUBMIT's ``keep``: a valid name, not kept already unless ``replace``."""
        if keep is None:
            return
        problem = name_problem(keep.get("name"))
        if problem is not None:
            raise RequestError(problem, code="bad_name")
        if keep["name"] in self.models and not keep.get("replace"):
            raise RequestError(
                f"a model named {keep['name']!r} is kept on this server already; drop it first "
                "(psctl models --drop) or replace it (--replace)", code="model_exists",
            )

    def _kept_to_train(self, spec: Any) -> KeptEntry | None:
        """The kept model a SUBMIT's ``from_kept`` names: kept now, and kept again under its name at the end."""
        if spec.from_kept is None:
            return None
        name = spec.from_kept.get("name")
        entry = self.models.get(name)
        if entry is None:
            raise RequestError(f"no model named {name!r} is kept on this server", code="unknown_model")
        if entry.state is not KeptState.KEPT:
            raise RequestError(f"model {name!r} cannot be trained now ({entry.state}): {entry.reason}", code="not_now")
        if spec.keep != {"name": name, "replace": True}:
            raise RequestError(f"a job that trains kept model {name!r} further keeps it under its name (keep {name!r}, replace)")
        return entry

    def _model_keep(self, event: ModelKept) -> list[ServiceEffect]:
        """The driver's job is trained: every shard turns its tables into a part of the kept model.
        The name switches to the new version only once every shard has its part."""
        job, body = self.job, event.body
        if job is None or job.driver != event.conn or body.get("job_id") != job.job_id:
            raise RequestError("MODEL_KEEP comes from the driver of the running job", code="no_job")
        if job.state is not JobState.DONE:  # every worker finished: nothing pushes to the tables any more
            raise RequestError(f"job {job.job_id} is still training; a model is kept once every worker finished", code="not_now")
        keep = job.spec.keep
        if keep is None:
            raise RequestError(f"job {job.job_id} was not submitted with a name to keep it under", code="bad_request")
        if self.keeping is not None or job.kept:
            raise RequestError(f"the tables of job {job.job_id} are kept already (or being kept)", code="busy")
        self._check_keep(keep)
        meta, extras = body.get("meta"), body.get("extras", [])
        if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str):
            raise RequestError("MODEL_KEEP needs the model's meta (an object with its kind)")
        if not isinstance(extras, list) or len(extras) != len(event.arrays) or not all(isinstance(n, str) for n in extras):
            raise RequestError("MODEL_KEEP's 'extras' must name each of its arrays")
        trained_at = body.get("trained_at")
        entry = KeptEntry(
            keep["name"], job.job_id, meta, list(job.tables), dict(job.ranges), list(job.shards), job.spec.checkpoint_dir,
            float(trained_at) if isinstance(trained_at, int | float) and not isinstance(trained_at, bool) else None,
        )
        targets = [
            (s.conn, {"job_id": job.job_id, "name": entry.name, "version": entry.version, "shard_index": i,
                      "dir": entry.dir, "extras": extras if i == 0 else []})
            for i, s in enumerate(job.shards)
        ]
        arrays = [list(event.arrays) if i == 0 else None for i in range(len(targets))]
        self.keeping, job.kept = entry.name, True
        return self._ask(MsgType.KEEP_TABLES, targets, SHARD_SETUP_TIMEOUT_S, self._kept, entry, event.request, arrays=arrays)

    def _kept(self, replies: tuple[Any, ...], entry: KeptEntry, request: Hashable) -> list[ServiceEffect]:
        self.keeping = None
        failed = [(i, r.reason) for i, r in enumerate(replies) if isinstance(r, NoAnswer)]
        if failed:
            index, reason = failed[0]
            done = [i for i in range(len(replies)) if i not in dict(failed)]
            out = self._drop_parts(entry, done)  # the parts that were made are freed; an older version stays
            return out + [Refuse(request, f"keeping model {entry.name!r} failed on shard {index}: {reason}", "bad_request")]
        old = self.models.get(entry.name)
        self.models[entry.name] = entry
        log.info("kept model %s (version %s) on %d shards", entry.name, entry.version, len(entry.shards))
        out = [] if old is None else self._drop_parts(old)
        return out + [Release(request, {"name": entry.name, "version": entry.version, "shards": [s.address for s in entry.shards if s]})]

    def _drop_parts(self, entry: KeptEntry, indices: list[int] | None = None) -> list[ServiceEffect]:
        """Tell the shards holding parts of ``entry`` (those at ``indices``) to free them and their files."""
        targets = [
            (s.conn, entry.part_body(i)) for i, s in enumerate(entry.shards)
            if s is not None and self._open(s.conn) and (indices is None or i in indices)
        ]
        return self._ask(MsgType.KEEP_DROP, targets, SHARD_SETUP_TIMEOUT_S, self._parts_dropped) if targets else []

    def _parts_dropped(self, replies: tuple[Any, ...]) -> list[ServiceEffect]:
        for reply in replies:
            if isinstance(reply, NoAnswer):  # its shard is gone, and its memory with it
                log.warning("freeing a kept model's part: %s", reply.reason)
        return []

    def _parts_lost(self, shard: ShardEntry) -> list[ServiceEffect]:
        """A shard holding parts of kept models is gone: with a checkpoint folder a new shard loads
        them; without one the model is lost (listed, with the reason, until it is dropped)."""
        out: list[ServiceEffect] = []
        for entry in self.models.values():
            for i, s in enumerate(entry.shards):
                if s is None or s.conn != shard.conn:
                    continue
                entry.shards[i] = None
                what = f"shard {shard.shard_id} at {shard.address}, holding part {i}, was lost"
                if entry.dir is not None and entry.state is not KeptState.LOST:
                    if entry.state is KeptState.KEPT:
                        entry.move(KeptState.RESTORING, f"{what}; the next shard to join loads it from {entry.dir}")
                elif entry.state is not KeptState.LOST:
                    entry.move(KeptState.LOST, f"{what} and the model has no checkpoint folder")
                    out += self._drop_parts(entry)
        return out

    def _restore_parts(self, shard: ShardEntry) -> list[ServiceEffect]:
        """A shard joined: it takes the first missing part of each restoring model."""
        out: list[ServiceEffect] = []
        for entry in self.models.values():
            if entry.state is not KeptState.RESTORING or None not in entry.shards:
                continue
            index = entry.shards.index(None)
            entry.shards[index] = shard
            out += self._ask(
                MsgType.KEEP_LOAD, [(shard.conn, entry.part_body(index))], SHARD_SETUP_TIMEOUT_S,
                self._part_restored, entry, index, shard,
            )
        return out

    def _part_restored(self, replies: tuple[Any, ...], entry: KeptEntry, index: int, shard: ShardEntry) -> list[ServiceEffect]:
        if self.models.get(entry.name) is not entry or entry.shards[index] is not shard:
            return []  # dropped or replaced meanwhile, or that shard went too (its loss said so)
        (reply,) = replies
        if isinstance(reply, NoAnswer):
            entry.shards[index] = None
            if entry.state is KeptState.RESTORING:
                entry.move(KeptState.LOST, f"part {index} could not be loaded: {reply.reason}")
            return self._drop_parts(entry)
        log.info("kept model %s: part %d loaded by shard %d", entry.name, index, shard.shard_id)
        if entry.state is KeptState.RESTORING and None not in entry.shards:
            entry.move(KeptState.KEPT)
        return []

    def _models(self, event: ModelsAsked) -> list[ServiceEffect]:
        """The kept models (or the one named), with each part's size and reads (asked now, 2 s at most)."""
        if event.name is not None and (not isinstance(event.name, str) or event.name not in self.models):
            return [Refuse(event.request, f"no model named {event.name!r} is kept on this server", "unknown_model")]
        entries = [self.models[event.name]] if event.name is not None else [self.models[n] for n in sorted(self.models)]
        shards = list({id(s): s for e in entries for s in e.shards if s is not None and self._open(s.conn)}.values())
        named = event.name is not None  # one model's listing carries its meta (each is bounded); the whole list does not
        if not shards:
            return self._models_body((), event.request, entries, shards, named)
        return self._ask(MsgType.STATUS, [(s.conn, {}) for s in shards], STATUS_TIMEOUT_S, self._models_body, event.request,
                         entries, shards, named)

    def _models_body(
        self, replies: tuple[Any, ...], request: Hashable, entries: list[KeptEntry], shards: list[ShardEntry], named: bool
    ) -> list[ServiceEffect]:
        kept_of = {id(s): ({} if isinstance(r, NoAnswer) else {(k.get("name"), k.get("version")): k for k in r.get("kept", [])})
                   for s, r in zip(shards, replies)}
        rows = []
        for e in entries:
            sizes: list[dict[str, Any] | None] = []
            for s in e.shards:
                part = kept_of.get(id(s), {}).get((e.name, e.version)) if s is not None else None
                sizes.append(None if part is None else {k: part[k] for k in ("keys", "bytes", "pulls", "keys_pulled", "bytes_pulled")})
            rows.append(e.listing(sizes, with_meta=len(entries) == 1 and named))
        return [Release(request, {"models": rows})]

    def _model_drop(self, event: ModelDropRequested) -> list[ServiceEffect]:
        """Forget a kept model and free its parts; answered once the shards did (or are gone)."""
        entry = self.models.get(event.name) if isinstance(event.name, str) else None
        if entry is None:
            return [Refuse(event.request, f"no model named {event.name!r} is kept on this server", "unknown_model")]
        if self.job is not None and self.job.kept_from is entry:
            return [Refuse(event.request, f"model {entry.name!r} is being trained further by job {self.job.job_id}; "
                           "drop it when that job has ended", "not_now")]
        del self.models[entry.name]
        log.info("dropped kept model %s (version %s)", entry.name, entry.version)
        targets = [(s.conn, entry.part_body(i)) for i, s in enumerate(entry.shards) if s is not None and self._open(s.conn)]
        if not targets:
            return [Release(event.request, {"name": entry.name, "freed": 0})]
        return self._ask(MsgType.KEEP_DROP, targets, SHARD_SETUP_TIMEOUT_S, self._dropped, entry, event.request)

    def _dropped(self, replies: tuple[Any, ...], entry: KeptEntry, request: Hashable) -> list[ServiceEffect]:
        freed = sum(not isinstance(r, NoAnswer) for r in replies)
        return [Release(request, {"name": entry.name, "freed": freed})]

    # -- STATUS ----------------------------------------------------------------------------
    def _status(self, event: StatusAsked) -> list[ServiceEffect]:
        """Membership and the job, with each shard's own figures (asked now, 2 s at most)."""
        shards = list(self.shards)
        if not shards:
            return self._status_body((), event.request, shards)
        return self._ask(MsgType.STATUS, [(s.conn, {}) for s in shards], STATUS_TIMEOUT_S, self._status_body, event.request, shards)

    def _status_body(self, replies: tuple[Any, ...], request: Hashable, shards: list[ShardEntry]) -> list[ServiceEffect]:
        rows = []
        for s, reply in zip(shards, replies):
            figures = {"error": reply.reason} if isinstance(reply, NoAnswer) else reply
            host = s.address.rsplit(":", 1)[0]
            rows.append({**figures, "shard_id": s.shard_id, "address": s.address, "host": host, "pid": s.pid, "state": "up"})
        body: dict[str, Any] = {"shards": rows, "job": None}
        job = self.job
        if job is not None:
            body["job"] = {
                "job_id": job.job_id,
                "mode": job.spec.mode,
                "staleness": job.spec.staleness,
                "state": job.state,
                "epoch": job.epochs.last_reported + 1,
                "epochs": job.spec.epochs,
                "last_checkpoint": job.last_checkpoint,
                "workers": [
                    {
                        "worker_id": w.worker_id,
                        "state": w.state,
                        "pid": w.pid,
                        "host": w.host,
                        "clock": w.clock,
                        "samples_s": w.samples_s,
                        "heartbeats": w.heartbeats,
                        "last_heartbeat_s": None if w.last_heard_s is None else self.now_s - w.last_heard_s,
                    }
                    for w in job.workers
                ],
            }
        return [Release(request, body)]

    # -- answers and timers ----------------------------------------------------------------
    def _answered(self, event: Answered) -> list[ServiceEffect]:
        then, args = self._pending.pop(event.ask)
        return then(event.replies, *args)

    def _timer(self, event: TimerFired) -> list[ServiceEffect]:
        entry = self._timers.pop(event.timer, None)
        if entry is None:
            return []
        then, args = entry
        return then(*args)

    _events: dict[type, Callable[..., list[ServiceEffect]]] = {
        Heard: _heard,
        ConnectionClosed: _closed,
        ShardRegistered: _register_shard,
        JobSubmitted: _submit,
        TablesGiven: _tables,
        WorkerRegistered: _register_worker,
        Heartbeat: _heartbeat,
        Tick: _tick,
        StatsArrived: _stats,
        StatsPooled: _stats_pooled,
        Progress: _progress,
        EpochReported: _epoch_report,
        Trained: _trained,
        FinalReport: _final_report,
        Failed: _failed,
        Checkpointed: _checkpointed,
        ManifestWritten: _manifest_written,
        Answered: _answered,
        TimerFired: _timer,
        HaltRequested: _halt,
        ServerStopping: _server_stopping,
        StopRequested: _stop,
        EpochSeen: _epoch_seen,
        JobEndRequested: _job_end,
        StatusAsked: _status,
        ModelKept: _model_keep,
        ModelsAsked: _models,
        ModelDropRequested: _model_drop,
    }


_MEMORY_FIELDS = {
    "mode": str, "compact_bytes": int, "budget_bytes": int, "rss_bytes": int, "peak_rss_bytes": int,
    "peak_rss_read_bytes": int, "peak_rss_trained_bytes": int,  # the peak once the rows were read, once trained
}


def worker_memory(reports: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each worker's memory figures from its final report (how it held its partition, its compact
    size, its budget, its peak RSS), by worker id; fields of another type are left out."""
    out = []
    for worker_id in sorted(reports):
        memory = reports[worker_id].get("memory")
        if isinstance(memory, dict):
            fields = {k: memory[k] for k, kind in _MEMORY_FIELDS.items() if isinstance(memory.get(k), kind) and not isinstance(memory.get(k), bool)}
            out.append({"worker_id": worker_id, **fields})
    return out
