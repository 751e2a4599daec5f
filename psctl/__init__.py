"""psctl: a parameter server for machine learning in one Python program.

The public API, importable from ``psctl`` itself:

- training and prediction as a library: :class:`TrainConfig` and :func:`train`
  (an awaitable returning a :class:`TrainResult`), :func:`predict`, :func:`predict_pairs` (an mf model's ratings for (user, item) pairs);
- the parameter server without the trainer (``psctl.apps.api``): :class:`LocalServer`,
  :class:`Job`, :class:`KVWorker`, :class:`TableSpec`; :class:`ServerModel` (a model kept on a server);
- :class:`Model`, the base class of a model of your own (``--model-class``);
- the typed errors: every :class:`PsctlError` carries one sentence and an ``exit_code``.

The library parts are imported on first use, so ``import psctl`` (which every
process psctl starts does) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from psctl.errors import (
    ConnectError,
    DataError,
    Interrupted,
    JobError,
    ModelFileError,
    PsctlError,
    SecurityError,
    UsageError,
)

__version__ = "0.1.0"

_LAZY = {
    "Job": "psctl.apps.api",
    "KVWorker": "psctl.apps.api",
    "LocalServer": "psctl.apps.api",
    "ServerModel": "psctl.apps.api",
    "TableSpec": "psctl.apps.api",
    "TrainConfig": "psctl.apps.train",
    "TrainResult": "psctl.apps.train",
    "train": "psctl.apps.train",
    "predict": "psctl.apps.predict",
    "predict_pairs": "psctl.apps.predict",
    "Model": "psctl.models.base",
}

__all__ = [
    "ConnectError",
    "DataError",
    "Interrupted",
    "Job",
    "JobError",
    "KVWorker",
    "LocalServer",
    "Model",
    "ModelFileError",
    "PsctlError",
    "SecurityError",
    "ServerModel",
    "TableSpec",
    "TrainConfig",
    "TrainResult",
    "UsageError",
    "__version__",
    "predict",
    "predict_pairs",
    "train",
]

if TYPE_CHECKING:
    from psctl.apps.api import Job, KVWorker, LocalServer, ServerModel, TableSpec
    from psctl.apps.predict import predict, predict_pairs
    from psctl.apps.train import TrainConfig, TrainResult, train
    from psctl.models.base import Model


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'psctl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
