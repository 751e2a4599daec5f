import numpy as np
import pytest

from psctl.models import metrics


def brute_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


@pytest.mark.parametrize("seed", range(5))
def test_auc_against_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(80) > 0.4).astype(float)
    s = rng.integers(0, 6, size=80).astype(float)  # many ties
    assert metrics.roc_auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
    s = rng.normal(size=80)
    assert metrics.roc_auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)


def test_auc_edges():
    y = np.array([0, 0, 1, 1])
    assert metrics.roc_auc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert metrics.roc_auc(y, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert metrics.roc_auc(y, np.full(4, 0.5)) == 0.5
    assert np.isnan(metrics.roc_auc(np.ones(3), np.arange(3.0)))
    assert np.isnan(metrics.roc_auc(np.zeros(3), np.arange(3.0)))


def test_log_loss():
    y, p = np.array([1, 0, 1]), np.array([0.9, 0.2, 0.6])
    expected = -(np.log(0.9) + np.log(0.8) + np.log(0.6)) / 3
    assert metrics.log_loss(y, p) == pytest.approx(expected)
    worst = metrics.log_loss(np.array([1, 0]), np.array([0.0, 1.0]))  # clipped to eps, not infinite
    assert 34 < worst < 35


def test_accuracy_and_confusion_matrix():
    assert metrics.accuracy(np.array([1, 0, 1]), np.array([1, 1, 1])) == pytest.approx(2 / 3)
    assert np.isnan(metrics.accuracy(np.array([]), np.array([])))
    np.testing.assert_array_equal(metrics.confusion_matrix([0, 1, 1, 2], [0, 0, 1, 2], 3), [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
