"""The coordinator: membership, the job, data-partition assignment, barriers, reports.

It carries only small control messages. It does not know models: the driver
sends the tables a job needs, and workers do all model-specific work.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psctl import net
from psctl.core.consistency import staleness_for
from psctl.core.reports import merge_reports, pool
from psctl.core.tables import TableSpec, table_ranges
from psctl.data import vocab
from psctl.files import checkpoint
from psctl.protocol.wire import Message, MsgType

log = logging.getLogger("psctl.coordinator")

SHARD_WAIT_S = 30.0
DEFAULT_HEARTBEAT_INTERVAL_S = 0.5
DEFAULT_FAILURE_TIMEOUT_S = 5.0
SHARD_SETUP_TIMEOUT_S = 30.0
UNKNOWN_CLOCK = 2**62  # a pending slot's start clock until the shards say where its predecessor stopped
PAUSE_TIMEOUT_S = 10.0  # a worker answers PAUSE at once; one that does not is hung
MAX_LABELS = 1000


@dataclass
class ShardInfo:
    shard_id: int
    address: str
    pid: int
    peer: net.Peer


class Barrier:
    """Waits until every expected worker has arrived or been dropped."""

    def __init__(self, expected: set[int]):
        self.expected = set(expected)
        self.arrived: dict[int, Any] = {}
        self.done: asyncio.Future[dict[int, Any]] = asyncio.get_running_loop().create_future()
        self._check()

    def arrive(self, worker: int, payload: Any) -> None:
        self.arrived[worker] = payload
        self._check()

    def add(self, worker: int) -> None:
        """Expect one more worker (a replacement), unless the barrier has already opened."""
        if not self.done.done():
            self.expected.add(worker)

    def drop(self, worker: int) -> None:
        self.expected.discard(worker)
        self._check()

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
            self.done.exception()  # mark retrieved: nobody may be waiting

    def _check(self) -> None:
        if not self.done.done() and self.expected <= self.arrived.keys():
            self.done.set_result({w: p for w, p in self.arrived.items() if w in self.expected})


@dataclass
class WorkerSlot:
    worker_id: int
    peer: net.Peer | None = None
    # waiting -> running -> trained -> finished, or lost; a lost worker's partition gets a new
    # slot: pending (its clock not known yet) -> spare (a replacement may register) -> running ...
    state: str = "waiting"
    pid: int | None = None
    host: str | None = None
    clock: int = 0  # as last reported by its heartbeat
    samples_s: float = 0.0  # likewise
    heartbeats: int = 0  # received so far
    partition: int = -1  # index into the job's partitions; a replacement takes its predecessor's
    start_clock: int = 0  # where a replacement resumes
    session: str = ""  # the token a heartbeat on another connection names this slot by (helper B's session)

    def __post_init__(self) -> None:
        if self.partition < 0:
            self.partition = self.worker_id


@dataclass
class Job:
    job_id: str
    spec: dict[str, Any]
    driver: net.Peer
    shards: list[ShardInfo]
    workers: list[WorkerSlot]
    stats: Barrier
    trained: Barrier
    final: Barrier
    ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    epoch_reports: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)
    stats_sent: bool = False
    tables: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: dict[int, set[int]] = field(default_factory=dict)  # clock -> shards that saved it
    last_checkpoint: int | None = None
    last_epoch_reported: int = -1
    recovering: int | None = None  # index of a lost shard awaiting its replacement
    stats_reply: tuple[dict[str, Any], list[Any]] | None = None  # body and vocabulary arrays
    tables_ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    state: str = "setup"  # setup -> running -> done | failed
    started_s: float = field(default_factory=time.monotonic)
    pausing: asyncio.Lock = field(default_factory=asyncio.Lock)  # held while the workers are paused for a checkpoint
    halting: bool = False  # the workers were told to stop at one clock: no more pauses
    # (clock, future): resolved when the manifest reaches that clock, None if the job finishes first
    waiters: list[tuple[int, asyncio.Future[int | None]]] = field(default_factory=list)
    timer: asyncio.Task[None] | None = None  # checkpoints every N seconds
    stop_requested: bool = False  # early stop: workers that join later are told too

    def live_ids(self) -> set[int]:
        return {w.worker_id for w in self.workers if w.state not in ("lost", "spare", "pending")}


class CoordinatorService:
    def __init__(self) -> None:
        self.shards: list[ShardInfo] = []
        self.job: Job | None = None
        self._job_ids = itertools.count(1)
        self._changed = asyncio.Condition()  # shards joined, a job started or ended

    # -- plumbing ------------------------------------------------------------
    def handle(self, peer: net.Peer, msg: Message) -> Any:
        peer.info["last_seen"] = time.monotonic()  # any frame shows the peer is alive
        handler = self._handlers.get(msg.type)
        if handler is None:
            raise net.RequestError(f"the coordinator does not serve {msg.type.name}", code="unexpected")
        return handler(self, peer, msg)

    def peer_lost(self, peer: net.Peer, exc: BaseException | None) -> None:
        self._changed_soon()  # wakes a REGISTER_WORKER that waits on this peer
        role = peer.info.get("role")
        if role == "shard":
            self.shards = [s for s in self.shards if s.peer is not peer]
            self._shard_lost(peer)
        elif role == "worker" and self.job is not None and peer.info.get("job_id") == self.job.job_id:
            self._worker_lost(self.job.workers[peer.info["worker_id"]])
        elif role == "driver" and self.job is not None and self.job.driver is peer:
            log.warning("driver of job %s went away; ending the job", self.job.job_id)
            self._end_job("the driver disconnected")

    async def _notify_changed(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _changed_soon(self) -> None:
        asyncio.get_running_loop().create_task(self._notify_changed())

    def _event(self, job: Job, body: dict[str, Any], arrays: list[Any] | None = None) -> None:
        if job.driver.is_open:
            job.driver.notify(MsgType.EVENT, body, arrays)

    def _job_of(self, peer: net.Peer) -> tuple[Job, WorkerSlot]:
        job = self.job
        if job is None or peer.info.get("job_id") != job.job_id or job.state != "running":
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
        peer.info.update(role="shard", shard_id=shard_id, address=address)
        log.info("shard %d registered at %s", shard_id, address)
        job = self.job
        if job is not None and job.recovering is not None:
            asyncio.get_running_loop().create_task(self._recover(job, job.recovering, info))
        self._changed_soon()
        return Message(MsgType.REGISTER_SHARD, {"shard_id": shard_id})

    # -- the driver ----------------------------------------------------------
    async def _submit(self, peer: net.Peer, msg: Message) -> Message:
        """Open a job: workers may register and run the statistics pass; tables come later (TABLES)."""
        if self.job is not None:
            raise net.RequestError(f"job {self.job.job_id} is still running on this server", code="busy")
        spec = msg.body.get("spec")
        if not isinstance(spec, dict):
            raise net.RequestError("SUBMIT needs a job spec")
        try:
            n_workers = int(spec["n_workers"])
            min_shards = int(spec.get("min_shards", 1))
            staleness_for(str(spec["mode"]), int(spec.get("staleness", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise net.RequestError(f"bad job spec: {exc}") from None
        if n_workers < 1 or len(spec.get("partitions", [])) != n_workers:
            raise net.RequestError("the job spec needs one data partition per worker")
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
            [WorkerSlot(i, start_clock=int((spec.get("resume") or {}).get("clock", 0))) for i in range(n_workers)],
            Barrier(workers),
            Barrier(workers),
            Barrier(workers),
        )
        self.job.state = "running"
        peer.info.update(role="driver", job_id=job_id)
        log.info("job %s: %d workers, %d shards, mode %s", job_id, n_workers, len(self.shards), spec["mode"])
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
            await self._setup_shards(job, job.spec.get("resume"), [w.worker_id for w in job.workers])
        except net.PsctlError as exc:
            self._fail(f"shard setup failed: {exc}")
            raise net.RequestError(f"shard setup failed: {exc}") from None
        ranges = job.ranges
        if not job.tables_ready.done():
            job.tables_ready.set_result(None)
        every_s = float((job.spec.get("checkpoint") or {}).get("every_s", 0) or 0)
        if every_s > 0:
            job.timer = asyncio.get_running_loop().create_task(self._checkpoint_timer(job, every_s))
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
            fut = asyncio.get_running_loop().create_future()
            if job.last_checkpoint is not None and job.last_checkpoint >= target:
                fut.set_result(job.last_checkpoint)
            else:
                job.waiters.append((target, fut))
            target = await fut
        if target is None:
            return None
        self._event(job, {"kind": "halted", "clock": target, "dir": job.spec["checkpoint"]["dir"], "reason": reason})
        self._end_job(f"{reason} at clock {target}, with a final checkpoint")
        return target

    async def stop_running_job(self, reason: str) -> str | None:
        """``psctl server`` is stopping: the running job's final checkpoint where one is
        configured, then the job ends. Returns a sentence for the operator (None: no job)."""
        job = self.job
        if job is None or job.state != "running":
            return None
        if not job.spec.get("checkpoint"):
            self._fail(reason)
            return f"job {job.job_id} stopped (it has no --checkpoint-dir, so no final checkpoint)"
        try:
            clock = await self.halt(job, reason)
        except (net.RequestError, net.PsctlError) as exc:
            self._fail(reason)
            return f"job {job.job_id} stopped without a final checkpoint: {exc}"
        if clock is None:
            return f"job {job.job_id} was finishing; it was not stopped"
        return f"job {job.job_id} stopped at clock {clock}; its final checkpoint is in {job.spec['checkpoint']['dir']}"

    def _cannot_pause(self, job: Job) -> str | None:
        if job is not self.job or job.state != "running":
            return "the job is not running"
        if job.halting:
            return "the job is stopping"
        if not job.spec.get("checkpoint"):
            return f"job {job.job_id} has no checkpoint folder (--checkpoint-dir)"
        if not job.ranges:
            return "training has not started yet"
        if job.recovering is not None:
            return "a lost shard is being replaced"
        if any(w.state in ("spare", "pending") for w in job.workers):
            return "a lost worker is being replaced"
        return None

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
        live = [w for w in job.workers if w.state == "running" and w.peer is not None and w.peer.is_open]
        until: int | None = None
        try:
            if not live:
                return None
            replies = await asyncio.gather(
                *(w.peer.request(MsgType.PAUSE, {"job_id": job.job_id}, timeout_s=PAUSE_TIMEOUT_S) for w in live if w.peer)
            )
            clocks = [r.body.get("clock") for r in replies]
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in clocks):
                raise net.RequestError("a worker answered PAUSE without its clock")
            target = max(clocks)
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
        except net.PsctlError as exc:
            raise net.RequestError(f"no checkpoint now: {exc}", code="not_now") from None
        finally:
            for w in live:
                if w.peer is not None and w.peer.is_open:
                    w.peer.notify(MsgType.RESUME, {"until": until})

    async def _checkpoint_timer(self, job: Job, every_s: float) -> None:
        """--checkpoint-every Ns: a checkpoint at one clock every N seconds while the job runs."""
        while True:
            await asyncio.sleep(every_s)
            if job is not self.job or job.state != "running":
                return
            if job.pausing.locked():
                continue  # a stop is under way
            try:
                await self.checkpoint_at_one_clock(job, stop=False)
            except net.RequestError as exc:
                log.info("job %s: skipped a timed checkpoint: %s", job.job_id, exc)

    def _settle_waiters(self, job: Job, clock: int | None = None, error: BaseException | None = None) -> None:
        """Resolve final-checkpoint waiters: reached ``clock``, failed with ``error``, or (neither) the job finished."""
        keep = []
        for target, fut in job.waiters:
            if fut.done():
                continue
            if error is not None:
                fut.set_exception(error)
            elif clock is None:
                fut.set_result(None)
            elif target <= clock:
                fut.set_result(clock)
            else:
                keep.append((target, fut))
        job.waiters = keep

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
                        "mode": spec["mode"],
                        "staleness": spec.get("staleness", 0),
                        "workers": workers,
                        "optimizer": spec["optimizer"],
                        "seed": spec.get("seed", 0),
                        "shard_index": i,
                        "checkpoint": spec.get("checkpoint"),
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
        what = f"shard {peer.info['shard_id']} at {peer.info['address']} was lost"
        self._settle_waiters(job, error=net.RequestError(f"{what} before the final checkpoint was saved"))
        finished = any(w.state in ("trained", "finished") for w in job.workers)
        if job.last_checkpoint is None or job.state != "running" or finished or job.recovering is not None:
            self._fail(what + ("" if job.last_checkpoint is not None else " (no checkpoint to recover from)"))
            return
        job.recovering = index
        log.warning("job %s: %s; waiting for a shard to take its place", job.job_id, what)
        self._event(job, {"kind": "shard_lost", "index": index, "clock": job.last_checkpoint, "reason": what})

    async def _recover(self, job: Job, index: int, shard: ShardInfo) -> None:
        """Roll every shard back to the last checkpoint and send the workers there."""
        job.shards[index] = shard
        clock = job.last_checkpoint
        assert clock is not None
        live = [w for w in job.workers if w.state == "running"]
        try:
            replies = await self._setup_shards(
                job, {"dir": job.spec["checkpoint"]["dir"], "clock": clock}, [w.worker_id for w in live]
            )
        except net.PsctlError as exc:
            self._fail(f"recovering shard {index} from the checkpoint at clock {clock} failed: {exc}")
            return
        job.recovering = None
        for w in job.workers:  # a lost worker's partition, not taken over yet, also goes back to the checkpoint
            if w.state in ("spare", "pending"):
                w.start_clock = min(w.start_clock, clock)
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
            self._end_job(reason if isinstance(reason, str) and self.job.state == "running" else None)

    def _end_job(self, reason: str | None) -> None:
        job = self.job
        if job is None:
            return
        self.job = None
        if job.timer is not None:
            job.timer.cancel()
        self._settle_waiters(job, error=net.RequestError(f"job {job.job_id} ended: {reason or 'done'}", code="job_ended"))
        if reason is not None:
            job.state = "failed"
            for w in job.workers:
                if w.peer is not None and w.peer.is_open:
                    w.peer.notify(MsgType.EVENT, {"kind": "abort", "reason": reason})
        ended = net.RequestError(f"job {job.job_id} ended: {reason or 'done'}", code="job_ended")
        for barrier in (job.stats, job.trained, job.final):
            barrier.fail(ended)
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

        def free_slot() -> WorkerSlot | None:
            if self.job is None or self.job.state != "running":
                return None
            if spare_of is not None and spare_of != self.job.job_id:
                return None
            states = ("spare",) if spare_of is not None else ("waiting", "spare")
            return next((w for w in self.job.workers if w.state in states and w.peer is None), None)

        if spare_of is None:
            async with self._changed:
                await self._changed.wait_for(lambda: free_slot() is not None or not peer.is_open)
        slot = free_slot()
        if slot is None and spare_of is not None:
            raise net.RequestError("no lost worker's partition is waiting to be taken over", code="no_spare")
        if slot is None or self.job is None:
            raise net.RequestError("connection closed while waiting for a job")
        job = self.job
        replacing = slot.state == "spare"
        slot.peer, slot.state = peer, "running"
        slot.pid, slot.host = msg.body.get("pid"), msg.body.get("host")
        slot.session = secrets.token_hex(16)
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
                "spec": job.spec,
                "partition": job.spec["partitions"][slot.partition],
                "partition_index": slot.partition,
                "start_clock": slot.start_clock,
                "stop": job.stop_requested,
                "session": slot.session,
            },
        )

    async def monitor(self) -> None:
        """Declare workers lost whose heartbeats stopped (a hung or partitioned host keeps its sockets open)."""
        while True:
            job = self.job
            timeout_s = float(job.spec.get("failure_timeout_s", DEFAULT_FAILURE_TIMEOUT_S)) if job else DEFAULT_FAILURE_TIMEOUT_S
            await asyncio.sleep(min(timeout_s / 4, 1.0))
            job = self.job
            if job is None or job.state != "running":
                continue
            now = time.monotonic()
            for slot in job.workers:
                if slot.peer is None or slot.state not in ("running", "trained"):
                    continue
                silent_s = now - slot.peer.info.get("last_seen", now)
                if silent_s > timeout_s:
                    self._worker_lost(slot, f"no heartbeat for {silent_s:.1f} s")
                    slot.peer.abort(ConnectionError("declared lost: no heartbeat"))

    def _heartbeat(self, peer: net.Peer, msg: Message) -> None:
        if "session" in msg.body:  # from the worker's heartbeat thread, on a connection of its own
            job, slot = self._slot_of_session(msg.body)
            if slot.peer is not None:
                slot.peer.info["last_seen"] = time.monotonic()
        else:
            job, slot = self._job_of(peer)
        slot.clock = int(msg.body.get("clock", slot.clock))
        slot.samples_s = float(msg.body.get("samples_s", 0.0))
        slot.heartbeats += 1

    def _slot_of_session(self, body: dict[str, Any]) -> tuple[Job, WorkerSlot]:
        """The slot a HEARTBEAT names by job, worker and session token (RequestError if none matches)."""
        job, worker_id, token = self.job, body.get("worker_id"), body.get("session")
        if (
            job is None
            or job.state != "running"
            or body.get("job_id") != job.job_id
            or not isinstance(worker_id, int)
            or isinstance(worker_id, bool)
            or not 0 <= worker_id < len(job.workers)
            or not isinstance(token, str)
        ):
            raise net.RequestError("no running job has this worker", code="no_job")
        slot = job.workers[worker_id]
        if not slot.session or slot.state not in ("running", "trained") or not hmac.compare_digest(slot.session, token):
            raise net.RequestError("this session does not hold the worker's slot", code="no_session")
        return job, slot

    def _worker_lost(self, slot: WorkerSlot, reason: str = "connection lost") -> None:
        job = self.job
        if job is None or slot.state in ("finished", "lost"):
            return
        unfinished = slot.state == "running"  # a worker lost after training needs no replacement
        slot.state = "lost"
        # Its rows between its last acknowledged clock and the stop clock would be missing.
        self._settle_waiters(job, error=net.RequestError(f"worker {slot.worker_id} was lost before the final checkpoint"))
        log.warning("job %s: worker %d lost (%s)", job.job_id, slot.worker_id, reason)
        if unfinished:
            # A new slot for its partition: every barrier waits for it from now on, so the
            # job cannot end before the partition's remaining rows are trained.
            spare = WorkerSlot(len(job.workers), state="pending", partition=slot.partition, start_clock=UNKNOWN_CLOCK)
            job.workers.append(spare)
            for barrier in (job.stats, job.trained, job.final):
                barrier.add(spare.worker_id)
            asyncio.get_running_loop().create_task(self._offer_replacement(job, slot, spare))
        self._event(
            job,
            {"kind": "worker_lost", "worker_id": slot.worker_id, "reason": reason, "at_s": time.monotonic() - job.started_s},
        )
        for barrier in (job.stats, job.trained, job.final):
            barrier.drop(slot.worker_id)
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
        if job is not self.job or job.state != "running":
            return
        # The lowest acknowledged clock: a push that reached only some shards is redone, never skipped.
        # (A roll-back meanwhile may have lowered it to the checkpoint's clock already.)
        spare.start_clock = min(min(clocks), spare.start_clock)
        spare.state = "spare"
        log.info("job %s: worker %d may replace worker %d from clock %d", job.job_id, spare.worker_id, lost.worker_id, spare.start_clock)
        self._changed_soon()
        grace_s = float(job.spec.get("takeover_after_s", job.spec.get("failure_timeout_s", DEFAULT_FAILURE_TIMEOUT_S)))
        while True:
            await asyncio.sleep(grace_s)
            if job is not self.job or job.state != "running" or spare.state != "spare" or spare.peer is not None:
                return
            survivors = [
                w for w in job.workers
                if w.state in ("running", "trained") and w.peer is not None and w.peer.is_open and not w.peer.info.get("helper")
            ]
            if not survivors:
                return
            pick = min(survivors, key=lambda w: (w.peer.info.get("takeovers", 0) if w.peer else 0, w.worker_id))
            assert pick.peer is not None
            pick.peer.info["takeovers"] = pick.peer.info.get("takeovers", 0) + 1
            log.info("job %s: asking worker %d to take over partition %d", job.job_id, pick.worker_id, spare.partition)
            pick.peer.notify(MsgType.EVENT, {"kind": "take_over", "job_id": job.job_id, "partition": spare.partition})
            grace_s = float(job.spec.get("failure_timeout_s", DEFAULT_FAILURE_TIMEOUT_S))  # if it does not come, ask another

    async def _stats(self, peer: net.Peer, msg: Message) -> Message:
        job, slot = self._job_of(peer)
        labels = msg.body.get("labels", [])
        if not isinstance(labels, list) or len(labels) > MAX_LABELS:
            raise net.RequestError(f"more than {MAX_LABELS} distinct label values")
        try:
            ids = vocab.from_message(msg.body, msg.arrays)
        except vocab.VocabError as exc:
            raise net.RequestError(str(exc)) from None
        job.stats.arrive(slot.worker_id, {**msg.body, "vocab": ids})
        parts = await job.stats.done
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
        # Keyed by partition: a replacement continues its predecessor's epoch reports,
        # and a step it redoes adds to the same entry.
        if epoch <= job.last_epoch_reported:
            return  # a replacement redoing the end of an epoch that was already summed up
        reports = job.epoch_reports.setdefault(epoch, {})
        reports[slot.partition] = merge_reports(reports.get(slot.partition), msg.body)
        self._check_epochs(job)

    def _check_epochs(self, job: Job) -> None:
        # A spare slot's partition is awaited too: its replacement will report for it.
        expected = {w.partition for w in job.workers if w.state != "lost"}
        for epoch in sorted(job.epoch_reports):
            reports = job.epoch_reports[epoch]
            if not expected <= reports.keys():
                break
            del job.epoch_reports[epoch]
            job.last_epoch_reported = epoch
            event = {"kind": "epoch", "epoch": epoch, **pool(list(reports.values()))}
            vals = [r["val"] for r in reports.values() if r.get("val")]
            if vals:
                event["val"] = pool(vals)
            self._event(job, event)

    async def _trained(self, peer: net.Peer, msg: Message) -> Message:
        job, slot = self._job_of(peer)
        slot.state = "trained"
        job.trained.arrive(slot.worker_id, msg.body)
        await job.trained.done
        return Message(MsgType.TRAINED, {})

    def _final_report(self, peer: net.Peer, msg: Message) -> None:
        job, slot = self._job_of(peer)
        slot.state = "finished"
        job.final.arrive(slot.worker_id, msg.body)
        if job.final.done.done() and not job.final.done.exception():
            reports = list(job.final.done.result().values())
            job.state = "done"
            self._settle_waiters(job)
            self._event(
                job,
                {
                    "kind": "done",
                    **pool(reports),
                    "lost_workers": [w.worker_id for w in job.workers if w.state == "lost"],
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
                "mode": job.spec.get("mode"),
                "staleness": job.spec.get("staleness", 0),
                "state": job.state,
                "epoch": job.last_epoch_reported + 1,
                "epochs": job.spec.get("epochs"),
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
                        "last_heartbeat_s": now - w.peer.info.get("last_seen", now) if w.peer else None,
                    }
                    for w in job.workers
                ],
            }
        return Message(MsgType.STATUS, body)

    def _checkpointed(self, peer: net.Peer, msg: Message) -> None:
        """A shard saved a clock; once every shard has, the manifest makes it the job's checkpoint."""
        job = self.job
        if job is None or msg.body.get("job_id") != job.job_id or not job.spec.get("checkpoint"):
            return
        clock = int(msg.body["clock"])
        saved = job.checkpoints.setdefault(clock, set())
        saved.add(int(msg.body["shard_index"]))
        if len(saved) < len(job.shards):
            return
        checkpoint.write_manifest(
            job.spec["checkpoint"]["dir"],
            {"clock": clock, "spec": job.spec, "tables": job.tables, "n_shards": len(job.shards), "job_id": job.job_id},
        )
        job.last_checkpoint = clock
        for c in [c for c in job.checkpoints if c <= clock]:
            del job.checkpoints[c]
        self._event(job, {"kind": "checkpoint", "clock": clock})
        self._settle_waiters(job, clock)

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
    server.tasks.add(asyncio.ensure_future(service.monitor()))
    return server, service, f"{bound_host}:{bound_port}"
