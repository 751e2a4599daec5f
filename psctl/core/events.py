"""What goes into the coordinator core and what comes out: events and effects.

``CoordinatorState.handle(event, now_s)`` (core/coordinator.py) takes one of the events
below and returns effects; the service (cluster/coordinator.py) builds the events from
frames, timers and threads, and runs the effects. Parties and requests are opaque keys
(``conn``, ``request``, ``handle``) that only the service maps to connections and futures.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

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


# -- events -----------------------------------------------------------------------


@dataclass(frozen=True)
class Heard:
    """Any frame arrived on ``conn`` (it shows the party is alive)."""

    conn: Hashable


@dataclass(frozen=True)
class ConnectionClosed:
    """``conn`` is gone: a worker, shard or driver lost, or someone waiting for a job."""

    conn: Hashable


@dataclass(frozen=True)
class ShardRegistered:
    request: Hashable
    conn: Hashable
    address: str
    pid: int


@dataclass(frozen=True)
class JobSubmitted:
    request: Hashable
    conn: Hashable
    spec: Any  # JobSpec


@dataclass(frozen=True)
class TablesGiven:
    request: Hashable
    conn: Hashable
    body: dict[str, Any]  # {"tables": [TableSpec as a dict]}


@dataclass(frozen=True)
class WorkerRegistered:
    request: Hashable
    conn: Hashable
    pid: object = None
    host: object = None
    spare_of: str | None = None  # a survivor taking a lost partition over: only a spare slot of that job
    partition: int | None = None  # a worker that holds one partition's rows only (psctl.spark): only that partition's slot


@dataclass(frozen=True)
class Heartbeat:
    """A worker's clock and rate; with a ``session`` token it may come on another connection."""

    conn: Hashable
    body: dict[str, Any]


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class StatsArrived:
    request: Hashable
    conn: Hashable
    body: dict[str, Any]  # the worker's body, its vocabulary decoded under "vocab"


@dataclass(frozen=True)
class StatsPooled:
    """The answer to ``PoolStats``: the driver's stats body and arrays, or why pooling failed."""

    job_id: str
    body: dict[str, Any] | None = None
    arrays: list[Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class Progress:
    conn: Hashable
    body: dict[str, Any]


@dataclass(frozen=True)
class EpochReported:
    conn: Hashable
    body: dict[str, Any]  # its "epoch" and the partition's (loss_sum, n, sums) so far


@dataclass(frozen=True)
class Trained:
    request: Hashable
    conn: Hashable
    body: dict[str, Any]


@dataclass(frozen=True)
class FinalReport:
    conn: Hashable
    body: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    conn: Hashable
    message: str


@dataclass(frozen=True)
class Checkpointed:
    conn: Hashable  # it must be the connection of the shard at shard_index
    job_id: object
    clock: object
    shard_index: object
    error: object = None  # why the shard could not write that clock's file (None: it did)


@dataclass(frozen=True)
class ManifestWritten:
    job_id: str
    clock: int
    error: str | None = None
    skipped: bool = False  # a later clock's manifest was on disk already: this one was not written


@dataclass(frozen=True)
class Answered:
    """The answers to an ``Ask``, in its targets' order: a reply body, or ``NoAnswer``."""

    ask: Hashable
    replies: tuple[Any, ...]


@dataclass(frozen=True)
class NoAnswer:
    reason: str


@dataclass(frozen=True)
class TimerFired:
    timer: Hashable


@dataclass(frozen=True)
class HaltRequested:
    """The driver stops the job (Ctrl-C): a final checkpoint at one clock, then the end."""

    request: Hashable
    conn: Hashable


@dataclass(frozen=True)
class ServerStopping:
    """``psctl server`` is stopping; the reply is a sentence for the operator (or None)."""

    request: Hashable
    reason: str


@dataclass(frozen=True)
class StopRequested:
    conn: Hashable


@dataclass(frozen=True)
class EpochSeen:
    conn: Hashable
    body: dict[str, Any]  # the "epoch" the driver has read: workers held at its end go on


@dataclass(frozen=True)
class JobEndRequested:
    conn: Hashable
    reason: object = None


@dataclass(frozen=True)
class StatusAsked:
    request: Hashable


@dataclass(frozen=True)
class ModelKept:
    """The driver of the running job asks to keep its tables under the spec's ``keep`` name:
    ``body`` has ``job_id``, ``meta`` (the model file's meta), ``trained_at``; ``arrays`` the
    model's other arrays (named in ``body["extras"]``), held by the model's shard 0."""

    request: Hashable
    conn: Hashable
    body: dict[str, Any]
    arrays: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ModelsAsked:
    """List the kept models (``name`` given: that one only, or an error)."""

    request: Hashable
    name: object = None


@dataclass(frozen=True)
class ModelDropRequested:
    request: Hashable
    name: object


Event = (
    Heard | ConnectionClosed | ShardRegistered | JobSubmitted | TablesGiven | WorkerRegistered | Heartbeat | Tick
    | StatsArrived | StatsPooled | Progress | EpochReported | Trained | FinalReport | Failed | Checkpointed
    | ManifestWritten | Answered | TimerFired | HaltRequested | ServerStopping | StopRequested | EpochSeen | JobEndRequested
    | StatusAsked | ModelKept | ModelsAsked | ModelDropRequested
)


# -- effects for the service (besides Release / Refuse of a request) ----------------


@dataclass(frozen=True)
class Notify:
    """Send a one-way frame to each of ``conns`` that is still open."""

    conns: tuple[Hashable, ...]
    kind: Any  # MsgType
    body: dict[str, Any]
    arrays: list[Any] | None = None


@dataclass(frozen=True)
class Ask:
    """Send a request to each target (conn, body); the replies come back as ``Answered(ask, ...)``.
    ``timeout_s`` None: the transport's default."""

    ask: Hashable
    kind: Any  # MsgType
    targets: tuple[tuple[Hashable, dict[str, Any]], ...]
    timeout_s: float | None = None
    arrays: tuple[Any, ...] | None = None  # per target, its frame's arrays (a list) or None


@dataclass(frozen=True)
class WriteManifest:
    """Write (and fsync) a checkpoint manifest off the loop, in clock order; then ``ManifestWritten``."""

    job_id: str
    dir: str
    clock: int
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Abort:
    conn: Hashable
    reason: str


@dataclass(frozen=True)
class KillShard:
    """The shard process ``pid`` was declared lost: whoever started it kills it (and starts another)."""

    pid: int


@dataclass(frozen=True)
class ArmTimer:
    """Deliver ``TimerFired(timer)`` after ``delay_s``."""

    timer: Hashable
    delay_s: float


@dataclass(frozen=True)
class PoolStats:
    """Pool the workers' statistics (vocabularies are the data layer's); answer with ``StatsPooled``."""

    job_id: str
    parts: dict[int, Any]


ServiceEffect = Release | Refuse | Notify | Ask | WriteManifest | Abort | KillShard | ArmTimer | PoolStats
