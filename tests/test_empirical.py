"""The empirical NTK: all methods agree, the kernel is a Gram matrix, blocking is exact, errors are clear."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ntklib as nl

METHODS = ("ntk_vector_products", "structured_derivatives", "auto")
# Relative tolerances of the issue: 1e-10 in float64, 1e-5 in float32 (a few hundred ulps of each dtype).
RTOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}


def rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def make_mlp(parametrization, act="erf", widths=(7, 5), out=3, dtype=jnp.float64, seed=0):
    net = nl.mlp(widths, out, act, W_std=1.3, b_std=0.4, parametrization=parametrization)
    _, params = net.init(jax.random.PRNGKey(seed), (-1, 4), dtype)
    x1 = jax.random.normal(jax.random.PRNGKey(seed + 1), (5, 4), dtype)
    x2 = jax.random.normal(jax.random.PRNGKey(seed + 2), (3, 4), dtype)
    return net, params, x1, x2


def make_cnn(parametrization, padding="SAME", dtype=jnp.float64, seed=0):
    net = nl.serial(
        nl.Conv(4, (3, 3), padding, W_std=1.2, b_std=0.3, parametrization=parametrization), nl.Relu,
        nl.Conv(5, (2, 3), padding, W_std=1.1, b_std=0.2, parametrization=parametrization), nl.Erf,
        nl.GlobalAvgPool, nl.Dense(3, W_std=1.5, b_std=0.1, parametrization=parametrization))
    _, params = net.init(jax.random.PRNGKey(seed), (-1, 6, 5, 2), dtype)
    x1 = jax.random.normal(jax.random.PRNGKey(seed + 1), (3, 6, 5, 2), dtype)
    x2 = jax.random.normal(jax.random.PRNGKey(seed + 2), (2, 6, 5, 2), dtype)
    return net, params, x1, x2


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("parametrization", ["ntk", "standard"])
@pytest.mark.parametrize("trace_axes", [(), (-1,)])
@pytest.mark.parametrize("maker", [make_mlp, make_cnn])
def test_methods_agree_with_jacobian_contraction(maker, trace_axes, parametrization, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        net, params, x1, x2 = maker(parametrization, dtype=dtype)
        ref = nl.empirical_ntk(net, params, x1, x2, method="jacobian_contraction", trace_axes=trace_axes)
        n1, n2 = x1.shape[0], x2.shape[0]
        assert ref.shape == ((n1, n2) if trace_axes else (n1, n2, 3, 3))
        assert ref.dtype == dtype
        for method in METHODS:
            k = nl.empirical_ntk(net, params, x1, x2, method=method, trace_axes=trace_axes)
            assert k.dtype == dtype
            assert rel_err(k, ref) <= RTOL[dtype], method


@pytest.mark.parametrize("padding", ["SAME", "CIRCULAR"])
@pytest.mark.parametrize("order", ["jacobian", "gram"])
def test_both_conv_contraction_orders_are_exact(x64, padding, order):
    from ntklib.empirical import _layer_blocks

    net, params, x1, x2 = make_cnn("ntk", padding)
    for trace in (False, True):
        ref = nl.empirical_ntk(net, params, x1, x2, method="jacobian_contraction", trace_axes=(-1,) if trace else ())
        k = sum(_layer_blocks(net, params, x1, x2, trace, order))
        assert rel_err(k, ref) <= 1e-10


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(depth=st.integers(0, 3), width=st.integers(1, 9), out=st.integers(1, 4),
       act=st.sampled_from(["erf", "relu", "tanh", "identity", "gelu"]),
       parametrization=st.sampled_from(["ntk", "standard"]), seed=st.integers(0, 2**16))
def test_structured_derivatives_property(depth, width, out, act, parametrization, seed):
    with jax.enable_x64(True):
        net = nl.mlp([width] * depth, out, act, W_std=1.1, b_std=0.3, parametrization=parametrization)
        _, params = net.init(jax.random.PRNGKey(seed), (-1, 3))
        x1 = jax.random.normal(jax.random.PRNGKey(seed + 1), (4, 3))
        x2 = jax.random.normal(jax.random.PRNGKey(seed + 2), (2, 3))
        ref = nl.empirical_ntk(net, params, x1, x2, method="jacobian_contraction", trace_axes=())
        for method in ("structured_derivatives", "ntk_vector_products"):
            k = nl.empirical_ntk(net, params, x1, x2, method=method, trace_axes=())
            assert rel_err(k, ref) <= 1e-10


@pytest.mark.parametrize("maker", [make_mlp, make_cnn])
def test_kernel_is_symmetric_psd(x64, maker):
    net, params, x1, _ = maker("ntk")
    full = nl.empirical_ntk(net, params, x1, trace_axes=())
    n, o = full.shape[0], full.shape[2]
    mat = jnp.transpose(full, (0, 2, 1, 3)).reshape(n * o, n * o)  # vec over (example, output)
    assert float(jnp.abs(mat - mat.T).max()) <= 1e-12 * float(jnp.abs(mat).max())
    eig = jnp.linalg.eigvalsh(mat)
    # PSD up to rounding: eigenvalues >= -(size * eps * ||Θ̂||).
    assert float(eig.min()) >= -mat.shape[0] * 1e-15 * float(eig.max())
    traced = nl.empirical_ntk(net, params, x1)
    np.testing.assert_allclose(traced, jnp.trace(full, axis1=2, axis2=3) / o, rtol=1e-12)


def test_layerwise_blocks_sum_to_kernel(x64):
    net, params, x1, x2 = make_mlp("ntk", widths=(6, 6, 6))
    blocks = nl.layerwise_ntk(net, params, x1, x2, trace_axes=())
    assert len(blocks) == 4
    ref = nl.empirical_ntk(net, params, x1, x2, method="jacobian_contraction", trace_axes=())
    assert rel_err(sum(blocks), ref) <= 1e-12


def test_any_callable_equinox_model(x64):
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(4, 3, 8, 2, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)

    def f(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    x1 = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (3, 4))
    ref = nl.empirical_ntk(f, params, x1, x2, method="jacobian_contraction", trace_axes=())
    vp = nl.empirical_ntk(f, params, x1, x2, method="ntk_vector_products", trace_axes=())
    auto = nl.empirical_ntk(f, params, x1, x2, method="auto", trace_axes=())
    # Independent reference: the dense Jacobian built by jax.jacrev over the flattened parameters.
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    j1 = jax.jacrev(lambda t: f(unravel(t), x1))(flat)
    j2 = jax.jacrev(lambda t: f(unravel(t), x2))(flat)
    dense = jnp.einsum("nap,mbp->nmab", j1, j2)
    for k in (ref, vp, auto):
        assert rel_err(k, dense) <= 1e-10
    with pytest.raises(ValueError, match="needs an ntklib network"):
        nl.empirical_ntk(f, params, x1, method="structured_derivatives")


@pytest.mark.parametrize("batch_size", [1, 2, 4, 16])
def test_blocked_equals_unblocked(x64, batch_size):
    net, params, x1, x2 = make_mlp("standard")
    for trace_axes in [(), (-1,)]:
        ref = nl.empirical_ntk(net, params, x1, x2, trace_axes=trace_axes)
        k = nl.empirical_ntk(net, params, x1, x2, trace_axes=trace_axes, batch_size=batch_size)
        assert k.shape == ref.shape
        assert rel_err(k, ref) <= 1e-14
        kx = nl.empirical_ntk(net, params, x1, trace_axes=trace_axes, batch_size=batch_size)
        assert rel_err(kx, nl.empirical_ntk(net, params, x1, trace_axes=trace_axes)) <= 1e-14


def test_sharded_over_four_cpu_devices_equals_unblocked():
    """The blocked kernel spread over 4 (forced) host devices equals the unblocked one to rounding."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        jax.config.update("jax_enable_x64", True)
        import ntklib as nl
        assert len(jax.devices()) == 4, jax.devices()
        # The CNN is the case XLA's SPMD partitioner got wrong (see ntklib.empirical._blocked).
        cases = [(nl.cnn([3, 4], 2, "relu"), (-1, 5, 5, 2), ["jacobian_contraction", "ntk_vector_products",
                                                              "structured_derivatives"], ()),
                 (nl.mlp([8, 8], 3, "erf", b_std=0.2), (-1, 4), ["structured_derivatives"], (-1,))]
        for net, shape, methods, tr in cases:
            _, p = net.init(jax.random.PRNGKey(0), shape)
            x1 = jax.random.normal(jax.random.PRNGKey(1), (11, *shape[1:]))
            x2 = jax.random.normal(jax.random.PRNGKey(2), (7, *shape[1:]))
            ref = nl.empirical_ntk(net, p, x1, x2, trace_axes=tr, method="jacobian_contraction")
            for m in methods:
                k = nl.empirical_ntk(net, p, x1, x2, trace_axes=tr, batch_size=3, method=m)
                err = float(jnp.linalg.norm(k - ref) / jnp.linalg.norm(ref))
                assert err <= 1e-14, (m, tr, err)
        print("sharded ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sharded ok" in out.stdout


def test_jit_and_vmap_compose(x64):
    net, params, x1, x2 = make_mlp("ntk")
    from ntklib.empirical import _structured_derivatives

    k = jax.jit(lambda p: _structured_derivatives(net, p, x1, x2, True))(params)
    ref = nl.empirical_ntk(net, params, x1, x2)
    assert rel_err(k, ref) <= 1e-12
    per_point = jax.vmap(lambda xi: nl.empirical_ntk(net, params, xi[None], x2, method="jacobian_contraction"))(x1)
    assert rel_err(per_point[:, 0], ref) <= 1e-12


def test_auto_follows_cost_model(x64):
    wide = nl.mlp([512, 512], 10, "erf")
    _, params = wide.init(jax.random.PRNGKey(0), (-1, 8))
    x = jnp.ones((16, 8))
    costs = nl.method_costs(wide, params, x, trace_axes=())
    assert min(costs, key=costs.get) == "structured_derivatives"
    # SD beats JC by far more than 10x on a wide MLP: the N²O²P term dominates JC.
    assert costs["jacobian_contraction"] > 10 * costs["structured_derivatives"]


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def small():
    net = nl.mlp([4], 2, "erf")
    _, params = net.init(jax.random.PRNGKey(0), (-1, 3))
    return net, params, jnp.ones((2, 3))


def test_error_unknown_method(small):
    net, params, x = small
    with pytest.raises(ValueError, match="method must be one of"):
        nl.empirical_ntk(net, params, x, method="magic")


def test_error_trace_axes(small):
    net, params, x = small
    with pytest.raises(ValueError, match="trace_axes"):
        nl.empirical_ntk(net, params, x, trace_axes=(0,))


def test_error_feature_mismatch(small):
    net, params, x = small
    with pytest.raises(ValueError, match="x2 must have the same per-example shape"):
        nl.empirical_ntk(net, params, x, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="params do not fit the network"):
        nl.empirical_ntk(net, params, jnp.ones((2, 5)))


def test_error_params_do_not_fit(small):
    net, params, x = small
    with pytest.raises(ValueError, match="params do not fit the network"):
        nl.empirical_ntk(net, params[:-1], x)
    bad = (params[0], (), {"W": jnp.ones((4, 7)), "b": jnp.ones(7)})
    with pytest.raises(ValueError, match="params do not fit the network"):
        nl.empirical_ntk(net, bad, x)


def test_error_non_finite_and_shapes(small):
    net, params, x = small
    with pytest.raises(ValueError, match="x1 contains non-finite"):
        nl.empirical_ntk(net, params, x.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="x2 contains non-finite"):
        nl.empirical_ntk(net, params, x, x.at[1, 2].set(jnp.inf))
    with pytest.raises(ValueError, match="x1 must have shape"):
        nl.empirical_ntk(net, params, jnp.ones(3))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        nl.empirical_ntk(net, params, x, batch_size=0)
    with pytest.raises(TypeError, match="f must be an ntklib network or a callable"):
        nl.empirical_ntk(42, params, x)


def test_error_callable_output_shape():
    with pytest.raises(ValueError, match=r"must return shape \(N, O\)"):
        nl.empirical_ntk(lambda p, x: (x @ p).sum(), jnp.ones(3), jnp.ones((2, 3)))


def test_layer_construction_errors():
    with pytest.raises(ValueError, match="parametrization must be one of"):
        nl.Dense(3, parametrization="mup")
    with pytest.raises(ValueError, match="out_dim must be a positive int"):
        nl.Dense(0)
    with pytest.raises(ValueError, match="W_std must be a finite number"):
        nl.Dense(3, W_std=-1.0)
    with pytest.raises(ValueError, match="glorot_uniform"):
        nl.Dense(3, init_scheme="glorot_uniform")
    with pytest.raises(ValueError, match="padding must be one of"):
        nl.Conv(3, (3, 3), "VALID")
    with pytest.raises(ValueError, match="activation must be one of"):
        nl.mlp([3], 1, "softplusish")
    with pytest.raises(TypeError, match="every argument must be an ntklib layer"):
        nl.serial(nl.Dense(3), "relu")
    with pytest.raises(ValueError, match="Dense: x must have shape"):
        net = nl.serial(nl.Dense(3))
        _, p = net.init(jax.random.PRNGKey(0), (-1, 2))
        net.apply(p, jnp.ones((2, 2, 2)))
