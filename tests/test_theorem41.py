"""Tests of ntklib.theorem41: the quantities of Theorem 4.1 read off a recorded run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntklib
from ntklib.theorem41 import theorem_4_1_sups


@pytest.fixture(scope="module", autouse=True)
def x64():
    """float64 for this module only."""
    with jax.enable_x64(True):
        yield


_NET = ntklib.mlp([16], 2, "erf", W_std=1.5, b_std=0.1)


def _data():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (4, 3))
    x /= jnp.linalg.norm(x, axis=1, keepdims=True)
    xt = jax.random.normal(k2, (2, 3))
    xt /= jnp.linalg.norm(xt, axis=1, keepdims=True)
    return x, jax.random.normal(k3, (4, 2)), xt


def _train(net, x, y, xt=None, steps=12, record_ntk=True):
    _, p0 = net.init(jax.random.PRNGKey(1), x.shape)
    return ntklib.train_gradient_descent(net, p0, x, y, 0.05, steps, x_test=xt, normalization="sum",
                                         record_ntk=record_ntk, ntk_method="structured_derivatives",
                                         progress=False)


def test_matches_direct_computation():
    x, y, xt = _data()
    traj = _train(_NET, x, y, xt)
    s = theorem_4_1_sups(traj)
    num = len(traj.times)
    dev = np.asarray(traj.f_train - traj.f_lin_train)
    assert s.f_train == pytest.approx(max(np.sqrt(np.sum(dev[t] ** 2)) for t in range(num)), rel=1e-12)
    dev_t = np.asarray(traj.f_test - traj.f_lin_test)
    assert s.f_test == pytest.approx(max(np.sqrt(np.sum(dev_t[t] ** 2)) for t in range(num)), rel=1e-12)
    k = np.asarray(traj.ntk)
    assert s.ntk == pytest.approx(max(np.sqrt(np.sum((k[t] - k[0]) ** 2)) for t in range(num)), rel=1e-12)
    assert s.theta == pytest.approx(float(np.max(traj.param_distance)), rel=1e-12)
    assert s.loss_ratio == pytest.approx(float(traj.loss[-1] / traj.loss[0]), rel=1e-12)
    assert s.f_train_t.shape == s.ntk_t.shape == s.theta_t.shape == (num,)
    assert s.f_train_t[0] == 0 and s.ntk_t[0] == 0 and s.theta_t[0] == 0
    # the network is non-linear: it leaves its linearization and its kernel moves
    assert s.f_train > 0 and s.ntk > 0 and s.theta > 0
    cut = round(num * 0.75)
    expected = max(np.max(q) / np.max(q[:cut]) - 1 for q in (s.f_test_t, s.theta_t, s.ntk_t))
    assert s.late_growth == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_linear_model_equals_its_linearization():
    """A network without hidden layer is linear in θ: f = f^lin and Θ̂_t = Θ̂_0 at every step."""
    x, y, xt = _data()
    traj = _train(ntklib.mlp([], 2, "erf", W_std=1.0, b_std=0.5), x, y, xt)
    s = theorem_4_1_sups(traj)
    assert s.f_train <= 1e-12 and s.f_test <= 1e-12
    assert s.ntk <= 1e-12
    assert s.theta > 0.01
    assert s.loss_ratio < 1


def test_without_test_inputs_and_errors():
    x, y, _ = _data()
    net = _NET
    s = theorem_4_1_sups(_train(net, x, y, steps=12))
    assert s.f_test is None and s.f_test_t is None
    assert np.isfinite(s.late_growth)
    with pytest.raises(ValueError, match="record_ntk"):
        theorem_4_1_sups(_train(net, x, y, steps=12, record_ntk=False))
    traj = _train(net, x, y, steps=12)
    for bad in (0, 1, -0.5, 2.0):
        with pytest.raises(ValueError, match="tail"):
            theorem_4_1_sups(traj, tail=bad)
    with pytest.raises(TypeError):
        theorem_4_1_sups({"times": []})
