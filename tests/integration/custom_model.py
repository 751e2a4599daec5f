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


class SlowEvalModel(MeanModel):
    """A user's model that is slow to evaluate many rows at once (a partition, as the final
    evaluation does): each such call computes, in plain Python, for the seconds of CPU time
    that the environment variable PSCTL_TEST_SLOW_CPU_S says; a mini-batch step (at most
    ``STEP_ROWS`` rows) is quick. Such a slow call must not run on a worker's event loop (the
    loop goes on serving the coordinator meanwhile), so there it raises."""

    kind = "tests.integration.custom_model:SlowEvalModel"
    STEP_ROWS = 64

    def loss_grad(self, params, X, y):
        if len(y) > self.STEP_ROWS:
            _slow_off_the_loop("loss_grad")
        return super().loss_grad(params, X, y)


class SlowPredictModel(MeanModel):
    """Prediction computes for PSCTL_TEST_SLOW_CPU_S seconds of CPU per call, off any event loop."""

    kind = "tests.integration.custom_model:SlowPredictModel"

    def predict(self, params, X):
        _slow_off_the_loop("predict")
        return super().predict(params, X)


def _slow_off_the_loop(what):
    import asyncio
    import os
    import time

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop runs in this thread: the right place for a long computation
        pass
    else:
        raise RuntimeError(f"{what} of many rows ran on the event loop")
    end = time.thread_time() + float(os.environ.get("PSCTL_TEST_SLOW_CPU_S", "0"))
    n = 0
    while time.thread_time() < end:  # CPU time of this thread: on a busy machine the wall time is longer
        n = (n * 31 + 7) % 1_000_003
    return n


class RaisingModel(MeanModel):
    """A user's model with a bug: every step raises. The job fails, and says what was raised."""

    kind = "tests.integration.custom_model:RaisingModel"

    def loss_grad(self, params, X, y):
        raise ValueError("boom in the user's loss_grad")
