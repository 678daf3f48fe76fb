"""Tests of ntklib.jacobian against the dense Jacobian J(θ) of (A.6)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import ntklib


@pytest.fixture(scope="module", autouse=True)
def x64():
    """float64 for this module only; the flag does not leak to other modules."""
    with jax.enable_x64(True):
        yield


NETS = {
    "mlp_ntk": (ntklib.mlp([10, 10], 2, "erf", W_std=1.4, b_std=0.3), (4, 3)),
    "mlp_std": (ntklib.mlp([10, 10], 2, "tanh", W_std=1.4, b_std=0.3, parametrization="standard"), (4, 3)),
    "cnn": (ntklib.cnn([3], 2, "tanh", W_std=1.3, b_std=0.2), (3, 4, 4, 2)),
}


@pytest.fixture(scope="module", params=list(NETS))
def case(request, x64):
    net, shape = NETS[request.param]
    kx, kp = jax.random.split(jax.random.PRNGKey(7))
    x = jax.random.normal(kx, shape)
    _, params = net.init(kp, shape)
    return net, params, x


def _vec_ntk(k):
    n, _, o, _ = k.shape
    return np.asarray(k).transpose(0, 2, 1, 3).reshape(n * o, n * o)


def test_jacobian_layout(case):
    net, params, x = case
    j = ntklib.jacobian(net, params, x)
    flat, unravel = ravel_pytree(params)
    n, o = x.shape[0], 2
    assert j.shape == (n * o, flat.size)
    # rows in (example, output) order, columns in ravel_pytree order: J v is the forward-mode derivative along v
    v = jnp.cos(jnp.arange(flat.size, dtype=flat.dtype))
    jv = jax.jvp(lambda p: net.apply(p, x), (params,), (unravel(v),))[1]
    np.testing.assert_allclose(j @ v, jv.reshape(-1), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(j[1 * o + 0], jax.grad(lambda w: net.apply(unravel(w), x)[1, 0])(flat), rtol=1e-12,
                               atol=1e-14)
    # J Jᵀ is the full NTK (3.9) in vec-(example, output) order
    k = ntklib.empirical_ntk(net, params, x, trace_axes=(), method="structured_derivatives")
    np.testing.assert_allclose(j @ j.T, _vec_ntk(k), rtol=1e-11, atol=1e-12)


def test_norms_and_split_match_dense(case):
    net, params, x = case
    j = np.asarray(ntklib.jacobian(net, params, x))
    norms = ntklib.jacobian_norms(net, params, x)
    np.testing.assert_allclose(norms.op, np.linalg.norm(j, 2), rtol=1e-10)
    np.testing.assert_allclose(norms.frobenius, np.linalg.norm(j), rtol=1e-12)
    # (A.18)–(A.19): per-leaf column blocks of the dense J
    split = ntklib.frobenius_split(net, params, x)
    _, unravel = ravel_pytree(params)
    expected = unravel(jnp.asarray((j**2).sum(axis=0)))
    assert jax.tree_util.tree_structure(split) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(lambda a: 0.0, params))
    for got, blk in zip(jax.tree_util.tree_leaves(split), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, float(jnp.sum(blk)), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(sum(jax.tree_util.tree_leaves(split)), np.linalg.norm(j) ** 2, rtol=1e-12)


def test_jacobian_distance_matches_dense(case):
    net, params, x = case
    both = ntklib.sample_ball(jax.random.PRNGKey(1), params, 0.3, 2)
    pa = jax.tree_util.tree_map(lambda a: a[0], both)
    pb = jax.tree_util.tree_map(lambda a: a[1], both)
    ja, jb = np.asarray(ntklib.jacobian(net, pa, x)), np.asarray(ntklib.jacobian(net, pb, x))
    d = ntklib.jacobian_distance(net, pa, pb, x)
    np.testing.assert_allclose(d, np.linalg.norm(ja - jb), rtol=1e-9)
    # the trace identity ‖J − J̃‖_F² = tr K + tr K̃ − 2 tr K_cross
    ident = np.trace(ja @ ja.T) + np.trace(jb @ jb.T) - 2 * np.trace(ja @ jb.T)
    np.testing.assert_allclose(d**2, ident, rtol=1e-8)


def test_lipschitz_ratios_match_dense():
    net, shape = NETS["mlp_ntk"]
    kx, kp, ks = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, shape)
    _, p0 = net.init(kp, shape)
    radius = 0.5
    out = ntklib.lipschitz_ratios(net, p0, x, radius, 3, ks)
    assert out.ratio.shape == out.op_norm.shape == (3,)
    k1, k2 = jax.random.split(ks)
    pa, pb = ntklib.sample_ball(k1, p0, radius, 3), ntklib.sample_ball(k2, p0, radius, 3)
    flat0 = ravel_pytree(p0)[0]
    for i in range(3):
        a = jax.tree_util.tree_map(lambda t, i=i: t[i], pa)
        b = jax.tree_util.tree_map(lambda t, i=i: t[i], pb)
        fa, fb = ravel_pytree(a)[0], ravel_pytree(b)[0]
        assert np.linalg.norm(fa - flat0) < radius and np.linalg.norm(fb - flat0) < radius
        ja, jb = np.asarray(ntklib.jacobian(net, a, x)), np.asarray(ntklib.jacobian(net, b, x))
        dist = np.linalg.norm(fa - fb)
        np.testing.assert_allclose(out.distance[i], dist, rtol=1e-12)
        np.testing.assert_allclose(out.ratio[i], np.linalg.norm(ja - jb) / dist, rtol=1e-9)
        np.testing.assert_allclose(out.op_norm[i], np.linalg.norm(ja, 2), rtol=1e-10)
    # generic callable (dense fallback) and chunked evaluation give the same numbers
    generic = ntklib.lipschitz_ratios(lambda p, xx: net.apply(p, xx), p0, x, radius, 3, ks, batch_size=2)
    np.testing.assert_allclose(generic.ratio, out.ratio, rtol=1e-9)
    np.testing.assert_allclose(generic.op_norm, out.op_norm, rtol=1e-10)


def test_generic_equinox_model():
    """The "any model" path: an equinox MLP wrapped as f(params, x)."""
    model = eqx.nn.MLP(3, 2, 8, 2, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)

    def f(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    j = np.asarray(ntklib.jacobian(f, params, x))
    assert j.shape == (8, ravel_pytree(params)[0].size)
    norms = ntklib.jacobian_norms(f, params, x)
    np.testing.assert_allclose(norms.op, np.linalg.norm(j, 2), rtol=1e-10)
    np.testing.assert_allclose(norms.frobenius, np.linalg.norm(j), rtol=1e-12)


def test_errors():
    net, shape = NETS["mlp_ntk"]
    x = jnp.ones(shape)
    _, p0 = net.init(jax.random.PRNGKey(0), shape)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="radius"):
        ntklib.lipschitz_ratios(net, p0, x, -1.0, 2, key)
    with pytest.raises(ValueError, match="n_pairs"):
        ntklib.lipschitz_ratios(net, p0, x, 1.0, 0, key)
    with pytest.raises(ValueError, match="batch_size"):
        ntklib.lipschitz_ratios(net, p0, x, 1.0, 2, key, batch_size=0)
    with pytest.raises(TypeError, match="ntklib network"):
        ntklib.frobenius_split(lambda p, xx: net.apply(p, xx), p0, x)
    with pytest.raises(ValueError, match="params"):
        ntklib.jacobian(net, p0, jnp.ones((4, 5)))                  # x does not fit the network
    with pytest.raises(ValueError, match="x must have shape"):
        ntklib.jacobian_norms(net, p0, jnp.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        ntklib.jacobian(net, p0, jnp.full(shape, jnp.nan))
    with pytest.raises(ValueError, match="params_b"):
        ntklib.jacobian_distance(net, p0, p0[:-1], x)
