"""The coordinator: membership, the job, data-partition assignment, barriers, reports.

It carries only small control messages. It does not know models: the driver
sends the tables a job needs, and workers do all model-specific work.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psctl import net
from psctl.core.coordinator import (
    JOB_TRANSITIONS,
    WATCHED_SLOT_STATES,
    Barrier,
    CheckpointLog,
    Effect,
    EpochPool,
    InvalidTransition,
    JobState,
    Liveness,
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
from psctl.errors import PsctlError
from psctl.core.reports import pool
from psctl.core.tables import TableSpec, table_ranges
from psctl.data import vocab
from psctl.files import checkpoint
from psctl.protocol.wire import Message, MsgType

log = logging.getLogger("psctl.coordinator")

SHARD_WAIT_S = 30.0
SHARD_SETUP_TIMEOUT_S = 30.0
PAUSE_TIMEOUT_S = 10.0  # a worker answers PAUSE at once; one that does not is hung
MAX_LABELS = 1000


@dataclass
class ShardInfo:
    shard_id: int
    address: str
    pid: int
    peer: net.Peer


WorkerSlot = Slot  # the slot is plain data (core.coordinator); its peer is a net.Peer here


@dataclass
class Job:
    job_id: str
    spec: JobSpec
    driver: net.Peer
    shards: list[ShardInfo]
    workers: list[WorkerSlot]
    stats: Barrier
    trained: Barrier
    final: Barrier
    ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    epochs: EpochPool = field(default_factory=EpochPool)
    stats_sent: bool = False
    tables: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: CheckpointLog = field(default_factory=CheckpointLog)
    recovering: int | None = None  # index of a lost shard awaiting its replacement
    stats_reply: tuple[dict[str, Any], list[Any]] | None = None  # body and vocabulary arrays
    tables_ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    state: JobState = JobState.SETUP
    started_s: float = field(default_factory=time.monotonic)
    pausing: asyncio.Lock = field(default_factory=asyncio.Lock)  # held while the workers are paused for a checkpoint
    halting: bool = False  # the workers were told to stop at one clock: no more pauses
    timer: asyncio.Task[None] | None = None  # checkpoints every N seconds
    stop_requested: bool = False  # early stop: workers that join later are told too
    takeovers: dict[int, int] = field(default_factory=dict)  # worker id -> partitions it was asked to take over
    manifest_written: asyncio.Lock = field(default_factory=asyncio.Lock)  # manifests are written in clock order

    @property
    def last_checkpoint(self) -> int | None:
        return self.checkpoints.last

    def move(self, new: JobState) -> None:
        check_move(JOB_TRANSITIONS, f"job {self.job_id}", self.state, new)  # type: ignore[arg-type]
        self.state = new

    def live_ids(self) -> set[int]:
        return live_ids(self.workers)


class CoordinatorService:
    def __init__(self) -> None:
        self.shards: list[ShardInfo] = []
        self.job: Job | None = None
        self._job_ids = itertools.count(1)
        self._changed = asyncio.Condition()  # shards joined, a job started or ended
        self._tasks: set[asyncio.Task[Any]] = set()  # every task this service spawns; cancelled on close
        self.liveness = Liveness.for_intervals(DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_FAILURE_TIMEOUT_S)
        self._pinging: set[int] = set()  # shard ids with a PING in flight
        # Called with a shard's pid when the failure detector declares it lost, so whoever
        # started that process (LocalCluster) kills it and starts another.
        self.on_shard_declared_lost: Callable[[int], None] | None = None

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

    # -- plumbing ------------------------------------------------------------
    def handle(self, peer: net.Peer, msg: Message) -> Any:
        self._heard(peer)  # any frame shows the peer is alive
        handler = self._handlers.get(msg.type)
        if handler is None:
            raise net.RequestError(f"the coordinator does not serve {msg.type.name}", code="unexpected")
        return handler(self, peer, msg)

    def peer_lost(self, peer: net.Peer, exc: BaseException | None) -> None:
        self._changed_soon()  # wakes a REGISTER_WORKER that waits on this peer
        role = peer.info.get("role")
        if role == "shard":
            self.liveness.forget(("shard", peer.info["shard_id"]))
            self.shards = [s for s in self.shards if s.peer is not peer]
            self._shard_lost(peer)
        elif role == "worker" and self.job is not None and peer.info.get("job_id") == self.job.job_id:
            self._worker_lost(self.job.workers[peer.info["worker_id"]])
        elif role == "driver" and self.job is not None and self.job.driver is peer:
            log.warning("driver of job %s went away; ending the job", self.job.job_id)
            self._end_job("the driver disconnected")

    def _heard(self, peer: net.Peer) -> None:
        now = time.monotonic()
        peer.info["last_seen"] = now
        role = peer.info.get("role")
        if role == "shard":
            self.liveness.heard(("shard", peer.info["shard_id"]))
        elif role == "worker" and self.job is not None and peer.info.get("job_id") == self.job.job_id:
            self._slot_heard(self.job.workers[peer.info["worker_id"]], now)

    def _slot_heard(self, slot: WorkerSlot, now: float) -> None:
        slot.last_heard_s = now
        self.liveness.heard(("worker", slot.worker_id))

    def _move(self, slot: WorkerSlot, new: SlotState) -> None:
        """A slot's move that a worker's message asked for: an illegal one is that worker's error."""
        try:
            slot.move(new)
        except InvalidTransition as exc:
            raise net.RequestError(str(exc), code="unexpected") from None
        if new in WATCHED_SLOT_STATES:
            self.liveness.watch(("worker", slot.worker_id))
        else:
            self.liveness.forget(("worker", slot.worker_id))

    def _run(self, effects: list[Effect]) -> None:
        """Run what the pure parts decided: answer the requests they held."""
        for effect in effects:
            fut = effect.handle
            assert isinstance(fut, asyncio.Future)
            if fut.done():
                continue
            if isinstance(effect, Release):
                fut.set_result(effect.value)
            else:
                fut.set_exception(net.RequestError(effect.message, code=effect.code))
                fut.exception()  # retrieved: its request may be gone

    async def _wait(self, barrier: Barrier, worker: int, payload: Any) -> Any:
        """Arrive at ``barrier`` and wait until it opens (or fails)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._run(barrier.arrive(worker, payload, fut))
        return await fut

    async def _notify_changed(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _changed_soon(self) -> None:
        self.spawn(self._notify_changed())

    def _event(self, job: Job, body: dict[str, Any], arrays: list[Any] | None = None) -> None:
        if job.driver.is_open:
            job.driver.notify(MsgType.EVENT, body, arrays)

    def _job_of(self, peer: net.Peer) -> tuple[Job, WorkerSlot]:
        job = self.job
        if job is None or peer.info.get("job_id") != job.job_id or job.state is not JobState.RUNNING:
            raise net.RequestError("no running job for this worker", code="no_job")
        return job, job.workers[peer.info["worker_id"]]

    # -- shards --------------------------------------------------------------
    def _register_shard(self, peer: net.Peer, msg: Message) -> Message:
        address, pid = msg.body.get("address"), msg.body.get("pid", 0)
        if not isinstance(address, str) or not isinstance(pid, int) or isinstance(pid, bool):
            raise net.RequestError("REGISTER_SHARD needs an address and an integer pid")
        shard_id = max((s.shard_id for s in self.shards), default=-1) + 1
        info = ShardInfo(shard_id, address, pid, peer)
        self.shards.append(info)
        peer.info.update(role="shard", shard_id=shard_id, address=address, pid=pid)
        self.liveness.watch(("shard", shard_id))
        log.info("shard %d registered at %s", shard_id, address)
        job = self.job
        if job is not None and job.recovering is not None:
            self.spawn(self._recover(job, job.recovering, info))
        self._changed_soon()
        return Message(MsgType.REGISTER_SHARD, {"shard_id": shard_id})

    # -- the driver ----------------------------------------------------------
    async def _submit(self, peer: net.Peer, msg: Message) -> Message:
        """Open a job: workers may register and run the statistics pass; tables come later (TABLES)."""
        if self.job is not None:
            raise net.RequestError(f"job {self.job.job_id} is still running on this server", code="busy")
        spec = JobSpec.from_wire(msg.body.get("spec"))
        n_workers, min_shards = spec.n_workers, spec.min_shards
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: len(self.shards) >= min_shards), SHARD_WAIT_S)
            except TimeoutError:
                raise net.RequestError(
                    f"only {len(self.shards)} of {min_shards} shards joined within {SHARD_WAIT_S:g} s", code="no_shards"
                ) from None
        if self.job is not None:
            raise net.RequestError(f"job {self.job.job_id} is still running on this server", code="busy")
        job_id = f"{os.getpid()}-{next(self._job_ids)}"
        workers = set(range(n_workers))
        self.job = Job(
            job_id,
            spec,
            peer,
            list(self.shards),
            [WorkerSlot(i, start_clock=spec.resume_clock) for i in range(n_workers)],
            Barrier(workers),
            Barrier(workers),
            Barrier(workers),
        )
        self.job.move(JobState.RUNNING)
        self.liveness.timeout_s = spec.failure_timeout_s
        self.liveness.max_gap_s = 2 * tick_interval_s(spec.heartbeat_interval_s, spec.failure_timeout_s)
        peer.info.update(role="driver", job_id=job_id)
        log.info("job %s: %d workers, %d shards, mode %s", job_id, n_workers, len(self.shards), spec.mode)
        self._changed_soon()
        return Message(MsgType.SUBMIT, {"job_id": job_id, "shards": [s.address for s in self.job.shards]})

    async def _tables(self, peer: net.Peer, msg: Message) -> Message:
        """The driver names the job's tables (known once labels are): set them up on every shard."""
        job = self.job
        if job is None or job.driver is not peer or job.ranges:
            raise net.RequestError("TABLES comes once, from the driver of the running job")
        try:
            tables = [TableSpec.from_dict(t) for t in msg.body["tables"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise net.RequestError(f"bad tables: {exc}") from None
        job.ranges = {t.name: table_ranges(t, len(job.shards)) for t in tables}
        job.tables = [t.to_dict() for t in tables]
        try:
            await self._setup_shards(job, job.spec.resume, [w.worker_id for w in job.workers])
        except PsctlError as exc:
            self._fail(f"shard setup failed: {exc}")
            raise net.RequestError(f"shard setup failed: {exc}") from None
        ranges = job.ranges
        if not job.tables_ready.done():
            job.tables_ready.set_result(None)
        every_s = job.spec.checkpoint_every_s
        if every_s > 0:
            job.timer = self.spawn(self._checkpoint_timer(job, every_s))
        return Message(MsgType.TABLES, {"shards": [s.address for s in job.shards], "ranges": ranges})

    def _stop(self, peer: net.Peer, msg: Message) -> None:
        """The driver stops training early: workers finish their step and wrap up as usual."""
        job = self.job
        if job is None or job.driver is not peer:
            return
        job.stop_requested = True
        for w in job.workers:
            if w.peer is not None and w.peer.is_open:
                w.peer.notify(MsgType.EVENT, {"kind": "stop"})

    async def _halt(self, peer: net.Peer, msg: Message) -> Message:
        """The driver stops the job (Ctrl-C): a final checkpoint at one clock, then the job ends."""
        job = self.job
        if job is None or job.driver is not peer:
            raise net.RequestError("HALT comes from the driver of the running job", code="forbidden")
        clock = await self.halt(job, "stopped by its driver")
        return Message(MsgType.HALT, {"clock": clock})

    async def halt(self, job: Job, reason: str) -> int | None:
        """Stop every worker at one clock, wait until every shard has saved it, end the job.

        Returns the clock of that final checkpoint, or None when the job finished
        first (no worker was still training); raises RequestError when no
        consistent checkpoint can be had (no folder, a replacement under way, a
        worker or shard lost meanwhile).
        """
        target = await self.checkpoint_at_one_clock(job, stop=True)
        if target is not None:
            fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
            self._run(job.checkpoints.wait(target, fut))
            target = await fut
        if target is None:
            return None
        self._event(job, {"kind": "halted", "clock": target, "dir": job.spec.checkpoint_dir, "reason": reason})
        self._end_job(f"{reason} at clock {target}, with a final checkpoint")
        return target

    async def stop_running_job(self, reason: str) -> str | None:
        """``psctl server`` is stopping: the running job's final checkpoint where one is
        configured, then the job ends. Returns a sentence for the operator (None: no job)."""
        job = self.job
        if job is None or job.state is not JobState.RUNNING:
            return None
        if not job.spec.checkpoint:
            self._fail(reason)
            return f"job {job.job_id} stopped (it has no --checkpoint-dir, so no final checkpoint)"
        try:
            clock = await self.halt(job, reason)
        except (net.RequestError, PsctlError) as exc:
            self._fail(reason)
            return f"job {job.job_id} stopped without a final checkpoint: {exc}"
        if clock is None:
            return f"job {job.job_id} was finishing; it was not stopped"
        return f"job {job.job_id} stopped at clock {clock}; its final checkpoint is in {job.spec.checkpoint_dir}"

    def _cannot_pause(self, job: Job) -> str | None:
        if job is not self.job:
            return "the job is not running"
        return cannot_pause(
            job.job_id, job.state, halting=job.halting, has_checkpoint_dir=bool(job.spec.checkpoint),
            tables_set=bool(job.ranges), recovering=job.recovering is not None, slots=job.workers,
        )

    async def checkpoint_at_one_clock(self, job: Job, *, stop: bool) -> int | None:
        """Hold every training worker, take the clock they can all reach (the furthest
        one's) and ask every shard to save when its min clock gets there; then let the
        workers go on, or (``stop``) go on only up to that clock and hold there.

        Held workers do not push, so no shard's min clock passes that clock before the
        shards know it: they all save the same clock, in every mode. With ``stop`` no
        worker pushes past it either, so the checkpoint is exact in async and ssp too.
        Returns the clock, or None when no worker is training any more.
        """
        async with job.pausing:  # one pause at a time: a stop waits for a timed checkpoint's pause
            return await self._pause_and_checkpoint(job, stop)

    async def _pause_and_checkpoint(self, job: Job, stop: bool) -> int | None:
        why = self._cannot_pause(job)
        if why is not None:
            raise net.RequestError(f"no checkpoint now: {why}", code="not_now")
        live = [w for w in job.workers if w.state is SlotState.RUNNING and w.peer is not None and w.peer.is_open]
        until: int | None = None
        try:
            if not live:
                return None
            replies = await asyncio.gather(
                *(w.peer.request(MsgType.PAUSE, {"job_id": job.job_id}, timeout_s=PAUSE_TIMEOUT_S) for w in live if w.peer)
            )
            try:
                target = one_clock([r.body.get("clock") for r in replies])
            except ValueError as exc:
                raise net.RequestError(str(exc)) from None
            await asyncio.gather(
                *(
                    s.peer.request(MsgType.CHECKPOINT, {"job_id": job.job_id, "clock": target}, timeout_s=SHARD_SETUP_TIMEOUT_S)
                    for s in job.shards
                )
            )
            until = target if stop else None
            job.halting = stop
            log.info("job %s: checkpoint at clock %d asked for (%s)", job.job_id, target, "stop there" if stop else "go on")
            return target
        except PsctlError as exc:
            raise net.RequestError(f"no checkpoint now: {exc}", code="not_now") from None
        finally:
            for w in live:
                if w.peer is not None and w.peer.is_open:
                    w.peer.notify(MsgType.RESUME, {"until": until})

    async def _checkpoint_timer(self, job: Job, every_s: float) -> None:
        """--checkpoint-every Ns: a checkpoint at one clock every N seconds while the job runs."""
        while True:
            await asyncio.sleep(every_s)
            if job is not self.job or job.state is not JobState.RUNNING:
                return
            if job.pausing.locked():
                continue  # a stop is under way
            try:
                await self.checkpoint_at_one_clock(job, stop=False)
            except net.RequestError as exc:
                log.info("job %s: skipped a timed checkpoint: %s", job.job_id, exc)

    async def _setup_shards(self, job: Job, restore: dict[str, Any] | None, workers: list[int]) -> list[Message]:
        """Create (or, with ``restore``, reload from a checkpoint) the job's tables on every shard."""
        spec = job.spec
        return await asyncio.gather(
            *(
                s.peer.request(
                    MsgType.JOB_SETUP,
                    {
                        "job_id": job.job_id,
                        "tables": job.tables,
                        "ranges": {name: r[i] for name, r in job.ranges.items()},
                        "mode": spec.mode,
                        "staleness": spec.staleness,
                        "workers": workers,
                        "optimizer": spec.optimizer,
                        "seed": spec.seed,
                        "shard_index": i,
                        "checkpoint": spec.checkpoint,
                        "restore": restore,
                        "n_shards": len(job.shards),
                    },
                    timeout_s=SHARD_SETUP_TIMEOUT_S,
                )
                for i, s in enumerate(job.shards)
            )
        )

    def _shard_lost(self, peer: net.Peer) -> None:
        """Wait for a replacement shard when the job has a checkpoint to roll back to; else fail."""
        job = self.job
        index = next((i for i, s in enumerate(job.shards) if s.peer is peer), None) if job else None
        if job is None or index is None:
            return
        why = peer.info.get("lost_reason")
        what = f"shard {peer.info['shard_id']} at {peer.info['address']} was lost" + (f": {why}" if why else "")
        self._run(job.checkpoints.settle(error=f"{what} before the final checkpoint was saved", code="bad_request"))
        failed = shard_lost_verdict(
            what, job.state, last_checkpoint=job.last_checkpoint, recovering=job.recovering is not None, slots=job.workers
        )
        if failed is not None:
            self._fail(failed)
            return
        job.recovering = index
        log.warning("job %s: %s; waiting for a shard to take its place", job.job_id, what)
        self._event(job, {"kind": "shard_lost", "index": index, "clock": job.last_checkpoint, "reason": what})

    async def _recover(self, job: Job, index: int, shard: ShardInfo) -> None:
        """Roll every shard back to the last checkpoint and send the workers there."""
        job.shards[index] = shard
        clock = job.last_checkpoint
        assert clock is not None
        live = [w for w in job.workers if w.state is SlotState.RUNNING]
        try:
            replies = await self._setup_shards(
                job, {"dir": job.spec.checkpoint_dir, "clock": clock}, [w.worker_id for w in live]
            )
        except PsctlError as exc:
            self._fail(f"recovering shard {index} from the checkpoint at clock {clock} failed: {exc}")
            return
        job.recovering = None
        rewind(job.workers, clock)  # a lost worker's partition, not taken over yet, also goes back
        # The surviving shards knew how far the fastest worker had got: those steps are done again.
        reached = [int(r.body["previous_clock"]) for r in replies if r.body.get("previous_clock") is not None]
        replayed = max(reached, default=clock) - clock
        for w in live:
            if w.peer is not None and w.peer.is_open:
                w.peer.notify(
                    MsgType.EVENT,
                    {"kind": "rewind", "clock": clock, "shards": [s.address for s in job.shards], "ranges": job.ranges},
                )
        self._event(
            job,
            {"kind": "shard_recovered", "index": index, "clock": clock, "replayed_steps": replayed,
             "shards": [s.address for s in job.shards]},
        )

    def _job_end(self, peer: net.Peer, msg: Message) -> None:
        """The driver is done with the job; a ``reason`` ends it early (workers are told)."""
        if self.job is not None and self.job.driver is peer:
            reason = msg.body.get("reason")
            self._end_job(reason if isinstance(reason, str) and self.job.state is JobState.RUNNING else None)

    def _end_job(self, reason: str | None) -> None:
        job = self.job
        if job is None:
            return
        self.job = None
        if job.timer is not None:
            job.timer.cancel()
        self._run(job.checkpoints.settle(error=f"job {job.job_id} ended: {reason or 'done'}", code="job_ended"))
        for w in job.workers:
            self.liveness.forget(("worker", w.worker_id))
        self.liveness.timeout_s = DEFAULT_FAILURE_TIMEOUT_S
        self.liveness.max_gap_s = 2 * tick_interval_s(DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_FAILURE_TIMEOUT_S)
        if reason is not None:
            if job.state is JobState.RUNNING:
                job.move(JobState.FAILED)
            for w in job.workers:
                if w.peer is not None and w.peer.is_open:
                    w.peer.notify(MsgType.EVENT, {"kind": "abort", "reason": reason})
        ended = net.RequestError(f"job {job.job_id} ended: {reason or 'done'}", code="job_ended")
        for barrier in (job.stats, job.trained, job.final):
            self._run(barrier.fail(str(ended)))
        if not job.tables_ready.done():
            job.tables_ready.set_exception(ended)
            job.tables_ready.exception()  # retrieved: nobody may be waiting
        for s in job.shards:
            if s.peer.is_open:
                s.peer.notify(MsgType.JOB_CLEAR, {"job_id": job.job_id})
        self._changed_soon()

    def _fail(self, reason: str) -> None:
        job = self.job
        if job is None:
            return
        log.warning("job %s failed: %s", job.job_id, reason)
        self._event(job, {"kind": "failed", "reason": reason})
        self._end_job(reason)

    # -- workers -------------------------------------------------------------
    async def _register_worker(self, peer: net.Peer, msg: Message) -> Message:
        """A worker joins the running job (waiting for one): a free slot, or a lost worker's.

        With ``spare_of`` (a survivor taking over a lost worker's partition) only a
        lost worker's slot of that job will do, and the answer comes at once.
        """
        spare_of = msg.body.get("spare_of")

        def free() -> WorkerSlot | None:
            if self.job is None or self.job.state is not JobState.RUNNING:
                return None
            if spare_of is not None and spare_of != self.job.job_id:
                return None
            return free_slot(self.job.workers, spare_only=spare_of is not None)

        if spare_of is None:
            async with self._changed:
                await self._changed.wait_for(lambda: free() is not None or not peer.is_open)
        slot = free()
        if slot is None and spare_of is not None:
            raise net.RequestError("no lost worker's partition is waiting to be taken over", code="no_spare")
        if slot is None or self.job is None:
            raise net.RequestError("connection closed while waiting for a job")
        job = self.job
        replacing = slot.state is SlotState.SPARE
        slot.peer = peer
        self._move(slot, SlotState.RUNNING)
        slot.session = secrets.token_hex(16)
        slot.last_heard_s = time.monotonic()
        slot.pid, slot.host = msg.body.get("pid"), msg.body.get("host")
        peer.info.update(role="worker", job_id=job.job_id, worker_id=slot.worker_id, helper=spare_of is not None)
        if replacing:  # the barriers have expected this slot since its predecessor was lost
            body = {"job_id": job.job_id, "worker_id": slot.worker_id, "clock": slot.start_clock}
            if job.ranges:  # tables exist: the gates must know the newcomer before it pushes
                await asyncio.gather(*(s.peer.request(MsgType.WORKER_JOINED, body) for s in job.shards))
        self._event(
            job,
            {"kind": "worker_joined", "worker_id": slot.worker_id, "pid": slot.pid, "host": slot.host,
             "partition": slot.partition, "start_clock": slot.start_clock, "replacing": replacing,
             "takeover": spare_of is not None},
        )
        return Message(
            MsgType.REGISTER_WORKER,
            {
                "job_id": job.job_id,
                "worker_id": slot.worker_id,
                "spec": job.spec.to_wire(),
                "partition": job.spec.partitions[slot.partition],
                "partition_index": slot.partition,
                "start_clock": slot.start_clock,
                "stop": job.stop_requested,
                "session": slot.session,  # a HEARTBEAT carrying it counts on any connection
            },
        )

    async def monitor(self) -> None:
        """The failure detector: every tick, PING each shard (its reply, like any frame, shows it
        is alive) and declare lost the parties the liveness tracker finds silent too long:
        a stopped, hung or partitioned host keeps its sockets open."""
        while True:
            spec = self.job.spec if self.job is not None else None
            await asyncio.sleep(
                tick_interval_s(spec.heartbeat_interval_s, spec.failure_timeout_s)
                if spec is not None
                else tick_interval_s(DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_FAILURE_TIMEOUT_S)
            )
            self._tick(time.monotonic())

    def _tick(self, now: float) -> None:
        for shard in self.shards:
            if shard.shard_id not in self._pinging and shard.peer.is_open:
                self._pinging.add(shard.shard_id)
                self.spawn(self._ping_shard(shard))
        for (role, ident), silent_s in self.liveness.tick(now):
            if role == "shard":
                shard = next((s for s in self.shards if s.shard_id == ident), None)
                if shard is None:
                    continue
                reason = f"it did not answer for {silent_s:.1f} s (stopped, hung or cut off)"
                log.warning("shard %d at %s: %s", shard.shard_id, shard.address, reason)
                shard.peer.info["lost_reason"] = reason
                shard.peer.abort(ConnectionError(f"declared lost: {reason}"))  # peer_lost handles the rest
                if self.on_shard_declared_lost is not None:
                    self.on_shard_declared_lost(shard.pid)
            elif self.job is not None and ident < len(self.job.workers):
                slot = self.job.workers[ident]
                if slot.state in WATCHED_SLOT_STATES:
                    self._worker_lost(slot, f"no heartbeat for {silent_s:.1f} s")
                    if slot.peer is not None:
                        slot.peer.abort(ConnectionError("declared lost: no heartbeat"))

    async def _ping_shard(self, shard: ShardInfo) -> None:
        try:
            timeout_s = self.liveness.timeout_s
            await shard.peer.request(MsgType.PING, {}, timeout_s=timeout_s)
            self.liveness.heard(("shard", shard.shard_id))  # a reply does not pass through handle()
        except (PsctlError, ConnectionError, TimeoutError) as exc:
            # Not a verdict: silence is judged by the liveness tracker, on time we were running.
            log.debug("PING to shard %d: %s", shard.shard_id, exc)
        finally:
            self._pinging.discard(shard.shard_id)

    def _heartbeat(self, peer: net.Peer, msg: Message) -> None:
        """A worker's clock and rate. On its registering connection, or on any other one when
        it carries the slot's session token (a session's heartbeat thread)."""
        token = msg.body.get("session")
        if token is None:
            job, slot = self._job_of(peer)
        else:
            job = self.job
            worker_id = msg.body.get("worker_id")
            if job is None or msg.body.get("job_id") != job.job_id or job.state is not JobState.RUNNING:
                raise net.RequestError("no running job for this heartbeat", code="no_job")
            if not isinstance(worker_id, int) or isinstance(worker_id, bool) or not 0 <= worker_id < len(job.workers):
                raise net.RequestError("a heartbeat with a session token needs its worker_id", code="bad_session")
            slot = job.workers[worker_id]
            if not isinstance(token, str) or slot.session is None or not secrets.compare_digest(token, slot.session):
                raise net.RequestError(f"wrong session token for worker {worker_id}", code="bad_session")
            self._slot_heard(slot, time.monotonic())
        clock, samples_s = msg.body.get("clock", slot.clock), msg.body.get("samples_s", 0.0)
        if isinstance(clock, int) and not isinstance(clock, bool):
            slot.clock = clock
        if isinstance(samples_s, int | float) and not isinstance(samples_s, bool):
            slot.samples_s = float(samples_s)
        slot.heartbeats += 1

    def _worker_lost(self, slot: WorkerSlot, reason: str = "connection lost") -> None:
        job = self.job
        if job is None or slot.state in (SlotState.FINISHED, SlotState.LOST):
            return
        spare, effects = lose(job.workers, [job.stats, job.trained, job.final], slot)
        self.liveness.forget(("worker", slot.worker_id))
        # Its rows between its last acknowledged clock and the stop clock would be missing.
        self._run(job.checkpoints.settle(error=f"worker {slot.worker_id} was lost before the final checkpoint", code="bad_request"))
        log.warning("job %s: worker %d lost (%s)", job.job_id, slot.worker_id, reason)
        if spare is not None:
            self.spawn(self._offer_replacement(job, slot, spare))
        self._event(
            job,
            {"kind": "worker_lost", "worker_id": slot.worker_id, "reason": reason, "at_s": time.monotonic() - job.started_s},
        )
        self._run(effects)
        self._check_epochs(job)
        if not job.live_ids():
            self._fail("every worker was lost")

    async def _offer_replacement(self, job: Job, lost: WorkerSlot, spare: WorkerSlot) -> None:
        """Take the lost worker out of every gate, then let a worker take its partition at
        the clock the shards acknowledged, so no row of it is skipped: a new worker that
        registers (psctl train restarts local ones), or else, after the job's
        ``takeover_after_s``, a surviving worker (it trains the partition alongside its own)."""
        clocks = [0]  # before the tables exist nothing was pushed
        if job.ranges:
            body = {"job_id": job.job_id, "worker_id": lost.worker_id}
            replies = await asyncio.gather(
                *(s.peer.request(MsgType.WORKER_LEFT, body) for s in job.shards if s.peer.is_open), return_exceptions=True
            )
            clocks = [r.body["clock"] for r in replies if isinstance(r, Message) and r.body.get("clock") is not None] or clocks
        if job is not self.job or job.state is not JobState.RUNNING:
            return
        offer(spare, clocks)
        log.info("job %s: worker %d may replace worker %d from clock %d", job.job_id, spare.worker_id, lost.worker_id, spare.start_clock)
        self._changed_soon()
        grace_s = job.spec.takeover_grace_s
        while True:
            await asyncio.sleep(grace_s)
            if job is not self.job or job.state is not JobState.RUNNING or spare.state is not SlotState.SPARE or spare.peer is not None:
                return
            pick = pick_survivor(
                [w for w in job.workers if w.peer is not None and w.peer.is_open and not w.peer.info.get("helper")],
                job.takeovers,
            )
            if pick is None or pick.peer is None:
                return
            log.info("job %s: asking worker %d to take over partition %d", job.job_id, pick.worker_id, spare.partition)
            pick.peer.notify(MsgType.EVENT, {"kind": "take_over", "job_id": job.job_id, "partition": spare.partition})
            grace_s = job.spec.failure_timeout_s  # if it does not come, ask another

    async def _stats(self, peer: net.Peer, msg: Message) -> Message:
        job, slot = self._job_of(peer)
        labels = msg.body.get("labels", [])
        if not isinstance(labels, list) or len(labels) > MAX_LABELS:
            raise net.RequestError(f"more than {MAX_LABELS} distinct label values")
        try:
            ids = vocab.from_message(msg.body, msg.arrays)
        except vocab.VocabError as exc:
            raise net.RequestError(str(exc)) from None
        parts = await self._wait(job.stats, slot.worker_id, {**msg.body, "vocab": ids})
        if not job.stats_sent:  # the driver names the tables from these and keeps them for the model file
            job.stats_sent = True
            stats = [p["stats"] for p in parts.values() if p.get("stats")]
            all_labels = sorted({str(lbl) for p in parts.values() for lbl in p.get("labels", [])})
            try:
                names = sorted({n for p in parts.values() for n in p["vocab"]})
                union = {n: vocab.union((p["vocab"].get(n, ()) for p in parts.values()), n) for n in names}
            except vocab.VocabError as exc:
                self._fail(str(exc))
                raise net.RequestError(str(exc)) from None
            body: dict[str, Any] = {"stats": stats, "labels": all_labels[: MAX_LABELS + 1]}
            arrays: list[Any] = []
            if union:
                body["vocab"], arrays = vocab.to_message({n: v.tolist() for n, v in union.items()})
            job.stats_reply = (body, arrays)
            self._event(job, {"kind": "stats", **body}, arrays)
        await job.tables_ready
        assert job.stats_reply is not None
        body, arrays = job.stats_reply
        return Message(MsgType.STATS, {**body, "shards": [s.address for s in job.shards], "ranges": job.ranges}, arrays)

    def _progress(self, peer: net.Peer, msg: Message) -> None:
        job, slot = self._job_of(peer)
        self._event(job, {"kind": "progress", "worker_id": slot.worker_id, **msg.body})

    def _epoch_report(self, peer: net.Peer, msg: Message) -> None:
        job, slot = self._job_of(peer)
        epoch = int(msg.body["epoch"])
        job.epochs.report(epoch, slot.partition, msg.body)
        self._check_epochs(job)

    def _check_epochs(self, job: Job) -> None:
        # A spare slot's partition is awaited too: its replacement will report for it.
        for event in job.epochs.complete({w.partition for w in job.workers if w.state is not SlotState.LOST}):
            self._event(job, event)

    async def _trained(self, peer: net.Peer, msg: Message) -> Message:
        job, slot = self._job_of(peer)
        self._move(slot, SlotState.TRAINED)
        await self._wait(job.trained, slot.worker_id, msg.body)
        return Message(MsgType.TRAINED, {})

    def _final_report(self, peer: net.Peer, msg: Message) -> None:
        job, slot = self._job_of(peer)
        self._move(slot, SlotState.FINISHED)
        self._run(job.final.arrive(slot.worker_id, msg.body))
        if job.final.result is not None:
            reports = list(job.final.result.values())
            job.move(JobState.DONE)
            self._run(job.checkpoints.settle())
            self.spawn(self._report_done(job, reports))

    async def _report_done(self, job: Job, reports: list[dict[str, Any]]) -> None:
        """Tell the driver the job is done, after the manifest being written (if any) is announced."""
        async with job.manifest_written:
            self._event(
                job,
                {
                    "kind": "done",
                    **pool(reports),
                    "lost_workers": [w.worker_id for w in job.workers if w.state is SlotState.LOST],
                    "bytes_pulled": sum(r.get("bytes_pulled", 0) for r in reports),
                    "bytes_pushed": sum(r.get("bytes_pushed", 0) for r in reports),
                    "seconds": time.monotonic() - job.started_s,
                },
            )

    def _failed(self, peer: net.Peer, msg: Message) -> None:
        job, slot = self._job_of(peer)
        self._fail(f"worker {slot.worker_id}: {msg.body.get('message', 'failed')}")

    async def _status(self, peer: net.Peer, msg: Message) -> Message:
        """Membership and the job, with each shard's own figures (asked now, 2 s at most)."""
        replies = await asyncio.gather(
            *(s.peer.request(MsgType.STATUS, timeout_s=2.0) for s in self.shards), return_exceptions=True
        )
        now = time.monotonic()
        shards = []
        for s, reply in zip(self.shards, replies):
            figures = reply.body if isinstance(reply, Message) else {"error": str(reply)}
            host = s.address.rsplit(":", 1)[0]
            shards.append({**figures, "shard_id": s.shard_id, "address": s.address, "host": host, "pid": s.pid, "state": "up"})
        body: dict[str, Any] = {"shards": shards, "job": None}
        if self.job is not None:
            job = self.job
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
                        "last_heartbeat_s": None if w.last_heard_s is None else now - w.last_heard_s,
                    }
                    for w in job.workers
                ],
            }
        return Message(MsgType.STATUS, body)

    def _checkpointed(self, peer: net.Peer, msg: Message) -> None:
        """A shard saved a clock; once every shard has, the manifest makes it the job's checkpoint."""
        job = self.job
        if job is None or msg.body.get("job_id") != job.job_id or not job.spec.checkpoint:
            return
        clock, index = msg.body.get("clock"), msg.body.get("shard_index")
        if not isinstance(clock, int) or not isinstance(index, int) or isinstance(clock, bool) or isinstance(index, bool):
            raise net.RequestError("CHECKPOINTED needs a clock and a shard_index")
        if not job.checkpoints.shard_saved(clock, index, len(job.shards)):
            return
        manifest = {"clock": clock, "spec": job.spec.to_wire(), "tables": job.tables, "n_shards": len(job.shards), "job_id": job.job_id}
        self.spawn(self._write_manifest(job, clock, manifest))

    async def _write_manifest(self, job: Job, clock: int, manifest: dict[str, Any]) -> None:
        """Write (and fsync) the manifest off the event loop; then the clock is the job's checkpoint."""
        async with job.manifest_written:  # in clock order: a later manifest is never overwritten by an earlier one
            if job.last_checkpoint is not None and job.last_checkpoint >= clock:
                return
            dir_ = job.spec.checkpoint_dir
            assert dir_ is not None
            try:
                await asyncio.to_thread(checkpoint.write_manifest, dir_, manifest)
            except OSError as exc:
                log.warning("job %s: writing the checkpoint manifest in %s failed: %s", job.job_id, dir_, exc)
                return
            if job is not self.job:
                return
            effects = job.checkpoints.written(clock)
            self._event(job, {"kind": "checkpoint", "clock": clock})
            self._run(effects)

    def _ping(self, peer: net.Peer, msg: Message) -> Message:
        return Message(MsgType.PING, {})

    _handlers: dict[MsgType, Callable[..., Any]] = {
        MsgType.REGISTER_SHARD: _register_shard,
        MsgType.SUBMIT: _submit,
        MsgType.TABLES: _tables,
        MsgType.JOB_END: _job_end,
        MsgType.STOP: _stop,
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
    }


async def start_coordinator(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_frame_bytes: int,
    max_connections: int | None = None,
    security: net.Security = net.LOCAL,
) -> tuple[net.Server, CoordinatorService, str]:
    """Listen and return (server, service, 'host:port')."""
    service = CoordinatorService()
    server = net.Server(
        service, max_frame_bytes=max_frame_bytes, max_connections=max_connections, name="coordinator", security=security
    )
    bound_host, bound_port = await server.start(host, port)
    server.tasks.add(asyncio.ensure_future(service.run()))  # cancelled by server.close()
    return server, service, f"{bound_host}:{bound_port}"
