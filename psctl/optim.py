"""Server-side update rules, applied by a shard to its slice of a table.

A rule is stateless itself; per-key state (AdaGrad's accumulators, Adam's
moments, ...) lives in arrays the shard keeps beside each table, created by
``init_state`` with the table's row shape. ``apply`` updates the rows
``rows`` (local row indices, unique) or, when ``rows`` is None, every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class UpdateRule(Protocol):
    def init_state(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Per-row state arrays for a table holding ``values``."""

    def apply(
        self, values: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], rows: np.ndarray | None, step: int
    ) -> None:
        """Update ``values`` (all rows, or ``rows``) in place with ``grad``; ``step`` counts this table's updates."""


@dataclass
class SGD:
    """SGD with an optional decaying step: lr_t = lr / (1 + lr_decay * t)."""

    lr: float
    lr_decay: float = 0.0

    def init_state(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def step_size(self, step: int) -> float:
        return self.lr / (1.0 + self.lr_decay * step)

    def apply(
        self, values: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], rows: np.ndarray | None, step: int
    ) -> None:
        delta = (self.step_size(step) * grad).astype(values.dtype, copy=False)
        if rows is None:
            values -= delta
        else:
            values[rows] -= delta  # rows are unique, so fancy-index -= is exact


OPTIMIZERS: dict[str, type] = {"sgd": SGD}


def make_optimizer(name: str, params: dict[str, Any]) -> UpdateRule:
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}") from None
    return cls(**params)
