"""The model registry: built-in models by name, a user's class by 'package.module:Class'."""

from __future__ import annotations

import importlib

from psctl.errors import PsctlError
from psctl.models.base import TASKS, Model
from psctl.models.linreg import LinReg
from psctl.models.logreg import LogReg
from psctl.models.mf import MF
from psctl.models.softmax import Softmax
from psctl.models.svm import SVM

MODELS: dict[str, type[Model]] = {m.kind: m for m in (LogReg, Softmax, SVM, LinReg, MF)}


def model_class(kind: str) -> type[Model]:
    """A built-in model by name, or a user's class given as 'package.module:Class'."""
    if ":" in kind:
        module_name, _, attr = kind.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise PsctlError(f"cannot load model class '{kind}': {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Model)):
            raise PsctlError(f"'{kind}' is not a psctl.models.Model subclass")
        if cls.task not in TASKS:
            raise PsctlError(f"model class '{kind}' has task {cls.task!r}; use one of {', '.join(TASKS)}")
        return cls
    try:
        return MODELS[kind]
    except KeyError:
        raise PsctlError(f"unknown model '{kind}'; known models: {', '.join(sorted(MODELS))}") from None
