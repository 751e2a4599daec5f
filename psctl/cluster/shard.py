"""A server shard: one key range of every table, its optimizer, the clock gate.

:class:`~psctl.core.shard_state.ShardState` is the pure part (tables, apply, gate); :class:`ShardService`
maps frames onto it and holds what is not pure: which connection each worker said HELLO on,
the pulls waiting at the gate (futures), checkpoint files being written in a thread.
The state's typed refusals (:mod:`psctl.core.shard_errors`) are request errors: they go
back as ERROR frames with their code and the connection stays open. :func:`run_shard` is the process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from psctl import net
from psctl.core.optim import make_optimizer
from psctl.core.shard_state import KeptTables, ShardState
from psctl.core.tables import TableSpec
from psctl.files import checkpoint
from psctl.protocol.wire import Message, MsgType

log = logging.getLogger("psctl.shard")

NEVER = 2**63 - 1  # a checkpoint clock no job reaches
MAX_REQUESTED_CHECKPOINTS = 64
CHECKPOINT_WRITE_TIMEOUT_S = 60.0  # how long a stopping shard waits for a file it is writing
MAX_PARKED_PULLS_PER_CONNECTION = 16  # pulls one connection may have waiting at the gate (a worker needs 1 or 2)


def process_memory() -> dict[str, int]:
    """This process's resident memory now and at its peak (bytes; Linux /proc, else getrusage)."""
    try:
        with open("/proc/self/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if line.startswith(("VmRSS", "VmHWM")))
        return {"rss_bytes": int(fields["VmRSS"].split()[0]) * 1024, "peak_rss_bytes": int(fields["VmHWM"].split()[0]) * 1024}
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"rss_bytes": peak, "peak_rss_bytes": peak}


