"""The coordinator: membership, the job, data-partition assignment, barriers, reports.

It carries only small control messages. It does not know models: the driver
sends the tables a job needs, and workers do all model-specific work.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psctl import net
from psctl.tables import TableSpec, shard_ranges
from psctl.wire import Message, MsgType

log = logging.getLogger("psctl.coordinator")

SHARD_WAIT_S = 30.0
SHARD_SETUP_TIMEOUT_S = 30.0
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
    state: str = "waiting"  # waiting -> running -> trained -> finished | lost
    pid: int | None = None
    host: str | None = None


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
    state: str = "setup"  # setup -> running -> done | failed
    started_s: float = field(default_factory=time.monotonic)

    def live_ids(self) -> set[int]:
        return {w.worker_id for w in self.workers if w.state != "lost"}


class CoordinatorService:
    def __init__(self) -> None:
        self.shards: list[ShardInfo] = []
        self.job: Job | None = None
        self._job_ids = itertools.count(1)
        self._changed = asyncio.Condition()  # shards joined, a job started or ended

    # -- plumbing ------------------------------------------------------------
    def handle(self, peer: net.Peer, msg: Message) -> Any:
        handler = self._handlers.get(msg.type)
        if handler is None:
            raise net.RequestError(f"the coordinator does not serve {msg.type.name}", code="unexpected")
        return handler(self, peer, msg)

    def peer_lost(self, peer: net.Peer, exc: BaseException | None) -> None:
        self._changed_soon()  # wakes a REGISTER_WORKER that waits on this peer
        role = peer.info.get("role")
        if role == "shard":
            self.shards = [s for s in self.shards if s.peer is not peer]
            if self.job is not None and any(s.peer is peer for s in self.job.shards):
                self._fail(f"shard {peer.info['shard_id']} at {peer.info['address']} was lost")
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

    def _event(self, job: Job, body: dict[str, Any]) -> None:
        if job.driver.is_open:
            job.driver.notify(MsgType.EVENT, body)

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
        self.shards.append(ShardInfo(shard_id, address, pid, peer))
        peer.info.update(role="shard", shard_id=shard_id, address=address)
        log.info("shard %d registered at %s", shard_id, address)
        self._changed_soon()
        return Message(MsgType.REGISTER_SHARD, {"shard_id": shard_id})

    # -- the driver ----------------------------------------------------------
    async def _submit(self, peer: net.Peer, msg: Message) -> Message:
        if self.job is not None:
            raise net.RequestError(f"job {self.job.job_id} is still running on this server", code="busy")
        spec = msg.body.get("spec")
        if not isinstance(spec, dict):
            raise net.RequestError("SUBMIT needs a job spec")
        try:
            n_workers = int(spec["n_workers"])
            tables = [TableSpec.from_dict(t) for t in spec["tables"]]
            min_shards = int(spec.get("min_shards", 1))
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
        shards = list(self.shards)
        job_id = f"{os.getpid()}-{next(self._job_ids)}"
        workers = set(range(n_workers))
        job = Job(
            job_id,
            spec,
            peer,
            shards,
            [WorkerSlot(i) for i in range(n_workers)],
            Barrier(workers),
            Barrier(workers),
            Barrier(workers),
        )
        ranges = {t.name: shard_ranges(t.rows, len(shards)) for t in tables}
        job.ranges = ranges
        self.job = job
        peer.info.update(role="driver", job_id=job_id)
        setups = [
            s.peer.request(
                MsgType.JOB_SETUP,
                {
                    "job_id": job_id,
                    "tables": [t.to_dict() for t in tables],
                    "ranges": {name: r[i] for name, r in ranges.items()},
                    "mode": spec["mode"],
                    "staleness": spec.get("staleness", 0),
                    "workers": sorted(workers),
                    "optimizer": spec["optimizer"],
                    "seed": spec.get("seed", 0),
                },
                timeout_s=SHARD_SETUP_TIMEOUT_S,
            )
            for i, s in enumerate(shards)
        ]
        try:
            await asyncio.gather(*setups)
        except net.PsctlError as exc:
            self._end_job(f"shard setup failed: {exc}")
            raise net.RequestError(f"shard setup failed: {exc}") from None
        job.state = "running"
        log.info("job %s: %d workers, %d shards, mode %s", job_id, n_workers, len(shards), spec["mode"])
        self._changed_soon()
        return Message(
            MsgType.SUBMIT,
            {"job_id": job_id, "shards": [s.address for s in shards], "ranges": ranges},
        )

    def _job_end(self, peer: net.Peer, msg: Message) -> None:
        if self.job is not None and self.job.driver is peer:
            self._end_job(None)

    def _end_job(self, reason: str | None) -> None:
        job = self.job
        if job is None:
            return
        self.job = None
        if reason is not None:
            job.state = "failed"
            for w in job.workers:
                if w.peer is not None and w.peer.is_open:
                    w.peer.notify(MsgType.EVENT, {"kind": "abort", "reason": reason})
        for barrier in (job.stats, job.trained, job.final):
            barrier.fail(net.RequestError(f"job {job.job_id} ended: {reason or 'done'}", code="job_ended"))
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
        def free_slot() -> WorkerSlot | None:
            if self.job is None or self.job.state != "running":
                return None
            return next((w for w in self.job.workers if w.state == "waiting" and w.peer is None), None)

        async with self._changed:
            await self._changed.wait_for(lambda: free_slot() is not None or not peer.is_open)
        slot = free_slot()
        if slot is None or self.job is None:
            raise net.RequestError("connection closed while waiting for a job")
        job = self.job
        slot.peer, slot.state = peer, "running"
        slot.pid, slot.host = msg.body.get("pid"), msg.body.get("host")
        peer.info.update(role="worker", job_id=job.job_id, worker_id=slot.worker_id)
        self._event(job, {"kind": "worker_joined", "worker_id": slot.worker_id, "pid": slot.pid, "host": slot.host})
        return Message(
            MsgType.REGISTER_WORKER,
            {
                "job_id": job.job_id,
                "worker_id": slot.worker_id,
                "spec": job.spec,
                "partition": job.spec["partitions"][slot.worker_id],
                "shards": [s.address for s in job.shards],
                "ranges": job.ranges,
            },
        )

    def _worker_lost(self, slot: WorkerSlot) -> None:
        job = self.job
        if job is None or slot.state in ("finished", "lost"):
            return
        slot.state = "lost"
        log.warning("job %s: worker %d lost", job.job_id, slot.worker_id)
        for s in job.shards:
            if s.peer.is_open:
                s.peer.notify(MsgType.WORKER_LEFT, {"job_id": job.job_id, "worker_id": slot.worker_id})
        self._event(job, {"kind": "worker_lost", "worker_id": slot.worker_id, "at_s": time.monotonic() - job.started_s})
        for barrier in (job.stats, job.trained, job.final):
            barrier.drop(slot.worker_id)
        self._check_epochs(job)
        if not job.live_ids():
            self._fail("every worker was lost")

    async def _stats(self, peer: net.Peer, msg: Message) -> Message:
        job, slot = self._job_of(peer)
        labels = msg.body.get("labels", [])
        if not isinstance(labels, list) or len(labels) > MAX_LABELS:
            raise net.RequestError(f"more than {MAX_LABELS} distinct label values")
        job.stats.arrive(slot.worker_id, msg.body)
        parts = await job.stats.done
        stats = [p["stats"] for p in parts.values() if p.get("stats")]
        all_labels = sorted({str(lbl) for p in parts.values() for lbl in p.get("labels", [])})
        body = {"stats": stats, "labels": all_labels[: MAX_LABELS + 1]}
        if not job.stats_sent:  # the driver needs the same numbers for the model file
            job.stats_sent = True
            self._event(job, {"kind": "stats", **body})
        return Message(MsgType.STATS, body)

    def _progress(self, peer: net.Peer, msg: Message) -> None:
        job, slot = self._job_of(peer)
        self._event(job, {"kind": "progress", "worker_id": slot.worker_id, **msg.body})

    def _epoch_report(self, peer: net.Peer, msg: Message) -> None:
        job, slot = self._job_of(peer)
        epoch = int(msg.body["epoch"])
        job.epoch_reports.setdefault(epoch, {})[slot.worker_id] = msg.body
        self._check_epochs(job)

    def _check_epochs(self, job: Job) -> None:
        live = job.live_ids()
        for epoch in sorted(job.epoch_reports):
            reports = job.epoch_reports[epoch]
            if not live <= reports.keys():
                break
            del job.epoch_reports[epoch]
            n = sum(r["n"] for r in reports.values())
            self._event(
                job,
                {
                    "kind": "epoch",
                    "epoch": epoch,
                    "loss": sum(r["loss_sum"] for r in reports.values()) / max(n, 1),
                    "accuracy": sum(r["correct"] for r in reports.values()) / max(n, 1),
                    "samples": n,
                },
            )

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
            reports = job.final.done.result().values()
            n = sum(r["n"] for r in reports)
            job.state = "done"
            self._event(
                job,
                {
                    "kind": "done",
                    "loss": sum(r["loss_sum"] for r in reports) / max(n, 1),
                    "accuracy": sum(r["correct"] for r in reports) / max(n, 1),
                    "samples": n,
                    "lost_workers": [w.worker_id for w in job.workers if w.state == "lost"],
                    "seconds": time.monotonic() - job.started_s,
                },
            )

    def _failed(self, peer: net.Peer, msg: Message) -> None:
        job, slot = self._job_of(peer)
        self._fail(f"worker {slot.worker_id}: {msg.body.get('message', 'failed')}")

    def _status(self, peer: net.Peer, msg: Message) -> Message:
        body: dict[str, Any] = {
            "shards": [{"shard_id": s.shard_id, "address": s.address, "pid": s.pid} for s in self.shards],
            "job": None,
        }
        if self.job is not None:
            job = self.job
            body["job"] = {
                "job_id": job.job_id,
                "mode": job.spec.get("mode"),
                "state": job.state,
                "workers": [{"worker_id": w.worker_id, "state": w.state, "pid": w.pid, "host": w.host} for w in job.workers],
            }
        return Message(MsgType.STATUS, body)

    def _ping(self, peer: net.Peer, msg: Message) -> Message:
        return Message(MsgType.PING, {})

    _handlers: dict[MsgType, Callable[..., Any]] = {
        MsgType.REGISTER_SHARD: _register_shard,
        MsgType.SUBMIT: _submit,
        MsgType.JOB_END: _job_end,
        MsgType.REGISTER_WORKER: _register_worker,
        MsgType.STATS: _stats,
        MsgType.PROGRESS: _progress,
        MsgType.EPOCH_REPORT: _epoch_report,
        MsgType.TRAINED: _trained,
        MsgType.FINAL_REPORT: _final_report,
        MsgType.FAILED: _failed,
        MsgType.STATUS: _status,
        MsgType.PING: _ping,
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
    return server, service, f"{bound_host}:{bound_port}"
