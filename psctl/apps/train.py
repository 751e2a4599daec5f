"""The driver behind ``psctl train``: plan, start or join a cluster, submit, follow, save.

It returns data and calls ``on_event`` with plain dicts; rendering is the CLI's job.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from psctl import net
from psctl.apps import history
from psctl.apps.results import json_safe
from psctl.cluster.client import ShardClient
from psctl.cluster.launch import Child, LocalCluster, embedded_security
from psctl.cluster.session import EventTimeout, Session
from psctl.core.batching import epoch_steps
from psctl.core.consistency import staleness_for
from psctl.core.job import DEFAULT_FAILURE_TIMEOUT_S, DEFAULT_HEARTBEAT_INTERVAL_S, PARTITION_MODES, JobSpec
from psctl.core.kept import name_problem
from psctl.core.optim import OPTIMIZERS
from psctl.core.tables import MIN_SHARD_BYTES, TableSpec, table_bytes
from psctl.data import arrays, csvfile, formats, parquet, ratings, storage, stream, vocab
from psctl.errors import DataError, Interrupted, JobError, PsctlError, RequestError, UsageError
from psctl.files import checkpoint, modelfile
from psctl.models.base import Model, classes_for, summarize
from psctl.models.registry import model_class
from psctl.protocol.wire import DEFAULT_MAX_FRAME_BYTES, Message, MsgType

SUBMIT_TIMEOUT_S = 60.0
# Step sizes that work for standardized or 0/1 features (FTRL's is its alpha on per-key summed
# gradients: 0.1, the sparse defaults', docs/DEFAULTS.md).
DEFAULT_LR = {"sgd": 0.1, "adagrad": 0.1, "adam": 0.01, "ftrl": 0.1}
# Without --epochs, a model whose defaults say ``converge`` stops once its training loss has
# not fallen by CONVERGE_TOL below the best for CONVERGE_EPOCHS epochs (scikit-learn's SGD
# rule, its tol and n_iter_no_change): big data stop after a few passes, small data run on.
CONVERGE_TOL = 1e-3
CONVERGE_EPOCHS = 3
TRAINING_OPTIONS = ("optimizer", "lr", "batch_size", "epochs", "l2")
FAILED_EVENT_GRACE_S = 2.0
FINAL_PULL_TIMEOUT_S = 600.0  # a sparse table of millions of keys takes seconds to gather
HALT_TIMEOUT_S = 60.0
# The driver's wait for the server's next event is bounded: after this long without one,
# the server must answer a PING (a stalled server is not a slow job).
EVENT_SILENCE_S = 10.0
SERVER_ANSWER_TIMEOUT_S = 30.0  # for every worker to reach the stop clock (async: the slowest catches up)


class StopRequest:
    """Ctrl-C (or SIGTERM) on ``psctl train``. While a job with a checkpoint folder trains,
    the first one stops it gracefully: every worker stops at one clock and the shards save
    a final checkpoint there. Otherwise, or on a second one, the command stops at once
    (its task is cancelled; every process it started is stopped)."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.graceful = False  # set by the driver while a graceful stop is possible
        self._task = asyncio.current_task()

    def signal(self) -> None:
        if self.graceful and not self.requested.is_set():
            self.requested.set()
        elif self._task is not None:
            self._task.cancel()


