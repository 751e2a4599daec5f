"""A worker: one data partition, a model's gradient, its own clock.

Flow: register with the coordinator, read the partition, take part in the
statistics pass, then per mini-batch pull -> gradient -> push (clock + 1),
leave the shards, wait for the others, evaluate the final model on the
partition and report.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from psctl import net
from psctl.cluster.client import Acks, ShardClient, ShardTimeout
from psctl.cluster.session import EventTimeout, Session, SessionClosed
from psctl.cluster.shard import process_memory
from psctl.core.batching import epoch_steps
from psctl.core.job import JobSpec
from psctl.core.keyplan import KeyPlan
from psctl.core.shard_errors import NonFiniteGradient
from psctl.core.sparse import SparseRows
from psctl.data import arrays, csvfile, formats, parquet, ratings, storage, stream, vocab
from psctl.errors import ConnectError, DataError, JobError, PsctlError
from psctl.models.base import Model, batch_sums, classes_for, encode_targets
from psctl.models.registry import model_class
from psctl.protocol.wire import Message, MsgType

log = logging.getLogger("psctl.worker")

PROGRESS_INTERVAL_S = 0.25
REWIND_TIMEOUT_S = 60.0
RECONNECT_TRIES = 7  # 0.1 s doubling: about 6 s in all
RECONNECT_FIRST_DELAY_S = 0.1
# How long a worker holds at an epoch's end for the driver (hold_epochs): the driver reads
# the report and may pull every table first, as long as the final pull may take.
EPOCH_HOLD_TIMEOUT_S = 600.0
# A mini-batch step's computation runs in a thread once one took longer than this on the loop:
# a model whose steps are slow (user code) then leaves the loop free for the coordinator's
# requests and events, and a quick one pays no thread hop (about 150 us a step, measured
# here against a 100 us logreg step).
INLINE_COMPUTE_S = 0.02
T = TypeVar("T")


# glibc's mallopt parameters; the size from which an allocation is its own mapping, and how
# many arenas the threads share.
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
MMAP_THRESHOLD_BYTES = 256 << 10
ARENA_MAX = 1


def return_freed_memory() -> None:
    """Make this worker process give the memory it frees back to the system, so its resident
    size follows what it holds: each slice's parse (a few MiB of temporaries, freed at once)
    would otherwise stay resident in allocator caches. Set in a worker process only.

    Why: glibc raises its mmap threshold to the largest block freed, after which blocks of that
    size come from per-thread arenas (the threads of ``asyncio.to_thread``) and stay resident
    when freed; a fixed threshold keeps every block of 256 KiB or more its own mapping, and one
    arena keeps the threads from each holding a high-water mark of small blocks (measured: 20-30
    MB less per worker). pyarrow's own pool (mimalloc) keeps freed pages too: the system
    allocator is used instead."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # read when pyarrow first allocates
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_ARENA_MAX, ARENA_MAX)
    except (OSError, AttributeError):  # not glibc
        pass


def max_partition_rows(spec: dict[str, Any]) -> int:
    return max((int(p.get("n_rows", 0)) for p in spec["partitions"]), default=0)


