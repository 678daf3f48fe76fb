"""Tests of ntklib.convergence (Theorems A.3/A.4) against dense Jacobians and a hand-written descent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntklib


@pytest.fixture(scope="module", autouse=True)
def x64():
    """float64 for this module only; the flag does not leak to other modules."""
    with jax.enable_x64(True):
        yield


NETS = {
    "mlp_std": (ntklib.mlp([12, 12], 2, "erf", W_std=1.5, b_std=0.2, parametrization="standard"), (5, 3)),
    "cnn": (ntklib.cnn([3], 2, "tanh", W_std=1.3, b_std=0.2), (3, 4, 4, 2)),
}


@pytest.fixture(scope="module", params=list(NETS))
def case(request, x64):
    net, shape = NETS[request.param]
    kx, kp, ky, kq = jax.random.split(jax.random.PRNGKey(3), 4)
    x = jax.random.normal(kx, shape)
    _, params = net.init(kp, shape)
    out = net.apply(params, x).shape
    y = jax.random.normal(ky, out)
    _, other = net.init(kq, shape)
    return net, params, other, x, y


def _dense(f, p, x):
    return np.asarray(ntklib.jacobian(f, p, x))


def test_gauss_legendre_exact_to_degree():
    nodes, weights = ntklib.gauss_legendre(5)
    assert np.isclose(sum(weights), 1.0, rtol=0, atol=1e-15)
    for k in range(10):  # ∫₀¹ s^k ds = 1/(k+1), exact up to degree 2·5 − 1 = 9
        assert np.isclose(sum(w * s**k for s, w in zip(nodes, weights)), 1 / (k + 1), rtol=1e-14)
    with pytest.raises(ValueError):
        ntklib.gauss_legendre(0)


def test_cross_ntk_matches_dense(case):
    net, params, other, x, _ = case
    ja, jb = _dense(net, params, x), _dense(net, other, x)
    np.testing.assert_allclose(ntklib.cross_ntk(net, params, other, x), ja @ jb.T, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(ntklib.cross_ntk(net, params, params, x), ja @ ja.T, rtol=1e-11, atol=1e-12)
    # a generic callable takes the dense path and agrees
    fn = lambda p, z: net.apply(p, z)  # noqa: E731
    np.testing.assert_allclose(ntklib.cross_ntk(fn, params, other, x), ja @ jb.T, rtol=1e-11, atol=1e-12)


def test_cross_ntk_rejects_mismatched_trees(case):
    net, params, _, x, _ = case
    with pytest.raises(ValueError):
        ntklib.cross_ntk(net, params, params[:-1], x)


def _manual_descent(net, params, x, y, lr, steps):
    loss = lambda p: 0.5 * jnp.sum((net.apply(p, x) - y) ** 2)  # noqa: E731
    path = [params]
    for _ in range(steps):
        g = jax.grad(loss)(path[-1])
        path.append(jax.tree_util.tree_map(lambda a, b: a - lr * b, path[-1], g))
    return path


def _between(a, b, s):
    """The point a + s (b − a) of the segment from a to b."""
    return jax.tree_util.tree_map(lambda u, v: u + s * (v - u), a, b)


def _flat(p):
    return np.asarray(jax.flatten_util.ravel_pytree(p)[0])


@pytest.mark.parametrize("name", ["mlp_std", "cnn"])
def test_descent_diagnostics_against_dense(name, x64):
    net, shape = NETS[name]
    kx, kp, ky = jax.random.split(jax.random.PRNGKey(11), 3)
    x = jax.random.normal(kx, shape)
    _, p0 = net.init(kp, shape)
    y = jax.random.normal(ky, net.apply(p0, x).shape)
    j0 = _dense(net, p0, x)
    lr = 0.25 / np.linalg.eigvalsh(j0 @ j0.T)[-1]
    steps, s_values, quadrature = 3, (0.0, 0.5, 1.0), 8
    d = ntklib.descent_diagnostics(net, p0, x, y, lr, steps, s_values=s_values, quadrature=quadrature)
    path = _manual_descent(net, p0, x, y, lr, steps)
    np.testing.assert_allclose(_flat(d.params), _flat(path[-1]), rtol=1e-12, atol=1e-14)
    eye = np.eye(j0.shape[0])
    for t, p in enumerate(path):
        jt = _dense(net, p, x)
        g = np.asarray(net.apply(p, x) - y).reshape(-1)
        np.testing.assert_allclose(d.residual[t], np.linalg.norm(g), rtol=1e-12)
        np.testing.assert_allclose(d.distance[t], np.linalg.norm(_flat(p) - _flat(p0)), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(d.jac_op[t], np.linalg.norm(jt, 2), rtol=1e-10)
        np.testing.assert_allclose(d.jac_fro[t], np.linalg.norm(jt), rtol=1e-10)
        np.testing.assert_allclose(d.jac_diff_fro[t], np.linalg.norm(jt - j0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(d.jac_diff_op[t], np.linalg.norm(jt - j0, 2), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(d.ntk_drift[t], np.linalg.norm(jt @ jt.T - j0 @ j0.T), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(d.ntk_min_eig[t], np.linalg.eigvalsh(jt @ jt.T)[0], rtol=1e-9, atol=1e-11)
        if t == steps:
            break
        nxt = path[t + 1]
        np.testing.assert_allclose(d.step[t], np.linalg.norm(_flat(nxt) - _flat(p)), rtol=1e-12)
        g_next = np.asarray(net.apply(nxt, x) - y).reshape(-1)
        for i, s in enumerate(s_values):
            mid = _between(p, nxt, s)
            m = eye - lr * _dense(net, mid, x) @ jt.T
            np.testing.assert_allclose(d.contraction[t, i], np.linalg.norm(m, 2), rtol=1e-10)
            np.testing.assert_allclose(d.point_defect[t, i], np.linalg.norm(g_next - m @ g), rtol=1e-6, atol=1e-13)
        # the integral form of the mean value theorem is an identity
        assert d.mean_value_defect[t] <= 1e-12 * max(1.0, np.linalg.norm(g)), d.mean_value_defect[t]
        assert d.point_defect[t, 0] > 1e3 * d.mean_value_defect[t]
        nodes, weights = ntklib.gauss_legendre(quadrature)
        jbar = sum(w * _dense(net, _between(p, nxt, s), x) for s, w in zip(nodes, weights))
        np.testing.assert_allclose(d.contraction_mean[t], np.linalg.norm(eye - lr * jbar @ jt.T, 2), rtol=1e-10)
        np.testing.assert_allclose(d.kernel_gap[t], np.linalg.norm(j0 @ j0.T - jbar @ jt.T, 2), rtol=1e-9)
    np.testing.assert_allclose(d.ntk0, j0 @ j0.T, rtol=1e-11, atol=1e-12)


def test_descent_diagnostics_callable_fallback(x64):
    net, shape = NETS["mlp_std"]
    kx, kp, ky = jax.random.split(jax.random.PRNGKey(5), 3)
    x = jax.random.normal(kx, shape)
    _, params = net.init(kp, shape)
    y = jax.random.normal(ky, net.apply(params, x).shape)
    fn = lambda p, z: net.apply(p, z)  # noqa: E731
    a = ntklib.descent_diagnostics(net, params, x, y, 1e-3, 3)
    b = ntklib.descent_diagnostics(fn, params, x, y, 1e-3, 3)
    for field in ("residual", "step", "contraction", "contraction_mean", "ntk_drift", "jac_op"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-9, atol=1e-12)


def test_descent_diagnostics_validation(x64):
    net, shape = NETS["mlp_std"]
    x = jnp.ones(shape)
    _, params = net.init(jax.random.PRNGKey(0), shape)
    y = net.apply(params, x)
    with pytest.raises(ValueError):
        ntklib.descent_diagnostics(net, params, x, y, 1e-3, 0)
    with pytest.raises(ValueError):
        ntklib.descent_diagnostics(net, params, x, y, -1.0, 2)
    with pytest.raises(ValueError):
        ntklib.descent_diagnostics(net, params, x, y, 1e-3, 2, s_values=(1.5,))
    with pytest.raises(ValueError):
        ntklib.descent_diagnostics(net, params, x, y[:, :0], 1e-3, 2)


def test_ntk_eigenvalues_match_dense(case):
    net, params, other, x, _ = case
    batch = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), params, other)
    eig = np.asarray(ntklib.ntk_eigenvalues(net, batch, x))
    for i, p in enumerate((params, other)):
        j = _dense(net, p, x)
        np.testing.assert_allclose(eig[i], np.linalg.eigvalsh(j @ j.T), rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError):
        ntklib.ntk_eigenvalues(net, params, x)
