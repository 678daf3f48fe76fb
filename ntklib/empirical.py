"""The empirical (finite-width) NTK, eq. (3.9), by three algorithms.

For a network ``f(θ, x) ∈ ℝ^O`` and two batches ``x1`` (N1 examples) and
``x2`` (N2 examples) the full kernel is

    Θ̂[i, j, a, b] = Σ_p ∂f_a(x1_i)/∂θ_p · ∂f_b(x2_j)/∂θ_p           (3.9)

with shape ``(N1, N2, O, O)``; the traced kernel (``trace_axes=(-1,)``,
the default, as in neural-tangents) is the mean over ``a = b``, shape
``(N1, N2)``, which is what the analytic per-output kernel predicts.

Methods (notation of section 6.2.1: N batch, O outputs, P parameters,
[FP] the cost of one forward pass):

* ``"jacobian_contraction"``: build the per-example Jacobians ``J ∈ ℝ^{N×O×P}``
  (``O`` reverse passes per example) and contract them. Time
  ``N·O·[FP] + N²·O²·P``, memory ``N·O·P``.
* ``"ntk_vector_products"``: never contract Jacobians; for each of the
  ``N2·O`` columns ``J2ᵀe`` push a forward-mode product through the whole batch
  ``x1``. Time ``N²·O·[FP]``.
* ``"structured_derivatives"`` (ntklib networks only): a weight layer
  ``h = x W + b`` has the outer-product Jacobian ``∂f_a/∂W = xᵀ δ_a`` of
  (A.19), so its block of Θ̂ is ``Gram(x) ⊙ Gram(δ)`` and no per-example
  parameter Jacobian is ever formed. The backpropagated signals
  ``δ^l = ∂f/∂h^l`` (A.13) come from one ``jax.vjp`` through zero "taps" added
  to each layer's output, vmapped over the ``O`` output directions. For a
  convolution the cheaper of two contraction orders is chosen per layer
  (:func:`conv_costs`).
* ``"auto"``: the cheapest by the analytic cost model :func:`method_costs`.

Everything is public JAX (``vjp``, ``jvp``, ``vmap``, ``einsum``); every method
``jit``s into one XLA program. ``f`` must treat examples independently
(no batch statistics); all methods assume it, as ``vmap_axes=0`` does in
neural-tangents.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .layers import Conv, Dense, Serial

__all__ = ["empirical_ntk", "method_costs", "conv_costs", "METHODS", "layerwise_ntk"]

METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives", "auto")


# --------------------------------------------------------------------------- validation

def _as_array(x, name):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            x = jnp.asarray(x)
        except TypeError as e:
            raise TypeError(f"{name} must be an array of inputs with a batch axis first, got {type(x).__name__}") from e
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, ...) with a batch axis first and at least one feature axis, "
                         f"got shape {tuple(x.shape)}")
    if not isinstance(x, jax.core.Tracer):
        if not bool(np.all(np.isfinite(np.asarray(x)))):
            raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return x


def _normalise_trace_axes(trace_axes):
    axes = tuple(trace_axes) if isinstance(trace_axes, (tuple, list)) else (trace_axes,)
    if axes == ():
        return False
    if axes in ((-1,), (1,)):
        return True
    raise ValueError(f"trace_axes must be () (full kernel, shape (N1, N2, O, O)) or (-1,) (mean over the output "
                     f"axis, shape (N1, N2)), got {trace_axes!r}")


def _check_params_fit(net: Serial, params, x):
    expected = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x.shape, x.dtype)[1])
    exp_leaves, exp_tree = jax.tree_util.tree_flatten(expected)
    try:
        got_leaves, got_tree = jax.tree_util.tree_flatten(params)
    except Exception as e:  # pragma: no cover - tree_flatten accepts anything
        raise TypeError(f"params must be a pytree of arrays, got {type(params).__name__}") from e
    if got_tree != exp_tree:
        raise ValueError(f"params do not fit the network: expected a tree like {exp_tree}, got {got_tree}")
    for e, g in zip(exp_leaves, got_leaves):
        if tuple(e.shape) != tuple(np.shape(g)):
            raise ValueError(f"params do not fit the network for inputs of shape {tuple(x.shape[1:])}: a leaf has "
                             f"shape {tuple(np.shape(g))}, expected {tuple(e.shape)}")


def _output_shape(fn, params, x, name):
    try:
        out = jax.eval_shape(fn, params, x[:1])
    except (TypeError, ValueError) as e:
        raise ValueError(f"f(params, {name}) failed for {name} of shape {tuple(x.shape)}: {e}") from e
    if len(out.shape) != 2 or out.shape[0] != 1:
        raise ValueError(f"f(params, x) must return shape (N, O); for {name}[:1] it returned {out.shape}")
    return out.shape[1]


_VALIDATED: set = set()  # signatures (network, parameter shapes, input shape, dtype) already checked


def _signature(f, params, x):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return (f, treedef, tuple((tuple(np.shape(a)), str(getattr(a, "dtype", ""))) for a in leaves),
            tuple(x.shape[1:]), str(x.dtype))


def _check_params_fit_cached(net, params, x):
    """:func:`_check_params_fit`, done once per signature: its ``eval_shape`` costs ~10 ms a call."""
    key = ("params", *_signature(net, params, x))
    if key not in _VALIDATED:
        _check_params_fit(net, params, x)
        _VALIDATED.add(key)


def _output_shape_cached(fn, params, x):
    try:
        key = ("output", *_signature(fn, params, x))
        hash(key)
    except TypeError:  # an unhashable callable: check every time
        return _output_shape(fn, params, x, "x1")
    if key not in _VALIDATED:
        _output_shape(fn, params, x, "x1")
        _VALIDATED.add(key)


# --------------------------------------------------------------------------- three methods on one block

def _per_example_jacobian(fn, params, x):
    """Pytree of ``(N, O, *leaf.shape)``: ∂f_a(x_n)/∂θ, one jacrev per example."""
    return jax.vmap(lambda xi: jax.jacrev(lambda p: fn(p, xi[None])[0])(params))(x)


def _jacobian_contraction(fn, params, x1, x2, trace):
    j1 = _per_example_jacobian(fn, params, x1)
    j2 = j1 if x2 is None else _per_example_jacobian(fn, params, x2)
    out = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(j1), jax.tree_util.tree_leaves(j2)):
        a = a.reshape(a.shape[0], a.shape[1], -1)
        b = b.reshape(b.shape[0], b.shape[1], -1)
        if trace:
            out = out + jnp.einsum("nap,map->nm", a, b) / a.shape[1]
        else:
            out = out + jnp.einsum("nap,mbp->nmab", a, b)
    return out


def _ntk_vector_products(fn, params, x1, x2, trace):
    x2 = x1 if x2 is None else x2

    def column(x2_m):  # J2ᵀ e_b for one example of x2, all b: pytree of (O, *leaf)
        out, vjp_fn = jax.vjp(lambda p: fn(p, x2_m[None])[0], params)
        return jax.vmap(vjp_fn)(jnp.eye(out.shape[0], dtype=out.dtype))[0]

    def products(v):  # J1 v over the whole batch x1: (N1, O)
        return jax.jvp(lambda p: fn(p, x1), (params,), (v,))[1]

    cols = jax.vmap(column)(x2)                             # (N2, O_b, *leaf)
    k = jax.vmap(jax.vmap(products))(cols)                  # (N2, O_b, N1, O_a)
    k = jnp.transpose(k, (2, 0, 3, 1))                      # (N1, N2, O_a, O_b)
    if trace:
        return jnp.trace(k, axis1=2, axis2=3) / k.shape[-1]
    return k


def _cotangents(net: Serial, params, x):
    """Inputs ``x^{l-1}`` of each weight layer and ``δ^l`` (A.13): lists of ``(N, ...)`` and ``(O, N, ...)``."""
    def record(params, x):
        outs = []
        for layer, p in zip(net.layers, params):
            x = layer.apply(p, x)
            if layer.has_weights:
                outs.append(x)
        return outs

    shapes = jax.eval_shape(record, params, x)
    taps = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    out, vjp_fn, inputs = jax.vjp(lambda t: net.apply_with_taps(params, x, t), taps, has_aux=True)
    n, o = out.shape
    directions = jnp.broadcast_to(jnp.eye(o, dtype=out.dtype)[:, None, :], (o, n, o))
    deltas = jax.vmap(vjp_fn)(directions)[0]
    return inputs, deltas


def conv_costs(n1, n2, o, d, kf, c, trace):
    """Multiply-adds of the two contraction orders for one convolution's weight block.

    ``d`` pixels, ``kf = F·C_in`` patch size, ``c = C_out`` channels.

    * ``"jacobian"``: form the layer Jacobian ``J[n,a] = patchesᵀ δ_a`` (N·O·D·F·C_in·C)
      and contract it (N1·N2·O²·F·C_in·C, or ·O for the trace).
    * ``"gram"``: ``Gram(patches)`` over pixel pairs (N1·N2·D²·F·C_in), pushed
      through the cotangents (N1·N2·O·D²·C), then contracted (N1·N2·O²·D·C).
    """
    oo = o if trace else o * o
    jac = (n1 + n2) * o * d * kf * c + n1 * n2 * oo * kf * c
    gram = n1 * n2 * d * d * kf + n1 * n2 * o * d * d * c + n1 * n2 * oo * d * c
    return {"jacobian": jac, "gram": gram}


def _gram(a, b, trace):
    """Σ over trailing axes of cotangent products: ``(O,N1,…)×(O,N2,…) -> (N1,N2[,O,O])``."""
    a = a.reshape(a.shape[0], a.shape[1], -1)
    b = b.reshape(b.shape[0], b.shape[1], -1)
    if trace:
        return jnp.einsum("anj,amj->nm", a, b) / a.shape[0]
    # One (N1·O × J)(J × N2·O) GEMM: XLA:CPU runs the 4-index einsum ~1.5x slower.
    o, n1, n2 = a.shape[0], a.shape[1], b.shape[1]
    am = jnp.transpose(a, (1, 0, 2)).reshape(n1 * o, -1)
    bm = am if b is a else jnp.transpose(b, (1, 0, 2)).reshape(n2 * o, -1)
    return jnp.transpose((am @ bm.T).reshape(n1, o, n2, o), (0, 2, 1, 3))


def _dense_block(layer: Dense, p, x1, x2, d1, d2, trace):
    c_w, c_b = layer.scales(x1.shape[-1])
    gx = x1 @ x2.T
    gd = _gram(d1, d2, trace)
    scale = c_w**2 * gx + c_b**2
    return scale * gd if trace else scale[:, :, None, None] * gd


def _conv_block(layer: Conv, p, x1, x2, d1, d2, trace, order=None):
    c_w, c_b = layer.scales(layer.filter_size * x1.shape[-1])
    p1, p2 = layer.patches(x1), layer.patches(x2)              # (N, D, Kf)
    o, n1 = d1.shape[:2]
    n2 = d2.shape[1]
    d1 = d1.reshape(o, n1, -1, d1.shape[-1])                     # (O, N, D, C)
    d2 = d2.reshape(o, n2, -1, d2.shape[-1])
    dd, kf, c = p1.shape[1], p1.shape[2], d1.shape[-1]
    if order is None:
        costs = conv_costs(n1, n2, o, dd, kf, c, trace)
        order = min(costs, key=costs.get)
    if order == "jacobian":
        j1 = jnp.einsum("npk,anpc->nakc", p1, d1)
        j2 = jnp.einsum("npk,anpc->nakc", p2, d2)
        w = jnp.einsum("nakc,makc->nm", j1, j2) / o if trace else jnp.einsum("nakc,mbkc->nmab", j1, j2)
    else:
        gx = jnp.einsum("npk,mqk->nmpq", p1, p2)
        t = jnp.einsum("nmpq,bmqc->nmbpc", gx, d2)
        w = jnp.einsum("anpc,nmapc->nm", d1, t) / o if trace else jnp.einsum("anpc,nmbpc->nmab", d1, t)
    s1, s2 = d1.sum(axis=2), d2.sum(axis=2)                      # bias: Σ over pixels first
    b = _gram(s1, s2, trace)
    return c_w**2 * w + c_b**2 * b


def _layer_blocks(net: Serial, params, x1, x2, trace, conv_order=None):
    """Per-weight-layer blocks Θ̂^l of (3.9), a list; their sum is Θ̂."""
    in1, dl1 = _cotangents(net, params, x1)
    in2, dl2 = (in1, dl1) if x2 is None else _cotangents(net, params, x2)
    blocks = []
    for idx, li in enumerate(net.weight_layers()):
        layer, p = net.layers[li], params[li]
        if isinstance(layer, Dense):
            blocks.append(_dense_block(layer, p, in1[idx], in2[idx], dl1[idx], dl2[idx], trace))
        elif isinstance(layer, Conv):
            blocks.append(_conv_block(layer, p, in1[idx], in2[idx], dl1[idx], dl2[idx], trace, conv_order))
        else:  # pragma: no cover - every ntklib weight layer is handled above
            raise TypeError(f"structured derivatives: no rule for layer {layer!r}")
    return blocks


def _structured_derivatives(net, params, x1, x2, trace):
    return sum(_layer_blocks(net, params, x1, x2, trace))


_IMPLS = {
    "jacobian_contraction": _jacobian_contraction,
    "ntk_vector_products": _ntk_vector_products,
}


# --------------------------------------------------------------------------- cost model

def _layer_shapes(net: Serial, params, x):
    """(layer, input shape, output shape) of every weight layer, from shapes only."""
    shapes, shape = [], jax.ShapeDtypeStruct(x.shape, x.dtype)
    for layer, p in zip(net.layers, params):
        out = jax.eval_shape(layer.apply, p, shape)
        if layer.has_weights:
            shapes.append((layer, shape.shape, out.shape))
        shape = out
    return shapes


def _forward_macs(fn, params, x):
    """Multiply-adds of ``fn`` on one example (XLA cost analysis, flops / 2); ``None`` if unavailable."""
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype)  # noqa: E731
    try:
        cost = jax.jit(fn).lower(jax.tree_util.tree_map(spec, params),
                                 jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)).cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
    except Exception:  # noqa: BLE001 - no estimate from this backend: fall back to P
        return None
    return int(flops // 2) if flops > 0 else None


def method_costs(f, params, x1, x2=None, *, trace_axes=(-1,)):
    """Analytic multiply-add counts of each method (the model ``method="auto"`` minimises).

    ``FP`` is the forward multiply-adds of one example (for a plain callable:
    half the flops of XLA's cost analysis of ``f`` on one example, or ``P``,
    the dense estimate, where no analysis is available; ``FP ≈ P`` would
    underrate a convolution's forward pass by the factor ``D``, the pixels,
    and make ``"auto"`` pick NTK-vector products for it), ``P`` the parameter count, ``M = N1`` when
    ``x2`` is ``None`` (one set of derivatives serves both sides) and
    ``N1 + N2`` otherwise, ``Ō = O`` for the traced kernel and ``O²`` for the
    full one. A reverse pass that also returns weight cotangents costs ``2·FP``,
    one that only carries input cotangents ``FP``.

    * JC: ``M·FP + M·O·2FP + N1·N2·Ō·P`` (forward, ``O`` full reverse passes per
      example, contraction);
    * NTK-VP: ``N2·O·2FP + N1·N2·O·2FP`` (columns ``J2ᵀe``, then ``J1 v`` by
      forward mode for every column);
    * SD: ``M·FP + M·O·FP`` (forward and cotangent passes) plus, per layer,
      ``N1·N2·(n_in + Ō·n_out)`` for a dense layer and the cheaper order of
      :func:`conv_costs` for a convolution.
    """
    trace = _normalise_trace_axes(trace_axes)
    x1 = jnp.asarray(x1)
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else jnp.asarray(x2).shape[0]
    m = n1 if x2 is None else n1 + n2
    fn = f.apply if isinstance(f, Serial) else f
    o = jax.eval_shape(fn, params, x1[:1]).shape[-1]
    p = sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params))
    oo = o if trace else o * o
    costs = {}
    if isinstance(f, Serial):
        fp, sd = 0, 0
        for layer, s_in, s_out in _layer_shapes(f, params, x1[:1]):
            if isinstance(layer, Conv):
                d, kf, c = s_out[1] * s_out[2], layer.filter_size * s_in[-1], s_out[-1]
                fp += d * kf * c
                orders = conv_costs(n1, n2, o, d, kf, c, trace)
                if x2 is None:  # the layer Jacobian of x1 serves both sides
                    orders["jacobian"] -= n2 * o * d * kf * c
                sd += min(orders.values())
            else:
                fp += s_in[-1] * s_out[-1]
                sd += n1 * n2 * (s_in[-1] + oo * s_out[-1])
        costs["structured_derivatives"] = m * fp + m * o * fp + sd
    else:
        fp = _forward_macs(fn, params, x1) or p
    costs["jacobian_contraction"] = m * fp + m * o * 2 * fp + n1 * n2 * oo * p
    costs["ntk_vector_products"] = n2 * o * 2 * fp + n1 * n2 * o * 2 * fp
    return costs


# --------------------------------------------------------------------------- public entry point

def _kernel_fn(f, method, trace):
    if method == "structured_derivatives":
        return lambda params, x1, x2: _structured_derivatives(f, params, x1, x2, trace)
    fn = f.apply if isinstance(f, Serial) else f
    impl = _IMPLS[method]
    return lambda params, x1, x2: impl(fn, params, x1, x2, trace)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _jitted(f, method, trace, params, x1, x2):
    return _kernel_fn(f, method, trace)(params, x1, x2)


def _split(x, bs):
    """``(N, ...) -> (ceil(N/bs), bs, ...)``, padding the last block with copies of row 0."""
    n = x.shape[0]
    nb = -(-n // bs)
    pad = nb * bs - n
    if pad:
        x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad, *x.shape[1:]))])
    return x.reshape(nb, bs, *x.shape[1:])


def _blocked(f, method, trace, params, x1, x2, bs):
    """Kernel assembled from ``bs × bs`` blocks, dealt round-robin to all JAX devices.

    Each block is committed to one device with ``jax.device_put`` and computed
    there by the same compiled function; dispatch is asynchronous, so the
    devices work concurrently and peak memory per device is one block. (An
    SPMD-partitioned ``vmap`` over blocks was tried first: XLA's CPU partitioner
    returned wrong Jacobian-contraction kernels for convolutions on forced host
    devices, so placement is explicit.)
    """
    n1, n2 = x1.shape[0], x2.shape[0]
    devices = jax.devices()
    x1b, x2b = _split(x1, min(bs, n1)), _split(x2, min(bs, n2))
    block_fn = _block_fn(f, method, trace)
    placed = {}  # device -> params committed there

    def on(device, tree):
        return jax.device_put(tree, device)

    pending = []
    for i in range(x1b.shape[0]):
        for j in range(x2b.shape[0]):
            device = devices[(i * x2b.shape[0] + j) % len(devices)]
            if device not in placed:
                placed[device] = on(device, params)
            pending.append(block_fn(placed[device], on(device, x1b[i]), on(device, x2b[j])))
    blocks = [np.asarray(jax.device_get(b)) for b in pending]
    rows = [np.concatenate(blocks[i * x2b.shape[0]:(i + 1) * x2b.shape[0]], axis=1) for i in range(x1b.shape[0])]
    return jnp.asarray(np.concatenate(rows)[:n1, :n2])


_BLOCK_CACHE: dict = {}


def _block_fn(f, method, trace):
    key = (f, method, trace)
    if key not in _BLOCK_CACHE:
        _BLOCK_CACHE[key] = jax.jit(_kernel_fn(f, method, trace))
    return _BLOCK_CACHE[key]


def empirical_ntk(f, params, x1, x2=None, *, method="auto", trace_axes=(-1,), batch_size=None):
    """Empirical NTK Θ̂(x1, x2) of (3.9).

    Args:
      f: an ntklib network (``serial``/``mlp``/``cnn``) or any callable
        ``f(params, x) -> (N, O)`` over any parameter pytree.
      params: the parameters θ at which Θ̂ is evaluated.
      x1: inputs ``(N1, ...)``.
      x2: inputs ``(N2, ...)``; ``None`` means ``x1`` (Θ̂(𝒳, 𝒳)).
      method: ``"jacobian_contraction"``, ``"ntk_vector_products"``,
        ``"structured_derivatives"`` (ntklib networks only) or ``"auto"``.
      trace_axes: ``()`` for the full kernel ``(N1, N2, O, O)``, entry
        ``[i, j, a, b] = Σ_p ∂f_a(x1_i)/∂θ_p ∂f_b(x2_j)/∂θ_p``; ``(-1,)`` for
        its mean over ``a = b``, shape ``(N1, N2)``.
      batch_size: compute in ``batch_size × batch_size`` blocks (bounded peak
        memory); blocks are spread over all JAX devices.

    Returns: the kernel, in the dtype of ``params``/``x1``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    trace = _normalise_trace_axes(trace_axes)
    if isinstance(f, Serial):
        net_fn = f.apply
    elif callable(f):
        net_fn = f
    else:
        raise TypeError(f"f must be an ntklib network or a callable f(params, x), got {type(f).__name__}")
    if method == "structured_derivatives" and not isinstance(f, Serial):
        raise ValueError("method='structured_derivatives' needs an ntklib network (serial/mlp/cnn) to see its layers; "
                         "for an arbitrary callable use 'jacobian_contraction', 'ntk_vector_products' or 'auto'")
    x1 = _as_array(x1, "x1")
    if x2 is not None:
        x2 = _as_array(x2, "x2")
        if tuple(x2.shape[1:]) != tuple(x1.shape[1:]):
            raise ValueError(f"x2 must have the same per-example shape as x1: x1 is {tuple(x1.shape)}, "
                             f"x2 is {tuple(x2.shape)}")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if isinstance(f, Serial):
        _check_params_fit_cached(f, params, x1)
    _output_shape_cached(net_fn, params, x1)
    if method == "auto":
        costs = method_costs(f, params, x1, x2, trace_axes=trace_axes)
        method = min(costs, key=costs.get)
    if batch_size is not None:
        return _blocked(f, method, trace, params, x1, x1 if x2 is None else x2, int(batch_size))
    return _jitted(f, method, trace, params, x1, x2)


def layerwise_ntk(net: Serial, params, x1, x2=None, *, trace_axes=(-1,)):
    """The per-layer blocks ``Θ̂^l = ∇_{θ^l} f ∇_{θ^l} fᵀ`` of (3.9), one per weight layer.

    Their sum is ``empirical_ntk(net, params, x1, x2)``. The diagonal of the
    full blocks gives the per-layer split of ``‖J‖_F²`` in (A.18).
    """
    if not isinstance(net, Serial):
        raise TypeError(f"net must be an ntklib network (serial/mlp/cnn), got {type(net).__name__}")
    trace = _normalise_trace_axes(trace_axes)
    x1 = _as_array(x1, "x1")
    if x2 is not None:
        x2 = _as_array(x2, "x2")
    _check_params_fit(net, params, x1)
    return _layerwise_jit(net, trace, params, x1, x2)


@partial(jax.jit, static_argnums=(0, 1))
def _layerwise_jit(net, trace, params, x1, x2):
    return _layer_blocks(net, params, x1, x2, trace)