@dataclass
class TrainConfig:
    model: str
    data: str
    workers: int = 8
    shards: int = 2
    server: str | None = None
    local_workers: int | None = None  # with --server: how many of the workers to start here
    mode: str = "sync"
    staleness: int = 0
    # None: not given, filled by resolve_defaults (the model's defaults, or psctl's first ones
    # when the optimizer's options are given): TRAINING_OPTIONS.
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    l2: float | None = None
    seed: int = 0
    label: str | None = None
    drop: tuple[str, ...] = ()
    has_header: bool = True
    standardize: bool = True
    model_params: dict[str, Any] = field(default_factory=dict)  # model-specific, e.g. linreg's loss
    lr_decay: float = 0.0
    validate: str | None = None  # a held-out file with the training file's columns
    test_split: float = 0.0  # or hold out this fraction of each worker's rows
    patience: int = 0  # stop after this many epochs without a better held-out loss (0: never)
    max_restarts: int = 3  # lost local worker processes replaced per job
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # clocks between shard checkpoints (0: none)
    checkpoint_every_s: float = 0.0  # or seconds between them (each at one clock for all shards)
    resume: str | None = None  # a checkpoint folder to continue from
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    failure_timeout_s: float = DEFAULT_FAILURE_TIMEOUT_S
    # ratings data (mf): the id and rating columns, names or 0-based indices
    user_col: str = "userId"
    item_col: str = "movieId"
    rating_col: str = "rating"
    out: str = "model.npz"
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    format: str = "auto"  # csv, libsvm or parquet, detected from the file by default
    delimiter: str | None = None  # CSV: the cell separator (a comma by default)
    index_base: int | None = None  # libsvm: 0 or 1; None detects it
    n_features: int | None = None  # libsvm: None takes the largest index in the data
    hash_bits: int | None = None  # csv: hash --categorical columns into 2^hash_bits keys
    categorical: tuple[str, ...] = ()
    optimizer: str | None = None
    l1: float = 0.0  # ftrl only
    save_optimizer_state: bool = False
    security: net.Security = net.LOCAL  # never written to the model file
    keep: str | None = None  # leave the trained tables on the server under this name (core/kept.py)
    replace: bool = False  # --keep of a name kept already replaces that model at the job's end
    resume_from: str | None = None  # a kept model to train further, in place, while it is served
    # In-memory input (psctl.sklearn): ``data`` is a features .npy that every worker maps, and
    # this is its data spec (psctl.data.arrays.data_spec: format, schema, labels file, rows).
    arrays: dict[str, Any] | None = None
    # With --server: submit once this many shards have registered (psctl.spark: its shard tasks); else 1.
    min_shards: int | None = None
    # The embedded cluster's shards and this job's local workers as tasks of this process,
    # not child processes (cluster.launch.LocalCluster): no process start-up, one core.
    in_process: bool = False
    # How each worker holds its partition (psctl/data/stream.py): auto, memory or stream, and
    # its memory budget for its rows (a size as in 64MB; None: half this host's memory divided
    # by the workers started here).
    partition_mode: str = "auto"
    worker_memory: str | None = None
    # Split the model over one shard per this many bytes of its tables, as in 1MB ("0": over
    # every shard; None: core.tables.MIN_SHARD_BYTES).
    min_shard_bytes: str | None = None
    # Set by resolve_defaults: the options it filled in, and whether the job stops once converged.
    defaulted: tuple[str, ...] | None = None
    converge: bool = False

    def check(self) -> None:
        if self.workers < 1:
            raise PsctlError("--workers must be at least 1")
        if self.shards < 1:
            raise PsctlError("--shards must be at least 1")
        # None (not given) is filled in by resolve_defaults
        if (self.epochs is not None and self.epochs < 1) or (self.batch_size is not None and self.batch_size < 1):
            raise PsctlError("--epochs and --batch-size must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise PsctlError("--lr must be positive")
        if self.l2 is not None and self.l2 < 0:
            raise PsctlError("--l2 must not be negative")
        if self.lr_decay < 0:
            raise PsctlError("--lr-decay must not be negative")
        if not 0 <= self.test_split < 1:
            raise PsctlError("--test-split must be a fraction between 0 and 1")
        if self.test_split and self.validate:
            raise PsctlError("use either --validate or --test-split, not both")
        if not 0 < self.heartbeat_interval_s < self.failure_timeout_s:
            raise PsctlError("--heartbeat-interval-s must be positive and below --failure-timeout-s")
        if self.checkpoint_every < 0 or self.checkpoint_every_s < 0:
            raise PsctlError("--checkpoint-every must be a positive number of steps, or of seconds as in 30s")
        if (self.checkpoint_every or self.checkpoint_every_s) and not (self.checkpoint_dir or self.resume):
            raise PsctlError("--checkpoint-every needs --checkpoint-dir")
        if self.patience < 0:
            raise PsctlError("--patience must not be negative")
        if self.patience and not (self.validate or self.test_split):
            raise PsctlError("--patience needs held-out rows: give --validate FILE or --test-split FRACTION")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise PsctlError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got '{self.optimizer}'")
        if self.lr_decay and self.optimizer not in (None, "sgd"):
            raise PsctlError("--lr-decay is for --optimizer sgd; the other optimizers adapt their steps per key")
        if self.l1 < 0:
            raise PsctlError("--l1 must not be negative")
        if self.l1 and self.optimizer not in (None, "ftrl"):  # None: the defaults are not filled in yet
            raise PsctlError(f"--l1 is FTRL's (the default optimizer for sparse input); --optimizer {self.optimizer} has none")
        if self.local_workers is not None and not 0 <= self.local_workers <= self.workers:
            raise PsctlError("--local-workers must be between 0 and --workers")
        # Options that contradict each other: refused here, before anything starts.
        if self.local_workers is not None and self.server is None:
            raise UsageError("--local-workers is for a job on a running server (--server HOST:PORT); "
                             "without --server every worker starts here")
        if self.keep is not None:
            if self.server is None:
                raise UsageError("--keep leaves the model on a running server (--server HOST:PORT); "
                                 "the cluster that psctl train starts without --server ends with the job")
            problem = name_problem(self.keep)
            if problem is not None:
                raise UsageError(f"--keep: {problem}")
            if self.patience:
                raise UsageError("--keep keeps the shards' final weights, but with --patience the model file holds "
                                 "the best epoch's: leave out one of them")
        if self.resume_from is not None:
            if self.server is None:
                raise UsageError("--resume-from trains a model kept on a running server (--server HOST:PORT) further")
            if self.keep not in (None, self.resume_from):
                raise UsageError(f"--resume-from {self.resume_from} keeps the model under its own name; leave out --keep")
            if self.resume or self.patience:
                raise UsageError("--resume-from continues a kept model; it does not go with --resume or --patience")
            self.keep, self.replace = self.resume_from, True
        if self.replace and self.keep is None:
            raise UsageError("--replace is for --keep NAME (it replaces the model kept under that name)")
        if self.staleness and self.mode != "ssp":
            raise UsageError(f"--staleness is the bound of --mode ssp; --mode {self.mode} has "
                             f"{'none' if self.mode == 'async' else 'staleness 0'}")
        if "huber_delta" in self.model_params and self.model_params.get("loss") != "huber":
            raise UsageError("--huber-delta is for --loss huber")
        if self.arrays is not None and (self.resume or self.validate):
            raise UsageError("in-memory data cannot be resumed or validated against a file; train on files for that")
        if self.resume and self.checkpoint_dir and checkpoint.folder_of(self.resume).resolve() != Path(self.checkpoint_dir).resolve():
            raise UsageError("--resume continues in its own folder; leave out --checkpoint-dir or give the same folder")
        if self.partition_mode not in PARTITION_MODES:
            raise UsageError(f"--partition-mode must be one of {', '.join(PARTITION_MODES)}; got '{self.partition_mode}'")
        if self.worker_memory is not None:
            try:
                stream.parse_size(self.worker_memory)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        try:
            min_shard_bytes(self)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        try:
            staleness_for(self.mode, self.staleness)
        except ValueError as exc:
            raise PsctlError(f"{exc}") from None


def resolve_defaults(cfg: TrainConfig, model_cls: type[Model], sparse: bool = False) -> None:
    """Fill the training options ``cfg`` leaves out (None), once, for input of the kind given
    (``sparse``: LIBSVM or hashed CSV, known once the input is).

    When the command sets none of the optimizer's options (--optimizer, --lr, --lr-decay),
    every option left out is the model's tuned default (``Model.defaults``: AdaGrad for the
    linear models and mf; ``Model.sparse_defaults`` for sparse input: FTRL for the linear
    models) and, without --epochs, the job stops once converged. Otherwise the command is
    tuning the optimizer itself, and what it leaves out is what it always was: SGD, the
    optimizer's DEFAULT_LR, batch 32, 10 epochs, no L2.
    """
    if cfg.defaulted is not None:
        return
    tuned = cfg.optimizer is None and cfg.lr is None and not cfg.lr_decay
    tuned_preset = (model_cls.sparse_defaults if sparse else None) or model_cls.defaults
    preset = tuned_preset if tuned else {**Model.defaults, "lr": None}
    filled = []
    for name in TRAINING_OPTIONS:
        if getattr(cfg, name) is None:
            value = preset[name]
            if name == "lr" and value is None:
                value = DEFAULT_LR.get(str(cfg.optimizer), 0.1)
            setattr(cfg, name, value)
            filled.append(name)
    cfg.defaulted = tuple(filled)
    cfg.converge = bool(preset.get("converge")) and "epochs" in filled


@dataclass
class TrainResult:
    model_path: str
    metrics: dict[str, Any]
    meta: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)


def optimizer_spec(cfg: TrainConfig) -> dict[str, Any]:
    """The shards' update rule. FTRL takes --l1 and --l2 itself (in its proximal step)."""
    assert cfg.optimizer is not None and cfg.lr is not None, "resolve_defaults first"
    params: dict[str, Any] = {"lr": cfg.lr}
    if cfg.optimizer == "sgd":
        params["lr_decay"] = cfg.lr_decay
    elif cfg.optimizer == "ftrl":
        params.update(l1=cfg.l1, l2=cfg.l2)
    return {"name": cfg.optimizer, "params": params}


def worker_memory_bytes(cfg: TrainConfig) -> int:
    """Each worker's memory budget: --worker-memory, or half this host's memory divided by the
    workers started here (all of them when this command starts none: they join from elsewhere)."""
    if cfg.worker_memory is not None:
        return stream.parse_size(cfg.worker_memory)
    local = cfg.workers if cfg.server is None or cfg.local_workers is None else cfg.local_workers
    return stream.default_budget(local or cfg.workers)


def min_shard_bytes(cfg: TrainConfig) -> int:
    """--min-shard-bytes in bytes: 0 spreads the tables over every shard."""
    if cfg.min_shard_bytes is None:
        return MIN_SHARD_BYTES
    if str(cfg.min_shard_bytes).strip() == "0":
        return 0
    return stream.parse_size(cfg.min_shard_bytes, "--min-shard-bytes", minimum=1)


