"""Models: pure numpy functions, one module per kind."""

from __future__ import annotations

from types import ModuleType

from psctl.errors import PsctlError
from psctl.models import logreg

MODELS: dict[str, ModuleType] = {"logreg": logreg}


def get_model(kind: str) -> ModuleType:
    try:
        return MODELS[kind]
    except KeyError:
        raise PsctlError(f"unknown model '{kind}'; known models: {', '.join(sorted(MODELS))}") from None
