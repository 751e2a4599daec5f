"""A server shard: one key range of every table, its optimizer, the clock gate.

:class:`ShardState` is the pure part (tables, apply, gate); :class:`ShardService`
maps frames onto it; :func:`run_shard` is the process.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from psctl import net
from psctl.consistency import ClockGate, SyncAccumulator, staleness_for
from psctl.optim import Optimizer, make_optimizer
from psctl.tables import TableSpec, init_values
from psctl.wire import MAX_ARRAYS, Message, MsgType

log = logging.getLogger("psctl.shard")


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
        optimizer: Optimizer,
        seed: int,
    ):
        self.job_id = job_id
        self.mode = mode
        self.specs = {t.name: t for t in tables}
        self.ranges = ranges
        self.values = {t.name: init_values(t, *ranges[t.name], seed) for t in tables}
        self.gate = ClockGate(workers, staleness_for(mode, staleness))
        self.acc = SyncAccumulator() if mode == "sync" else None
        self.optimizer = optimizer
        self.updates = 0  # optimizer applications
        self.pushes = 0
        self.left: set[int] = set()

    def check_tables(self, names: list[Any]) -> list[str]:
        if not isinstance(names, list) or not 0 < len(names) <= MAX_ARRAYS:
            raise net.RequestError(f"'tables' must be a list of 1 to {MAX_ARRAYS} table names")
        for name in names:
            if not isinstance(name, str) or name not in self.values:
                raise net.RequestError(f"unknown table {name!r}")
        return names

    def read(self, names: list[str]) -> list[np.ndarray]:
        # A copy: the reply may sit in the transport's buffer while later pushes change the table.
        return [self.values[n].copy() for n in names]

    def push(self, worker: int, clock: int, grads: dict[str, np.ndarray], count: int) -> list[Any]:
        """Apply (or, in sync mode, accumulate) one push; return the gate tokens now ready."""
        if worker not in self.gate.clocks:
            raise net.RequestError(f"worker {worker} is not in the live set of job {self.job_id}", code="not_live")
        expected = self.gate.clocks[worker]
        if clock != expected:
            raise net.RequestError(f"worker {worker} pushed clock {clock}, expected {expected}", code="bad_clock")
        for name, grad in grads.items():
            if grad.shape != self.values[name].shape:
                raise net.RequestError(
                    f"gradient for {name!r} has shape {grad.shape}, the shard holds {self.values[name].shape}"
                )
        self.pushes += 1
        if self.acc is not None:
            self.acc.add(clock, grads, count)
        else:
            for name, grad in grads.items():
                self.optimizer.apply(self.values[name], grad)
            self.updates += 1
        ready = self.gate.advance(worker, clock + 1)
        self._apply_completed()
        return ready

    def leave(self, worker: int) -> list[Any]:
        """Drop a worker (finished, left or lost) from the live set."""
        if worker in self.gate.clocks:
            self.left.add(worker)
        ready = self.gate.remove(worker)
        self._apply_completed()
        return ready

    def _apply_completed(self) -> None:
        if self.acc is None:
            return
        for _clock, means in self.acc.complete(self.gate.min_clock()):
            for name, grad in means.items():
                self.optimizer.apply(self.values[name], grad)
            self.updates += 1

    def status(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "keys": int(sum(v.shape[0] for v in self.values.values())),
            "bytes": int(sum(v.nbytes for v in self.values.values())),
            "updates": self.updates,
            "pushes": self.pushes,
            "clocks": {str(w): c for w, c in self.gate.clocks.items()},
            "waiting_pulls": self.gate.waiting(),
        }


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
        if worker is not None and self.state is not None and peer.info.get("job_id") == self.state.job_id:
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
        return Message(MsgType.HELLO, {"shard_id": self.shard_id, "ranges": state.ranges})

    def _pull(self, peer: net.Peer, msg: Message) -> net.Reply | asyncio.Future[Message]:
        state = self._job(msg.body)
        names = state.check_tables(msg.body.get("tables"))
        peer.check_keys(sum(state.values[n].shape[0] for n in names))
        if peer.info.get("role") == "driver" or peer.info.get("worker_id") in state.left:
            return Message(MsgType.PULL, {}, state.read(names))
        if peer.info.get("role") != "worker":
            raise net.RequestError("say HELLO before PULL")
        clock = _require(msg.body, "clock", int)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        token = (fut, names, clock)
        if state.gate.wait(clock, token):
            return self._answer_pull(state, token)
        return fut

    def _answer_pull(self, state: ShardState, token: tuple[asyncio.Future[Message], list[str], int]) -> Message:
        fut, names, clock = token
        reply = Message(MsgType.PULL, {"min_clock": state.gate.min_clock(), "clock": clock}, state.read(names))
        if not fut.done():
            fut.set_result(reply)
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
        names = state.check_tables(msg.body.get("tables"))
        if len(msg.arrays) != len(names):
            raise net.RequestError(f"PUSH names {len(names)} tables but carries {len(msg.arrays)} arrays")
        peer.check_keys(sum(len(a) if a.ndim else 1 for a in msg.arrays))
        count = _require(msg.body, "count", int)
        if count < 1:
            raise net.RequestError("'count' must be >= 1")
        clock = _require(msg.body, "clock", int)
        self._release(state.push(worker, clock, dict(zip(names, msg.arrays)), count))
        return None

    def _leave(self, peer: net.Peer, msg: Message) -> net.Reply:
        state = self._job(msg.body)
        worker = peer.info.get("worker_id")
        if worker is None:
            raise net.RequestError("only a worker can LEAVE")
        self._release(state.leave(worker))
        return None

    # -- control plane (from the coordinator) --------------------------------
    def _job_setup(self, peer: net.Peer, msg: Message) -> net.Reply:
        b = msg.body
        try:
            tables = [TableSpec.from_dict(t) for t in b["tables"]]
            ranges = {name: (int(lo), int(hi)) for name, (lo, hi) in b["ranges"].items()}
            optimizer = make_optimizer(b["optimizer"]["name"], b["optimizer"].get("params", {}))
            self.state = ShardState(
                str(b["job_id"]),
                tables,
                ranges,
                str(b["mode"]),
                int(b.get("staleness", 0)),
                [int(w) for w in b["workers"]],
                optimizer,
                int(b.get("seed", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise net.RequestError(f"bad job setup: {exc}") from None
        log.info("shard %s: job %s set up (%s)", self.shard_id, self.state.job_id, self.state.status())
        return None

    def _worker_left(self, peer: net.Peer, msg: Message) -> net.Reply:
        state = self._job(msg.body)
        self._release(state.leave(_require(msg.body, "worker_id", int)))
        return None

    def _job_clear(self, peer: net.Peer, msg: Message) -> net.Reply:
        if self.state is not None and msg.body.get("job_id") == self.state.job_id:
            self._release(self.state.gate.drain())
            self.state = None
        return None

    def _status(self, peer: net.Peer, msg: Message) -> net.Reply:
        body: dict[str, Any] = {"shard_id": self.shard_id, "pid": os.getpid()}
        if self.state is not None:
            body.update(self.state.status())
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
        MsgType.JOB_CLEAR: _job_clear,
        MsgType.STATUS: _status,
        MsgType.PING: _ping,
    }


_FROM_COORDINATOR = frozenset({MsgType.JOB_SETUP, MsgType.WORKER_LEFT, MsgType.JOB_CLEAR})


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
