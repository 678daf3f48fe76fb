"""Analytic infinite-width kernels: closed forms, exact linear cases, convergence of the empirical NTK, errors.

float64 is switched on per test with the ``x64`` fixture of conftest.py (never globally).
The width-scaling tests run in float32: their errors (≥ 1e-2) are far above its rounding.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import ntklib as nl
from ntklib.analytic import _expectations

ACTS = ("erf", "relu", "identity")


def rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def sphere(n, d=4, seed=0, dtype=None):
    x = jax.random.normal(jax.random.PRNGKey(seed), (n, d), dtype or jnp.zeros(()).dtype)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def fit_slope(widths, errs):
    return float(np.polyfit(np.log(widths), np.log(errs), 1)[0])


# --------------------------------------------------------------------------- closed forms vs Monte Carlo

# numpy/scipy references, independent of the JAX code under test
PHI = {"erf": (scipy.special.erf, lambda z: 2 / math.sqrt(math.pi) * np.exp(-z * z)),
       "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(z.dtype)),
       "identity": (lambda z: z, np.ones_like)}

# (Σ11, Σ12, Σ22): generic, anti-correlated, uncorrelated, x = x' (ρ = 1), ρ = −1, large variance
COVARIANCES = [(1.0, 0.3, 0.7), (0.5, -0.4, 2.0), (1.3, 0.0, 0.2), (0.8, 0.8, 0.8), (1.1, -1.1, 1.1),
               (9.0, 5.0, 4.0)]


@pytest.mark.parametrize("act", ACTS)
def test_closed_forms_match_monte_carlo(act, x64):
    """E[φ(u)φ(v)] and E[φ'(u)φ'(v)] within 5 standard errors of a 10^6-sample average."""
    phi, dphi = PHI[act]
    m = 10**6
    z = np.random.default_rng(1).standard_normal((2, m))
    for k, (s11, s12, s22) in enumerate(COVARIANCES):
        u = math.sqrt(s11) * z[0]
        if abs(s12) < math.sqrt(s11 * s22):
            chol = np.linalg.cholesky(np.array([[s11, s12], [s12, s22]]))
            v = chol[1, 0] * z[0] + chol[1, 1] * z[1]
        else:  # rank one (|ρ| = 1): v = ±√(Σ22/Σ11) u
            v = math.copysign(math.sqrt(s22 / s11), s12) * u
        e, ed = _expectations(act, jnp.float64(s11), jnp.float64(s12), jnp.float64(s22))
        for name, closed, samples in (("E[φφ]", e, phi(u) * phi(v)), ("E[φ'φ']", ed, dphi(u) * dphi(v))):
            mc, se = samples.mean(), samples.std() / math.sqrt(m)
            assert abs(float(closed) - mc) <= 5 * se + 1e-12, (act, k, name, float(closed), mc, se)


@pytest.mark.parametrize("act", ("erf", "relu"))
def test_depth_one_kernels_match_monte_carlo(act, x64):
    """The assembled depth-1 𝒦 and Θ of (2.1) equal their Gaussian expectations, entry by entry."""
    phi, dphi = PHI[act]
    sw, sb, m = 1.3, 0.4, 4 * 10**5
    x = np.asarray(sphere(3, seed=2)) * np.array([[1.0], [2.0], [0.5]])
    k = nl.infinite_width_kernels(x, depth=1, activation=act, W_std=sw, b_std=sb)
    k1 = sw**2 * x @ x.T / 4 + sb**2
    np.testing.assert_allclose(k.nngp_layers[0], k1, rtol=1e-14)
    # h^1(x) over the three inputs is jointly N(0, 𝒦^1): m independent samples
    h = np.random.default_rng(3).standard_normal((m, 3)) @ np.linalg.cholesky(k1).T
    a, d = phi(h), dphi(h)
    nngp = sw**2 * a[:, :, None] * a[:, None, :] + sb**2                 # (m, 3, 3) samples
    ntk = nngp + sw**2 * d[:, :, None] * d[:, None, :] * k1
    for closed, samples in ((k.nngp, nngp), (k.ntk, ntk)):
        mc, se = samples.mean(axis=0), samples.std(axis=0) / math.sqrt(m)
        assert np.all(np.abs(np.asarray(closed) - mc) <= 5 * se), (closed, mc, se)


# --------------------------------------------------------------------------- exact cases

@pytest.mark.parametrize("depth", (0, 1, 3))
def test_identity_network_is_exact_linear_algebra(depth, x64):
    """φ = id: 𝒦^l = σ_w^{2l} G + σ_b² Σ_{j<l} σ_w^{2j}, Θ = Σ_l σ_w^{2(L+1-l)} 𝒦^l,
    Θ_std = Σ_{l≥2} σ_w^{2(L+1-l)} 𝒦^{l-1}, with G = x1 x2ᵀ/n_0."""
    sw, sb = 1.4, 0.6
    x1 = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (7, 4), jnp.float64))
    x2 = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (3, 4), jnp.float64))
    g = x1 @ x2.T / 4
    kl = [sw ** (2 * l) * g + sb**2 * sum(sw ** (2 * j) for j in range(l)) for l in range(1, depth + 2)]
    theta = sum(sw ** (2 * (depth + 1 - l)) * kl[l - 1] for l in range(1, depth + 2))
    k = nl.infinite_width_kernels(x1, x2, depth=depth, activation="identity", W_std=sw, b_std=sb)
    np.testing.assert_allclose(k.nngp, kl[-1], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(k.ntk, theta, rtol=1e-13, atol=1e-13)
    for got, want in zip(k.nngp_layers, kl):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    if depth:
        theta_std = sum(sw ** (2 * (depth + 1 - l)) * kl[l - 2] for l in range(2, depth + 2))
        ks = nl.infinite_width_kernels(x1, x2, depth=depth, activation="identity", W_std=sw, b_std=sb,
                                       parametrization="standard")
        np.testing.assert_allclose(ks.ntk, theta_std, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(ks.nngp, k.nngp, rtol=1e-15)


@pytest.mark.parametrize("dtype", ("float32", "float64"))
def test_diagonal_x_equals_x_prime_is_exact(dtype, request):
    """At x = x' (θ = 0): ReLU 𝒦^{l+1} = σ_w²/2 𝒦^l + σ_b², 𝒦̇ = 1/2;
    erf 𝒦^{l+1} = σ_w² (2/π) arcsin(2𝒦/(1+2𝒦)) + σ_b², 𝒦̇ = (4/π)/√(1+4𝒦)."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    dt = jnp.dtype(dtype)
    tol = 1e-6 if dtype == "float32" else 1e-14
    x = sphere(7, seed=6, dtype=dt) * jnp.arange(1, 8, dtype=dt)[:, None]
    sw, sb, depth = 1.5, 0.3, 4
    q = np.asarray(sw**2 * jnp.sum(x * x, 1) / 4 + sb**2, np.float64)
    for act in ("relu", "erf"):
        k = nl.infinite_width_kernels(x, depth=depth, activation=act, W_std=sw, b_std=sb)
        assert k.ntk.dtype == dt and k.nngp.dtype == dt
        qq, th = q.copy(), q.copy()
        for _ in range(depth):
            if act == "relu":
                e, ed = qq / 2, 0.5
            else:
                e = 2 / np.pi * np.arcsin(2 * qq / (1 + 2 * qq))
                ed = 4 / np.pi / np.sqrt(1 + 4 * qq)
            qq = sw**2 * e + sb**2
            th = qq + sw**2 * ed * th
        np.testing.assert_allclose(np.diag(k.nngp), qq, rtol=tol)
        np.testing.assert_allclose(np.diag(k.ntk), th, rtol=tol)
        # the same numbers when x2 is passed explicitly: only the first Gram matrix rounds differently, but
        # at x = x' the arc-cosine turns a rounding ε of the correlation into θ ≈ √(2ε)
        k2 = nl.infinite_width_kernels(x, x, depth=depth, activation=act, W_std=sw, b_std=sb)
        np.testing.assert_allclose(k2.ntk, k.ntk, rtol=1e-3 if dtype == "float32" else 1e-7)