class _ControlService:
    """The worker's side of its session: the coordinator's events (abort, early stop, rewind,
    take over) and its pauses for a checkpoint at one clock."""

    def __init__(self) -> None:
        self.abort_reason: str | None = None
        self.stop_requested = False
        self.paused = False  # hold before the next step until RESUME
        self.until: int | None = None  # after RESUME: take no step at this clock or later
        self.position: Callable[[], int] = lambda: 0  # the clock this worker will hold at
        self.on_take_over: Callable[[str], None] = lambda job_id: None
        self.seen_epoch = -1  # hold_epochs: the last epoch the driver has read
        self._wake = asyncio.Event()

    def session(self, address: str, *, max_frame_bytes: int, security: net.Security) -> Awaitable[Session]:
        """Open the worker's control session with this service behind it."""
        return Session.open(
            address,
            max_frame_bytes=max_frame_bytes,
            security=security,
            requests={MsgType.PAUSE: self.pause, MsgType.RESUME: self.resume},
            on_event=self.on_event,
            on_close=lambda cause: self._abort("the coordinator went away"),
        )

    async def next_rewind(self, session: Session, timeout_s: float) -> dict[str, Any]:
        """The coordinator's next rewind (clock and shards after a shard was recovered)."""
        deadline = time.monotonic() + timeout_s
        while self.abort_reason is None:
            try:
                event = await session.next_event(max(deadline - time.monotonic(), 0.0))
            except EventTimeout:
                raise JobError(f"a shard was lost and the job did not recover within {timeout_s:g} s") from None
            except SessionClosed:
                break
            if event.get("kind") == "rewind":
                return event
        raise JobError(f"job stopped: {self.abort_reason}")

    async def wait_abort(self, session: Session, timeout_s: float) -> None:
        """Wait at most ``timeout_s`` for the coordinator to stop the job; then JobError if it did."""
        try:
            await self.next_rewind(session, timeout_s)
        except JobError:
            if self.abort_reason is not None:
                raise
            return

    async def wait_turn(self, clock: int) -> None:
        """Hold the step at ``clock`` while the coordinator pauses the workers for a
        checkpoint, or for good once ``clock`` reaches the clock it said to stop at."""
        while self.abort_reason is None and (self.paused or (self.until is not None and clock >= self.until)):
            self._wake.clear()
            await self._wake.wait()

    async def wait_epoch_seen(self, epoch: int, timeout_s: float) -> None:
        """Hold at the end of ``epoch`` until the driver has read its report (early stopping
        pulls the best epoch's weights meanwhile), the job stops, or a halt says where to stop."""
        deadline = time.monotonic() + timeout_s
        while self.abort_reason is None and not self.stop_requested and self.until is None and self.seen_epoch < epoch:
            self._wake.clear()
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    await self._wake.wait()
            except TimeoutError:
                raise JobError(f"the driver did not read epoch {epoch + 1}'s report within {timeout_s:g} s") from None

    def pause(self, msg: Message) -> net.Reply:
        self.paused, self.until = True, None
        return Message(MsgType.PAUSE, {"clock": self.position()})

    def resume(self, msg: Message) -> net.Reply:
        until = msg.body.get("until")
        if until is not None and (not isinstance(until, int) or isinstance(until, bool)):
            raise net.RequestError("RESUME 'until' must be an integer clock or null")
        self.paused, self.until = False, until
        self._wake.set()
        return None

    def on_event(self, event: dict[str, Any]) -> None:
        """Acts at once on what cannot wait for a read of the inbox (rewinds are read from it)."""
        kind = event.get("kind")
        if kind == "abort":
            self._abort(str(event.get("reason", "the job was aborted")))
        elif kind == "stop":
            self.stop_requested = True
            self._wake.set()
        elif kind == "epoch_seen":
            epoch = event.get("epoch")
            if isinstance(epoch, int) and not isinstance(epoch, bool):
                self.seen_epoch = max(self.seen_epoch, epoch)
                self._wake.set()
        elif kind == "take_over":
            self.on_take_over(str(event.get("job_id")))

    def _abort(self, reason: str) -> None:
        if self.abort_reason is None:
            self.abort_reason = reason
        self._wake.set()  # a held step ends now; a wait for a rewind sees the abort event


@dataclass
class Prepared:
    """A worker's rows, ready for the model: features scaled, labels encoded."""

    X: Any
    y: np.ndarray
    classes: list[str]
    n_features: int


@dataclass
class WorkerData:
    """What the statistics pass gives a worker: the whole data's statistics and classes, its rows
    (training and held-out, in memory or streamed), the feature count, and the shards to use."""

    stats: dict[str, Any]
    classes: list[str]
    rows: stream.MemoryRows | stream.StreamRows
    val: stream.MemoryRows | stream.StreamRows | None
    n_features: int
    shards: dict[str, Any]  # the STATS reply's "shards" and "ranges"


def load_partition(spec: dict[str, Any], path: str, part: csvfile.Partition) -> tuple[Any, np.ndarray]:
    """Features and raw labels of one partition, in the job's data format.

    A file is parsed slice by slice (``csvfile.slice_partition``): run in a thread, the
    parse then lets the heartbeat thread have the interpreter's lock between slices."""
    if arrays.is_arrays(spec["data"]):  # in-memory input: a view of the mapped rows
        return arrays.read_partition(spec["data"], path, part)
    if parquet.is_parquet_data(spec["data"]):  # only the row groups holding the partition's rows
        report = parquet.ReadReport()
        rows = parquet.read_partition(spec["data"], path, part, report)
        log.info("partition %d of '%s': %s", part.index, path, report.describe())
        return rows
    pieces = [_load_slice(spec, path, piece) for piece in csvfile.slice_partition(path, part)]
    if len(pieces) == 1:
        return pieces[0]
    Xs, labels = zip(*pieces)
    X = SparseRows.concat(Xs) if isinstance(Xs[0], SparseRows) else np.concatenate(Xs)
    return X, np.concatenate(labels)