def build_spec(cfg: TrainConfig, source: formats.Source, partitions: list[csvfile.Partition]) -> JobSpec:
    """The job as the coordinator and workers see it. Tables come after the statistics pass."""
    if cfg.partition_mode == "stream" and (arrays.is_arrays(source.data) or parquet.is_parquet_data(source.data)):
        raise UsageError("--partition-mode stream reads a CSV or LIBSVM file again every epoch; "
                         "in-memory and Parquet input are read whole (leave it out)")
    return JobSpec(
        model=cfg.model,
        model_params={**cfg.model_params, "sparse": True} if source.sparse else cfg.model_params,
        n_workers=cfg.workers,
        n_features=source.n_features,  # None for LIBSVM until the statistics pass
        mode=cfg.mode,
        staleness=cfg.staleness,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        l2=0.0 if cfg.optimizer == "ftrl" else cfg.l2,
        seed=cfg.seed,
        standardize=cfg.standardize,
        optimizer=optimizer_spec(cfg),
        min_shards=cfg.shards if cfg.server is None else (cfg.min_shards or 1),
        data={"path": storage.absolute(cfg.data), "size": input_size(cfg.data, source), **source.data},
        partitions=tuple(p.to_dict() for p in partitions),
        test_split=cfg.test_split,
        checkpoint=(
            {"dir": os.path.abspath(cfg.checkpoint_dir), "every": cfg.checkpoint_every, "every_s": cfg.checkpoint_every_s}
            if cfg.checkpoint_dir
            else None
        ),
        heartbeat_interval_s=cfg.heartbeat_interval_s,
        failure_timeout_s=cfg.failure_timeout_s,
        # How long a lost worker's partition waits for a new worker before a survivor takes
        # it over: long enough for this driver's restart to register, if it will restart one.
        # Early stopping keeps the weights of the best epoch's end, not of a few steps later;
        # the convergence stop ends the job exactly at the epoch that converged (without the
        # hold, the workers trained on into the next epoch until the STOP reached them, so how
        # far depended on timing, and the same seed gave other weights on a loaded machine).
        hold_epochs=cfg.patience > 0 or cfg.converge,
        keep={"name": cfg.keep, "replace": cfg.replace} if cfg.keep is not None else None,
        from_kept={"name": cfg.resume_from} if cfg.resume_from is not None else None,
        takeover_after_s=takeover_after_s(cfg, source),
        partition_mode=cfg.partition_mode,
        worker_memory_bytes=worker_memory_bytes(cfg),
        min_shard_bytes=min_shard_bytes(cfg),
    )


# Rows that each worker holds alone (arrays.is_per_worker) cannot be taken over by a survivor:
# a lost worker's partition waits this long for its own replacement (psctl.spark restarts it).
NO_TAKEOVER_S = 24 * 3600.0


def takeover_after_s(cfg: TrainConfig, source: formats.Source) -> float:
    if arrays.is_per_worker(source.data):
        return NO_TAKEOVER_S
    return cfg.failure_timeout_s if cfg.max_restarts > 0 and (cfg.local_workers is None or cfg.local_workers > 0) else 0.0


def input_size(path: str, source: formats.Source) -> int:
    """The input's stored bytes (a Parquet folder's: its files' together); workers check it."""
    if parquet.is_parquet_data(source.data):
        return sum(int(size) for _, size, _ in source.data["files"])
    if arrays.is_per_worker(source.data):  # no file here: each worker holds its rows
        return 0
    return storage.stored_size(path)


def resume_spec(cfg: TrainConfig, fresh: JobSpec) -> tuple[list[str], JobSpec]:
    """The stopped job's spec (same partitions, hyper-parameters, shards), set to resume at its
    checkpoint, and the options of this command applied to it (see :func:`resume_options`)."""
    manifest = checkpoint.read_manifest(cfg.resume or "")
    folder = checkpoint.folder_of(cfg.resume or "")
    try:
        spec = JobSpec.from_wire(manifest["spec"])
    except RequestError as exc:
        raise checkpoint.CheckpointError(f"'{cfg.resume}' holds a job spec psctl cannot read: {exc}") from None
    if spec.model != fresh.model or spec.data.get("path") != fresh.data["path"]:
        raise checkpoint.CheckpointError(
            f"'{cfg.resume}' is a checkpoint of {spec.model} on {spec.data.get('path')}, not of this job"
        )
    if spec.data.get("size") != fresh.data["size"]:
        raise checkpoint.CheckpointError(f"'{spec.data['path']}' changed size since the checkpoint")
    checkpoint.check_files(folder, manifest)
    if cfg.server is None and manifest["n_shards"] != cfg.shards:
        cfg.shards = int(manifest["n_shards"])  # the shard files are per shard
    spec, applied = resume_options(cfg, spec)
    # A checkpoint folder is relocatable: the job continues in the folder it was resumed from,
    # wherever it was first written (a copy or a moved folder leaves the original alone).
    here = os.path.abspath(folder)
    cfg.checkpoint_dir = here  # the model file records where the checkpoints went
    return applied, spec.replace(
        hold_epochs=fresh.hold_epochs,  # early stopping is this run's choice
        # How the workers hold their rows changes no result's meaning: this run's choice too.
        partition_mode=fresh.partition_mode, worker_memory_bytes=fresh.worker_memory_bytes,
        min_shards=int(manifest["n_shards"]), resume={
            "dir": here, "clock": int(manifest["clock"]), "job_id": manifest.get("job_id"), "n_shards": int(manifest["n_shards"]),
        },
        checkpoint={**(spec.checkpoint or {"every": 0, "every_s": 0.0}), "dir": here},
    )


# Each option's value when the command does not give it (the CLI's defaults are these).
_DEFAULTS = {
    f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    for f in fields(TrainConfig) if f.default is not MISSING or f.default_factory is not MISSING
}


def _checkpoint_options(spec: JobSpec) -> list[tuple[str, str, Any]]:
    """(TrainConfig field, its flag, the checkpoint's value) for each option a resumed job takes from its checkpoint."""
    opt = spec.optimizer
    params = opt.get("params", {})
    ftrl = opt.get("name") == "ftrl"
    return [
        ("workers", "--workers", spec.n_workers), ("mode", "--mode", spec.mode), ("staleness", "--staleness", spec.staleness),
        ("epochs", "--epochs", spec.epochs), ("batch_size", "--batch-size", spec.batch_size), ("seed", "--seed", spec.seed),
        ("optimizer", "--optimizer", opt.get("name")), ("lr", "--lr", params.get("lr")),
        ("lr_decay", "--lr-decay", params.get("lr_decay", 0.0)), ("l1", "--l1", params.get("l1", 0.0)),
        ("l2", "--l2", params.get("l2", 0.0) if ftrl else spec.l2), ("standardize", "--no-standardize", spec.standardize),
        ("test_split", "--test-split", spec.test_split),
        ("model_params", "the model's options", {k: v for k, v in spec.model_params.items() if k != "sparse"}),
        ("heartbeat_interval_s", "--heartbeat-interval-s", spec.heartbeat_interval_s),
        ("failure_timeout_s", "--failure-timeout-s", spec.failure_timeout_s),
    ]  # fmt: skip


