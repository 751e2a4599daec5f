"""Every built-in model: gradients against finite differences, shapes, outputs per task."""

import numpy as np
import pytest

from psctl.core.tables import TableSpec
from psctl.errors import DataError, PsctlError
from psctl.models import MODELS, Model, model_class
from psctl.models.base import (
    batch_sums,
    classes_for,
    encode_targets,
    evaluate,
    summarize,
)

RNG = np.random.default_rng(11)
X = RNG.normal(size=(30, 4))


def targets(model: Model) -> np.ndarray:
    if model.task == "regression":
        return RNG.normal(size=30) * 3
    if model.task == "binary":
        return (RNG.random(30) > 0.5).astype(float)
    return RNG.integers(0, len(model.classes), size=30)


CASES = [
    ("logreg", ["0", "1"], {}),
    ("softmax", ["a", "b", "c"], {}),
    ("svm", ["a", "b"], {}),
    ("svm", ["a", "b", "c", "d"], {}),
    ("linreg", [], {}),
    ("linreg", [], {"loss": "huber", "huber_delta": 0.7}),
]


@pytest.mark.parametrize(("kind", "classes", "params"), CASES)
@pytest.mark.parametrize("l2", [0.0, 0.2])
def test_gradient_matches_finite_differences(kind, classes, params, l2):
    model = MODELS[kind](4, classes, l2=l2, **params)
    (spec,) = model.tables()
    y = targets(model)
    W = RNG.normal(size=spec.shape(spec.rows)) * 0.5
    loss, grads, _ = model.loss_grad({"w": W}, X, y)
    eps = 1e-6
    numeric = np.zeros_like(W)
    for i in np.ndindex(W.shape):
        d = np.zeros_like(W)
        d[i] = eps
        numeric[i] = (model.loss_grad({"w": W + d}, X, y)[0] - model.loss_grad({"w": W - d}, X, y)[0]) / (2 * eps)
    # The hinge is not differentiable at margin 1; random weights almost never sit there.
    np.testing.assert_allclose(grads["w"], numeric, rtol=1e-4, atol=1e-6)
    assert isinstance(loss, float)


@pytest.mark.parametrize(("kind", "classes", "params"), CASES)
def test_outputs_have_the_task_shape(kind, classes, params):
    model = MODELS[kind](4, classes, **params)
    (spec,) = model.tables()
    W = RNG.normal(size=spec.shape(spec.rows)).astype(np.float32)
    out = model.predict({"w": W}, X.astype(np.float32))
    expected = {"binary": (30,), "regression": (30,), "classes": (30, len(classes))}[model.task]
    assert out.shape == expected
    _, grads, outputs = model.loss_grad({"w": W}, X.astype(np.float32), targets(model))
    assert grads["w"].dtype == np.float32 and outputs.shape == expected


@pytest.mark.parametrize(("kind", "classes", "params"), CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_rows_prediction_does_not_depend_on_the_rows_beside_it(kind, classes, params, dtype):
    """Prediction spread over workers writes one process's bytes and metrics only if a row's
    output is the same to the bit in any partition (BLAS's gemv is not: numpy 2.4, 3 rows vs 1)."""
    model = MODELS[kind](40, classes, **params)
    (spec,) = model.tables()
    W = RNG.normal(size=spec.shape(spec.rows)).astype(dtype)
    rows = RNG.normal(size=(37, 40)).astype(dtype)
    whole = model.predict({"w": W}, rows)
    for size in (1, 2, 3, 5, 8, 13):
        parts = [model.predict({"w": W}, rows[i : i + size].copy()) for i in range(0, len(rows), size)]
        assert np.array_equal(np.concatenate(parts), whole), size


def test_softmax_learns_separable_classes():
    model = MODELS["softmax"](2, ["x", "y", "z"])
    centers = np.array([[4, 0], [-4, 0], [0, 4]])
    y = np.repeat(np.arange(3), 20)
    Xs = centers[y] + RNG.normal(size=(60, 2))
    W = np.zeros((3, 3))
    for _ in range(200):
        _, g, _ = model.loss_grad({"w": W}, Xs, y)
        W -= 0.5 * g["w"]
    assert evaluate("classes", y, model.predict({"w": W}, Xs), 3)["accuracy"] == 1.0


def test_linreg_huber_bounds_the_gradient():
    model = MODELS["linreg"](1, [], loss="huber", huber_delta=1.0)
    _, g, _ = model.loss_grad({"w": np.zeros(2)}, np.zeros((2, 1)), np.array([1000.0, -1000.0]))
    assert np.abs(g["w"]).max() <= 1.0


def test_bad_model_parameters():
    with pytest.raises(PsctlError, match="has no parameter rank"):
        MODELS["logreg"](3, ["0", "1"], rank=4)
    with pytest.raises(PsctlError, match="--loss must be one of"):
        MODELS["linreg"](3, [], loss="cubic")


def test_classes_and_targets():
    assert classes_for("classes", ["10", "9", "2.0"]) == ["2", "9", "10"]
    assert classes_for("binary", ["M", "B"], "svm") == ["B", "M"]
    with pytest.raises(DataError, match="softmax needs at least two"):
        classes_for("classes", ["a"], "softmax")
    with pytest.raises(DataError, match="exactly two label values; found 3"):
        classes_for("binary", ["a", "b", "c"], "logreg")
    np.testing.assert_array_equal(encode_targets("classes", np.array(["b", "a"]), ["a", "b"]), [1, 0])
    with pytest.raises(DataError, match="regression needs numeric labels; found 'x'"):
        encode_targets("regression", np.array(["1.5", "x"]), [])


def test_sums_and_summaries():
    s = batch_sums("regression", np.array([1.0, 3.0]), np.array([0.0, 0.0]))
    assert summarize("regression", s, 2) == {"rmse": pytest.approx(np.sqrt(5)), "mae": 2.0}
    s = batch_sums("classes", np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]))
    assert summarize("classes", s, 2) == {"accuracy": 0.5}


class Tiny(Model):
    kind = "tiny"
    task = "regression"

    def tables(self):
        return [TableSpec("w", 1)]


def test_user_model_classes_load_by_import_path():
    assert model_class("tests.unit.test_models:Tiny") is Tiny
    with pytest.raises(PsctlError, match="cannot load model class"):
        model_class("tests.unit.test_models:Nope")
    with pytest.raises(PsctlError, match="not a psctl.models.Model subclass"):
        model_class("tests.unit.test_models:CASES")
