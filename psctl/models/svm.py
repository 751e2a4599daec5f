"""Linear SVM, hinge loss. Two classes: one weight vector; more: one-vs-rest (as
scikit-learn's SGDClassifier does), a column of ``W`` per class. Bias row last."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from psctl.models.base import LinearModel, row_scores


def _scores(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    return X @ W[:-1] + W[-1]


def loss_grad(W: np.ndarray, X: np.ndarray, signs: np.ndarray, l2: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean over rows of the summed per-column hinge max(0, 1 - s z) + (l2/2)||W without bias||^2.

    ``signs`` holds +1/-1 with W's column shape per row ((n,) for a vector W).
    """
    z = _scores(W, X)
    margin = 1 - signs * z
    active = margin > 0
    loss = float(np.where(active, margin, 0).sum() / len(X)) + 0.5 * l2 * float(np.sum(W[:-1] ** 2))
    err = np.where(active, -signs, 0).astype(W.dtype) / len(X)
    grad = np.empty_like(W)
    grad[:-1] = X.T @ err + l2 * W[:-1]
    grad[-1] = err.sum(axis=0)
    return loss, grad, z


def signs_for(y: np.ndarray, n_classes: int) -> np.ndarray:
    """+1/-1 targets: a vector for two classes, one column per class otherwise."""
    if n_classes == 2:
        return np.where(y == 1, 1.0, -1.0)
    return np.where(y[:, None] == np.arange(n_classes)[None, :], 1.0, -1.0)


def class_scores(z: np.ndarray) -> np.ndarray:
    """Per-class scores (n, k); for two classes the one score becomes [-z, z]."""
    return np.column_stack([-z, z]) if z.ndim == 1 else z


class SVM(LinearModel):
    kind = "svm"
    task = "classes"
    # The hinge's subgradient is +-x on every row inside the margin, so AdaGrad's accumulator
    # grows with each of them and lr 0.1 leaves a sync job far from the optimum after its
    # 20 epochs (digits: training objective 0.50 against 0.26 at lr 0.3 and 0.23 at 0.5;
    # test accuracy 0.936 on the split); 0.5 scatters async runs (0.950-0.967):
    # docs/DEFAULTS.md.
    defaults: ClassVar[dict[str, Any]] = {**LinearModel.defaults, "lr": 0.3}

    def dim(self) -> int:
        return 1 if len(self.classes) == 2 else len(self.classes)

    def loss_grad(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
        W = params["w"]
        loss, grad, z = loss_grad(W, X, signs_for(y, len(self.classes)).astype(W.dtype), self.l2)
        return loss, {"w": grad}, class_scores(z)

    def predict(self, params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        return class_scores(row_scores(params["w"], X))