def resume_options(cfg: TrainConfig, spec: JobSpec) -> tuple[JobSpec, list[str]]:
    """The checkpoint's options against this command's: an option left at its default takes
    the checkpoint's value; more --epochs and another --checkpoint-every apply (the job goes on
    longer, or checkpoints at another pace; returned as sentences to show); any other option
    that differs is refused. ``cfg`` ends up holding the values really used (the model file
    records them)."""
    contradicting, applied = [], []
    for name, flag, theirs in _checkpoint_options(spec):
        mine = getattr(cfg, name)
        if mine == theirs:
            continue
        if name in (cfg.defaulted or ()) or mine == _DEFAULTS[name]:  # not given (or given as the default): the checkpoint's
            setattr(cfg, name, theirs)
        elif name == "epochs" and mine > theirs:
            spec = spec.replace(epochs=mine)
            applied.append(f"{flag} {mine} (the checkpoint's job had {theirs})")
        elif flag == "--no-standardize":
            contradicting.append(f"{flag} (the checkpoint standardizes)")
        else:
            shown = "" if flag.startswith("the ") else f" {mine}"
            contradicting.append(f"{flag}{shown} (the checkpoint has {theirs})")
    # The checkpoint's shards hold its tables as they were placed: a resume goes on as many.
    if cfg.min_shard_bytes is not None and min_shard_bytes(cfg) != spec.min_shard_bytes:
        contradicting.append(f"--min-shard-bytes {cfg.min_shard_bytes} (the checkpoint has {spec.min_shard_bytes})")
    if contradicting:
        n = len(contradicting)
        raise UsageError(
            f"--resume continues the checkpoint's job with its settings, and {', '.join(contradicting)} "
            f"contradict{'s' if n == 1 else ''} them: leave {'it' if n == 1 else 'them'} out"
        )
    every = spec.checkpoint or {}
    theirs_pace = (int(every.get("every") or 0), float(every.get("every_s") or 0.0))
    mine_pace = (cfg.checkpoint_every, cfg.checkpoint_every_s)
    if mine_pace == (0, 0.0):
        cfg.checkpoint_every, cfg.checkpoint_every_s = theirs_pace
    elif mine_pace != theirs_pace:
        spec = spec.replace(checkpoint={**every, "every": cfg.checkpoint_every, "every_s": cfg.checkpoint_every_s})
        applied.append(f"--checkpoint-every {_pace(*mine_pace)} (the checkpoint's job had {_pace(*theirs_pace)})")
    return spec, applied


def _pace(every: int, every_s: float) -> str:
    return f"{every_s:g}s" if every_s else str(every) if every else "none"


def plan_validation(cfg: TrainConfig, schema: csvfile.CsvSchema | None) -> dict[str, Any]:
    """The --validate file, split over the workers like the training file."""
    assert cfg.validate is not None
    if schema is None:
        raise PsctlError("--validate takes a CSV of the training file's columns; for other inputs use --test-split")
    if parquet.is_parquet(cfg.validate, cfg.format):
        dataset = parquet.describe(cfg.validate)
        val_schema = parquet.read_schema(dataset, cfg.label, cfg.drop)
        extra = dataset.to_data(val_schema)
        partitions = parquet.plan_partitions(dataset, cfg.workers)
        size = dataset.size
    else:
        val_schema = csvfile.read_schema(cfg.validate, cfg.label, cfg.drop, cfg.has_header, schema.delimiter)
        extra = {"schema": val_schema.to_dict()}
        partitions = csvfile.plan_partitions(cfg.validate, cfg.workers, cfg.has_header)
        size = storage.stored_size(cfg.validate)
    if val_schema.columns != schema.columns:
        raise DataError(f"'{cfg.validate}' does not have the training file's columns")
    return {
        "path": storage.absolute(cfg.validate),
        "size": size,
        **extra,
        "partitions": [p.to_dict() for p in partitions],
    }


class _Run:
    """What the driver learns while a job runs: the statistics, the model, where its tables live."""

    def __init__(self, cfg: TrainConfig, model_cls: type[Model], spec: JobSpec, control: Session):
        self.cfg, self.model_cls, self.spec, self.control = cfg, model_cls, spec, control
        self.n_features: int | None = spec.n_features
        self.stats: dict[str, Any] | None = None
        self.model: Model | None = None
        self.placed: dict[str, Any] | None = None  # TABLES reply: shards and ranges
        self.job_id = ""
        self.client: ShardClient | None = None  # the driver's own connections to the shards
        self.best_loss, self.best_epoch, self.since_best = float("inf"), -1, 0
        self.best_params: dict[str, np.ndarray] | None = None
        self.best_train_loss, self.flat_epochs = float("inf"), 0  # cfg.converge
        self.stopping = False
        self.data_params: dict[str, Any] = {}  # what the model took from the statistics pass
        self.resumed_classes: list[str] | None = None  # --resume-from: the kept model's classes

    def make_model(self, classes: list[str]) -> Model:
        assert self.n_features is not None
        return self.model_cls(self.n_features, classes, l2=self.spec.l2, **self.spec.model_params, **self.data_params)

    async def on_stats(self, event: dict[str, Any]) -> None:
        """Labels are known: name the classes, size the tables, have the shards create them."""
        self.stats = event
        self.n_features = formats.n_features_of(self.spec.data, event["stats"]) or self.n_features
        classes = classes_for(self.model_cls.task, event["labels"], self.model_cls.kind)
        if self.resumed_classes is not None and classes != self.resumed_classes:
            raise PsctlError(f"kept model {self.cfg.resume_from} predicts the classes {self.resumed_classes}; "
                             f"this data has {classes}")
        self.data_params = self.model_cls.data_params(event)
        self.model = self.make_model(classes)
        tables = [t.to_dict() for t in self.model.tables()]
        self.placed = (await self.control.request(MsgType.TABLES, {"tables": tables}, timeout_s=SUBMIT_TIMEOUT_S)).body

    def with_metrics(self, event: dict[str, Any]) -> dict[str, Any]:
        task = self.model_cls.task
        if "sums" in event:
            event = {**event, "metrics": summarize(task, event["sums"], event["samples"])}
        if "val" in event:
            val = event["val"]
            event = {**event, "val": {**val, "metrics": summarize(task, val["sums"], val["samples"])}}
        return event

    async def on_epoch(self, event: dict[str, Any], on_event: Callable[[dict[str, Any]], None]) -> None:
        """Track the best held-out loss; keep those weights; stop after --patience epochs without
        better. Or, with ``cfg.converge``, stop once the training loss stops falling."""
        if self.stopping:
            return
        if self.cfg.converge:
            self._check_converged(event, on_event)
        if "val" not in event or self.stopping:
            return
        loss = event["val"]["loss"]
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.since_best = loss, event["epoch"], 0
            if self.cfg.patience:
                self.best_params = await self.pull_all()
        else:
            self.since_best += 1
            if self.cfg.patience and self.since_best >= self.cfg.patience:
                self.stopping = True
                self.control.notify(MsgType.STOP, {})
                on_event({"kind": "early_stop", "epoch": event["epoch"], "best_epoch": self.best_epoch})

    def _check_converged(self, event: dict[str, Any], on_event: Callable[[dict[str, Any]], None]) -> None:
        loss = float(event["loss"])
        self.flat_epochs = self.flat_epochs + 1 if loss > self.best_train_loss - CONVERGE_TOL else 0
        self.best_train_loss = min(self.best_train_loss, loss)
        if self.flat_epochs >= CONVERGE_EPOCHS and event["epoch"] < self.spec.epochs - 1:
            self.stopping = True
            self.control.notify(MsgType.STOP, {})
            on_event({"kind": "converged", "epoch": event["epoch"], "epochs": CONVERGE_EPOCHS, "tol": CONVERGE_TOL})

    async def _shards(self) -> ShardClient:
        """The driver's own connections to the shards (opened once)."""
        assert self.placed is not None and self.model is not None
        if self.client is None:
            self.client = await ShardClient.connect(
                self.placed["shards"], self.placed["ranges"], self.job_id, {"role": "driver"},
                max_frame_bytes=self.cfg.max_frame_bytes, hashed=[t.name for t in self.model.tables() if t.sparse],
                security=self.cfg.security,
                # A shard builds the dump in one go, answering no ping meanwhile: half the bound, twice.
                answer_timeout_s=FINAL_PULL_TIMEOUT_S / 2,
            )
        return self.client

    async def pull_all(self) -> dict[str, np.ndarray]:
        """The model's arrays as the shards hold them now: a sparse table as ``name`` values plus
        ``name.keys``; optimizer state as ``name.opt.<state>`` with --save-optimizer-state."""
        assert self.model is not None
        client = await self._shards()
        tables = self.model.tables()
        dumped = await client.dump([t.name for t in tables], self.cfg.save_optimizer_state)
        params: dict[str, np.ndarray] = {}
        for t in tables:
            keys, values, state = dumped[t.name]
            params[t.name] = values
            if t.sparse:
                params[f"{t.name}.keys"] = keys
            params.update({f"{t.name}.opt.{name}": arr for name, arr in state.items()})
        return params

    async def shard_status(self) -> list[dict[str, Any]]:
        """Each shard's figures (keys, memory, rows behind all pushes)."""
        return await (await self._shards()).status(timeout_s=SUBMIT_TIMEOUT_S)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


