"""Linear regression: squared loss (0.5 (z - y)^2) or Huber. Parameters: ``w`` of n_features + 1, bias last."""

from __future__ import annotations

import numpy as np

from psctl.errors import PsctlError
from psctl.models.base import LinearModel, row_scores

LOSSES = ("squared", "huber")


def loss_grad(w: np.ndarray, X: np.ndarray, y: np.ndarray, l2: float, loss: str = "squared", delta: float = 1.0):
    """Mean loss + (l2/2)||w without bias||^2, its gradient, and the predictions."""
    z = X @ w[:-1] + w[-1]
    r = z - y
    if loss == "huber":
        small = np.abs(r) <= delta
        value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
        d = np.where(small, r, delta * np.sign(r))
    else:
        value, d = 0.5 * r**2, r
    d = (d / len(y)).astype(w.dtype)
    grad = np.empty_like(w)
    grad[:-1] = X.T @ d + l2 * w[:-1]
    grad[-1] = d.sum()
    return float(value.mean()) + 0.5 * l2 * float(w[:-1] @ w[:-1]), grad, z


class LinReg(LinearModel):
    kind = "linreg"
    task = "regression"
    params = {**LinearModel.params, "loss": "squared", "huber_delta": 1.0}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.options["loss"] not in LOSSES:
            raise PsctlError(f"linreg --loss must be one of {', '.join(LOSSES)}")

    def loss_grad(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray):
        loss, grad, z = loss_grad(params["w"], X, y, self.l2, self.options["loss"], self.options["huber_delta"])
        return loss, {"w": grad}, z

    def predict(self, params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        return row_scores(params["w"], X)