def test_kernels_are_psd_layers_sum_jit_and_grad(x64):
    x1, x2 = sphere(7, seed=7), sphere(3, seed=8)
    for parametrization in ("ntk", "standard"):
        for act in ACTS:
            kw = dict(depth=2, activation=act, W_std=1.2, b_std=0.5, parametrization=parametrization)
            k = nl.infinite_width_kernels(x1, **kw)
            assert len(k.nngp_layers) == len(k.ntk_layers) == 3
            np.testing.assert_allclose(sum(k.ntk_layers), k.ntk, rtol=1e-14)
            np.testing.assert_allclose(k.nngp_layers[-1], k.nngp, rtol=0)
            for m in (k.nngp, k.ntk):
                np.testing.assert_allclose(m, m.T, rtol=1e-14)
                assert float(jnp.linalg.eigvalsh(m).min()) > -1e-12 * float(jnp.abs(m).max())
    # jit gives the eager numbers; gradients are finite, also on the diagonal x = x' where ReLU's θ = 0
    kw = dict(depth=2, activation="relu", W_std=1.2, b_std=0.5)
    jitted = jax.jit(lambda a, b: nl.infinite_width_kernels(a, b, **kw))(x1, x2)
    eager = nl.infinite_width_kernels(x1, x2, **kw)
    np.testing.assert_allclose(jitted.ntk, eager.ntk, rtol=1e-14)
    g = jax.jit(jax.grad(lambda a: nl.infinite_width_kernels(a, **kw).ntk.sum()))(x1)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_dtype_follows_inputs(x64):
    x = np.ones((7, 4), np.float32)
    assert nl.infinite_width_kernels(x, depth=1).ntk.dtype == jnp.float32
    assert nl.infinite_width_kernels(x.astype(np.float64), depth=1).ntk.dtype == jnp.float64
    assert nl.infinite_width_kernels(np.ones((7, 4), np.int32), depth=1).ntk.dtype == jnp.float64