async def train(
    cfg: TrainConfig, on_event: Callable[[dict[str, Any]], None] = lambda e: None, stop: StopRequest | None = None,
    write_data: Callable[[], None] | None = None,
) -> TrainResult:
    """Run one training job end to end and write the model file (``stop``: see :class:`StopRequest`).

    ``write_data`` (in-memory input): fills the data file, which already has its final size,
    in a thread while the cluster starts; the job is submitted once it is done."""
    writing = asyncio.ensure_future(asyncio.to_thread(write_data)) if write_data is not None else None
    try:
        return await _train(cfg, on_event, stop, writing)
    finally:
        if writing is not None and not writing.done():
            await asyncio.wait({writing})  # a thread cannot be stopped: its file is not removed under it


async def _train(
    cfg: TrainConfig, on_event: Callable[[dict[str, Any]], None], stop: StopRequest | None, writing: asyncio.Future[None] | None
) -> TrainResult:
    model_cls = model_class(cfg.model)
    cfg.check()  # what does not depend on the defaults; again once they are filled in
    check_out_path(cfg.out)
    delimiter = csvfile.check_delimiter(cfg.delimiter)
    dataset: parquet.Dataset | None = None
    if cfg.arrays is not None:
        source, partitions = _arrays_source(cfg, model_cls)
    elif cfg.format != "libsvm" and parquet.is_parquet(cfg.data, cfg.format):
        dataset = await asyncio.to_thread(parquet.describe, cfg.data)
        source = _parquet_source(cfg, model_cls, dataset)
    elif model_cls.data_format == "ratings":
        schema = read_schema(cfg, model_cls)
        source = formats.Source(
            "ratings", {"schema": schema.to_dict(), "format": "ratings"}, schema, len(schema.feature_indices), cfg.has_header
        )
    else:
        source = formats.plan_source(
            cfg.data, cfg.format, label=cfg.label, drop=cfg.drop, has_header=cfg.has_header, index_base=cfg.index_base,
            n_features=cfg.n_features, hash_bits=cfg.hash_bits, categorical=cfg.categorical, delimiter=delimiter,
        )
    if source.sparse and "sparse" not in model_cls.params:
        raise PsctlError(f"model {cfg.model} does not take sparse input ({source.format})")
    resolve_defaults(cfg, model_cls, sparse=source.sparse)  # the defaults depend on the input's kind
    cfg.check()
    if cfg.arrays is None:
        partitions = await asyncio.to_thread(_plan, cfg, source, dataset, cfg.workers)
    spec = build_spec(cfg, source, partitions)
    resumed_classes = await _check_resumable(cfg, source) if cfg.resume_from is not None else None
    # bad parameters fail here, not on the cluster
    model_cls(source.n_features or 1, ["0", "1"], l2=spec.l2, **spec.model_params)
    if cfg.validate:
        spec = spec.replace(validation=await asyncio.to_thread(plan_validation, cfg, source.schema))
    if cfg.resume:
        workers = cfg.workers
        applied, spec = resume_spec(cfg, spec)
        if cfg.workers != workers:  # the checkpoint's worker count: its partitions (for the figures)
            partitions = await asyncio.to_thread(_plan, cfg, source, dataset, cfg.workers)
        on_event({"kind": "resuming", "clock": spec.resume_clock, "dir": cfg.resume, "epochs": spec.epochs, "applied": applied})
    steps = cfg.epochs * steps_per_job_epoch(partitions, cfg.batch_size)
    on_event(
        {"kind": "planned", "rows": sum(p.n_rows for p in partitions), "features": spec.n_features,
         "workers": cfg.workers, "steps": steps, "epochs": cfg.epochs, "converge": cfg.converge}
    )
    started = time.monotonic()
    if cfg.server is None:  # every process of the cluster is ours: a fresh secret unless one was given
        cfg = replace(cfg, security=embedded_security(cfg.security))
    async with LocalCluster(max_frame_bytes=cfg.max_frame_bytes, security=cfg.security, in_process=cfg.in_process) as cluster:
        if cfg.server is None:
            coordinator = await cluster.start_coordinator()
            shards_up = asyncio.ensure_future(cluster.start_shards(cfg.shards, coordinator))
        else:
            coordinator = cfg.server
            shards_up = None
        control = await Session.open(
            coordinator, max_frame_bytes=cfg.max_frame_bytes, security=cfg.security, what="psctl server",
            decode=lambda msg: vocab.attach(msg.body, msg.arrays),
        )
        session = _Run(cfg, model_cls, spec, control)
        session.resumed_classes = resumed_classes
        try:
            n_local = cfg.workers if cfg.local_workers is None else cfg.local_workers
            await cluster.start_workers(n_local, coordinator, cfg.model if ":" in cfg.model else None)
            if shards_up is not None:
                await shards_up
            on_event({"kind": "cluster_up", "seconds": time.monotonic() - started, "address": coordinator})
            if writing is not None:
                await writing  # the workers read the data once the job is submitted
            reply = await control.submit(spec.to_wire(), timeout_s=SUBMIT_TIMEOUT_S)
            job_id = session.job_id = reply["job_id"]
            on_event({"kind": "submitted", "job_id": job_id, "shards": reply["shards"]})
            events, done = await _follow(cluster, coordinator, control, session, on_event, stop)
            assert session.model is not None
            params = session.best_params if session.best_params is not None else await session.pull_all()
            shards = await session.shard_status()
            done["rows_trained"] = min((int(s.get("samples", 0)) for s in shards), default=0)
            meta = _model_meta(cfg, source, session, done, time.monotonic() - started)
            meta["history"] = history.from_events(events, session.model_cls.task)
            epochs_run = len(meta["history"]["epochs"]) or cfg.epochs  # fewer when stopped early
            meta["metrics"]["traffic"] = traffic_per_epoch(session.model, partitions, cfg, done, epochs_run)
            meta["metrics"].update(table_figures(session.model.tables(), params, shards, done, spec))
            kinds, arrays = vocab_file_parts(session.stats)
            if kinds:
                meta["vocab"] = kinds
            kept_error = await _keep(cfg, control, job_id, meta, arrays, on_event) if cfg.keep else None
            control.notify(MsgType.JOB_END, {"job_id": job_id})
        finally:
            session.close()
            control.close()
    params.update(arrays)
    modelfile.save_model(cfg.out, params, meta)
    if kept_error is not None:
        raise JobError(f"the model was written to {cfg.out}, but keeping it on the server failed: {kept_error}")
    return TrainResult(cfg.out, meta["metrics"], meta, events)