@dataclass
class _Checkpoints:
    folder: str
    index: int  # this shard's place in the job (files are named by it)
    every: int  # clocks between checkpoints (0: only when the coordinator asks)
    next_clock: int
    requested: set[int] = field(default_factory=set)  # clocks the coordinator asked for (CHECKPOINT)
    last_clock: int | None = None  # the clock of the last checkpoint file this shard finished

    @classmethod
    def plan(cls, folder: str, index: int, every: int, start: int) -> _Checkpoints:
        return cls(folder, index, every, cls.next_after(start, every))

    @staticmethod
    def next_after(clock: int, every: int) -> int:
        return (clock // every + 1) * every if every > 0 else NEVER

    def due(self, low: int) -> bool:
        return low >= self.next_clock or any(c <= low for c in self.requested)

    def taken(self, low: int) -> None:
        """A snapshot at ``low`` was taken: the next one is due later (its file is written after)."""
        self.next_clock = max(self.next_clock, self.next_after(low, self.every))
        self.requested = {c for c in self.requested if c > low}

    def saved(self, low: int) -> None:
        """The file of clock ``low`` is on disk."""
        self.taken(low)
        self.last_clock = low


def write_error(folder: str, exc: BaseException) -> str:
    """Why a checkpoint file could not be written, naming its folder: "'/ck': No space left on device"."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__  # save_model re-raises the OSError as ModelFileError
    if isinstance(cause, OSError):
        return f"'{folder}': {cause.strerror or cause}"
    return f"'{folder}': {exc}"


def _write_checkpoint(folder: str, index: int, clock: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    # No pruning here: only the coordinator knows which clocks a manifest names (CHECKPOINTED).
    checkpoint.save_shard(folder, index, clock, arrays, meta)


@dataclass(eq=False)  # by identity: a connection's parked tokens are kept in a set
class _PullToken:
    fut: asyncio.Future[Message]
    names: list[str]
    keys: list[np.ndarray] | None
    rows: list[np.ndarray] | None  # the keys' rows, found when the pull arrived
    clock: int


def _keyed_arrays(msg: Message, names: list[str], per_table: int) -> list[np.ndarray] | None:
    """The keys arrays of a keyed request (None for whole-table requests); checks the array count."""
    keyed = bool(msg.body.get("keyed", False))
    expected = len(names) * (per_table if keyed else per_table - 1)
    if len(msg.arrays) != expected:
        raise net.RequestError(f"{msg.type.name} for {len(names)} tables carries {len(msg.arrays)} arrays, expected {expected}")
    if not keyed:
        return None
    return msg.arrays[::per_table] if per_table > 1 else list(msg.arrays)


def _sessions(value: Any) -> dict[int, str]:
    """JOB_SETUP's ``sessions``: worker id (as text) -> that slot's session token."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError("'sessions' must map worker ids to session tokens")
    return {int(k): v for k, v in value.items()}


def _require(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise net.RequestError(f"field {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


class ShardService:
    """Frames -> ShardState. One instance per shard process."""

    # A push is handled at once (``_push`` returns None or raises): workers send it quiet,
    # acknowledged by the pull reply behind it (net.Peer.request_quiet).
    quiet_types = frozenset({MsgType.PUSH})

    def __init__(
        self,
        on_coordinator_lost: Callable[[], None],
        write_checkpoint: Callable[[str, int, int, dict[str, np.ndarray], dict[str, Any]], None] | None = None,
    ):
        self.state: ShardState | None = None
        self.shard_id: int | None = None
        self._on_coordinator_lost = on_coordinator_lost
        self.coordinator: net.Peer | None = None
        self.stopping = False  # set as the shard stops: links closing then are expected
        self.checkpoints: _Checkpoints | None = None
        self.workers: dict[int, net.Peer] = {}  # worker -> the connection it said HELLO on (this job's state)
        self.sessions: dict[int, str] = {}  # worker -> its slot's session token (from the coordinator)
        # Runs in a thread: the snapshot is taken on the loop, the file written and fsynced off it.
        self._write_checkpoint = write_checkpoint or _write_checkpoint
        self._writes: set[asyncio.Task[None]] = set()
        self._write_lock = asyncio.Lock()  # one file at a time, in clock order
        self.kept: dict[tuple[str, str], KeptTables] = {}  # (name, version) -> this shard's part of a kept model

    def _job(self, body: dict[str, Any]) -> ShardState:
        job_id = body.get("job_id")
        if self.state is None or job_id != self.state.job_id:
            raise net.RequestError(f"job {job_id!r} is not running on this shard", code="no_job")
        return self.state

    def handle(self, peer: net.Peer, msg: Message) -> net.Reply | asyncio.Future[Message]:
        handler = self._handlers.get(msg.type)
        if handler is None:
            raise net.RequestError(f"a shard does not serve {msg.type.name}", code="unexpected")
        if msg.type in _FROM_COORDINATOR and peer is not self.coordinator:
            raise net.RequestError(f"only this shard's coordinator may send {msg.type.name}", code="forbidden")
        return handler(self, peer, msg)

    def peer_lost(self, peer: net.Peer, exc: BaseException | None) -> None:
        parked = peer.info.pop("parked_pulls", None)
        if parked:
            # Nobody will read their answers: they leave the gate, with the keys they hold.
            if self.state is not None:
                self.state.gate.discard(parked)
            for token in list(parked):
                token.fut.cancel()
        if peer is self.coordinator:
            if not self.stopping:
                log.warning("shard %s lost its coordinator", self.shard_id)
            self._on_coordinator_lost()
            return
        worker = peer.info.get("worker_id")
        # Only the connection this state knows the worker by: after a roll-back the worker's
        # old connections close while it is already live again on new ones.
        if worker is not None and self.state is not None and self.workers.get(worker) is peer:
            self._release(self.state.leave(worker))

    # -- data plane ----------------------------------------------------------
    def _hello(self, peer: net.Peer, msg: Message) -> net.Reply:
        role = msg.body.get("role")
        if role not in ("worker", "driver"):
            raise net.RequestError("HELLO needs role 'worker' or 'driver'")
        state = self._job(msg.body)
        if role == "worker":
            worker = _require(msg.body, "worker_id", int)
            token, expected = msg.body.get("session"), self.sessions.get(worker)
            if not isinstance(token, str) or expected is None or not secrets.compare_digest(token.encode(), expected.encode()):
                raise net.RequestError(
                    f"HELLO as worker {worker} needs that worker's session token (from its REGISTER_WORKER reply); "
                    "this one is missing or wrong",
                    code="bad_session",
                )
            peer.info["worker_id"] = worker
            self.workers[worker] = peer
        peer.info["role"] = role
        peer.info["job_id"] = state.job_id
        peer.admit()
        return Message(MsgType.HELLO, {"shard_id": self.shard_id, "ranges": state.ranges})

    def _pull(self, peer: net.Peer, msg: Message) -> net.Reply | asyncio.Future[Message]:
        state = self._job(msg.body)
        names = state.check_tables(msg.body.get("tables"))
        keys = _keyed_arrays(msg, names, per_table=1)
        peer.check_keys(sum(len(k) for k in keys) if keys is not None else sum(state.tables[n].values.shape[0] for n in names))
        dump = peer.info.get("role") == "driver" and bool(msg.body.get("dump"))
        # The whole pull is checked now, not when the gate opens (that is inside another
        # worker's push or leave); the rows found are read then.
        rows = state.check_pull(names, keys, whole_sparse=dump)
        if dump:
            arrays, state_names = state.dump(names, with_state=bool(msg.body.get("with_state")))
            return Message(MsgType.PULL, {"state": state_names}, arrays)
        if peer.info.get("role") == "driver" or peer.info.get("worker_id") in state.left:
            return Message(MsgType.PULL, {}, state.read(names, keys, rows))
        if peer.info.get("role") != "worker":
            raise net.RequestError("say HELLO before PULL")
        clock = _require(msg.body, "clock", int)
        state.check_pull_clock(peer.info["worker_id"], clock)
        parked: set[_PullToken] = peer.info.setdefault("parked_pulls", set())
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        token = _PullToken(fut, names, keys, rows, clock)
        if state.gate.can_read(clock):
            return self._answer_pull(state, token)
        if len(parked) >= MAX_PARKED_PULLS_PER_CONNECTION:
            raise net.RequestError(
                f"this connection already has {MAX_PARKED_PULLS_PER_CONNECTION} pulls waiting at the clock gate "
                f"(MAX_PARKED_PULLS_PER_CONNECTION); wait for their answers before pulling again",
                code="busy",
            )
        state.gate.wait(clock, token)
        parked.add(token)
        fut.add_done_callback(lambda _: self._forget_pull(parked, token))
        return fut

    def _forget_pull(self, parked: set[_PullToken], token: _PullToken) -> None:
        """A parked pull was answered, refused or cancelled (its connection went away)."""
        parked.discard(token)
        if token.fut.cancelled() and self.state is not None:
            self.state.gate.discard((token,))

    def _answer_pull(self, state: ShardState, token: _PullToken) -> Message:
        body = {"min_clock": state.gate.min_clock(), "clock": token.clock}
        reply = Message(MsgType.PULL, body, state.read(token.names, token.keys, token.rows))
        if not token.fut.done():
            token.fut.set_result(reply)
        return reply

    def _release(self, tokens: list[Any]) -> None:
        """Answer pulls the gate let go, each on its own: a failure goes to that pull's requester,
        never to the push or leave that opened the gate, nor to the other pulls released with it."""
        assert self.state is not None
        for token in tokens:
            try:
                self._answer_pull(self.state, token)
            except Exception as exc:
                if token.fut.done():
                    log.exception("shard %s: answering a pull at clock %d failed", self.shard_id, token.clock)
                else:
                    token.fut.set_exception(exc)

    def _push(self, peer: net.Peer, msg: Message) -> net.Reply:
        state = self._job(msg.body)
        worker = peer.info.get("worker_id")
        if worker is None:
            raise net.RequestError("say HELLO as a worker before PUSH")
        names = state.check_tables(msg.body.get("tables"), allow_empty=True)  # empty: a clock tick only
        keys = _keyed_arrays(msg, names, per_table=2)
        grads = msg.arrays[1::2] if keys is not None else msg.arrays
        peer.check_keys(sum(len(a) if a.ndim else 1 for a in msg.arrays))
        count = _require(msg.body, "count", int)
        if count < 1:
            raise net.RequestError("'count' must be >= 1")
        clock = _require(msg.body, "clock", int)
        sums = msg.body.get("sums", False)
        if not isinstance(sums, bool):
            raise net.RequestError("'sums' must be true or false")
        table_grads = {n: (None if keys is None else keys[i], grads[i]) for i, n in enumerate(names)}
        self._release(state.push(worker, clock, table_grads, count, sums))
        self._maybe_checkpoint(state)
        return None

    async def _leave(self, peer: net.Peer, msg: Message) -> net.Reply:
        state = self._job(msg.body)
        worker = peer.info.get("worker_id")
        if worker is None:
            raise net.RequestError("only a worker can LEAVE")
        self._release(state.leave(worker))
        self._maybe_checkpoint(state)
        # A worker hears that it left once the checkpoints of the clocks it pushed are on disk
        # and reported: the job does not end while a file it names is still being written.
        await self.finish_writes(CHECKPOINT_WRITE_TIMEOUT_S)
        return None

    def _maybe_checkpoint(self, state: ShardState) -> None:
        """Save the shard when the slowest live worker passes the next checkpoint clock
        (every N clocks, or a clock the coordinator asked for).

        In sync mode every clock below the min clock is applied and none above it,
        so every shard saves the same state for the same clock. A clock the
        coordinator asks for is one where it holds every worker, so the min
        clock stops there on every shard, whatever the mode.
        """
        plan = self.checkpoints
        low = state.gate.min_clock()
        if plan is None or low is None or not plan.due(low):
            return
        arrays, meta = state.snapshot()  # consistent at `low`: later pushes change the tables, not this
        plan.taken(low)
        task = asyncio.get_running_loop().create_task(self._save(plan, state.job_id, low, arrays, meta))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _save(self, plan: _Checkpoints, job_id: str, clock: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Write one checkpoint file in a thread (pulls and pushes are served meanwhile); report it when done."""
        async with self._write_lock:
            try:
                await asyncio.to_thread(self._write_checkpoint, plan.folder, plan.index, clock, arrays, meta)
                error = None
            except Exception as exc:
                # A full disk (or a file-size limit, a read-only folder) fails this save only: the
                # push that triggered it was applied and acked; the coordinator hears at once.
                error = write_error(plan.folder, exc)
                log.error("shard %s: the checkpoint at clock %d failed: %s", self.shard_id, clock, error)
        body: dict[str, Any] = {"job_id": job_id, "clock": clock, "shard_index": plan.index}
        if error is None:
            plan.saved(clock)
        else:
            body["error"] = error
        if self.coordinator is not None and self.coordinator.is_open:
            self.coordinator.notify(MsgType.CHECKPOINTED, body)

    def _committed(self, peer: net.Peer, msg: Message) -> net.Reply:
        """The coordinator wrote the manifest of ``clock``: remove this shard's files that no
        manifest can name any more (older than it, except the checkpoint before it)."""
        state = self.state
        if state is None or msg.body.get("job_id") != state.job_id:
            return None  # one-way, after the job ended here: nothing to answer, nothing to remove
        clock = _require(msg.body, "clock", int)
        previous = msg.body.get("previous_clock")
        if previous is not None and (not isinstance(previous, int) or isinstance(previous, bool)):
            raise net.RequestError("field 'previous_clock' is not an integer")
        plan = self.checkpoints
        if plan is None:
            return None
        task = asyncio.get_running_loop().create_task(self._prune(plan, state.job_id, clock, previous))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return None

    async def _prune(self, plan: _Checkpoints, job_id: str, clock: int, previous: int | None) -> None:
        async with self._write_lock:  # after the files being written, in order
            try:
                removed = await asyncio.to_thread(checkpoint.prune, plan.folder, plan.index, clock, previous)
            except OSError as exc:
                log.warning("shard %s: removing old checkpoint files in %s failed: %s", self.shard_id, plan.folder, exc)
                return
        log.debug("job %s: shard %s removed the files of clocks %s (checkpoint %d)", job_id, self.shard_id, removed, clock)

    async def finish_writes(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for the checkpoint files being written."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout_s)

    # -- control plane (from the coordinator) --------------------------------
    def _job_setup(self, peer: net.Peer, msg: Message) -> net.Reply:
        b = msg.body
        if self.state is not None:
            # A roll-back replaces this job's state: pulls waiting at the old gate are told so.
            for token in self.state.gate.drain():
                if not token.fut.done():
                    token.fut.set_exception(net.RequestError("the job rolled back to a checkpoint", code="rolled_back"))
        try:
            tables = [TableSpec.from_dict(t) for t in b["tables"]]
            ranges = {name: (int(lo), int(hi)) for name, (lo, hi) in b["ranges"].items()}
            optimizer = make_optimizer(b["optimizer"]["name"], b["optimizer"].get("params", {}))
            state = ShardState(
                str(b["job_id"]),
                tables,
                ranges,
                str(b["mode"]),
                int(b.get("staleness", 0)),
                [int(w) for w in b["workers"]],
                optimizer,
                int(b.get("seed", 0)),
                int(b.get("shard_index", 0)),
                int(b.get("n_shards", 1)),
            )
            index = int(b.get("shard_index", 0))
            sessions = _sessions(b.get("sessions", {}))
            from_kept = b.get("from_kept")
            if from_kept:  # train a kept model further, in place (a replacement shard without the part starts fresh)
                part = self.kept.get((str(from_kept["name"]), str(from_kept["version"])))
                if part is not None:
                    state.adopt(part)
            restore = b.get("restore")
            if restore:
                job_of_files = restore.get("job_id")  # the job that wrote the files (a resumed job's predecessor)
                arrays, meta = checkpoint.load_shard(str(restore["dir"]), index, int(restore["clock"]), job_of_files and str(job_of_files))
                state.restore(arrays, meta, int(restore["clock"]))
            self.checkpoints = None
            if b.get("checkpoint"):
                start = int(restore["clock"]) if restore else 0
                self.checkpoints = _Checkpoints.plan(str(b["checkpoint"]["dir"]), index, int(b["checkpoint"].get("every", 0)), start)
                self.checkpoints.last_clock = start if restore else None
        except (KeyError, TypeError, ValueError, checkpoint.CheckpointError) as exc:
            raise net.RequestError(f"bad job setup: {exc}") from None
        previous = self.state
        self.state = state
        self.workers = {}  # workers say HELLO again to the new state
        self.sessions = sessions
        log.info("shard %s: job %s set up (%s)", self.shard_id, self.state.job_id, self.state.status())
        if previous is not None and previous.job_id == state.job_id and previous.gate.clocks:
            return Message(MsgType.JOB_SETUP, {"previous_clock": max(previous.gate.clocks.values())})
        return None

    def _worker_left(self, peer: net.Peer, msg: Message) -> net.Reply:
        state = self._job(msg.body)
        worker = _require(msg.body, "worker_id", int)
        self._release(state.leave(worker))
        return Message(MsgType.WORKER_LEFT, {"clock": state.left.get(worker)})

    def _worker_joined(self, peer: net.Peer, msg: Message) -> net.Reply:
        state = self._job(msg.body)
        worker = _require(msg.body, "worker_id", int)
        session = _require(msg.body, "session", str)
        if "clock" in msg.body:  # a replacement: it resumes where its predecessor stopped
            state.gate.add(worker, _require(msg.body, "clock", int))
        self.sessions[worker] = session  # a HELLO with the old token no longer counts
        return None

    def _checkpoint(self, peer: net.Peer, msg: Message) -> net.Reply:
        """Save when the min clock reaches ``clock`` (now, if it is there already)."""
        state = self._job(msg.body)
        clock = _require(msg.body, "clock", int)
        plan = self.checkpoints
        if plan is None:
            raise net.RequestError(f"job {state.job_id} has no checkpoint folder", code="no_checkpoint")
        if len(plan.requested) >= MAX_REQUESTED_CHECKPOINTS:
            raise net.RequestError(f"more than {MAX_REQUESTED_CHECKPOINTS} checkpoints are pending", code="busy")
        plan.requested.add(clock)
        self._maybe_checkpoint(state)
        return Message(MsgType.CHECKPOINT, {"min_clock": state.gate.min_clock()})

    def _job_clear(self, peer: net.Peer, msg: Message) -> net.Reply:
        if self.state is not None and msg.body.get("job_id") == self.state.job_id:
            self._release(self.state.gate.drain())
            for part in self.kept.values():  # a kept model the job trained further is read-only again
                for table in part.tables.values():
                    table.state = {}
            self.state = None
            self.workers = {}
            self.sessions = {}
        return None

    # -- kept models (core/kept.py) ---------------------------------------------
    def _kept(self, body: dict[str, Any], what: str = "model") -> KeptTables:
        name, version = _require(body, what, str), _require(body, "version", str)
        part = self.kept.get((name, version))
        if part is None:
            raise net.RequestError(f"this shard holds no kept model {name!r} of version {version!r}", code="unknown_model")
        return part

    async def _keep_tables(self, peer: net.Peer, msg: Message) -> net.Reply:
        """The job ends and its tables stay as a kept model (written to the checkpoint folder, if any)."""
        b = msg.body
        state = self._job(b)
        name, version, index = _require(b, "name", str), _require(b, "version", str), _require(b, "shard_index", int)
        extra_names = b.get("extras", [])
        if not isinstance(extra_names, list) or len(extra_names) != len(msg.arrays) or not all(isinstance(n, str) for n in extra_names):
            raise net.RequestError("'extras' must name each array of KEEP_TABLES")
        if not state.tables:
            raise net.RequestError(f"the tables of job {state.job_id} were handed over already", code="busy")
        part = KeptTables.from_job(name, version, state, dict(zip(extra_names, msg.arrays)))
        folder = b.get("dir")
        if folder is not None:
            try:
                await asyncio.to_thread(checkpoint.save_kept, str(folder), name, version, index, part.arrays())
            except Exception as exc:
                raise net.RequestError(f"shard {self.shard_id} could not write its part of model {name!r}: {write_error(str(folder), exc)}") from None
        self.kept[(name, version)] = part
        log.info("shard %s: kept model %s (version %s): %s", self.shard_id, name, version, part.status())
        return Message(MsgType.KEEP_TABLES, part.status())

    async def _keep_load(self, peer: net.Peer, msg: Message) -> net.Reply:
        """Take a lost shard's place in a kept model: load that shard's part from its file."""
        b = msg.body
        name, version = _require(b, "name", str), _require(b, "version", str)
        index, folder = _require(b, "shard_index", int), _require(b, "dir", str)
        try:
            specs = [TableSpec.from_dict(t) for t in b["tables"]]
            ranges = {n: (int(lo), int(hi)) for n, (lo, hi) in b["ranges"].items()}
            arrays = await asyncio.to_thread(checkpoint.load_kept, folder, name, version, index)
            part = KeptTables.from_arrays(name, version, specs, ranges, index, int(b["n_shards"]), arrays)
        except (KeyError, TypeError, ValueError, checkpoint.CheckpointError) as exc:
            raise net.RequestError(f"cannot load kept model {name!r}: {exc}") from None
        self.kept[(name, version)] = part
        log.info("shard %s: loaded part %d of kept model %s from %s", self.shard_id, index, name, folder)
        return Message(MsgType.KEEP_LOAD, part.status())

    async def _keep_drop(self, peer: net.Peer, msg: Message) -> net.Reply:
        """Free a kept model's part (and remove its file)."""
        b = msg.body
        name, version = _require(b, "name", str), _require(b, "version", str)
        self.kept.pop((name, version), None)
        folder, index = b.get("dir"), b.get("shard_index")
        if isinstance(folder, str) and isinstance(index, int):
            try:
                await asyncio.to_thread(checkpoint.remove_kept, folder, name, version, index)
            except OSError as exc:
                log.warning("shard %s: removing the file of kept model %s failed: %s", self.shard_id, name, exc)
        return Message(MsgType.KEEP_DROP, {})

    def _model_pull(self, peer: net.Peer, msg: Message) -> net.Reply:
        """Read a kept model: rows by key, whole dense tables, or (``extras``) its other arrays."""
        part = self._kept(msg.body)
        peer.admit()  # a reader of kept models says what it is with its first pull
        if msg.body.get("extras"):
            names = sorted(part.extras)
            return Message(MsgType.MODEL_PULL, {"extras": names}, [part.extras[n] for n in names])
        names = part.check_tables(msg.body.get("tables"))
        keys = _keyed_arrays(msg, names, per_table=1)
        peer.check_keys(sum(len(k) for k in keys) if keys is not None else sum(len(part.tables[n]) for n in names))
        return Message(MsgType.MODEL_PULL, {}, part.read(names, keys))

    def _status(self, peer: net.Peer, msg: Message) -> net.Reply:
        body: dict[str, Any] = {"shard_id": self.shard_id, "pid": os.getpid(), "kept": [p.status() for p in self.kept.values()]}
        if self.state is not None:
            body.update(self.state.status(), **process_memory())
            body["last_checkpoint"] = self.checkpoints.last_clock if self.checkpoints else None
        return Message(MsgType.STATUS, body)

    def _ping(self, peer: net.Peer, msg: Message) -> net.Reply:
        return Message(MsgType.PING, {}, msg.arrays)

    _handlers: dict[MsgType, Callable[..., Any]] = {
        MsgType.HELLO: _hello,
        MsgType.PULL: _pull,
        MsgType.PUSH: _push,
        MsgType.LEAVE: _leave,
        MsgType.JOB_SETUP: _job_setup,
        MsgType.WORKER_LEFT: _worker_left,
        MsgType.WORKER_JOINED: _worker_joined,
        MsgType.JOB_CLEAR: _job_clear,
        MsgType.CHECKPOINT: _checkpoint,
        MsgType.CHECKPOINTED: _committed,
        MsgType.STATUS: _status,
        MsgType.PING: _ping,
        MsgType.MODEL_PULL: _model_pull,
        MsgType.KEEP_TABLES: _keep_tables,
        MsgType.KEEP_LOAD: _keep_load,
        MsgType.KEEP_DROP: _keep_drop,
    }


_FROM_COORDINATOR = frozenset(
    {MsgType.JOB_SETUP, MsgType.WORKER_LEFT, MsgType.WORKER_JOINED, MsgType.JOB_CLEAR, MsgType.CHECKPOINT,
     MsgType.CHECKPOINTED, MsgType.KEEP_TABLES, MsgType.KEEP_LOAD, MsgType.KEEP_DROP}
)


async def run_shard(
    coordinator: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    advertise_host: str | None = None,
    max_frame_bytes: int,
    max_connections: int | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    security: net.Security = net.LOCAL,
) -> None:
    """Serve one shard until ``stop`` is set or the coordinator goes away."""
    stop = stop or asyncio.Event()
    service = ShardService(on_coordinator_lost=stop.set)
    server = net.Server(
        service, max_frame_bytes=max_frame_bytes, max_connections=max_connections, name="shard", security=security
    )
    bound_host, bound_port = await server.start(host, port)
    address = f"{advertise_host or bound_host}:{bound_port}"
    try:
        peer = await net.connect(
            coordinator, service, max_frame_bytes=max_frame_bytes, what="psctl coordinator", security=security
        )
        service.coordinator = peer
        reply = await peer.request(MsgType.REGISTER_SHARD, {"address": address, "pid": os.getpid()})
        service.shard_id = int(reply.body["shard_id"])
        if on_ready is not None:
            on_ready(address)
        await stop.wait()
    finally:
        await service.finish_writes(CHECKPOINT_WRITE_TIMEOUT_S)
        # Stopping: the coordinator closing its link while this one closes is no loss to warn about.
        service.stopping = True
        await server.close()
        if service.coordinator is not None:
            service.coordinator.close()