def test_kernels_of_reads_the_network(x64):
    x1, x2 = sphere(7, seed=9), sphere(3, seed=10)
    for p in ("ntk", "standard"):
        net = nl.mlp([5, 6], 2, "relu", W_std=1.3, b_std=0.2, parametrization=p)
        want = nl.infinite_width_kernels(x1, x2, depth=2, activation="relu", W_std=1.3, b_std=0.2, parametrization=p)
        got = nl.kernels_of(net, x1, x2)
        np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-15)
        np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-15)
    # mixed activations, one per hidden layer
    net = nl.serial(nl.Dense(5), nl.Erf, nl.Dense(5), nl.Relu, nl.Dense(5), nl.Identity, nl.Dense(1))
    want = nl.infinite_width_kernels(x1, depth=3, activation=("erf", nl.Relu, "identity"))
    np.testing.assert_allclose(nl.kernels_of(net, x1).ntk, want.ntk, rtol=1e-15)
    assert nl.kernels_of(nl.mlp([], 3, W_std=0.7), x1).ntk.shape == (7, 7)     # depth 0: a linear model


# --------------------------------------------------------------------------- convergence of the empirical kernels

WIDTHS = (64, 128, 256, 512, 1024, 2048)        # 1.5 decades
SEEDS = 6
SETUPS = {"erf": (1.5, 0.2), "relu": (1.4, 0.2)}
DEPTH = 2


def draw_params(net, n0, seed):
    """An init of ``net`` (an ntklib MLP) from numpy's generator: ω, β ~ N(0, 1) for (2.1), and for (A.1)
    the trainable W = σ_w/√fan_in · ω, b = σ_b · β (``Dense.scales`` of the NTK-parametrization twin).

    The distribution of ``net.init``, without compiling JAX's sampler once per width and seed.
    """
    rng = np.random.default_rng(seed)
    params, fan_in = [], n0
    for layer in net.layers:
        if isinstance(layer, nl.Dense):
            w = rng.standard_normal((fan_in, layer.out_dim), dtype=np.float32)
            b = rng.standard_normal((layer.out_dim,), dtype=np.float32)
            if layer.parametrization == "standard":
                c_w, c_b = nl.Dense(layer.out_dim, layer.W_std, layer.b_std).scales(fan_in)
                w, b = np.float32(c_w) * w, np.float32(c_b) * b
            params.append({"W": w, "b": b})
            fan_in = layer.out_dim
        else:
            params.append(())
    return tuple(params)


def _empirical_errors(act, parametrization, widths, x):
    """Relative errors ‖Θ̂_0 − Θ‖_F/‖Θ‖_F, shape (len(widths), SEEDS), independent draws per width and seed."""
    sw, sb = SETUPS[act]
    theta = nl.infinite_width_kernels(x, depth=DEPTH, activation=act, W_std=sw, b_std=sb,
                                      parametrization=parametrization).ntk
    errs = np.empty((len(widths), SEEDS))
    for i, n in enumerate(widths):
        net = nl.mlp([n] * DEPTH, 1, act, W_std=sw, b_std=sb, parametrization=parametrization)
        for s in range(SEEDS):
            params = draw_params(net, x.shape[1], (s, n, parametrization == "standard"))
            emp = nl.empirical_ntk(net, params, x, method="structured_derivatives")
            if parametrization == "standard":
                emp = emp / n                                   # (A.7): Θ̂ = (1/n) J Jᵀ
            errs[i, s] = rel_err(emp, theta)
    return errs