async def _check_resumable(cfg: TrainConfig, source: formats.Source) -> list[str] | None:
    """A kept model can be trained further on this data: the same model, input and columns, and
    nothing the new data would change under its weights (standardization, id vocabularies)."""
    from psctl.apps import kept

    assert cfg.server is not None and cfg.resume_from is not None
    (entry,) = await kept.list_models(cfg.server, cfg.resume_from, cfg.security)
    meta, name = entry["meta"], cfg.resume_from
    if meta.get("kind") != cfg.model:
        raise UsageError(f"kept model {name} is a {meta.get('kind')} model, not {cfg.model}")
    if meta.get("vocab") or meta.get("data_format") == "ratings":
        raise UsageError(f"kept model {name} maps its training file's ids to rows; --resume-from is for models without id vocabularies")
    if meta.get("standardize") or (source.format == "csv" and cfg.standardize):
        raise UsageError(f"--resume-from {name}: other data would standardize the features differently under the kept weights; "
                         "train both jobs with --no-standardize")
    trained = meta.get("input") or {}
    now = {"format": source.format, **{k: source.data[k] for k in ("hash_bits", "categorical") if k in source.data}}
    if any(trained.get(k) != v for k, v in now.items()):
        raise UsageError(f"kept model {name} reads {trained}; this data is read as {now}")
    columns = list(source.schema.feature_names) if source.schema else []
    if columns != list(meta.get("feature_names") or []):
        raise UsageError(f"kept model {name} was trained on the columns {meta.get('feature_names')}; this data has {columns}")
    return meta.get("classes")


KEEP_TIMEOUT_S = 120.0
MAX_KEPT_META_BYTES = 768 * 1024  # under the 1 MiB control body, with room for the MODELS reply's other fields  # the shards write their parts to the checkpoint folder before they answer


async def _keep(
    cfg: TrainConfig, control: Session, job_id: str, meta: dict[str, Any], extras: dict[str, np.ndarray],
    on_event: Callable[[dict[str, Any]], None],
) -> str | None:
    """Leave the job's tables on the shards as the kept model ``cfg.keep``; why not (one sentence), or None."""
    names = sorted(extras)
    body = {"job_id": job_id, "meta": json_safe(meta), "trained_at": time.time(), "extras": names}
    size = len(json.dumps(body).encode())
    if size > MAX_KEPT_META_BYTES:  # the coordinator holds the meta and sends it to readers in one control body
        return (f"the model's meta (standardization, columns, metrics) takes {size} bytes as JSON; "
                f"a kept model's may take at most {MAX_KEPT_META_BYTES}")
    try:
        reply = await control.request(MsgType.MODEL_KEEP, body, [extras[n] for n in names], timeout_s=KEEP_TIMEOUT_S)
    except (net.RemoteError, net.ConnectionLost, JobError) as exc:
        return str(exc)
    on_event({"kind": "kept", "name": reply.body["name"], "version": reply.body["version"], "shards": reply.body["shards"]})
    return None


def _plan(cfg: TrainConfig, source: formats.Source, dataset: parquet.Dataset | None, n_parts: int) -> list[csvfile.Partition]:
    """The input's partitions: row ranges of a Parquet dataset, byte ranges of a text file."""
    if dataset is not None:
        return parquet.plan_partitions(dataset, n_parts)
    return csvfile.plan_partitions(cfg.data, n_parts, source.has_header)


def _parquet_source(cfg: TrainConfig, model_cls: type[Model], dataset: parquet.Dataset) -> formats.Source:
    """Parquet input: numeric feature columns read as a CSV of the same columns would be."""
    if model_cls.data_format == "ratings" or cfg.categorical or cfg.hash_bits is not None:
        raise UsageError("Parquet input is read as numeric feature columns and a label; mf ratings and "
                         "--categorical/--hash-bits take CSV input")
    if cfg.delimiter is not None or not cfg.has_header:
        raise UsageError("--delimiter and --no-header are for CSV input; a Parquet file names its columns")
    if cfg.index_base is not None or cfg.n_features is not None:
        raise UsageError("--index-base and --n-features are for LIBSVM input")
    schema = parquet.read_schema(dataset, cfg.label, cfg.drop)
    return formats.Source("csv", dataset.to_data(schema), schema, len(schema.feature_indices), True)


def _arrays_source(cfg: TrainConfig, model_cls: type[Model]) -> tuple[formats.Source, list[csvfile.Partition]]:
    """In-memory input (``cfg.arrays``): read as a CSV of the same columns would be, by row ranges."""
    assert cfg.arrays is not None
    fmt = cfg.arrays["format"]
    if (fmt == "ratings") != (model_cls.data_format == "ratings"):
        raise DataError(f"model {cfg.model} does not train on in-memory {fmt} rows")
    schema = csvfile.CsvSchema.from_dict(cfg.arrays["schema"]) if cfg.arrays.get("schema") else None
    if fmt == "libsvm":  # a sparse matrix: its columns are the features
        n_features = int(cfg.arrays["n_features"])
    elif fmt == "hashed_csv":
        n_features = 2 ** int(cfg.arrays["hash_bits"]) - 1
    else:
        assert schema is not None
        n_features = len(schema.feature_indices)
    source = formats.Source(fmt, dict(cfg.arrays), schema, n_features, True)
    if arrays.is_per_worker(cfg.arrays):  # the partitions the workers hold
        if len(cfg.arrays["partition_rows"]) != cfg.workers:
            raise UsageError(f"the in-memory data has {len(cfg.arrays['partition_rows'])} partitions for {cfg.workers} workers")
        return source, arrays.partitions_of(cfg.arrays["partition_rows"])
    return source, arrays.plan_partitions(int(cfg.arrays["rows"]), cfg.workers)


def _driver_event(event: dict[str, Any], events: list[dict[str, Any]], on_event: Callable[[dict[str, Any]], None],
                  followed: float) -> None:
    """An event of the driver's own (early_stop, converged): shown, and kept in the history."""
    event = {**event, "since_submit_s": time.monotonic() - followed}
    events.append(event)
    on_event(event)


