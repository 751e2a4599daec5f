import numpy as np
import pytest

from psctl.optim import SGD, make_optimizer


def test_sgd_step_decays_with_updates():
    rule = SGD(lr=1.0, lr_decay=0.5)
    assert [rule.step_size(t) for t in range(3)] == [1.0, pytest.approx(1 / 1.5), 0.5]
    values = np.zeros(3, dtype=np.float32)
    for step in range(3):
        rule.apply(values, np.ones(3), {}, None, step)
    np.testing.assert_allclose(values, -(1 + 1 / 1.5 + 0.5))


def test_sgd_updates_only_given_rows():
    values = np.zeros((4, 2))
    SGD(lr=0.1).apply(values, np.ones((2, 2)), {}, np.array([1, 3]), 0)
    np.testing.assert_allclose(values[[1, 3]], -0.1)
    assert not values[[0, 2]].any()


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop", {})