@pytest.mark.parametrize("act", ("erf", "relu"))
def test_empirical_ntk_converges_at_rate_n_minus_half(act):
    """‖Θ̂_0 − Θ‖_F/‖Θ‖_F over widths 64…2048, geometric mean over 6 seeds: log-log slope in [−0.65, −0.35]."""
    x = sphere(16, seed=11, dtype=jnp.float32)
    errs = _empirical_errors(act, "ntk", WIDTHS, x)
    gm = np.exp(np.log(errs).mean(axis=1))
    slope = fit_slope(WIDTHS, gm)
    print(f"{act}: slope {slope:.3f}, errors {np.round(gm, 4)}")
    assert -0.65 <= slope <= -0.35, (slope, gm)
    assert gm[-1] < 0.1


@pytest.mark.parametrize("act", ("erf", "relu"))
def test_standard_parametrization_limit_of_A7(act):
    """(1/n) J Jᵀ of a standard-parametrization net → Θ_std, within the measured n^{-1/2} fluctuation.

    The constant c of ``err ≈ c n^{-1/2}`` is measured at n = 128 (geometric
    mean over 6 seeds); at n = 2048 the geometric mean must be within
    ``2 c/√n`` (slack 2 for the seed noise of both means). The plausible wrong
    limits (the NTK-parametrization Θ, or Θ/σ_w² with the first layer and the
    biases kept) are further from Θ_std than 2 such tolerances, so the check has power.
    """
    x = sphere(16, seed=12, dtype=jnp.float32)
    small, large = 128, 2048
    errs = _empirical_errors(act, "standard", (small, large), x)
    gm = np.exp(np.log(errs).mean(axis=1))
    c = gm[0] * math.sqrt(small)
    tol = 2 * c / math.sqrt(large)
    print(f"{act} standard: c = {c:.2f}, error at n={large}: {gm[1]:.4f} (seeds {np.round(errs[1], 3)}), "
          f"tol {tol:.3f}")
    assert gm[1] <= tol, (errs, tol)
    sw, sb = SETUPS[act]
    kw = dict(depth=2, activation=act, W_std=sw, b_std=sb)
    theta_ntk = nl.infinite_width_kernels(x, **kw).ntk
    theta_std = nl.infinite_width_kernels(x, **kw, parametrization="standard").ntk
    for wrong in (theta_ntk, theta_ntk / sw**2):
        assert rel_err(wrong, theta_std) > 2 * tol, rel_err(wrong, theta_std)


@pytest.mark.parametrize("parametrization", ("ntk", "standard"))
def test_layer_blocks_and_preactivation_variances(parametrization):
    """At n = 2048: layerwise_ntk blocks → ntk_layers, and (1/n) h^l h'^lᵀ → 𝒦^l for every Dense layer.

    The output covariance 𝒦^{L+1} is read off a second, n-wide readout drawn like the first.
    """
    n, act, depth = 2048, "erf", 2
    sw, sb = SETUPS[act]
    x = sphere(8, seed=13, dtype=jnp.float32)
    net = nl.mlp([n] * depth, 1, act, W_std=sw, b_std=sb, parametrization=parametrization)
    wide_readout = nl.Dense(n, W_std=sw, b_std=sb, parametrization=parametrization)
    k = nl.kernels_of(net, x)
    norm = float(jnp.linalg.norm(k.ntk))
    scale = n if parametrization == "standard" else 1
    block_errs, var_errs = [], []
    for s in range(3):
        _, params = net.init(jax.random.PRNGKey(2000 + s), (-1, 4), jnp.float32)     # the library's own init
        blocks = nl.layerwise_ntk(net, params, x)
        assert len(blocks) == len(k.ntk_layers) == depth + 1
        block_errs.append([float(jnp.linalg.norm(b / scale - a)) / norm for b, a in zip(blocks, k.ntk_layers)])
        h, grams = x, []
        for layer, p in zip(net.layers[:-1], params[:-1]):
            h = layer.apply(p, h)
            if isinstance(layer, nl.Dense):
                grams.append(h @ h.T / n)
        p_out = draw_params(nl.serial(wide_readout), n, (3000, s, parametrization == "standard"))[0]
        out = wide_readout.apply(p_out, h)
        grams.append(out @ out.T / n)
        var_errs.append([rel_err(g, kl) for g, kl in zip(grams, k.nngp_layers)])
    tol = 5 / math.sqrt(n)  # fluctuations are c·n^{-1/2} with c ≈ 1–4 here
    print(f"{parametrization}: block errors {np.round(block_errs, 3).tolist()}, "
          f"K^l errors {np.round(var_errs, 3).tolist()}")
    assert np.max(block_errs) < tol and np.max(var_errs) < tol


