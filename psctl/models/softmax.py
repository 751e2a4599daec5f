"""Softmax (multinomial logistic) regression. Parameters: ``W`` of (n_features + 1, k), the bias row last."""

from __future__ import annotations

import numpy as np

from psctl.models.base import LinearModel, row_scores


def _logits(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    return X @ W[:-1] + W[-1]


def probabilities(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    z = row_scores(W, X)
    z = z - z.max(axis=1, keepdims=True)  # exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loss_grad(W: np.ndarray, X: np.ndarray, y: np.ndarray, l2: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy + (l2/2)||W without bias||^2; its gradient; the probabilities."""
    z = _logits(W, X)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    rows = np.arange(len(y))
    loss = float(np.mean(log_norm - z[rows, y])) + 0.5 * l2 * float(np.sum(W[:-1] ** 2))
    p = np.exp(z - log_norm[:, None])
    err = p.copy()
    err[rows, y] -= 1
    err /= len(y)
    grad = np.empty_like(W)
    grad[:-1] = X.T @ err + l2 * W[:-1]
    grad[-1] = err.sum(axis=0)
    return loss, grad, p


class Softmax(LinearModel):
    kind = "softmax"
    task = "classes"

    def dim(self) -> int:
        return len(self.classes)

    def loss_grad(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
        loss, grad, p = loss_grad(params["w"], X, y, self.l2)
        return loss, {"w": grad}, p

    def predict(self, params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        return probabilities(params["w"], X)
