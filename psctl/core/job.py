"""The job spec: what the driver submits and the coordinator hands every worker, typed.

One place for each default. ``to_wire()`` gives the JSON body that travels in SUBMIT,
REGISTER_WORKER's reply and the checkpoint manifest; ``from_wire(body)`` checks it and
refuses a bad field with one sentence (``RequestError``). Nested parts that belong to
another layer (the data/format spec, model parameters, the optimizer, partitions) stay
dicts: those layers validate them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from psctl.core.consistency import staleness_for
from psctl.core.tables import MIN_SHARD_BYTES
from psctl.errors import RequestError

DEFAULT_HEARTBEAT_INTERVAL_S = 0.5
DEFAULT_FAILURE_TIMEOUT_S = 5.0
DEFAULT_EPOCHS = 1
DEFAULT_BATCH_SIZE = 32
PARTITION_MODES = ("auto", "memory", "stream")


@dataclass(frozen=True)
class JobSpec:
    """A training job as the coordinator and workers see it."""

    model: str
    n_workers: int
    mode: str
    partitions: tuple[dict[str, Any], ...]  # one per worker: a byte range of the data file (csvfile.Partition)
    staleness: int = 0
    model_params: dict[str, Any] = field(default_factory=dict)
    n_features: int | None = None  # None for LIBSVM until the statistics pass
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    l2: float = 0.0
    seed: int = 0
    standardize: bool = True
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "sgd", "params": {}})
    min_shards: int = 1
    data: dict[str, Any] = field(default_factory=dict)  # path, size and the format's own fields
    test_split: float = 0.0
    checkpoint: dict[str, Any] | None = None  # {"dir", "every", "every_s"}
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    failure_timeout_s: float = DEFAULT_FAILURE_TIMEOUT_S
    # How long a lost worker's partition waits for a new worker before a survivor takes it
    # over; None: the failure timeout.
    takeover_after_s: float | None = None
    validation: dict[str, Any] | None = None  # a held-out file's partitions
    resume: dict[str, Any] | None = None  # {"dir", "clock"}: continue from that checkpoint
    # Early stopping keeps the best epoch's weights: each worker holds at an epoch's end until
    # the driver has read that epoch's report (and pulled the weights if they are the best).
    hold_epochs: bool = False
    # Keep the trained tables on the shards under a name when the job ends (core/kept.py):
    # {"name": NAME, "replace": bool}.
    keep: dict[str, Any] | None = None
    # Train a kept model further, in place (its tables are this job's): {"name": NAME}.
    from_kept: dict[str, Any] | None = None
    # How a worker holds its partition (psctl/data/stream.py): "memory" keeps it whole in its
    # compact form, "stream" reads it from the file every epoch, "auto" chooses by the budget.
    partition_mode: str = "auto"
    # Each worker's memory budget for its rows; None: the worker's default (data/stream.py).
    worker_memory_bytes: int | None = None
    # The job's dense tables are split over one shard per this many bytes (at least one,
    # at most every registered shard); 0: over every shard (core/tables.py, shards_needed).
    min_shard_bytes: int = MIN_SHARD_BYTES

    @property
    def takeover_grace_s(self) -> float:
        return self.failure_timeout_s if self.takeover_after_s is None else self.takeover_after_s

    @property
    def resume_clock(self) -> int:
        return int(self.resume["clock"]) if self.resume else 0

    @property
    def checkpoint_dir(self) -> str | None:
        return str(self.checkpoint["dir"]) if self.checkpoint else None

    @property
    def checkpoint_every_s(self) -> float:
        return float((self.checkpoint or {}).get("every_s") or 0.0)

    def replace(self, **changes: Any) -> JobSpec:
        return dataclasses.replace(self, **changes)

    def to_wire(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        body["partitions"] = [dict(p) for p in self.partitions]
        return body

    @classmethod
    def from_wire(cls, body: Any) -> JobSpec:
        """The spec in a SUBMIT body (or a manifest); unknown fields are ignored."""
        if not isinstance(body, dict):
            raise RequestError("SUBMIT needs a job spec")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in body and body[f.name] is not None or f.name in _REQUIRED:
                values[f.name] = _check(f.name, body.get(f.name))
        if values["n_workers"] < 1 or len(values["partitions"]) != values["n_workers"]:
            raise RequestError("the job spec needs one data partition per worker")
        try:
            staleness_for(values["mode"], values.get("staleness", 0))
        except ValueError as exc:
            raise RequestError(f"bad job spec: {exc}") from None
        return cls(**values)


_REQUIRED = ("model", "n_workers", "mode", "partitions")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check(name: str, value: Any, kind: str | None = None) -> Any:
    """One field, checked: its wire value converted, or one sentence naming the field."""
    kind = kind or _KINDS[name]
    ok = {
        "str": isinstance(value, str),
        "int": _is_int(value),
        "count": _is_int(value) and value >= 0,
        "positive": _is_int(value) and value >= 1,
        "float": _is_number(value),
        "seconds": _is_number(value) and value > 0,
        "seconds0": _is_number(value) and value >= 0,
        "fraction": _is_number(value) and 0 <= value < 1,
        "bool": isinstance(value, bool),
        "dict": isinstance(value, dict),
        "optimizer": isinstance(value, dict), "checkpoint": isinstance(value, dict), "resume": isinstance(value, dict),
        "keep": isinstance(value, dict), "from_kept": isinstance(value, dict),
        "parts": isinstance(value, list | tuple) and all(isinstance(p, dict) for p in value),
        "partition_mode": value in PARTITION_MODES,
    }[kind]
    if not ok:
        what = _WHAT[kind]
        raise RequestError(f"bad job spec: '{name}' must be {what}, not {value!r:.40}")
    if kind in _NESTED:
        _check_nested(name, value)
    if kind == "parts":
        return tuple(dict(p) for p in value)
    if kind in ("float", "seconds", "seconds0", "fraction"):
        return float(value)
    return value


_KINDS = {
    "model": "str", "n_workers": "positive", "mode": "str", "partitions": "parts", "staleness": "count",
    "model_params": "dict", "n_features": "positive", "epochs": "positive", "batch_size": "positive", "l2": "float",
    "seed": "int", "standardize": "bool", "optimizer": "optimizer", "min_shards": "positive", "data": "dict",
    "test_split": "fraction", "checkpoint": "checkpoint", "heartbeat_interval_s": "seconds", "failure_timeout_s": "seconds",
    "takeover_after_s": "seconds0", "validation": "dict", "resume": "resume", "hold_epochs": "bool",
    "keep": "keep", "from_kept": "from_kept", "partition_mode": "partition_mode", "worker_memory_bytes": "positive",
    "min_shard_bytes": "count",
}
_WHAT = {
    "str": "a string", "int": "an integer", "count": "an integer >= 0", "positive": "an integer >= 1",
    "float": "a number", "seconds": "a number of seconds > 0", "seconds0": "a number of seconds >= 0",
    "fraction": "a fraction in [0, 1)", "bool": "true or false", "dict": "an object", "parts": "a list of objects",
    "optimizer": "an object", "checkpoint": "an object", "resume": "an object", "keep": "an object", "from_kept": "an object",
    "partition_mode": f"one of {', '.join(PARTITION_MODES)}",
}

# Nested objects every worker and shard reads: their fields checked here, once, so a bad
# value (a hand-edited manifest's "every": "five") is one sentence, not a crash on the cluster.
_NESTED: dict[str, dict[str, tuple[str, bool]]] = {  # field -> (kind, required)
    "checkpoint": {"dir": ("str", True), "every": ("count", False), "every_s": ("seconds0", False)},
    "resume": {"dir": ("str", True), "clock": ("count", True), "job_id": ("str", False), "n_shards": ("positive", False)},
    "optimizer": {"name": ("str", True), "params": ("dict", False)},
    "keep": {"name": ("str", True), "replace": ("bool", False)},
    "from_kept": {"name": ("str", True)},
}


def _check_nested(name: str, value: dict[str, Any]) -> None:
    for key, (kind, required) in _NESTED[name].items():
        if key in value and value[key] is not None or required:
            try:
                _check(key, value.get(key), kind)
            except RequestError:
                raise RequestError(f"bad job spec: '{name}.{key}' must be {_WHAT[kind]}, not {value.get(key)!r:.40}") from None
    if name == "optimizer":
        for key, v in (value.get("params") or {}).items():
            if not _is_number(v) or not math.isfinite(v) or key == "lr" and not v > 0:
                what = "a positive number" if key == "lr" else "a finite number"
                raise RequestError(f"bad job spec: 'optimizer.params.{key}' must be {what}, not {v!r:.40}")