def _load_slice(spec: dict[str, Any], path: str, part: csvfile.Partition) -> tuple[Any, np.ndarray]:
    if spec["data"].get("format", "csv") in formats.SPARSE_FORMATS:
        return formats.read_partition(spec["data"], path, part)
    schema = csvfile.CsvSchema.from_dict(spec["data"]["schema"])
    if spec["data"].get("format", "csv") == "ratings":
        return ratings.read_partition(path, schema, part)
    return csvfile.read_partition(path, schema, part)


def check_input(path: str, data: dict[str, Any]) -> None:
    """DataError unless this host sees the job's input at ``path``, of the job's size."""
    if parquet.is_parquet_data(data):
        return parquet.check_unchanged(data, path)
    if arrays.is_per_worker(data):  # this worker's rows only: arrays.read_partition checks their count
        return arrays.check_local(path)
    if not storage.exists(path):
        raise DataError(f"data file '{path}' does not exist on worker host {socket.gethostname()}")
    if storage.stored_size(path) != data["size"]:
        raise DataError(f"data file '{path}' on this host differs in size from the job's ({data['size']} bytes)")


def stats_request(raw_X: Any, labels: np.ndarray, spec: dict[str, Any], model_cls: type[Model]) -> tuple[dict[str, Any], list[np.ndarray]]:
    """This worker's part of the statistics pass: partial column statistics, distinct
    labels, and (ratings) the distinct user and item ids; body and arrays of STATS."""
    fmt = spec["data"].get("format", "csv")
    if fmt == "ratings":
        return ratings.stats_request(raw_X, labels)
    if fmt in formats.SPARSE_FORMATS:
        stats = formats.partial_stats(spec["data"], raw_X)
    else:
        stats = csvfile.partial_stats(raw_X) if len(raw_X) and spec.get("standardize", True) else None
    distinct = sorted(set(labels.tolist())) if model_cls.task != "regression" else []
    return {"stats": _jsonable(stats) if stats else None, "labels": distinct}, []


def prepare(raw_X: Any, labels: np.ndarray, classes: list[str], stats_reply: dict[str, Any], spec: dict[str, Any], task: str) -> Prepared:
    """Standardize features and encode labels the same way on every worker."""
    y = encode_targets(task, labels, classes)
    X = raw_X
    n_features = spec["n_features"]
    if spec["data"].get("format", "csv") == "ratings":  # ids -> table rows
        X = ratings.encode_rows(raw_X, stats_reply["vocab"])
        if (X < 0).any():
            raise JobError("an id of this worker's partition is missing from the job's vocabulary")
        X = X.astype(np.int32)  # a vocabulary holds at most vocab.MAX_VOCAB_SIZE ids
    elif spec["data"].get("format", "csv") == "csv":  # dense numeric features: scaled, float32
        mean_std = csvfile.merge_stats(stats_reply["stats"]) if spec.get("standardize", True) and stats_reply["stats"] else None
        X = csvfile.scaled_float32(raw_X, mean_std)
    else:  # sparse rows over model keys; LIBSVM's feature count comes from the statistics
        X = formats.to_keys(spec["data"], raw_X, stats_reply["stats"]).compact()
        n_features = X.n_cols
    if task != "classes":
        y = y.astype(np.float32)
    return Prepared(X, y, classes, n_features)


# Whether a step's numbers are finite is checked explicitly (step_figures); numpy's floating
# point warnings add nothing to that, and OpenBLAS kernels can raise the invalid flag on
# finite float32 input (numpy#24067, OpenBLAS#1924), which a caller's warnings filter set to
# "error" (an in-process worker in a user's program or a test) would turn into a lost worker.
def _no_fp_warnings() -> np.errstate:
    return np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore")


