"""Server-side update rules against values worked out by hand, step by step."""

import math

import numpy as np
import pytest

from psctl.core.optim import FTRL, OPTIMIZERS, SGD, AdaGrad, Adam, make_optimizer


def run(rule, grads, rows=None, n_rows=1, dim=None):
    """Apply ``grads`` (one per step) to a zero table; return the table after each step."""
    shape = (n_rows,) if dim is None else (n_rows, dim)
    values = np.zeros(shape, np.float32)
    state = rule.init_state(values)
    seen = []
    for step, g in enumerate(grads):
        rule.apply(values, np.asarray(g, np.float32), state, rows, step)
        seen.append(values.copy())
    return seen, state


def test_sgd_with_decay():
    (w1, w2), _ = run(SGD(lr=0.5, lr_decay=1.0), [[2.0], [2.0]])
    assert w1[0] == pytest.approx(-0.5 * 2)
    assert w2[0] == pytest.approx(-1.0 - 0.5 / (1 + 1) * 2)


def test_adagrad_two_steps():
    (w1, w2), state = run(AdaGrad(lr=0.1, eps=0.0), [[2.0], [-1.0]])
    # sum of squares 4: w = -0.1 * 2 / 2;  then 5: w += 0.1 * 1 / sqrt(5)
    assert w1[0] == pytest.approx(-0.1)
    assert w2[0] == pytest.approx(-0.1 + 0.1 / math.sqrt(5), rel=1e-6)
    assert state["sum_sq"][0] == pytest.approx(5.0)


def test_adam_two_steps_bias_corrected():
    (w1, w2), state = run(Adam(lr=0.1, eps=0.0), [[2.0], [-1.0]])
    # step 1: m = 0.2, v = 0.004, m^ = 2, v^ = 4 -> w = -0.1 * 2 / 2
    assert w1[0] == pytest.approx(-0.1, rel=1e-6)
    # step 2: m = 0.9*0.2 - 0.1 = 0.08, v = 0.999*0.004 + 0.001 = 0.004996
    m_hat, v_hat = 0.08 / (1 - 0.9**2), 0.004996 / (1 - 0.999**2)
    assert w2[0] == pytest.approx(-0.1 - 0.1 * m_hat / math.sqrt(v_hat), rel=1e-5)
    assert state["t"][0] == 2


def test_adam_counts_steps_per_key():
    """A key first touched late gets a fully bias-corrected first step, like any other."""
    rule = Adam(lr=0.1, eps=0.0)
    values = np.zeros(3, np.float32)
    state = rule.init_state(values)
    rule.apply(values, np.array([1.0], np.float32), state, np.array([0]), 0)
    rule.apply(values, np.array([1.0, 3.0], np.float32), state, np.array([0, 2]), 1)
    assert state["t"].tolist() == [2, 0, 1]
    assert values[2] == pytest.approx(-0.1) and values[1] == 0


def ftrl_reference(grads, alpha, beta, l1, l2):
    """Algorithm 1 of McMahan et al. (2013) for one coordinate, in plain floats."""
    z = n = w = 0.0
    out = []
    for g in grads:
        sigma = (math.sqrt(n + g * g) - math.sqrt(n)) / alpha
        z += g - sigma * w
        n += g * g
        w = 0.0 if abs(z) <= l1 else -(z - math.copysign(l1, z)) / ((beta + math.sqrt(n)) / alpha + l2)
        out.append(w)
    return out


def test_ftrl_three_steps_by_hand():
    (w1, w2, w3), state = run(FTRL(lr=0.5, beta=1.0, l1=0.1, l2=0.2), [[1.0], [-0.5], [0.6]])
    # step 1: sigma = 1 / 0.5 = 2, z = 1, n = 1 -> w = -(1 - 0.1) / ((1 + 1) / 0.5 + 0.2) = -0.9 / 4.2
    assert w1[0] == pytest.approx(-0.9 / 4.2, rel=1e-6)
    # step 2: sigma = (sqrt(1.25) - 1) / 0.5, z = 1 - 0.5 + sigma * 0.9 / 4.2
    sigma = (math.sqrt(1.25) - 1) / 0.5
    z = 0.5 + sigma * 0.9 / 4.2
    assert w2[0] == pytest.approx(-(z - 0.1) / ((1 + math.sqrt(1.25)) / 0.5 + 0.2), rel=1e-5)
    assert w3[0] == pytest.approx(ftrl_reference([1.0, -0.5, 0.6], 0.5, 1.0, 0.1, 0.2)[2], rel=1e-5)
    assert state["n"][0] == pytest.approx(1 + 0.25 + 0.36, rel=1e-6)


def test_ftrl_l1_keeps_weights_exactly_zero():
    rule = FTRL(lr=0.5, l1=1.0)
    (w1, w2), state = run(rule, [[0.3, -2.0], [0.4, 0.1]], n_rows=2)
    assert w2[0] == 0.0  # |z| = 0.7 <= l1: exactly zero, not small
    assert w2[1] != 0.0
    assert w2[1] == pytest.approx(ftrl_reference([-2.0, 0.1], 0.5, 1.0, 1.0, 0.0)[1], rel=1e-5)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_rows_subset_equals_whole_table_on_those_rows(name):
    """Updating rows [1, 3] of a table equals updating a table of just those rows."""
    rule = make_optimizer(name, {"lr": 0.3})
    g = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
    big = np.zeros((4, 2), np.float32)
    big_state = rule.init_state(big)
    small = np.zeros((2, 2), np.float32)
    small_state = rule.init_state(small)
    for step in range(3):
        rule.apply(big, g * (step + 1), big_state, np.array([1, 3]), step)
        rule.apply(small, g * (step + 1), small_state, None, step)
    np.testing.assert_allclose(big[[1, 3]], small, rtol=1e-6)
    assert not big[[0, 2]].any()
    for key in big_state:
        np.testing.assert_allclose(big_state[key][[1, 3]], small_state[key], rtol=1e-6)


def test_unknown_optimizer_and_parameters():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop", {"lr": 0.1})
    with pytest.raises(TypeError):
        make_optimizer("ftrl", {"lr": 0.1, "momentum": 0.9})


def test_sgd_updates_only_given_rows():
    values = np.zeros((4, 2))
    SGD(lr=0.1).apply(values, np.ones((2, 2)), {}, np.array([1, 3]), 0)
    np.testing.assert_allclose(values[[1, 3]], -0.1)
    assert not values[[0, 2]].any()
