import numpy as np
import pytest

from psctl.errors import PsctlError
from psctl.models import logreg, model_class
from psctl.models.logreg import LogReg


def problem(seed: int, rows: int = 25, features: int = 4):
    rng = np.random.default_rng(seed)
    return rng, rng.normal(size=(rows, features)), (rng.random(rows) > 0.5).astype(float)


def naive_loss(w, X, y, l2):
    p = 1 / (1 + np.exp(-(X @ w[:-1] + w[-1])))
    return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)) + 0.5 * l2 * np.sum(w[:-1] ** 2)


@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_gradient_matches_central_differences(l2):
    rng, X, y = problem(1)
    eps = 1e-6
    for _ in range(4):
        w = rng.normal(size=5) * 2
        _, grad = logreg.loss_grad(w, X, y, l2)
        numeric = np.array(
            [(logreg.loss_grad(w + eps * e, X, y, l2)[0] - logreg.loss_grad(w - eps * e, X, y, l2)[0]) / (2 * eps) for e in np.eye(5)]
        )
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("l2", [0.0, 0.7])
def test_loss_matches_the_naive_formula(l2):
    rng, X, y = problem(2)
    w = rng.normal(size=5)
    assert logreg.loss_grad(w, X, y, l2)[0] == pytest.approx(naive_loss(w, X, y, l2), rel=1e-12)


def test_bias_is_not_regularized():
    _, X, y = problem(3)
    w = np.array([0.0, 0.0, 0.0, 0.0, 5.0])
    loss0, grad0 = logreg.loss_grad(w, X, y, 0.0)
    loss1, grad1 = logreg.loss_grad(w, X, y, 10.0)
    assert loss0 == loss1 and grad0[-1] == grad1[-1]


def test_extreme_logits_stay_finite():
    X = np.array([[1.0], [-1.0], [1.0], [-1.0]])
    y = np.array([0.0, 1.0, 1.0, 0.0])  # two rows confidently wrong, two confidently right
    for scale in (1e3, 1e5, 1e100):
        w = np.array([scale, 0.0])
        loss, grad = logreg.loss_grad(w, X, y, 0.0)
        assert np.isfinite(loss) and np.isfinite(grad).all()
        assert logreg.predict_proba(w, X).tolist() == [1.0, 0.0, 1.0, 0.0]
    loss, _ = logreg.loss_grad(np.array([1e3, 0.0]), X, y, 0.0)
    assert loss == pytest.approx(1e3 / 2)  # half the rows cost |z| = 1000 each


def test_float32_in_float32_out():
    w = np.full(3, 0.5, dtype=np.float32)
    X, y = np.ones((4, 2), dtype=np.float32), np.ones(4, dtype=np.float32)
    loss, grad = logreg.loss_grad(w, X, y, 0.1)
    assert isinstance(loss, float) and grad.dtype == np.float32
    assert logreg.predict_proba(w, X).dtype == np.float32


def test_predictions_and_correct():
    w = np.array([2.0, -1.0, 0.5])
    X = np.array([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    p = logreg.predict_proba(w, X)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-np.array([2.5, -2.5, -1.5]))))
    model = LogReg(2)
    loss, grads, outputs = model.loss_grad({"w": w}, X, np.array([1.0, 0.0, 1.0]))
    np.testing.assert_allclose(outputs, p)
    assert loss == logreg.loss_grad(w, X, np.array([1.0, 0.0, 1.0]), 0.0)[0]


def test_registry():
    assert [(t.name, t.rows, t.dim) for t in LogReg(30).tables()] == [("w", 31, 1)]
    assert model_class("logreg") is LogReg
    with pytest.raises(PsctlError, match="unknown model 'x'; known models: linreg, logreg, mf, softmax, svm$"):
        model_class("x")