def split_validation(labels: np.ndarray, fraction: float, seed: int, partition: int, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """A partition's (train, held-out) row indices: stratified by label for classifiers."""
    key = labels if stratify else np.zeros(len(labels), dtype=np.int8)
    return csvfile.stratified_split(key, fraction, seed * 1_000_003 + partition)


def split_rows(raw_X: Any, labels: np.ndarray, fraction: float, seed: int, partition: int, stratify: bool) -> tuple[Any, np.ndarray, Any, np.ndarray]:
    """The partition's training rows and labels, then its held-out ones (``split_validation``)."""
    train_rows, val_rows = split_validation(labels, fraction, seed, partition, stratify)
    return raw_X[train_rows], labels[train_rows], raw_X[val_rows], labels[val_rows]


def is_text_input(data: dict[str, Any] | None) -> bool:
    """Whether an input is a file read in byte ranges (CSV, hashed CSV, LIBSVM, ratings): what
    a worker reads slice by slice and may stream; in-memory arrays and Parquet are read whole."""
    return data is None or not (arrays.is_arrays(data) or parquet.is_parquet_data(data))


def plan_rows(client: ShardClient, model: Model, X: Any) -> KeyPlan:
    """The routing of the keys that rows ``X`` touch (plain computation: it may run in a thread)."""
    return client.plan(model.keys(X))


def evaluate(model: Model, params: dict[str, np.ndarray], rows: Prepared) -> dict[str, Any]:
    """Loss and additive figures of ``params`` on ``rows``, as a report carries them."""
    with _no_fp_warnings():
        loss, _, outputs = model.loss_grad(params, rows.X, rows.y)
    return {"loss_sum": float(loss) * len(rows.y), "n": len(rows.y), "sums": batch_sums(model.task, outputs, rows.y)}


def step_figures(model: Model, params: dict[str, np.ndarray], X: Any, y: np.ndarray, epoch: int) -> tuple[float, dict[str, np.ndarray], dict[str, float]]:
    """One mini-batch's loss, the gradients to push and additive figures; PsctlError if they are
    not finite. The gradients are the batch's mean, or per-key sums for a ``key_sums`` model."""
    with _no_fp_warnings():
        loss, grads, outputs = model.loss_grad(params, X, y)
        if model.key_sums:
            grads = {name: g * len(y) for name, g in grads.items()}
        figures = batch_sums(model.task, outputs, y)
    if not all(map(math.isfinite, (float(loss) * len(y), *figures.values()))):
        # Pushing would spread inf/NaN to the tables; the reports could not carry it either.
        raise PsctlError(f"the loss overflowed in epoch {epoch + 1}: training diverged; try a smaller --lr")
    return float(loss), grads, figures


class Offload:
    """Runs a repeated computation on the loop while it is quick and in a thread once it is not.

    The first call runs in a thread (a user's model may be slow from its first step); the
    time the computation took decides the next call. Only plain computation may be given:
    nothing that touches the loop or its objects, since it may run in another thread.
    """

    def __init__(self, inline_s: float = INLINE_COMPUTE_S):
        self.inline_s = inline_s
        self.inline = False

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        if self.inline:
            return self._timed(fn, *args)
        return await asyncio.to_thread(self._timed, fn, *args)

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.inline = time.perf_counter() - started < self.inline_s


async def _with_backoff(attempt: Callable[[], Awaitable[T]], check: Callable[[], None], tries: int = RECONNECT_TRIES) -> T:
    """``attempt()`` again after a connection failure, waiting 0.1 s, 0.2 s, 0.4 s ... in between
    (a shard that was just started again may not take connections yet); ``check`` may give up."""
    for n in range(tries):
        try:
            return await attempt()
        except (ConnectError, net.ConnectionLost):
            if n == tries - 1:
                raise
            check()
            await asyncio.sleep(RECONNECT_FIRST_DELAY_S * 2**n)
    raise AssertionError("unreachable")


def _jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}


def _add(total: dict[str, float], more: dict[str, float]) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0.0) + v


