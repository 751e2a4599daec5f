"""The coordinator's asyncio service: frames become events for the core, effects become actions.

Every decision (membership, the job, its slots, shards, barriers, epochs, checkpoints) is
``core.coordinator.CoordinatorState``'s. This service only maps connections and pending
requests to the opaque keys the core uses, sends what the core asks for (its answers come
back as events), writes manifests in a thread, runs timers and the failure detector's
ticks, and holds every task it spawns. It carries only small control messages and does not
know models.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Hashable
from typing import Any

from psctl import net
from psctl.core import coordinator as core
from psctl.core.coordinator import JobData
from psctl.core.job import JobSpec
from psctl.data import vocab
from psctl.files import checkpoint
from psctl.net.transport import DEFAULT_REQUEST_TIMEOUT_S
from psctl.protocol.wire import Message, MsgType

log = logging.getLogger("psctl.coordinator")

MAX_LABELS = 1000


# The frames by which a peer says what it is (a shard, a worker, a driver, a worker's heartbeat
# connection): without a secret, a connection that sends none of them stays in the set-up budget.
_ROLES = frozenset({MsgType.REGISTER_SHARD, MsgType.REGISTER_WORKER, MsgType.SUBMIT, MsgType.HEARTBEAT})


class CoordinatorService:
    def __init__(self, idle_failure_timeout_s: float = core.DEFAULT_FAILURE_TIMEOUT_S) -> None:
        self.state = core.CoordinatorState(job_id_prefix=str(os.getpid()), idle_failure_timeout_s=idle_failure_timeout_s)
        self._conns = itertools.count(1)
        self._peers: dict[int, net.Peer] = {}  # conn id -> its connection (the core knows ids only)
        self._requests = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[Any], MsgType | None]] = {}  # request id -> (future, reply type)
        self._tasks: set[asyncio.Task[Any]] = set()  # every task this service spawns; cancelled on close
        self._manifests = asyncio.Lock()  # manifests are written in clock order
        # Called with a shard's pid when the failure detector declares it lost, so whoever
        # started that process (LocalCluster) kills it and starts another.
        self.on_shard_declared_lost: Callable[[int], None] | None = None

    @property
    def job(self) -> JobData | None:
        return self.state.job

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task this service holds until it ends (and cancels on close)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self) -> None:
        """The failure detector, until cancelled (the server closes); then every task this
        service spawned is cancelled too."""
        try:
            await self.monitor()
        finally:
            for task in list(self._tasks):
                task.cancel()

    async def monitor(self) -> None:
        """Tick the core's failure detector several times a failure timeout."""
        while True:
            await asyncio.sleep(self.state.tick_interval_s())
            self._dispatch(core.Tick())

    # -- events in, effects out -------------------------------------------------------
    def _dispatch(self, event: core.Event) -> None:
        self._apply(self.state.handle(event, time.monotonic()))

    def _apply(self, effects: list[core.ServiceEffect]) -> None:
        for effect in effects:
            if isinstance(effect, core.Release | core.Refuse):
                self._answer(effect)
            elif isinstance(effect, core.Notify):
                for conn in effect.conns:
                    peer = self._peers.get(conn)  # type: ignore[call-overload]
                    if peer is not None and peer.is_open:
                        peer.notify(effect.kind, effect.body, effect.arrays)
            elif isinstance(effect, core.Ask):
                self.spawn(self._ask(effect))
            elif isinstance(effect, core.WriteManifest):
                self.spawn(self._write_manifest(effect))
            elif isinstance(effect, core.Abort):
                peer = self._peers.get(effect.conn)  # type: ignore[call-overload]
                if peer is not None:
                    peer.abort(ConnectionError(effect.reason))  # its close comes back as ConnectionClosed
            elif isinstance(effect, core.KillShard):
                if self.on_shard_declared_lost is not None:
                    self.on_shard_declared_lost(effect.pid)
            elif isinstance(effect, core.ArmTimer):
                self.spawn(self._timer(effect))
            elif isinstance(effect, core.PoolStats):
                self._dispatch(pool_stats(effect))
            else:
                raise AssertionError(f"unknown effect {effect!r}")

    def _answer(self, effect: core.Release | core.Refuse) -> None:
        entry = self._pending.pop(effect.handle, None)  # type: ignore[call-overload]
        if entry is None:
            return
        fut, kind = entry
        if fut.done():
            return
        if isinstance(effect, core.Refuse):
            fut.set_exception(net.RequestError(effect.message, code=effect.code))
            fut.exception()  # retrieved: its request may be gone
        elif kind is None:
            fut.set_result(effect.value)
        elif isinstance(effect.value, tuple):
            fut.set_result(Message(kind, *effect.value))
        else:
            fut.set_result(Message(kind, effect.value))

    def _request(self, make: Callable[[int], core.Event], kind: MsgType | None) -> Any:
        """Hand the core an event that waits for an answer: the reply now if it came at once,
        else an awaitable of it."""
        rid = next(self._requests)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (fut, kind)
        try:
            self._dispatch(make(rid))
        except BaseException:
            self._pending.pop(rid, None)
            raise
        if fut.done():
            return fut.result()
        return self._await(rid, fut)

    async def _await(self, rid: int, fut: asyncio.Future[Any]) -> Any:
        try:
            return await fut
        finally:
            self._pending.pop(rid, None)

    async def _ask(self, ask: core.Ask) -> None:
        timeout_s = DEFAULT_REQUEST_TIMEOUT_S if ask.timeout_s is None else ask.timeout_s

        async def one(conn: Hashable, body: dict[str, Any], arrays: list[Any] | None) -> Any:
            peer = self._peers.get(conn)  # type: ignore[call-overload]
            if peer is None or not peer.is_open:
                return core.NoAnswer("the connection is closed")
            try:
                return (await peer.request(ask.kind, body, arrays, timeout_s=timeout_s)).body
            except Exception as exc:  # any failure is an answer the core judges
                return core.NoAnswer(str(exc))

        arrays = ask.arrays or (None,) * len(ask.targets)
        replies = await asyncio.gather(*(one(conn, body, a) for (conn, body), a in zip(ask.targets, arrays)))
        self._dispatch(core.Answered(ask.ask, tuple(replies)))

    async def _timer(self, timer: core.ArmTimer) -> None:
        await asyncio.sleep(timer.delay_s)
        self._dispatch(core.TimerFired(timer.timer))

    async def _write_manifest(self, effect: core.WriteManifest) -> None:
        """Write (and fsync) the manifest off the event loop; then the clock is the job's checkpoint."""
        async with self._manifests:  # in clock order: a later manifest is never overwritten by an earlier one
            if self.state.manifest_superseded(effect.job_id, effect.clock):
                self._dispatch(core.ManifestWritten(effect.job_id, effect.clock, skipped=True))
                return
            try:
                await asyncio.to_thread(checkpoint.write_manifest, effect.dir, effect.manifest)
            except OSError as exc:
                self._dispatch(core.ManifestWritten(effect.job_id, effect.clock, f"in {effect.dir}: {exc}"))
                return
            self._dispatch(core.ManifestWritten(effect.job_id, effect.clock))

    # -- frames in ---------------------------------------------------------------------
    def _conn(self, peer: net.Peer) -> int:
        conn = peer.info.get("conn")
        if conn is None:
            conn = peer.info["conn"] = next(self._conns)
            self._peers[conn] = peer
        return conn  # type: ignore[no-any-return]

    def handle(self, peer: net.Peer, msg: Message) -> Any:
        conn = self._conn(peer)
        self._dispatch(core.Heard(conn))  # any frame shows the peer is alive
        handler = self._handlers.get(msg.type)
        if handler is None:
            raise net.RequestError(f"the coordinator does not serve {msg.type.name}", code="unexpected")
        if msg.type in _ROLES:
            peer.admit()
        return handler(self, conn, msg)

    def peer_lost(self, peer: net.Peer, exc: BaseException | None) -> None:
        conn = peer.info.get("conn")
        if conn is None:
            return  # it never sent a frame: nobody knows it
        self._dispatch(core.ConnectionClosed(conn))
        self._peers.pop(conn, None)

    def _register_shard(self, conn: int, msg: Message) -> Any:
        address, pid = msg.body.get("address"), msg.body.get("pid", 0)
        if not isinstance(address, str) or not isinstance(pid, int) or isinstance(pid, bool):
            raise net.RequestError("REGISTER_SHARD needs an address and an integer pid")
        return self._request(lambda r: core.ShardRegistered(r, conn, address, pid), MsgType.REGISTER_SHARD)

    def _submit(self, conn: int, msg: Message) -> Any:
        spec = JobSpec.from_wire(msg.body.get("spec"))
        return self._request(lambda r: core.JobSubmitted(r, conn, spec), MsgType.SUBMIT)

    def _tables(self, conn: int, msg: Message) -> Any:
        return self._request(lambda r: core.TablesGiven(r, conn, msg.body), MsgType.TABLES)

    def _stop(self, conn: int, msg: Message) -> None:
        self._dispatch(core.StopRequested(conn))

    def _epoch_seen(self, conn: int, msg: Message) -> None:
        self._dispatch(core.EpochSeen(conn, msg.body))

    def _halt(self, conn: int, msg: Message) -> Any:
        return self._request(lambda r: core.HaltRequested(r, conn), MsgType.HALT)

    def _job_end(self, conn: int, msg: Message) -> None:
        self._dispatch(core.JobEndRequested(conn, msg.body.get("reason")))

    def _register_worker(self, conn: int, msg: Message) -> Any:
        body = msg.body
        partition = body.get("partition")
        if partition is not None and (not isinstance(partition, int) or isinstance(partition, bool) or partition < 0):
            raise net.RequestError("REGISTER_WORKER 'partition' must be a partition's index")
        return self._request(
            lambda r: core.WorkerRegistered(r, conn, body.get("pid"), body.get("host"), body.get("spare_of"), partition),
            MsgType.REGISTER_WORKER,
        )

    def _heartbeat(self, conn: int, msg: Message) -> None:
        self._dispatch(core.Heartbeat(conn, msg.body))

    def _stats(self, conn: int, msg: Message) -> Any:
        labels = msg.body.get("labels", [])
        if not isinstance(labels, list) or len(labels) > MAX_LABELS:
            raise net.RequestError(f"more than {MAX_LABELS} distinct label values")
        try:
            ids = vocab.from_message(msg.body, msg.arrays)
        except vocab.VocabError as exc:
            raise net.RequestError(str(exc)) from None
        return self._request(lambda r: core.StatsArrived(r, conn, {**msg.body, "vocab": ids}), MsgType.STATS)

    def _progress(self, conn: int, msg: Message) -> None:
        self._dispatch(core.Progress(conn, msg.body))

    def _epoch_report(self, conn: int, msg: Message) -> None:
        self._dispatch(core.EpochReported(conn, msg.body))

    def _trained(self, conn: int, msg: Message) -> Any:
        return self._request(lambda r: core.Trained(r, conn, msg.body), MsgType.TRAINED)

    def _final_report(self, conn: int, msg: Message) -> None:
        self._dispatch(core.FinalReport(conn, msg.body))

    def _failed(self, conn: int, msg: Message) -> None:
        self._dispatch(core.Failed(conn, msg.body.get("message", "failed")))

    def _status(self, conn: int, msg: Message) -> Any:
        return self._request(lambda r: core.StatusAsked(r), MsgType.STATUS)

    def _checkpointed(self, conn: int, msg: Message) -> None:
        body = msg.body
        self._dispatch(core.Checkpointed(conn, body.get("job_id"), body.get("clock"), body.get("shard_index"), body.get("error")))

    def _ping(self, conn: int, msg: Message) -> Message:
        return Message(MsgType.PING, {})

    def _model_keep(self, conn: int, msg: Message) -> Any:
        return self._request(lambda r: core.ModelKept(r, conn, msg.body, tuple(msg.arrays)), MsgType.MODEL_KEEP)

    def _models(self, conn: int, msg: Message) -> Any:
        return self._request(lambda r: core.ModelsAsked(r, msg.body.get("name")), MsgType.MODELS)

    def _model_drop(self, conn: int, msg: Message) -> Any:
        return self._request(lambda r: core.ModelDropRequested(r, msg.body.get("name")), MsgType.MODEL_DROP)

    _handlers: dict[MsgType, Callable[..., Any]] = {
        MsgType.REGISTER_SHARD: _register_shard,
        MsgType.SUBMIT: _submit,
        MsgType.TABLES: _tables,
        MsgType.JOB_END: _job_end,
        MsgType.STOP: _stop,
        MsgType.EPOCH_SEEN: _epoch_seen,
        MsgType.HALT: _halt,
        MsgType.REGISTER_WORKER: _register_worker,
        MsgType.STATS: _stats,
        MsgType.PROGRESS: _progress,
        MsgType.EPOCH_REPORT: _epoch_report,
        MsgType.TRAINED: _trained,
        MsgType.FINAL_REPORT: _final_report,
        MsgType.FAILED: _failed,
        MsgType.STATUS: _status,
        MsgType.PING: _ping,
        MsgType.HEARTBEAT: _heartbeat,
        MsgType.CHECKPOINTED: _checkpointed,
        MsgType.MODEL_KEEP: _model_keep,
        MsgType.MODELS: _models,
        MsgType.MODEL_DROP: _model_drop,
    }

    # -- asked by the server process -----------------------------------------------------
    async def stop_running_job(self, reason: str) -> str | None:
        """``psctl server`` is stopping: the running job's final checkpoint where one is
        configured, then the job ends. Returns a sentence for the operator (None: no job)."""
        result = self._request(lambda r: core.ServerStopping(r, reason), None)
        if asyncio.iscoroutine(result):
            return await result  # type: ignore[no-any-return]
        return result  # type: ignore[no-any-return]


