"""Tests of ntklib.local_lipschitz: Theorem A.2 (A.12) tools and the Lemma A.1 quantities (A.13)–(A.24)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.special import gammaincc
from scipy.stats import binomtest

import ntklib


@pytest.fixture(scope="module", autouse=True)
def x64():
    """float64 for this module only; the flag does not leak to other modules."""
    with jax.enable_x64(True):
        yield


# --------------------------------------------------------------------------- Theorem A.2

def test_singular_values_match_svd_and_are_reproducible():
    lo, hi = ntklib.gaussian_singular_values(3, (6, 3), 10, chunk=4)
    assert lo.shape == hi.shape == (10,) and np.all(lo <= hi)
    # the same draws, reproduced chunk by chunk from the same PCG64 stream
    gen = np.random.default_rng(3)
    mats = np.concatenate([gen.standard_normal((m, 6, 3)) for m in (4, 4, 2)])
    s = np.linalg.svd(mats, compute_uv=False)
    np.testing.assert_allclose(lo, s[:, -1], rtol=1e-12)
    np.testing.assert_allclose(hi, s[:, 0], rtol=1e-12)
    lo2, hi2 = ntklib.gaussian_singular_values(np.random.default_rng(3), (6, 3), 10, chunk=4)
    np.testing.assert_array_equal(lo, lo2)
    np.testing.assert_array_equal(hi, hi2)
    with pytest.raises(ValueError, match="shape"):
        ntklib.gaussian_singular_values(0, (3, 6), 10)
    with pytest.raises(TypeError, match="rng"):
        ntklib.gaussian_singular_values(jax.random.PRNGKey(0), (6, 3), 10)


def test_column_singular_value_is_chi_distributed():
    """For n = 1, s = ‖g‖ ~ χ_N: the tail P(s > u) = Q(N/2, u²/2) matches the sample within 5 standard errors."""
    m = 200_000
    lo, hi = ntklib.gaussian_singular_values(0, (3, 1), m, chunk=50_000)
    np.testing.assert_array_equal(lo, hi)
    for u in (1.0, 2.0, 3.0):
        p = gammaincc(1.5, u**2 / 2)
        assert abs(np.mean(hi > u) - p) < 5 * np.sqrt(p * (1 - p) / m)


def test_extreme_singular_values_near_bai_yin():
    """Large Gaussian matrices: s_max ≈ √N + √n and s_min ≈ √N − √n (to O(N^{-1/6}) fluctuations)."""
    lo, hi = ntklib.gaussian_singular_values(1, (200, 50), 10)
    edge_hi, edge_lo = np.sqrt(200) + np.sqrt(50), np.sqrt(200) - np.sqrt(50)
    assert abs(np.mean(hi) - edge_hi) < 0.8 and abs(np.mean(lo) - edge_lo) < 0.8
    assert np.all(hi <= edge_hi + 3.0) and np.all(lo >= edge_lo - 3.0)     # (A.12) at t = 3


def test_vershynin_bounds():
    lo, hi = ntklib.vershynin_bounds(16, 4, 1.0)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(7.0)
    lo, hi = ntklib.vershynin_bounds(16, 4, np.array([0.25, 4.0]), upper="sqrt_t")
    np.testing.assert_allclose(hi, [6.5, 8.0])
    np.testing.assert_allclose(lo, [1.75, -2.0])
    with pytest.raises(ValueError, match="upper"):
        ntklib.vershynin_bounds(4, 4, 1.0, upper="t2")
    with pytest.raises(ValueError, match="t must"):
        ntklib.vershynin_bounds(4, 4, -1.0)


def test_binomial_interval_is_clopper_pearson():
    for k, m in ((0, 50), (3, 50), (50, 50), (17, 1000)):
        lo, hi = ntklib.binomial_interval(k, m, 0.99)
        ref = binomtest(k, m).proportion_ci(confidence_level=0.99, method="exact")
        assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)
    lo, hi = ntklib.binomial_interval(np.array([0, 5]), 10)
    assert lo.shape == (2,) and lo[0] == 0.0 and 0 < lo[1] < 0.5 < hi[1] < 1
    with pytest.raises(ValueError):
        ntklib.binomial_interval(11, 10)
    with pytest.raises(ValueError):
        ntklib.binomial_interval(1, 10, confidence=1.0)


@pytest.mark.parametrize("shape", [(5, 3), (3, 200), (100, 80), (70, 70)])
def test_operator_norm(shape):
    a = np.random.default_rng(0).standard_normal(shape)
    assert ntklib.operator_norm(a) == pytest.approx(np.linalg.norm(a, 2), rel=1e-12)
    with pytest.raises(ValueError):
        ntklib.operator_norm(np.zeros(3))


# --------------------------------------------------------------------------- (A.13)–(A.24)

NETS = {
    "standard_erf": ntklib.mlp([9, 7], 2, "erf", W_std=1.4, b_std=0.3, parametrization="standard"),
    "ntk_tanh": ntklib.mlp([8, 8], 1, "tanh", W_std=1.2, b_std=0.2),
    "standard_relu": ntklib.mlp([10], 3, "relu", W_std=1.5, b_std=0.1, parametrization="standard"),
}


@pytest.fixture(scope="module", params=list(NETS))
def case(request, x64):
    net = NETS[request.param]
    kx, kp, kd = jax.random.split(jax.random.PRNGKey(11), 3)
    x = jax.random.normal(kx, (5, 3))
    _, p = net.init(kp, x.shape)
    d = jax.tree_util.tree_map(lambda a: 1e-2 * jax.random.normal(kd, a.shape), p)
    q = jax.tree_util.tree_map(jnp.add, p, d)
    return net, p, q, x


def test_layer_signals(case):
    net, p, _, x = case
    sig = ntklib.layer_signals(net, p, x)
    o = net.apply(p, x).shape[1]
    assert len(sig.inputs) == len(sig.deltas) == len(net.weight_layers())
    np.testing.assert_array_equal(sig.inputs[0], x)
    eye = np.broadcast_to(np.eye(o)[:, None, :], (o, x.shape[0], o))
    np.testing.assert_array_equal(sig.deltas[-1], eye)               # δ^{L+1} = ∂f/∂f = I
    # δ^l = ∂f/∂h^l: the Jacobian block of layer l's bias is c_b δ^l (A.19)
    j = np.asarray(ntklib.jacobian(net, p, x)).reshape(x.shape[0], o, -1)
    flat, unravel = ravel_pytree(p)
    for k, li in enumerate(net.weight_layers()):
        mask = jax.tree_util.tree_map(jnp.zeros_like, p)
        mask = tuple({"W": m["W"], "b": jnp.ones_like(m["b"])} if i == li else m for i, m in enumerate(mask))
        cols = np.asarray(ravel_pytree(mask)[0]).astype(bool)
        c_b = net.layers[li].scales(sig.inputs[k].shape[-1])[1]
        np.testing.assert_allclose(j[:, :, cols], c_b * np.transpose(sig.deltas[k], (1, 0, 2)), atol=1e-13)


def test_pair_statistics_against_dense_jacobian(case):
    net, p, q, x = case
    st = ntklib.pair_statistics(net, p, q, x)
    ja, jb = np.asarray(ntklib.jacobian(net, p, x)), np.asarray(ntklib.jacobian(net, q, x))
    assert float(st.jac_op) == pytest.approx(np.linalg.norm(ja, 2), rel=1e-10)
    assert float(st.jac_frob) == pytest.approx(np.linalg.norm(ja), rel=1e-12)
    assert float(st.jac_diff) == pytest.approx(np.linalg.norm(ja - jb), rel=1e-9)
    assert float(st.distance) == pytest.approx(np.linalg.norm(ravel_pytree(p)[0] - ravel_pytree(q)[0]), rel=1e-12)
    sa, sb = ntklib.layer_signals(net, p, x), ntklib.layer_signals(net, q, x)
    np.testing.assert_allclose(st.input_norms, [np.linalg.norm(a) for a in sa.inputs], rtol=1e-12)
    np.testing.assert_allclose(st.delta_norms, [np.linalg.norm(d) for d in sa.deltas], rtol=1e-12)
    np.testing.assert_allclose(st.input_diffs, [np.linalg.norm(a - b) for a, b in zip(sa.inputs, sb.inputs)],
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(st.delta_diffs, [np.linalg.norm(a - b) for a, b in zip(sa.deltas, sb.deltas)],
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(st.max_input_norms, [np.linalg.norm(a, axis=1).max() for a in sa.inputs], rtol=1e-12)
    # a point against itself: no difference, no sign change
    same = ntklib.pair_statistics(net, p, p, x)
    assert float(same.jac_diff) <= 1e-14 * float(same.jac_frob) and float(same.distance) == 0.0
    assert int(same.sign_changes.sum()) == 0


def test_sign_changes_count_flipped_preactivations():
    net = ntklib.mlp([6], 1, "relu", parametrization="standard")
    x = jnp.array([[1.0, 0.0]])
    p = ({"W": jnp.array([[1.0, -1.0, 2.0, 0.5, -0.3, 1.0], [0.0] * 6]), "b": jnp.zeros(6)}, (),
         {"W": jnp.ones((6, 1)), "b": jnp.zeros(1)})
    q = ({"W": p[0]["W"], "b": jnp.array([-2.0, 2.0, 0.0, 0.0, 0.0, 0.0])}, (), p[2])
    st = ntklib.pair_statistics(net, p, q, x)
    assert st.sign_changes.tolist()[0] == 2          # units 0 and 1 flip; unit 2 stays positive
    with pytest.raises(ValueError, match="Dense"):
        ntklib.pair_statistics(ntklib.cnn([2], 1), None, None, jnp.zeros((1, 4, 4, 1)))


def test_sample_pair_in_ball():
    net = ntklib.mlp([20, 20], 1, "erf", parametrization="standard")
    _, p0 = net.init(jax.random.PRNGKey(0), (1, 3))
    flat0 = ravel_pytree(p0)[0]
    radius = 0.3
    dists = []
    for i in range(5):
        a, b = ntklib.sample_pair(i, p0, radius)
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(p0)
        dists += [np.linalg.norm(np.asarray(ravel_pytree(pt)[0] - flat0)) for pt in (a, b)]
    dists = np.array(dists)
    p = flat0.size
    assert np.all(dists < radius) and np.all(dists > radius * 0.9)      # U^{1/P}: near the sphere for large P
    assert abs(np.mean(dists) - radius * p / (p + 1)) < 0.01 * radius
    a1, b1 = ntklib.sample_pair(0, p0, radius)
    a2, _ = ntklib.sample_pair(np.random.default_rng(0), p0, radius)
    np.testing.assert_array_equal(ravel_pytree(a1)[0], ravel_pytree(a2)[0])
    assert not np.array_equal(ravel_pytree(a1)[0], ravel_pytree(b1)[0])     # two independent points
    assert a1[0]["W"].dtype == p0[0]["W"].dtype
    with pytest.raises(ValueError, match="radius"):
        ntklib.sample_pair(0, p0, 0.0)


def test_frobenius_split_from_signals_is_a18(case):
    """(A.18)–(A.20): ‖J‖_F² = Σ_l Σ_x c_w²‖x^{l-1}(x)‖²‖δ^l(x)‖² + c_b²‖δ^l(x)‖², against frobenius_split."""
    net, p, _, x = case
    sig = ntklib.layer_signals(net, p, x)
    split = ntklib.frobenius_split(net, p, x)
    for k, li in enumerate(net.weight_layers()):
        c_w, c_b = net.layers[li].scales(sig.inputs[k].shape[-1])
        d2 = np.sum(np.asarray(sig.deltas[k]) ** 2, axis=(0, 2))
        x2 = np.sum(np.asarray(sig.inputs[k]) ** 2, axis=1)
        assert c_w**2 * np.sum(x2 * d2) == pytest.approx(float(split[li]["W"]), rel=1e-12)
        assert c_b**2 * np.sum(d2) == pytest.approx(float(split[li]["b"]), rel=1e-12)