# --------------------------------------------------------------------------- errors

def test_errors_name_the_argument():
    x = np.ones((3, 4))
    cases = [
        (dict(activation="softplus"), ValueError, "unknown activation"),
        (dict(activation="tanh"), ValueError, "'tanh' has no closed-form"),
        (dict(activation=nl.Tanh), ValueError, "'Tanh' has no closed-form"),
        (dict(activation=3), TypeError, "activation"),
        (dict(activation=("erf",)), ValueError, "one entry per hidden layer"),
        (dict(depth=-1), ValueError, "depth must be >= 0"),
        (dict(depth=1.5), TypeError, "depth must be an int"),
        (dict(W_std=-1.0), ValueError, "W_std"),
        (dict(b_std=-0.1), ValueError, "b_std"),
        (dict(W_std=float("nan")), ValueError, "W_std"),
        (dict(b_std="a"), TypeError, "b_std"),
        (dict(parametrization="mup"), ValueError, "parametrization"),
        (dict(depth=0, parametrization="standard"), ValueError, "depth >= 1"),
    ]
    for kw, exc, msg in cases:
        kw = {"depth": 2, **kw}
        with pytest.raises(exc, match=msg):
            nl.infinite_width_kernels(x, **kw)
    with pytest.raises(ValueError, match="x2 must have the same number of features"):
        nl.infinite_width_kernels(x, np.ones((2, 3)), depth=1)
    with pytest.raises(ValueError, match="x1 contains non-finite"):
        nl.infinite_width_kernels(np.array([[1.0, np.nan]]), depth=1)
    with pytest.raises(ValueError, match="x2 contains non-finite"):
        nl.infinite_width_kernels(np.ones((1, 2)), np.array([[np.inf, 0.0]]), depth=1)
    with pytest.raises(ValueError, match="x1 must have shape"):
        nl.infinite_width_kernels(np.ones(4), depth=1)
    with pytest.raises(TypeError, match="x1 must be a numeric array"):
        nl.infinite_width_kernels(np.array([["a", "b"]]), depth=1)


def test_kernels_of_rejects_unsupported_networks():
    x = np.ones((2, 3))
    cases = [
        (nl.mlp([4], 1, "tanh"), "'Tanh' has no closed-form"),
        (nl.mlp([4], 1, "gelu"), "'Gelu' has no closed-form"),
        (nl.serial(nl.Dense(4, W_std=1.0), nl.Erf, nl.Dense(1, W_std=2.0)), "share W_std"),
        (nl.serial(nl.Dense(4, b_std=0.1), nl.Erf, nl.Dense(1)), "share b_std"),
        (nl.serial(nl.Dense(4), nl.Erf, nl.Dense(1, parametrization="standard")), "share parametrization"),
        (nl.mlp([4], 1, "erf", parametrization="standard", init="glorot_uniform"), "glorot_uniform"),
        (nl.serial(nl.Dense(4), nl.Erf, nl.Erf, nl.Dense(4), nl.Dense(1)), "must be Dense"),
        (nl.serial(nl.Dense(4), nl.Dense(4), nl.Dense(1)), "must be an activation"),
        (nl.serial(nl.Dense(4), nl.Erf), "odd number of layers"),
        (nl.cnn([2], 1), "odd number of layers|must be Dense"),
        (nl.serial(nl.Dense(4), nl.Activation("Softplus", jax.nn.softplus), nl.Dense(1)), "'Softplus'"),
    ]
    for net, msg in cases:
        with pytest.raises(ValueError, match=msg):
            nl.kernels_of(net, x)
    with pytest.raises(TypeError, match="net must be an ntklib network"):
        nl.kernels_of(lambda p, x: x, x)
