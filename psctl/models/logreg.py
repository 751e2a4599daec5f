"""Binary logistic regression. Parameters: one vector ``w`` of n_features + 1, the bias last."""

from __future__ import annotations

import numpy as np

from psctl.models.base import LinearModel, row_scores


def _logits(w: np.ndarray, X: np.ndarray) -> np.ndarray:
    return X @ w[:-1] + w[-1]


def loss_grad(w: np.ndarray, X: np.ndarray, y: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """Mean binary cross-entropy + (l2/2)||w without bias||^2, and its gradient."""
    z = _logits(w, X)
    # log(1 + exp(z)) - y z, computed without overflow
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z)) + 0.5 * l2 * float(w[:-1] @ w[:-1])
    err = (_sigmoid(z) - y) / len(y)
    grad = np.empty_like(w)
    grad[:-1] = X.T @ err + l2 * w[:-1]
    grad[-1] = err.sum()
    return loss, grad


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a non-positive number only: stable at both ends
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def predict_proba(w: np.ndarray, X: np.ndarray) -> np.ndarray:
    """P(class 1) per row, each row's independent of the others (``row_scores``)."""
    return _sigmoid(row_scores(w, X))


class LogReg(LinearModel):
    """Binary logistic regression on one weight vector (bias last)."""

    kind = "logreg"
    task = "binary"

    def loss_grad(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
        w = params["w"]
        loss, grad = loss_grad(w, X, y, self.l2)
        return loss, {"w": grad}, _sigmoid(_logits(w, X))

    def predict(self, params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        return predict_proba(params["w"], X)
