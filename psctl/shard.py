"""A server shard: one key range of every table, its optimizer, the clock gate.

:class:`ShardState` is the pure part (tables, apply, gate); :class:`ShardService`
maps frames onto it; :func:`run_shard` is the process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from psctl import checkpoint, net
from psctl.consistency import ClockGate, Grad, SyncAccumulator, staleness_for
from psctl.optim import UpdateRule, make_optimizer
from psctl.sparse_table import SparseTable
from psctl.tables import TableSpec, init_values
from psctl.wire import MAX_ARRAYS, Message, MsgType

log = logging.getLogger("psctl.shard")

NEVER = 2**63 - 1  # a checkpoint clock no job reaches
MAX_REQUESTED_CHECKPOINTS = 64


class Table:
    """This shard's rows [lo, hi) of one table, with the update rule's per-row state."""

    def __init__(self, spec: TableSpec, lo: int, hi: int, seed: int, rule: UpdateRule):
        self.spec, self.lo, self.hi = spec, lo, hi
        self.values = init_values(spec, lo, hi, seed)
        self.state = rule.init_state(self.values)
        self.steps = 0  # updates applied, for learning-rate schedules

    def locate(self, keys: np.ndarray) -> np.ndarray:
        """Local row indices of global ``keys`` (sorted, unique, inside this shard's range)."""
        if keys.ndim != 1 or keys.dtype.kind not in "iu":
            raise net.RequestError(f"keys for {self.spec.name!r} must be a 1-d integer array")
        keys = keys.astype(np.int64)  # keys may come narrowed (uint8..uint32); diff them signed
        if len(keys):
            if keys[0] < self.lo or keys[-1] >= self.hi:
                raise net.RequestError(f"keys for {self.spec.name!r} fall outside this shard's range [{self.lo}, {self.hi})")
            if len(keys) > 1 and not (np.diff(keys) > 0).all():
                raise net.RequestError(f"keys for {self.spec.name!r} must be sorted and unique")
        return keys - self.lo

    def read(self, keys: np.ndarray | None, rows: np.ndarray | None = None) -> np.ndarray:
        """Values of ``keys`` (all rows: None); ``rows`` from :meth:`locate` spares a second look-up.

        A copy: the reply may sit in the transport's buffer while later pushes change the table.
        """
        if keys is None:
            return self.values.copy()
        return self.values[self.locate(keys) if rows is None else rows]

    def check_grad(self, keys: np.ndarray | None, grad: np.ndarray) -> None:
        expected = self.values.shape if keys is None else (len(keys), *self.values.shape[1:])
        if grad.shape != expected:
            raise net.RequestError(f"gradient for {self.spec.name!r} has shape {grad.shape}, expected {expected}")

    def snapshot(self) -> dict[str, np.ndarray]:
        return {"values": self.values, **{f"state.{k}": v for k, v in self.state.items()}}

    def restore(self, arrays: dict[str, np.ndarray], steps: int) -> None:
        if arrays["values"].shape != self.values.shape:
            raise ValueError(f"table {self.spec.name!r}: checkpoint shape {arrays['values'].shape}, expected {self.values.shape}")
        self.values[...] = arrays["values"]
        for k in self.state:
            self.state[k][...] = arrays[f"state.{k}"]
        self.steps = steps

    def apply(self, rule: UpdateRule, keys: np.ndarray | None, grad: np.ndarray, rows: np.ndarray | None = None) -> None:
        if keys is not None and rows is None:
            rows = self.locate(keys)
        rule.apply(self.values, grad, self.state, rows, self.steps)
        self.steps += 1

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + sum(a.nbytes for a in self.state.values())

    def dump(self, with_state: bool) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Keys, values and (if asked) optimizer state of the whole range."""
        state = {name: arr.copy() for name, arr in self.state.items()} if with_state else {}
        return np.arange(self.lo, self.hi, dtype=np.int64), self.values.copy(), state


class ShardState:
    """One job's parameters on this shard and the rules that change them."""

    def __init__(
        self,
        job_id: str,
        tables: list[TableSpec],
        ranges: dict[str, tuple[int, int]],
        mode: str,
        staleness: int,
        workers: list[int],
        rule: UpdateRule,
        seed: int,
        shard_index: int = 0,
        n_shards: int = 1,
    ):
        self.job_id = job_id
        self.mode = mode
        self.ranges = ranges
        self.tables: dict[str, Table | SparseTable] = {
            t.name: SparseTable(t, shard_index, n_shards, seed, rule) if t.sparse else Table(t, *ranges[t.name], seed, rule)
            for t in tables
        }
        self.gate = ClockGate(workers, staleness_for(mode, staleness))
        self.acc = SyncAccumulator() if mode == "sync" else None
        self.rule = rule
        self.updates = 0  # optimizer applications (a sync clock counts once)
        self.pushes = 0
        self.samples = 0  # rows behind every push, for the "every row used" check
        self.left: dict[int, int] = {}  # worker -> its clock when it left
        self.peers: dict[int, Any] = {}  # worker -> the connection it said HELLO on
        self.started_s = time.monotonic()

    def check_tables(self, names: Any, allow_empty: bool = False) -> list[str]:
        if not isinstance(names, list) or not (0 < len(names) or allow_empty) or len(names) > MAX_ARRAYS:
            raise net.RequestError(f"'tables' must be a list of 1 to {MAX_ARRAYS} table names")
        for name in names:
            if not isinstance(name, str) or name not in self.tables:
                raise net.RequestError(f"unknown table {name!r}")
        return names

    def read(
        self, names: list[str], keys: list[np.ndarray] | None = None, rows: list[np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """Each table's values of its keys (whole tables: no keys); ``rows``: their :meth:`locate` results."""
        if keys is None:
            return [self.tables[n].read(None) for n in names]
        return [self.tables[n].read(keys[i], None if rows is None else rows[i]) for i, n in enumerate(names)]

    def locate(self, names: list[str], keys: list[np.ndarray]) -> list[np.ndarray]:
        """Validate each table's keys (range, order, owner) and find their rows, once per request."""
        return [self.tables[n].locate(k) for n, k in zip(names, keys)]

    def dump(self, names: list[str], with_state: bool) -> tuple[list[np.ndarray], dict[str, list[str]]]:
        """Per table: keys, values, then its state arrays (named in the second result)."""
        arrays: list[np.ndarray] = []
        state_names: dict[str, list[str]] = {}
        for name in names:
            keys, values, state = self.tables[name].dump(with_state)
            state_names[name] = sorted(state)
            arrays += [keys, values, *(state[s] for s in state_names[name])]
        return arrays, state_names

    def push(self, worker: int, clock: int, grads: dict[str, Grad], count: int) -> list[Any]:
        """Apply (or, in sync mode, accumulate) one push; return the gate tokens now ready."""
        if worker not in self.gate.clocks:
            raise net.RequestError(f"worker {worker} is not in the live set of job {self.job_id}", code="not_live")
        expected = self.gate.clocks[worker]
        if clock != expected:
            raise net.RequestError(f"worker {worker} pushed clock {clock}, expected {expected}", code="bad_clock")
        rows: dict[str, np.ndarray | None] = {}
        for name, (keys, grad) in grads.items():
            table = self.tables[name]
            table.check_grad(keys, grad)
            # validate before anything is applied or accumulated; an async push applies these rows
            rows[name] = None if keys is None else table.locate(keys)
        self.pushes += 1
        self.samples += count
        if self.acc is not None:
            self.acc.add(clock, grads, count)
        else:
            self._apply(grads, rows)
        ready = self.gate.advance(worker, clock + 1)
        self._apply_completed()
        return ready

    def leave(self, worker: int) -> list[Any]:
        """Drop a worker (finished, left or lost) from the live set."""
        if worker in self.gate.clocks:
            self.left[worker] = self.gate.clocks[worker]
        ready = self.gate.remove(worker)
        self._apply_completed()
        return ready

    def _apply(self, grads: dict[str, Grad], rows: dict[str, np.ndarray | None] | None = None) -> None:
        for name, (keys, grad) in grads.items():
            self.tables[name].apply(self.rule, keys, grad, None if rows is None else rows[name])
        self.updates += 1

    def _apply_completed(self) -> None:
        if self.acc is None:
            return
        for _clock, means in self.acc.complete(self.gate.min_clock()):
            self._apply(means)

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and meta of a checkpoint at the current min clock (tables, optimizer state, counters)."""
        arrays = {f"{name}/{k}": v for name, t in self.tables.items() for k, v in t.snapshot().items()}
        meta = {
            "job_id": self.job_id,
            "steps": {name: t.steps for name, t in self.tables.items()},
            "updates": self.updates,
            "samples": self.samples,
        }
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], clock: int) -> None:
        """Tables and counters from a checkpoint; every worker's clock set to its clock."""
        for name, table in self.tables.items():
            prefix = f"{name}/"
            table.restore({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, int(meta["steps"][name]))
        self.updates, self.samples = int(meta["updates"]), int(meta["samples"])
        for worker in list(self.gate.clocks):
            self.gate.clocks[worker] = clock

    def status(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "keys": int(sum(len(t) for t in self.tables.values())),
            "bytes": int(sum(t.nbytes for t in self.tables.values())),
            **process_memory(),
            "updates": self.updates,
            "pushes": self.pushes,
            "samples": self.samples,
            "clock": self.gate.min_clock(),  # the slowest live worker's: every clock below it is applied (sync)
            "clocks": {str(w): c for w, c in self.gate.clocks.items()},
            "waiting_pulls": self.gate.waiting(),
            "updates_s": self.updates / max(time.monotonic() - self.started_s, 1e-9),
        }


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
    last_clock: int | None = None  # the clock this shard saved last

    @classmethod
    def plan(cls, folder: str, index: int, every: int, start: int) -> _Checkpoints:
        return cls(folder, index, every, cls.next_after(start, every))

    @staticmethod
    def next_after(clock: int, every: int) -> int:
        return (clock // every + 1) * every if every > 0 else NEVER

    def due(self, low: int) -> bool:
        return low >= self.next_clock or any(c <= low for c in self.requested)

    def saved(self, low: int) -> None:
        self.last_clock = low
        self.next_clock = self.next_after(low, self.every)
        self.requested = {c for c in self.requested if c > low}


@dataclass
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


def _require(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise net.RequestError(f"field {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


class ShardService:
    """Frames -> ShardState. One instance per shard process."""

    def __init__(self, on_coordinator_lost: Callable[[], None]):
        self.state: ShardState | None = None
        self.shard_id: int | None = None
        self._on_coordinator_lost = on_coordinator_lost
        self.coordinator: net.Peer | None = None
        self.checkpoints: _Checkpoints | None = None

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
        if peer is self.coordinator:
            log.warning("shard %s lost its coordinator", self.shard_id)
            self._on_coordinator_lost()
            return
        worker = peer.info.get("worker_id")
        # Only the connection this state knows the worker by: after a roll-back the worker's
        # old connections close while it is already live again on new ones.
        if worker is not None and self.state is not None and self.state.peers.get(worker) is peer:
            self._release(self.state.leave(worker))

    # -- data plane ----------------------------------------------------------
    def _hello(self, peer: net.Peer, msg: Message) -> net.Reply:
        role = msg.body.get("role")
        if role not in ("worker", "driver"):
            raise net.RequestError("HELLO needs role 'worker' or 'driver'")
        state = self._job(msg.body)
        peer.info["role"] = role
        peer.info["job_id"] = state.job_id
        if role == "worker":
            peer.info["worker_id"] = _require(msg.body, "worker_id", int)
            state.peers[peer.info["worker_id"]] = peer
        return Message(MsgType.HELLO, {"shard_id": self.shard_id, "ranges": state.ranges})

    def _pull(self, peer: net.Peer, msg: Message) -> net.Reply | asyncio.Future[Message]:
        state = self._job(msg.body)
        names = state.check_tables(msg.body.get("tables"))
        keys = _keyed_arrays(msg, names, per_table=1)
        peer.check_keys(sum(len(k) for k in keys) if keys is not None else sum(state.tables[n].values.shape[0] for n in names))
        # Bad keys are refused now, not when the gate opens; the rows found are read then.
        rows = None if keys is None else state.locate(names, keys)
        if peer.info.get("role") == "driver" and msg.body.get("dump"):
            arrays, state_names = state.dump(names, with_state=bool(msg.body.get("with_state")))
            return Message(MsgType.PULL, {"state": state_names}, arrays)
        if peer.info.get("role") == "driver" or peer.info.get("worker_id") in state.left:
            return Message(MsgType.PULL, {}, state.read(names, keys, rows))
        if peer.info.get("role") != "worker":
            raise net.RequestError("say HELLO before PULL")
        clock = _require(msg.body, "clock", int)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        token = _PullToken(fut, names, keys, rows, clock)
        if state.gate.wait(clock, token):
            return self._answer_pull(state, token)
        return fut

    def _answer_pull(self, state: ShardState, token: _PullToken) -> Message:
        body = {"min_clock": state.gate.min_clock(), "clock": token.clock}
        reply = Message(MsgType.PULL, body, state.read(token.names, token.keys, token.rows))
        if not token.fut.done():
            token.fut.set_result(reply)
        return reply

    def _release(self, tokens: list[Any]) -> None:
        assert self.state is not None
        for token in tokens:
            self._answer_pull(self.state, token)

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
        table_grads = {n: (None if keys is None else keys[i], grads[i]) for i, n in enumerate(names)}
        self._release(state.push(worker, clock, table_grads, count))
        self._maybe_checkpoint(state)
        return None

    def _leave(self, peer: net.Peer, msg: Message) -> net.Reply:
        state = self._job(msg.body)
        worker = peer.info.get("worker_id")
        if worker is None:
            raise net.RequestError("only a worker can LEAVE")
        self._release(state.leave(worker))
        self._maybe_checkpoint(state)
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
        arrays, meta = state.snapshot()
        checkpoint.save_shard(plan.folder, plan.index, low, arrays, meta)
        checkpoint.prune(plan.folder, plan.index, low)
        plan.saved(low)
        if self.coordinator is not None and self.coordinator.is_open:
            self.coordinator.notify(MsgType.CHECKPOINTED, {"job_id": state.job_id, "clock": low, "shard_index": plan.index})

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
            restore = b.get("restore")
            if restore:
                arrays, meta = checkpoint.load_shard(restore["dir"], index, int(restore["clock"]))
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
        state.gate.add(_require(msg.body, "worker_id", int), _require(msg.body, "clock", int))
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
            self.state = None
        return None

    def _status(self, peer: net.Peer, msg: Message) -> net.Reply:
        body: dict[str, Any] = {"shard_id": self.shard_id, "pid": os.getpid()}
        if self.state is not None:
            body.update(self.state.status())
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
        MsgType.STATUS: _status,
        MsgType.PING: _ping,
    }


_FROM_COORDINATOR = frozenset(
    {MsgType.JOB_SETUP, MsgType.WORKER_LEFT, MsgType.WORKER_JOINED, MsgType.JOB_CLEAR, MsgType.CHECKPOINT}
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
        await server.close()
        if service.coordinator is not None:
            service.coordinator.close()
