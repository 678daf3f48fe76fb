"""Regression: the cost model of ``method="auto"`` for a plain callable counts a convolution's forward pass.

Before the fix, ``method_costs`` assumed ``FP ≈ P`` for any callable. For a CNN the forward pass is
``≈ D·P`` (D pixels), so NTK-vector products (``N²·O·FP``) looked ~D times cheaper than they are and
``auto`` picked them; on the benchmark CNN they are ~6x slower than Jacobian contraction
(benchmarks/results/ntk_methods.json). The callable's FP now comes from XLA's cost analysis.
"""

import jax
import jax.numpy as jnp

import ntklib as nl


def test_callable_cnn_forward_cost_and_auto_choice():
    net = nl.cnn([16, 16], 10, "relu")
    _, params = net.init(jax.random.PRNGKey(0), (-1, 8, 8, 3))
    x = jnp.ones((4, 8, 8, 3))
    as_callable = lambda p, xx: net.apply(p, xx)  # noqa: E731 - hide the layers from the cost model
    c_net = nl.method_costs(net, params, x, trace_axes=())
    c_fn = nl.method_costs(as_callable, params, x, trace_axes=())
    # Same JC / NTK-VP counts up to what XLA counts differently: it skips the zero padding of SAME
    # convolutions (the border pixels see fewer taps: -10% at 8x8) and adds biases and activations.
    for m in ("jacobian_contraction", "ntk_vector_products"):
        assert abs(c_fn[m] / c_net[m] - 1) < 0.2, (m, c_fn[m], c_net[m])
    assert min(c_fn, key=c_fn.get) == "jacobian_contraction"


def test_callable_mlp_forward_cost_is_about_p():
    net = nl.mlp([64, 64], 3, "erf")
    _, params = net.init(jax.random.PRNGKey(0), (-1, 5))
    x = jnp.ones((6, 5))
    c_net = nl.method_costs(net, params, x, trace_axes=())
    c_fn = nl.method_costs(net.apply, params, x, trace_axes=())
    for m in ("jacobian_contraction", "ntk_vector_products"):
        assert abs(c_fn[m] / c_net[m] - 1) < 0.05, (m, c_fn[m], c_net[m])


def test_auto_on_callable_under_jit():
    net = nl.cnn([4], 2, "relu")
    _, params = net.init(jax.random.PRNGKey(0), (-1, 5, 5, 2))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 5, 2))
    f = lambda p, xx: net.apply(p, xx)  # noqa: E731
    k = jax.jit(lambda p, xx: nl.empirical_ntk(f, p, xx, method="auto", trace_axes=()))(params, x)
    ref = nl.empirical_ntk(net, params, x, method="structured_derivatives", trace_axes=())
    assert float(jnp.linalg.norm(k - ref) / jnp.linalg.norm(ref)) < 1e-5
