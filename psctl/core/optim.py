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


def _take(arr: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    return arr.astype(np.float64) if rows is None else arr[rows].astype(np.float64)


def _put(arr: np.ndarray, rows: np.ndarray | None, new: np.ndarray) -> None:
    if rows is None:
        arr[...] = new
    else:
        arr[rows] = new


@dataclass
class AdaGrad:
    """AdaGrad (Duchi et al., 2011): per-key step lr / (sqrt(sum of squared gradients) + eps)."""

    lr: float
    eps: float = 1e-8

    def init_state(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return {"sum_sq": np.zeros_like(values)}

    def apply(
        self, values: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], rows: np.ndarray | None, step: int
    ) -> None:
        g = grad.astype(np.float64)
        sum_sq = _take(state["sum_sq"], rows) + g * g
        _put(state["sum_sq"], rows, sum_sq)
        _put(values, rows, _take(values, rows) - self.lr * g / (np.sqrt(sum_sq) + self.eps))


@dataclass
class Adam:
    """Adam (Kingma & Ba, 2015) with a step count per key, so a rare key's first update
    is bias-corrected like anyone's (with sparse data keys see few of the table's steps)."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def init_state(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return {"m": np.zeros_like(values), "v": np.zeros_like(values), "t": np.zeros(values.shape[:1], values.dtype)}

    def apply(
        self, values: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], rows: np.ndarray | None, step: int
    ) -> None:
        g = grad.astype(np.float64)
        m = self.beta1 * _take(state["m"], rows) + (1 - self.beta1) * g
        v = self.beta2 * _take(state["v"], rows) + (1 - self.beta2) * g * g
        t = _take(state["t"], rows) + 1
        for name, new in (("m", m), ("v", v), ("t", t)):
            _put(state[name], rows, new)
        t = t.reshape(-1, *([1] * (g.ndim - 1)))
        m_hat, v_hat = m / (1 - self.beta1**t), v / (1 - self.beta2**t)
        _put(values, rows, _take(values, rows) - self.lr * m_hat / (np.sqrt(v_hat) + self.eps))


@dataclass
class FTRL:
    """FTRL-Proximal (McMahan et al., KDD 2013, Algorithm 1), per key.

    State z and n; the stored value is the weight they imply, exactly 0 while
    |z| <= l1, which is what makes L1-regularized models truly sparse. ``lr`` is
    the paper's alpha. Tables start at zero (a table's init values are replaced
    by the weight from z and n at a key's first update).
    """

    lr: float
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0

    def init_state(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return {"z": np.zeros_like(values), "n": np.zeros_like(values)}

    def apply(
        self, values: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], rows: np.ndarray | None, step: int
    ) -> None:
        g = grad.astype(np.float64)
        w, z, n = _take(values, rows), _take(state["z"], rows), _take(state["n"], rows)
        sigma = (np.sqrt(n + g * g) - np.sqrt(n)) / self.lr
        z += g - sigma * w
        n += g * g
        w = np.where(np.abs(z) <= self.l1, 0.0, -(z - np.sign(z) * self.l1) / ((self.beta + np.sqrt(n)) / self.lr + self.l2))
        _put(state["z"], rows, z)
        _put(state["n"], rows, n)
        _put(values, rows, w)


OPTIMIZERS: dict[str, type] = {"sgd": SGD, "adagrad": AdaGrad, "adam": Adam, "ftrl": FTRL}


def make_optimizer(name: str, params: dict[str, Any]) -> UpdateRule:
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}") from None
    return cls(**params)
