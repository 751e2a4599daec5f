"""A test-only model, written as a user would: one class, nothing else in psctl changes.

It learns a per-class centroid-free "mean target" regressor: prediction = b, the
mean of y, with squared loss. Loaded by 'psctl train tests.integration.custom_model:MeanModel'.
"""

import numpy as np

from psctl.core.tables import TableSpec
from psctl.models import Model


class MeanModel(Model):
    kind = "tests.integration.custom_model:MeanModel"
    task = "regression"

    def tables(self):
        return [TableSpec("b", 1)]

    def loss_grad(self, params, X, y):
        b = params["b"]
        r = b[0] - y
        return float(0.5 * np.mean(r**2)), {"b": np.array([r.mean()], dtype=b.dtype)}, np.full(len(y), b[0])

    def predict(self, params, X):
        return np.full(len(X), params["b"][0])


class DivergingModel(MeanModel):
    """A model whose gradient overflows to NaN: the shard refuses it, the worker fails naming itself."""

    kind = "tests.integration.custom_model:DivergingModel"

    def loss_grad(self, params, X, y):
        loss, grads, outputs = super().loss_grad(params, X, y)
        return loss, {"b": np.full_like(grads["b"], np.nan)}, outputs
