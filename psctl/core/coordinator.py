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
