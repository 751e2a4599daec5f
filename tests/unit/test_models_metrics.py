import numpy as np
import pytest

from psctl import metrics
from psctl.models import get_model, logreg
from psctl.errors import PsctlError


@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_logreg_gradient_matches_finite_differences(l2):
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(20, 4)), (rng.random(20) > 0.5).astype(float)
    for _ in range(3):
        w = rng.normal(size=5)
        _, grad = logreg.loss_grad(w, X, y, l2)
        eps = 1e-6
        numeric = np.array(
            [(logreg.loss_grad(w + eps * e, X, y, l2)[0] - logreg.loss_grad(w - eps * e, X, y, l2)[0]) / (2 * eps) for e in np.eye(5)]
        )
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


def test_logreg_loss_matches_naive_formula_and_stays_finite():
    rng = np.random.default_rng(2)
    X, y, w = rng.normal(size=(10, 3)), (rng.random(10) > 0.5).astype(float), rng.normal(size=4)
    p = 1 / (1 + np.exp(-(X @ w[:-1] + w[-1])))
    naive = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert logreg.loss_grad(w, X, y, 0.0)[0] == pytest.approx(naive)
    huge = np.array([1e4, 0.0])
    loss, grad = logreg.loss_grad(huge, np.array([[1.0], [-1.0]]), np.array([0.0, 1.0]), 0.0)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert logreg.predict_proba(huge, np.array([[1.0], [-1.0]])).tolist() == [1.0, 0.0]


def test_logreg_keeps_float32():
    w = np.zeros(3, dtype=np.float32)
    _, g = logreg.loss_grad(w, np.ones((4, 2), dtype=np.float32), np.ones(4, dtype=np.float32), 0.1)
    assert g.dtype == np.float32


def test_unknown_model():
    with pytest.raises(PsctlError, match="unknown model 'x'; known models: logreg"):
        get_model("x")


def test_auc_against_pair_count_with_ties():
    rng = np.random.default_rng(3)
    y = rng.random(60) > 0.4
    s = rng.integers(0, 5, size=60).astype(float)  # many ties
    pos, neg = s[y], s[~y]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert metrics.roc_auc(y, s) == pytest.approx(brute)
    assert np.isnan(metrics.roc_auc(np.ones(3), np.arange(3)))


def test_log_loss_accuracy_confusion():
    assert metrics.log_loss(np.array([1, 0]), np.array([0.9, 0.2])) == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2)
    assert metrics.accuracy(np.array([1, 0, 1]), np.array([1, 1, 1])) == pytest.approx(2 / 3)
    np.testing.assert_array_equal(metrics.confusion_matrix([0, 1, 1], [0, 0, 1], 2), [[1, 0], [1, 1]])
