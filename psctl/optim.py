"""Server-side update rules. A rule turns (values, gradient) into new values in place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Optimizer(Protocol):
    def apply(self, values: np.ndarray, grad: np.ndarray) -> None:
        """Update ``values`` in place with ``grad`` (same shape)."""


@dataclass
class SGD:
    """Plain SGD: ``values -= lr * grad``."""

    lr: float

    def apply(self, values: np.ndarray, grad: np.ndarray) -> None:
        values -= (self.lr * grad).astype(values.dtype, copy=False)


OPTIMIZERS = {"sgd": SGD}


def make_optimizer(name: str, params: dict[str, Any]) -> Optimizer:
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}") from None
    return cls(**params)