def pool_stats(effect: core.PoolStats) -> core.StatsPooled:
    """The driver's stats body from every worker's: their statistics, the labels seen and the
    union of the vocabularies (the data layer's)."""
    # In partition order, not arrival order: merging is not associative in floating point,
    # so a seeded sync job then gets the same means and deviations, and model, every time.
    parts = {k: effect.parts[k] for k in sorted(effect.parts)}
    stats = [p["stats"] for p in parts.values() if p.get("stats")]
    all_labels = sorted({str(lbl) for p in parts.values() for lbl in p.get("labels", [])})
    try:
        names = sorted({n for p in parts.values() for n in p["vocab"]})
        union = {n: vocab.union((p["vocab"].get(n, ()) for p in parts.values()), n) for n in names}
    except vocab.VocabError as exc:
        return core.StatsPooled(effect.job_id, error=str(exc))
    body: dict[str, Any] = {"stats": stats, "labels": all_labels[: MAX_LABELS + 1]}
    arrays: list[Any] = []
    if union:
        body["vocab"], arrays = vocab.to_message({n: v.tolist() for n, v in union.items()})
    return core.StatsPooled(effect.job_id, body, arrays)


async def start_coordinator(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_frame_bytes: int,
    max_connections: int | None = None,
    security: net.Security = net.LOCAL,
    idle_failure_timeout_s: float | None = None,
) -> tuple[net.Server, CoordinatorService, str]:
    """Listen and return (server, service, 'host:port')."""
    service = CoordinatorService() if idle_failure_timeout_s is None else CoordinatorService(idle_failure_timeout_s)
    server = net.Server(
        service, max_frame_bytes=max_frame_bytes, max_connections=max_connections, name="coordinator", security=security
    )
    bound_host, bound_port = await server.start(host, port)
    server.tasks.add(asyncio.ensure_future(service.run()))  # cancelled by server.close()
    return server, service, f"{bound_host}:{bound_port}"