class Worker:
    def __init__(
        self,
        coordinator: str,
        *,
        max_frame_bytes: int,
        data_path: str | None = None,
        model_classes: Sequence[str] = (),
        security: net.Security = net.LOCAL,
        partition: int | None = None,
    ):
        # ``partition``: this worker holds that partition's rows alone (``data_path`` names
        # them; psctl.spark's tasks), so it joins only as that partition's worker.
        self.partition = partition
        # A job spec names its model; a user's class ('pkg.mod:Class') is imported only
        # when this worker was started allowing it, so a job cannot make a worker import code.
        self.model_classes = set(model_classes)
        self.budget_bytes = 0  # this worker's memory budget for its rows, once the job is known
        self.in_step = False  # between the pull of step `session.clock` and its push
        self.session: Session | None = None  # the control session; its clock and samples feed the heartbeats
        self.coordinator_address = coordinator
        self.max_frame_bytes = max_frame_bytes
        self.data_path = data_path
        self.security = security
        self.control = _ControlService()
        # A pause lets the step under way finish: that step's clock + 1 is where this worker holds.
        self.control.position = lambda: (self.session.clock if self.session else 0) + self.in_step
        self.control.on_take_over = self._take_over
        self.helpers: set[asyncio.Task[Any]] = set()  # lost workers' partitions this process took over

    async def run(self, spare_of: str | None = None) -> dict[str, Any]:
        """Join the next job, train, report. Returns the final report.

        ``spare_of``: join only as the replacement of a lost worker of that job
        (this process was asked to take its partition over), at once or not at all.
        """
        try:
            return await self._run(spare_of)
        finally:
            # They train next to this worker: the process ends after them.
            for result in await asyncio.gather(*self.helpers, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("taking over a lost worker's partition failed", exc_info=result)

    def _take_over(self, job_id: str) -> None:
        """Train a lost worker's partition alongside this one, as a second worker of the job."""
        if self.partition is not None:  # the lost partition's rows are not here
            log.warning("job %s: cannot take over a lost worker's partition: this worker holds only partition %d's rows",
                        job_id, self.partition)
            return
        helper = Worker(
            self.coordinator_address,
            max_frame_bytes=self.max_frame_bytes,
            data_path=self.data_path,
            model_classes=self.model_classes,
            security=self.security,
        )

        async def run() -> None:
            try:
                report = await helper.run(spare_of=job_id)
                log.info("took over a lost worker's partition: %d rows", report["n"])
            except PsctlError as exc:
                log.warning("could not take over a lost worker's partition: %s", exc)

        task = asyncio.get_running_loop().create_task(run())
        self.helpers.add(task)

    async def _run(self, spare_of: str | None) -> dict[str, Any]:
        coord = self.session = await self.control.session(
            self.coordinator_address, max_frame_bytes=self.max_frame_bytes, security=self.security
        )
        try:
            body: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname()}
            if spare_of is not None:
                body["spare_of"] = spare_of
            if self.partition is not None:
                body["partition"] = self.partition
            # No bound: `psctl worker` waits for the next job. Heartbeats start with the reply:
            # reading the data and waiting for the other workers' statistics can take longer
            # than the failure timeout.
            reg = await coord.register_worker(body, timeout_s=None)
            try:
                return await self._work(coord, reg)
            except PsctlError as exc:
                # A shard that stopped answering is news for the job; a lost coordinator connection is not.
                if coord.is_open and (isinstance(exc, ShardTimeout) or not isinstance(exc, net.ConnectionLost | JobError)):
                    coord.notify(MsgType.FAILED, {"message": str(exc)})
                raise
        finally:
            coord.close()

    def _check_abort(self) -> None:
        if self.control.abort_reason is not None:
            raise JobError(f"job stopped: {self.control.abort_reason}")

    async def _work(self, coord: Session, reg: dict[str, Any]) -> dict[str, Any]:
        job = JobSpec.from_wire(reg["spec"])
        spec = job.to_wire()  # every field present, defaults filled in, for the data helpers
        worker_id = int(reg["worker_id"])
        self.control.stop_requested = self.control.stop_requested or bool(reg.get("stop"))
        partition = int(reg.get("partition_index", worker_id))
        if ":" in job.model and job.model not in self.model_classes:
            raise PsctlError(f"this worker does not load model class '{job.model}'; start it with --model-class {job.model}")
        model_cls = model_class(job.model)
        part = csvfile.Partition.from_dict(reg["partition"])
        path = self.data_path or job.data["path"]
        await asyncio.to_thread(check_input, path, job.data)
        # Every computation over the partition, and the model's code, runs in a thread (each
        # ``to_thread`` below): the loop stays free for the coordinator's requests and events
        # and for a partition this process took over. Parsing goes slice by slice, so the
        # heartbeat thread gets the interpreter's lock (load_partition).
        data = await self._read_data(coord, job, spec, path, part, partition, model_cls)
        peak_read = process_memory()["peak_rss_bytes"]  # the statistics pass and the rows held
        stats, classes, rows, val, n_features = data.stats, data.classes, data.rows, data.val, data.n_features
        model = await asyncio.to_thread(
            lambda: model_cls(n_features, classes, l2=job.l2, **job.model_params, **model_cls.data_params(stats))
        )

        async def connect_shards(shards: list[str], ranges: dict[str, Any]) -> ShardClient:
            return await ShardClient.connect(
                shards,
                ranges,
                reg["job_id"],
                {"role": "worker", "worker_id": worker_id, "session": reg["session"]},
                max_frame_bytes=self.max_frame_bytes,
                hashed=[t.name for t in model.tables() if t.sparse],
                security=self.security,
                # Within the failure timeout the coordinator declares a stuck party lost and the
                # job recovers or aborts, which answers a pull held at the gate.
                answer_timeout_s=job.failure_timeout_s,
            )

        client = await connect_shards(data.shards["shards"], data.shards["ranges"])
        try:
            start_clock = int(reg.get("start_clock", 0))
            while True:
                try:
                    await self._train(coord, client, model, rows, val, spec, partition, start_clock)
                    break
                except (net.ConnectionLost, net.RemoteError) as exc:
                    if isinstance(exc, net.RemoteError) and exc.code == NonFiniteGradient.code:
                        # The shard applied none of it; no roll-back mends a model that diverged.
                        raise PsctlError(f"worker {worker_id} pushed non-finite gradients (NaN/Inf): {exc}") from None
                    if not spec.get("checkpoint"):
                        # A lost shard fails such a job: the coordinator says so within the failure
                        # timeout. Wait for that (the job's failure is then the one sentence), and
                        # leave as a lost worker, to be replaced, only if it does not come.
                        await self.control.wait_abort(coord, job.failure_timeout_s)
                        raise
                    # A shard was lost: the coordinator rolls the shards back to their last
                    # checkpoint and says where to start again.
                    log.warning("worker %d: %s; waiting for the shards to recover", worker_id, exc)
                    rewind = await self.control.next_rewind(coord, REWIND_TIMEOUT_S)
                    client.close()
                    client = await _with_backoff(lambda: connect_shards(rewind["shards"], rewind["ranges"]), self._check_abort)
                    start_clock = int(rewind["clock"])
            trained_bytes = {"bytes_pulled": client.bytes_pulled, "bytes_pushed": client.bytes_pushed}
            peak_trained = process_memory()["peak_rss_bytes"]
            await client.leave()
            await coord.request(MsgType.TRAINED, {}, timeout_s=None)
            self._check_abort()
            # Traffic of training only: the evaluation pull below is not part of any epoch.
            report: dict[str, Any] = {"loss_sum": 0.0, "sums": {}, "n": rows.n}
            report.update(bytes_pulled=client.bytes_pulled, bytes_pushed=client.bytes_pushed)
            if rows.n:
                # Block by block (a streamed partition: slice by slice from the file), in threads.
                figures = await self._evaluate(client, model, rows, None)
                report.update(loss_sum=figures["loss_sum"], sums=figures["sums"])
            report["memory"] = {"mode": rows.mode, "compact_bytes": int(rows.compact_bytes + (val.compact_bytes if val else 0)),
                                "budget_bytes": self.budget_bytes, "peak_rss_read_bytes": peak_read,
                                "peak_rss_trained_bytes": peak_trained, **process_memory()}
            report.update(trained_bytes)  # training traffic only, not the evaluation pull
            coord.notify(MsgType.FINAL_REPORT, report)
            return report
        finally:
            client.close()

    async def _train(
        self,
        coord: Session,
        client: ShardClient,
        model: Model,
        rows: stream.MemoryRows | stream.StreamRows,
        val: stream.MemoryRows | stream.StreamRows | None,
        spec: dict[str, Any],
        partition: int,
        start_clock: int,
    ) -> None:
        """Mini-batch steps from ``start_clock`` (0, or where a lost predecessor's pushes stopped)."""
        epochs, batch_size, seed = int(spec["epochs"]), int(spec["batch_size"]), int(spec.get("seed", 0))
        hold = bool(spec.get("hold_epochs"))
        n_rows = rows.n
        max_rows = max_partition_rows(spec)
        per_epoch = epoch_steps(n_rows, batch_size, max_rows)
        clock = coord.clock = start_clock
        self.in_step = False
        acks: Acks | None = None  # the previous step's push
        # The first step is reported at once (the driver sees training start), then every interval.
        last_progress = time.monotonic() - PROGRESS_INTERVAL_S
        recent_loss, recent_n = 0.0, 0
        first_epoch = start_clock // per_epoch if per_epoch else 0
        plan_step, compute_step = Offload(), Offload()  # each decides by its own time
        for epoch in range(first_epoch, epochs):
            if self.control.stop_requested:
                break
            loss_sum, sums, trained = 0.0, {}, 0
            staleness: dict[str, int] = {}  # clocks behind -> steps, as the gate answered this epoch's pulls
            skip = start_clock - epoch * per_epoch if epoch == first_epoch else 0
            batches = rows.epoch(epoch, batch_size, seed, partition, max_rows)
            step = -1
            while True:
                # A streamed epoch reads the file when the next batch opens a new window: in a thread.
                batch = batches.next() if batches.ready() else await asyncio.to_thread(batches.next)
                if batch is None:
                    break
                step += 1
                if step < skip:
                    continue
                await self.control.wait_turn(clock)
                self._check_abort()
                if self.control.stop_requested:
                    break
                self.in_step = True
                X, y = batch
                # One routing of the batch's keys for the pull and the push of this step.
                plan = await plan_step(plan_rows, client, model, X)
                # The pull goes out behind the previous push on each connection,
                # so it sees that push; its ack is collected afterwards.
                params = await client.pull(plan, clock, after=acks)
                behind = str(client.last_staleness)
                staleness[behind] = staleness.get(behind, 0) + 1
                if acks is not None:
                    await acks
                loss, grads, figures = await compute_step(step_figures, model, params, X, y, epoch)
                n = len(y)
                acks = client.push(grads, clock, n, plan, sums=model.key_sums)
                # Not held while the next batch is read (a streamed epoch's next window).
                batch = X = y = params = grads = plan = None
                clock = coord.clock = clock + 1
                self.in_step = False
                loss_sum += loss * n
                trained += n
                coord.samples += n
                _add(sums, figures)
                recent_loss += loss * n
                recent_n += n
                now = time.monotonic()
                if now - last_progress >= PROGRESS_INTERVAL_S:
                    coord.notify(
                        MsgType.PROGRESS,
                        {"epoch": epoch, "clock": clock, "samples": recent_n, "loss_sum": recent_loss},
                    )
                    recent_loss, recent_n, last_progress = 0.0, 0, now
            if self.control.stop_requested:
                break  # a partial epoch is not reported
            if hold and acks is not None:
                await acks  # the epoch's last push is on the shards before the driver may read them
                acks = None
            report: dict[str, Any] = {"epoch": epoch, "loss_sum": loss_sum, "sums": sums, "n": trained, "staleness": staleness}
            if val is not None:
                report["val"] = await self._evaluate(client, model, val, clock)
            coord.notify(MsgType.EPOCH_REPORT, report)
            if hold and epoch < epochs - 1:
                await self.control.wait_epoch_seen(epoch, EPOCH_HOLD_TIMEOUT_S)
        if acks is not None:
            await acks
        if recent_n:
            coord.notify(MsgType.PROGRESS, {"epoch": epochs - 1, "clock": clock, "samples": recent_n, "loss_sum": recent_loss})

    async def _evaluate(self, client: ShardClient, model: Model, rows: stream.MemoryRows | stream.StreamRows, clock: int | None) -> dict[str, Any]:
        """Loss and additive figures of the current parameters on ``rows`` (held-out data, or at the
        end the training rows: ``clock`` None), block by block, the figures summed."""
        total: dict[str, Any] = {"loss_sum": 0.0, "n": 0, "sums": {}}
        blocks = rows.blocks()
        while (block := await asyncio.to_thread(next, blocks, None)) is not None:
            X, y = block
            plan = await asyncio.to_thread(plan_rows, client, model, X)
            params = await (client.pull(plan) if clock is None else client.pull(plan, clock))
            figures = await asyncio.to_thread(evaluate, model, params, Prepared(X, y, [], 0))
            total["loss_sum"] += figures["loss_sum"]
            total["n"] += figures["n"]
            _add(total["sums"], figures["sums"])
        return total

    async def _read_data(
        self, coord: Session, job: JobSpec, spec: dict[str, Any], path: str, part: csvfile.Partition, partition: int, model_cls: type[Model]
    ) -> WorkerData:
        """The statistics pass and this worker's rows, in the mode the job and its budget choose.
        Every computation over the data runs in a thread."""
        stratify = model_cls.task != "regression"
        self.budget_bytes = job.worker_memory_bytes or stream.default_budget(job.n_workers)
        text = is_text_input(job.data) and is_text_input(job.validation)
        if not text:  # in-memory arrays, Parquet: read whole (arrays map their file; no copy)
            raw_X, labels = await asyncio.to_thread(load_partition, spec, path, part)
            val_raw: tuple[Any, np.ndarray] | None = None
            if job.test_split:
                split = await asyncio.to_thread(split_rows, raw_X, labels, job.test_split, job.seed, partition, stratify)
                raw_X, labels, val_raw = split[0], split[1], (split[2], split[3])
            elif job.validation:
                val_part = csvfile.Partition.from_dict(job.validation["partitions"][partition])
                val_raw = await asyncio.to_thread(load_partition, {**spec, "data": job.validation}, job.validation["path"], val_part)
            body, arrays = await asyncio.to_thread(stats_request, raw_X, labels, spec, model_cls)
            if val_raw is not None and stratify:  # classes must cover the held-out labels too
                held_out = val_raw[1]
                body["labels"] = await asyncio.to_thread(lambda: sorted(set(body["labels"]) | set(held_out.tolist())))
            stats, classes, shards = await self._stats(coord, body, arrays, model_cls)
            prep = await asyncio.to_thread(prepare, raw_X, labels, classes, stats, spec, model_cls.task)
            val = await asyncio.to_thread(prepare, *val_raw, classes, stats, spec, model_cls.task) if val_raw is not None else None
            held_rows = stream.MemoryRows(val.X, val.y) if val else None
            return WorkerData(stats, classes, stream.MemoryRows(prep.X, prep.y), held_rows, prep.n_features, shards)

        hold = stream.HoldOut(job.test_split, job.seed * 1_000_003 + partition, stratify) if job.test_split else None
        pf = await asyncio.to_thread(stream.PartitionFile.of, path, part, lambda piece: _load_slice(spec, path, piece), hold)
        vf = None
        if job.validation:
            val_spec, val_path = {**spec, "data": job.validation}, job.validation["path"]
            val_part = csvfile.Partition.from_dict(job.validation["partitions"][partition])
            vf = await asyncio.to_thread(stream.PartitionFile.of, val_path, val_part, lambda piece: _load_slice(val_spec, val_path, piece), None, True)
        counted = stream.Stats(job.data, job.standardize, model_cls.task)
        await asyncio.to_thread(stream.scan, pf, counted)
        if vf is not None:  # its labels only: the classes cover them
            await asyncio.to_thread(stream.scan, vf, counted)
        stats, classes, shards = await self._stats(coord, *counted.request(), model_cls)

        def compact(raw_X: Any, labels: np.ndarray) -> tuple[Any, np.ndarray]:
            prep = prepare(raw_X, labels, classes, stats, spec, model_cls.task)
            return prep.X, prep.y

        held = vf if vf is not None else pf
        # No rows, in the compact form: its dtypes and row width (the size estimate), the feature count.
        assert pf.empty is not None  # set by the statistics pass
        empty = await asyncio.to_thread(prepare, *pf.empty, classes, stats, spec, model_cls.task)
        sample = (empty.X, empty.y)
        estimate = stream.estimate_bytes(pf, "train", sample) + stream.estimate_bytes(held, "val", sample)
        mode = stream.choose_mode(job.partition_mode, estimate, self.budget_bytes)
        n_held = held.n("val")
        if mode == "memory":
            got = await asyncio.to_thread(stream.gather, pf, "train", compact)
            rows = stream.MemoryRows(*got) if got is not None else stream.MemoryRows(*sample)
            val_got = await asyncio.to_thread(stream.gather, held, "val", compact) if n_held else None
            val = stream.MemoryRows(*val_got) if val_got is not None else None
            pf.release()
            held.release()
        else:
            n_train = pf.n("train")
            row_bytes = stream.estimate_bytes(pf, "train", sample) / max(n_train, 1)
            window = stream.window_rows(self.budget_bytes, row_bytes, max((c.rows for c in pf.train), default=0), job.batch_size)
            rows = stream.StreamRows(pf, "train", compact, window, stream.estimate_bytes(pf, "train", sample))
            val = stream.StreamRows(held, "val", compact, window, stream.estimate_bytes(held, "val", sample)) if n_held else None
        if (job.validation or job.test_split) and val is None:  # every worker reports held-out figures
            val = stream.MemoryRows(sample[0][:0], sample[1][:0])
        log.info("partition %d: %s mode, %.1f MB compact, budget %.1f MB", partition, mode, estimate / 1e6, self.budget_bytes / 1e6)
        return WorkerData(stats, classes, rows, val, empty.n_features, shards)

    async def _stats(
        self, coord: Session, body: dict[str, Any], arrays: list[np.ndarray], model_cls: type[Model]
    ) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
        """The statistics pass's exchange: this partition's part out, the whole data's back
        (statistics, classes, and the reply's shards and key ranges)."""
        reply = await coord.request(MsgType.STATS, body, arrays, timeout_s=None)
        self._check_abort()
        stats = await asyncio.to_thread(vocab.attach, reply.body, reply.arrays)
        return stats, classes_for(model_cls.task, stats["labels"], model_cls.kind), reply.body