async def _follow(
    cluster: LocalCluster,
    coordinator: str,
    control: Session,
    session: _Run,
    on_event: Callable[[dict[str, Any]], None],
    stop: StopRequest | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Relay events until the job is done or failed.

    A local worker process that dies is fine once the coordinator reports it
    lost: a new process replaces it (up to --max-restarts) and resumes its
    partition where the shards stopped hearing from it. One that dies
    unexplained (say, before it ever registered) fails the job after a short
    grace, instead of a hang.

    A stop request (Ctrl-C) with a checkpoint folder asks the coordinator to HALT:
    the job ends at one clock with a final checkpoint, and this raises Interrupted.
    """
    cfg = session.cfg
    restarts = 0
    events: list[dict[str, Any]] = []
    followed = time.monotonic()  # the history's clock: seconds since the job was submitted
    exits = {asyncio.ensure_future(c.proc.wait()): c for c in cluster.workers()}
    dead: list[Any] = []
    lost = 0
    joined: set[int] = set()  # pids of the worker processes that registered for the job
    deadline: float | None = None
    get: asyncio.Future[dict[str, Any]] | None = None
    stopping = asyncio.ensure_future(stop.requested.wait()) if stop is not None else None
    halt: asyncio.Future[Message] | None = None
    if stop is not None:
        stop.graceful = bool(session.spec.checkpoint)
    try:
        while True:
            get = get or asyncio.ensure_future(_next_event(control))
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            waits = {get, *exits, *(f for f in (stopping, halt) if f is not None and not f.done())}
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if stopping is not None and stopping.done():
                stopping = None
                on_event({"kind": "halting", "dir": session.spec.checkpoint_dir})
                halt = asyncio.ensure_future(
                    session.control.request(MsgType.HALT, {"job_id": session.job_id}, timeout_s=HALT_TIMEOUT_S)
                )
            if halt is not None and halt.done():
                try:
                    clock = halt.result().body.get("clock")
                except PsctlError as exc:
                    raise Interrupted(f"interrupted without a final checkpoint ({exc}); {_last_checkpoint(session.spec)}") from None
                if clock is not None:
                    raise Interrupted(_halted(session.spec, clock, None))
                halt = None  # no worker was still training: the job finishes as usual
            for fut in [f for f in exits if f.done()]:
                child = exits.pop(fut)
                if fut.result() != 0:
                    dead.append(child)
                    deadline = deadline or time.monotonic() + FAILED_EVENT_GRACE_S
            if get.done():
                try:
                    event, get = get.result(), None
                except JobError as exc:  # SessionClosed: lost the connection to the psctl server; or it went silent
                    raise JobError(f"{exc}{_resume_hint(session.spec, events)}") from exc
                lost += event["kind"] == "worker_lost"
                restarted: dict[str, Any] | None = None
                if event["kind"] == "worker_joined" and isinstance(event.get("pid"), int):
                    joined.add(event["pid"])
                if event["kind"] == "worker_lost" and restarts < cfg.max_restarts and cluster.workers():
                    restarts += 1
                    (child,) = await cluster.start_workers(1, coordinator, cfg.model if ":" in cfg.model else None)
                    exits[asyncio.ensure_future(child.proc.wait())] = child
                    restarted = {"kind": "worker_restarted", "replacing": event["worker_id"], "restarts": restarts}
                    on_event(restarted)
                if event["kind"] == "shard_lost" and cfg.server is None:
                    # The embedded cluster started the shard, so it starts the replacement.
                    await cluster.start_shards(1, coordinator)
                if event["kind"] == "shard_recovered" and session.placed is not None:
                    session.placed["shards"] = event["shards"]
                    session.close()  # its connections went to the lost shard's address
                    session.client = None
                if event["kind"] == "stats":
                    await session.on_stats(event)
                    assert session.placed is not None
                    tables = session.model.tables()
                    on_event({"kind": "placed", "shards": len(session.placed["shards"]), "sparse": any(t.sparse for t in tables),
                              "bytes": sum(table_bytes(t) for t in tables)})  # fmt: skip
                event = session.with_metrics(event)
                if event["kind"] != "progress":
                    event["since_submit_s"] = time.monotonic() - followed
                    events.append(event)
                if restarted is not None:  # the history has the loss first, then the new process
                    events.append({**restarted, "since_submit_s": time.monotonic() - followed})
                    restarted = None
                on_event(event)
                if event["kind"] == "epoch":
                    await session.on_epoch(event, lambda e: _driver_event(e, events, on_event, followed))
                    if session.spec.hold_epochs:  # the workers held at its end go on
                        control.notify(MsgType.EPOCH_SEEN, {"epoch": event["epoch"]})
                if event["kind"] == "halted":
                    raise Interrupted(_halted(session.spec, event["clock"], None if halt is not None else event["reason"]))
                if event["kind"] == "failed":
                    raise JobError(f"training failed: {event['reason']}{_first_exit(event['reason'], cluster.workers())}")
                if event["kind"] == "done":
                    return events, event
            if len(dead) <= lost:
                deadline = None
            elif deadline is not None and time.monotonic() >= deadline:
                # A process that died before it registered (killed as it started) holds no slot:
                # the coordinator will not report it lost, so start another in its place.
                unregistered = [c for c in dead if c.proc.pid not in joined]
                if unregistered and restarts < cfg.max_restarts:
                    dead.remove(unregistered[0])
                    restarts += 1
                    (child,) = await cluster.start_workers(1, coordinator, cfg.model if ":" in cfg.model else None)
                    exits[asyncio.ensure_future(child.proc.wait())] = child
                    restarted = {"kind": "worker_restarted", "replacing": None, "process": unregistered[0].index, "restarts": restarts}
                    events.append({**restarted, "since_submit_s": time.monotonic() - followed})
                    on_event(restarted)
                    deadline = time.monotonic() + FAILED_EVENT_GRACE_S if len(dead) > lost else None
                    continue
                child = dead[lost]
                last = child.log_tail().splitlines()[-1:] or ["no output"]
                raise JobError(f"worker process {child.index} exited before the job finished: {last[0]}")
    finally:
        if stop is not None:
            stop.graceful = False
        for fut in [*exits, get, stopping, halt]:
            if fut is not None:
                fut.cancel()


def _first_exit(reason: str, workers: list[Child]) -> str:
    """When the job failed because its workers were lost, what the first of the embedded
    cluster's workers that exited with an error said, as the end of the sentence: the cause
    behind "every worker was lost". "" for any other failure (a lost shard: the workers only
    echo the coordinator's reason) or when no worker process failed."""
    if not reason.startswith("every worker was lost"):
        return ""
    for child in workers:
        if child.proc.returncode not in (None, 0):
            last = child.log_tail().splitlines()[-1:] or ["no output"]
            return f" (worker process {child.index} exited with code {child.proc.returncode}: {last[0]})"
    return ""


async def _next_event(control: Session) -> dict[str, Any]:
    """The server's next event. Each wait is bounded: after EVENT_SILENCE_S without one (a
    long statistics pass, a slow epoch) the server must answer a PING, or this raises JobError."""
    while True:
        try:
            return await control.next_event(timeout_s=EVENT_SILENCE_S)
        except EventTimeout:
            pass
        try:
            await control.request(MsgType.PING, timeout_s=SERVER_ANSWER_TIMEOUT_S)
        except net.ConnectionLost:
            if not control.is_open:
                continue  # closed meanwhile: the next wait hands out what came before, then SessionClosed
            raise JobError(
                f"the psctl server sent nothing for {EVENT_SILENCE_S:g} s and did not answer a ping "
                f"within {SERVER_ANSWER_TIMEOUT_S:g} s"
            ) from None


def _halted(spec: JobSpec, clock: int, by_server: str | None) -> str:
    """What a stopped job left behind, and how to go on."""
    folder = spec.checkpoint_dir
    who = f"the psctl server stopped the job ({by_server})" if by_server else "interrupted"
    return (
        f"{who}: every worker stopped at clock {clock} and the shards saved a final checkpoint in '{folder}'; "
        f"continue with the same command and --resume {folder}"
    )


def _resume_hint(spec: JobSpec, events: list[dict[str, Any]]) -> str:
    """What a job that lost its server can resume from: the manifest on disk (this host may
    not see the folder: then the last checkpoint the server reported), and the command."""
    folder = spec.checkpoint_dir
    if not folder:
        return ""
    try:
        clock = checkpoint.read_manifest(folder)["clock"]
    except PsctlError:
        clock = next((e["clock"] for e in reversed(events) if e.get("kind") == "checkpoint"), None)
    if clock is None:
        return f"; '{folder}' holds no checkpoint yet"
    return f"; the last checkpoint in '{folder}' is at clock {clock}: continue with the same command and --resume {folder}"


def _last_checkpoint(spec: JobSpec) -> str:
    folder = spec.checkpoint_dir
    try:
        return f"the last checkpoint in '{folder}' is at clock {checkpoint.read_manifest(folder)['clock']}"
    except PsctlError:
        return f"'{folder}' holds no complete checkpoint"


def table_figures(
    tables: list[TableSpec], params: dict[str, np.ndarray], shards: list[dict[str, Any]], done: dict[str, Any], spec: JobSpec
) -> dict[str, Any]:
    """Keys stored, non-zero weights, shard memory and traffic per epoch versus a dense model
    of the same key space (which would pull and push every table whole at each step)."""
    steps = steps_per_job_epoch([csvfile.Partition.from_dict(p) for p in spec.partitions], spec.batch_size)
    dense_step_bytes = sum(t.rows * t.dim * np.dtype(t.dtype).itemsize for t in tables)
    return {
        "key_space": sum(t.rows for t in tables),
        "unique_keys": sum(len(params[t.name]) for t in tables),
        "nonzero_weights": sum(int(np.count_nonzero(params[t.name])) for t in tables),
        "shard_keys": [s.get("keys", 0) for s in shards],
        "shard_table_bytes": [s.get("bytes", 0) for s in shards],
        "shard_rss_bytes": [s.get("rss_bytes", 0) for s in shards],
        "shard_peak_rss_bytes": [s.get("peak_rss_bytes", 0) for s in shards],
        "bytes_pulled_per_epoch": done.get("bytes_pulled", 0) / max(spec.epochs, 1),
        "bytes_pushed_per_epoch": done.get("bytes_pushed", 0) / max(spec.epochs, 1),
        "dense_bytes_per_epoch": steps * dense_step_bytes,
    }


def _model_meta(cfg: TrainConfig, source: formats.Source, session: _Run, done: dict[str, Any], seconds: float) -> dict[str, Any]:
    assert session.model is not None and session.stats is not None
    schema = source.schema
    meta: dict[str, Any] = {
        "kind": cfg.model,
        "task": session.model_cls.task,
        "data_format": session.model_cls.data_format,
        "model_params": {**session.spec.model_params, **session.data_params},
        "n_features": session.n_features,
        "input": formats.meta_of(session.spec.data, session.stats["stats"]) if source.sparse else {"format": source.format},
        "optimizer": session.spec.optimizer,
        "schema": schema.to_dict() if schema else None,
        "feature_names": list(schema.feature_names) if schema else [],
        "label": schema.columns[schema.label_index] if schema and schema.label_index is not None else None,
        "classes": session.model.classes,
        "standardize": None,
        "training": {
            k: v for k, v in asdict(cfg).items() if k not in ("out", "max_frame_bytes", "local_workers", "security", "arrays")
        } | ({"data": "(in memory)"} if cfg.arrays is not None else {}),
        "metrics": {
            "train_loss": done["loss"],
            **{f"train_{k}": v for k, v in done["metrics"].items()},
            "samples": done["samples"],
            "lost_workers": done["lost_workers"],
            "rows_trained": done.get("rows_trained", 0),
            "bytes_pulled": done.get("bytes_pulled", 0),
            "bytes_pushed": done.get("bytes_pushed", 0),
            "seconds": seconds,
            "worker_memory": done.get("worker_memory", []),
        },
    }
    if session.best_epoch >= 0:
        meta["metrics"]["best_epoch"] = session.best_epoch
        meta["metrics"]["best_val_loss"] = session.best_loss
        meta["metrics"]["weights_from_epoch"] = session.best_epoch if session.best_params is not None else "last"

    if source.format == "csv" and cfg.standardize and session.stats["stats"]:
        mean, std = csvfile.merge_stats(session.stats["stats"])
        meta["standardize"] = {"mean": np.asarray(mean).tolist(), "std": np.asarray(std).tolist()}
    return meta


def steps_per_job_epoch(partitions: list[csvfile.Partition], batch_size: int) -> int:
    """Steps (pushes) of all workers together in one epoch."""
    largest = max(p.n_rows for p in partitions)
    return sum(epoch_steps(p.n_rows, batch_size, largest) for p in partitions)


def read_schema(cfg: TrainConfig, model_cls: type[Model]) -> csvfile.CsvSchema:
    """The columns a job reads, in its model's data format."""
    if model_cls.data_format == "ratings":
        if cfg.label is not None or cfg.drop:
            raise PsctlError(f"{model_cls.kind} reads --user-col, --item-col and --rating-col; --label and --drop are for feature CSVs")
        return ratings.read_schema(cfg.data, cfg.user_col, cfg.item_col, cfg.rating_col, cfg.has_header,
                                   delimiter=csvfile.check_delimiter(cfg.delimiter))
    return csvfile.read_schema(cfg.data, cfg.label, cfg.drop, cfg.has_header, csvfile.check_delimiter(cfg.delimiter))


def traffic_per_epoch(
    model: Model, partitions: list[csvfile.Partition], cfg: TrainConfig, done: dict[str, Any], epochs: int
) -> dict[str, float]:
    """Bytes pulled and pushed per epoch (all workers, over the ``epochs`` the job ran), and
    what pulling whole tables at every step would cost. Pulled bytes count parameter values
    received; pushed bytes count keys and gradient values sent."""
    steps = steps_per_job_epoch(partitions, cfg.batch_size)
    table_bytes = sum(t.rows * t.dim * np.dtype(t.dtype).itemsize for t in model.tables())
    return {
        "pulled_per_epoch": done.get("bytes_pulled", 0) / max(epochs, 1),
        "pushed_per_epoch": done.get("bytes_pushed", 0) / max(epochs, 1),
        "dense_per_epoch": float(steps * table_bytes),
        "steps_per_epoch": steps,
    }


def vocab_file_parts(stats: dict[str, Any] | None) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The id vocabularies for the model file: their kinds (meta ``vocab``) and
    their arrays (``vocab_<name>``: int64 ids or a UTF-8 text blob)."""
    vocabs: dict[str, vocab.Vocab] = (stats or {}).get("vocab", {})
    return {n: v.kind for n, v in vocabs.items()}, {f"vocab_{n}": v.to_array() for n, v in vocabs.items()}


def check_out_path(out: str) -> None:
    if storage.is_url(out):  # written through fsspec at the end (files/modelfile.py)
        return
    if Path(out).is_dir():
        raise UsageError(f"--out names the folder '{out}'; give the model file's path, e.g. {Path(out) / 'model.npz'}")
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise DataError(f"cannot write the model to '{out}': folder '{parent}' does not exist")


def result_summary(result: TrainResult) -> dict[str, Any]:
    """The result as plain JSON values (``psctl train --json``): what was trained, how well, where it went."""
    m, training = result.metrics, result.meta.get("training", {})
    checkpoints = [e["clock"] for e in result.events if e.get("kind") == "checkpoint"]
    return json_safe({
        "model_path": result.model_path,
        "model": result.meta.get("kind"),
        "mode": training.get("mode"),
        "staleness": training.get("staleness"),
        "workers": training.get("workers"),
        "epochs": training.get("epochs"),
        "rows_trained": m.get("rows_trained"),
        "samples": m.get("samples"),
        "seconds": m.get("seconds"),
        "lost_workers": m.get("lost_workers"),
        "last_checkpoint_clock": checkpoints[-1] if checkpoints else None,
        "checkpoint_dir": training.get("checkpoint_dir"),
        "resumed_from": training.get("resume"),
        "metrics": m,
    })  # fmt: skip

