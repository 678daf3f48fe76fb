"""Jacobian tools for Appendix A: J(θ) (A.6), its norms, the per-layer split
(A.18)–(A.19) and the local-Lipschitz ratios of Lemma A.1 (A.11).

Conventions: for inputs ``x`` of shape ``(N, ...)`` and a network with ``O``
outputs, ``J(θ) = ∇_θ f(𝒳, θ)`` (A.6) is the ``(N·O, P)`` matrix whose row
``i·O + a`` is ``∂f_a(x_i)/∂θ`` (vec over (example, output), as in
:mod:`ntklib.dynamics`) and whose columns follow
``jax.flatten_util.ravel_pytree(params)``. ``J Jᵀ`` is then the full NTK
``empirical_ntk(f, θ, x, trace_axes=())`` ``(N, N, O, O)`` reshaped to
``(N·O, N·O)`` (without the ``1/n`` of (A.7)).

Only :func:`jacobian` forms ``J``; the other tools work from NTK blocks or
from the per-layer structure ``∂f_a(x)/∂W^l = c_w x^{l-1}(x) ⊗ δ^l_a(x)``
(A.19), with ``δ^l = ∂f/∂h^l`` the backpropagated signals of (A.13) and
``c_w`` the parametrization scale (:meth:`ntklib.Dense.scales`), so they run
at widths where ``J`` would not fit in memory.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .empirical import _as_array, _check_params_fit, _cotangents, empirical_ntk
from .layers import Conv, Dense, Serial

__all__ = [
    "jacobian",
    "JacobianNorms",
    "jacobian_norms",
    "frobenius_split",
    "jacobian_distance",
    "sample_ball",
    "LipschitzSample",
    "lipschitz_ratios",
]


def _net_fn(f):
    if isinstance(f, Serial):
        return f.apply
    if callable(f):
        return f
    raise TypeError(f"f must be an ntklib network or a callable f(params, x), got {type(f).__name__}")


def _check(f, params, x, name="x"):
    fn = _net_fn(f)
    x = _as_array(x, name)
    if isinstance(f, Serial):
        _check_params_fit(f, params, x)
    out = jax.eval_shape(fn, params, x)
    if len(out.shape) != 2:
        raise ValueError(f"f(params, x) must return shape (N, O), got {out.shape}")
    return fn, x


# --------------------------------------------------------------------------- (A.6)

def _dense_jacobian(fn, params, x):
    flat, unravel = ravel_pytree(params)
    g = lambda v: fn(unravel(v), x).reshape(-1)  # noqa: E731
    rows = jax.eval_shape(g, flat).shape[0]
    return jax.jacrev(g)(flat) if rows <= flat.size else jax.jacfwd(g)(flat)


_dense_jacobian_jit = jax.jit(_dense_jacobian, static_argnums=0)


def jacobian(f, params, x):
    """The dense Jacobian ``J(θ) = ∇_θ f(𝒳, θ)`` of (A.6), shape ``(N·O, P)``.

    Rows in (example, output) order (row ``i·O + a`` is ``∂f_a(x_i)/∂θ``),
    columns in ``ravel_pytree(params)`` order. It has ``N·O·P`` entries: for
    small networks only (tests, illustrations); at large width use
    :func:`jacobian_norms`, :func:`frobenius_split`, :func:`jacobian_distance`.
    """
    fn, x = _check(f, params, x)
    return _dense_jacobian_jit(fn, params, x)


# --------------------------------------------------------------------------- norms

class JacobianNorms(NamedTuple):
    """``op``: spectral norm ``‖J‖ = √λ_max(J Jᵀ)``; ``frobenius``: ``‖J‖_F = √tr(J Jᵀ)``."""

    op: Any
    frobenius: Any


def _full_ntk_matrix(f, params, x):
    """Full NTK ``J Jᵀ`` as an ``(N·O, N·O)`` matrix, rows/cols in (example, output) order."""
    method = "structured_derivatives" if isinstance(f, Serial) else "auto"
    k = empirical_ntk(f, params, x, method=method, trace_axes=())
    n, _, o, _ = k.shape
    return jnp.transpose(k, (0, 2, 1, 3)).reshape(n * o, n * o)


def _op_from_ntk(mat):
    lam = jnp.linalg.eigvalsh(0.5 * (mat + mat.T))[-1]
    return jnp.sqrt(jnp.maximum(lam, 0))


def jacobian_norms(f, params, x) -> JacobianNorms:
    """Operator and Frobenius norms of ``J(θ)`` (A.6), from the full NTK only.

    ``‖J‖_op² = λ_max(J Jᵀ)`` and ``‖J‖_F² = tr(J Jᵀ) = Σ_{i,a} Θ̂[i, i, a, a]``
    where ``J Jᵀ`` is the full (not traced) empirical NTK of (3.9) reshaped to
    ``(N·O, N·O)``. For ntklib networks it is built by structured derivatives,
    so ``J`` is never materialised; for other callables ``empirical_ntk``'s
    ``"auto"`` method is used.
    """
    _, x = _check(f, params, x)
    mat = _full_ntk_matrix(f, params, x)
    return JacobianNorms(op=_op_from_ntk(mat), frobenius=jnp.sqrt(jnp.trace(mat)))


# --------------------------------------------------------------------------- (A.18)–(A.19)

def _layer_split(layer, xin, d):
    """``(‖J(W^l)‖_F², ‖J(b^l)‖_F²)`` of one weight layer from its inputs ``(N, …)`` and ``δ^l`` ``(O, N, …)``."""
    if isinstance(layer, Dense):
        c_w, c_b = layer.scales(xin.shape[-1])
        d2 = jnp.sum(d**2, axis=(0, 2))                                  # Σ_a ‖δ_a(x_i)‖²: (N,)
        return c_w**2 * jnp.sum(jnp.sum(xin**2, axis=-1) * d2), c_b**2 * jnp.sum(d2)
    if isinstance(layer, Conv):
        c_w, c_b = layer.scales(layer.filter_size * xin.shape[-1])
        p = layer.patches(xin)                                           # (N, D, F·C_in)
        dd = d.reshape(d.shape[0], d.shape[1], -1, d.shape[-1])          # (O, N, D, C)
        j = jnp.einsum("npk,anpc->nakc", p, dd)                          # per-example weight Jacobian (shared W)
        return c_w**2 * jnp.sum(j**2), c_b**2 * jnp.sum(dd.sum(axis=2) ** 2)
    raise TypeError(f"no structured rule for layer {layer!r}")  # pragma: no cover


@partial(jax.jit, static_argnums=0)
def _split_jit(net, params, x):
    inputs, deltas = _cotangents(net, params, x)
    out = [() for _ in net.layers]
    for idx, li in enumerate(net.weight_layers()):
        w, b = _layer_split(net.layers[li], inputs[idx], deltas[idx])
        out[li] = {"W": w, "b": b}
    return tuple(out)


def frobenius_split(net: Serial, params, x):
    """Per-layer split ``‖J‖_F² = Σ_l ‖J(W^l)‖_F² + ‖J(b^l)‖_F²`` of (A.18), by (A.19).

    For a dense layer ``h^l = c_w x^{l-1} ω + c_b β`` (``ω, β`` the trainable
    parameters; ``c_w = σ_w/√fan_in``, ``c_b = σ_b`` in NTK parametrization,
    ``1`` in standard) the Jacobian block of example ``x`` and output ``a`` is
    the outer product ``c_w x^{l-1}(x) δ^l_a(x)ᵀ`` (A.19), so

        ‖J(W^l)‖_F² = c_w² Σ_x ‖x^{l-1}(x)‖² ‖δ^l(x)‖_F²,     ‖J(b^l)‖_F² = c_b² Σ_x ‖δ^l(x)‖_F²,

    with ``‖δ^l(x)‖_F² = Σ_a ‖∂f_a(x)/∂h^l‖²`` — no Jacobian is formed. For a
    convolution (shared weights) the per-example layer Jacobian
    ``Σ_p patch_p ⊗ δ_p`` is small (``O·F·C_in·C_out``) and is summed directly.

    Returns: a pytree like ``params``: ``{"W": ‖J(W^l)‖_F², "b": ‖J(b^l)‖_F²}``
    per weight layer, ``()`` for the others; the sum of its leaves is ``‖J‖_F²``.
    """
    if not isinstance(net, Serial):
        raise TypeError(f"net must be an ntklib network (serial/mlp/cnn), got {type(net).__name__}")
    _, x = _check(net, params, x)
    return _split_jit(net, params, x)


# --------------------------------------------------------------------------- Lemma A.1, (A.11)

def _layer_diff_sq(layer, xa, xb, da, db):
    """``‖J_l(θ) − J_l(θ̃)‖_F²`` of one weight layer (weights + bias), in a cancellation-free form.

    ``x_a ⊗ δ_a − x_b ⊗ δ_b = Δx ⊗ δ_a + x_b ⊗ Δδ``, so per example and output
    ``‖·‖² = ‖Δx‖²‖δ_a‖² + ‖x_b‖²‖Δδ‖² + 2 (Δx·x_b)(δ_a·Δδ)``: algebraically
    ``tr K(θ,θ) + tr K(θ̃,θ̃) − 2 tr K(θ,θ̃)`` per layer, but with the differences
    taken on activations and cotangents rather than on the large traces.
    """
    dx, dd = xa - xb, da - db
    if isinstance(layer, Dense):
        c_w, c_b = layer.scales(xa.shape[-1])
        w = (jnp.sum(dx**2, -1) * jnp.sum(da**2, axis=(0, 2)) + jnp.sum(xb**2, -1) * jnp.sum(dd**2, axis=(0, 2))
             + 2 * jnp.sum(dx * xb, -1) * jnp.sum(da * dd, axis=(0, 2)))
        return c_w**2 * jnp.sum(w) + c_b**2 * jnp.sum(dd**2)
    if isinstance(layer, Conv):
        c_w, c_b = layer.scales(layer.filter_size * xa.shape[-1])
        o, n = da.shape[:2]
        da = da.reshape(o, n, -1, da.shape[-1])
        dd = dd.reshape(o, n, -1, dd.shape[-1])
        j = (jnp.einsum("npk,anpc->nakc", layer.patches(dx), da)
             + jnp.einsum("npk,anpc->nakc", layer.patches(xb), dd))
        return c_w**2 * jnp.sum(j**2) + c_b**2 * jnp.sum(dd.sum(axis=2) ** 2)
    raise TypeError(f"no structured rule for layer {layer!r}")  # pragma: no cover


def _jac_diff_sq(f, pa, pb, x):
    """``‖J(θ_a) − J(θ_b)‖_F²``: structured for ntklib nets, dense otherwise."""
    if isinstance(f, Serial):
        ia, da = _cotangents(f, pa, x)
        ib, db = _cotangents(f, pb, x)
        return sum(_layer_diff_sq(f.layers[li], ia[k], ib[k], da[k], db[k])
                   for k, li in enumerate(f.weight_layers()))
    ja, jb = _dense_jacobian(f, pa, x), _dense_jacobian(f, pb, x)
    return jnp.sum((ja - jb) ** 2)


_jac_diff_sq_jit = jax.jit(_jac_diff_sq, static_argnums=0)


def jacobian_distance(f, params_a, params_b, x):
    """``‖J(θ_a) − J(θ_b)‖_F`` (the left side of (A.11), before ``1/√n``), without forming ``J`` for ntklib nets.

    Equals ``√(tr K(θ_a,θ_a) + tr K(θ_b,θ_b) − 2 tr K_cross)`` with
    ``K_cross = J(θ_a) J(θ_b)ᵀ``, evaluated per layer from inputs and
    cotangents at both parameter points (see :func:`frobenius_split`) in a
    form that avoids the cancellation of the three traces. Generic callables
    fall back to dense Jacobians.
    """
    _, x = _check(f, params_a, x)
    if jax.tree_util.tree_structure(params_a) != jax.tree_util.tree_structure(params_b):
        raise ValueError("params_b must have the tree structure of params_a")
    return jnp.sqrt(jnp.maximum(_jac_diff_sq_jit(f, params_a, params_b, x), 0))


def sample_ball(key, params0, radius, num: int):
    """``num`` points drawn uniformly from the open ball ``B(θ0, radius)`` of (A.11).

    Direction uniform on the sphere (a normalised Gaussian over all ``P``
    parameters), distance ``radius · U^{1/P}``, ``U ~ U[0, 1)``. Returns a
    pytree like ``params0`` with a leading axis ``num``; key ``k`` of
    ``jax.random.split(key, num)`` draws point ``k``.
    """
    flat0, unravel = ravel_pytree(params0)
    p, dtype = flat0.size, flat0.dtype

    def one(k):
        k1, k2 = jax.random.split(k)
        u = jax.random.normal(k1, (p,), dtype)
        s = radius * jnp.exp(jnp.log(jax.random.uniform(k2, (), dtype)) / p)
        return unravel(flat0 + s * u / jnp.linalg.norm(u))

    return jax.vmap(one)(jax.random.split(key, num))


class LipschitzSample(NamedTuple):
    """Lemma A.1 quantities on ``n_pairs`` sampled pairs, each of shape ``(n_pairs,)``.

    ``ratio = ‖J(θ) − J(θ̃)‖_F / ‖θ − θ̃‖₂``; ``op_norm = ‖J(θ)‖``;
    ``jac_diff = ‖J(θ) − J(θ̃)‖_F``; ``distance = ‖θ − θ̃‖₂``.
    """

    ratio: Any
    op_norm: Any
    jac_diff: Any
    distance: Any


@partial(jax.jit, static_argnums=(0, 3))
def _lipschitz_jit(f, pa, pb, batch_size, x):
    def one(pair):
        a, b = pair
        dist = jnp.sqrt(sum(jnp.sum((u - v) ** 2) for u, v in
                            zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))
        jd = jnp.sqrt(jnp.maximum(_jac_diff_sq(f, a, b, x), 0))
        if isinstance(f, Serial):
            op = _op_from_ntk(_full_ntk_matrix(f, a, x))
        else:
            ja = _dense_jacobian(f, a, x)
            op = _op_from_ntk(ja @ ja.T)
        return jd / dist, op, jd, dist

    if batch_size is None:
        out = jax.vmap(one)((pa, pb))
    else:
        out = jax.lax.map(one, (pa, pb), batch_size=batch_size)
    return LipschitzSample(*out)


def lipschitz_ratios(f, params0, x, radius, n_pairs: int, key, *, batch_size=None) -> LipschitzSample:
    """Sample the two quantities of Lemma A.1 (A.11) inside ``B(θ0, radius)``.

    Draws ``θ`` and ``θ̃`` independently and uniformly from the ball
    (``θ = sample_ball(k1, …)``, ``θ̃ = sample_ball(k2, …)`` with
    ``k1, k2 = jax.random.split(key)``) and returns, per pair,
    ``‖J(θ) − J(θ̃)‖_F / ‖θ − θ̃‖₂`` and ``‖J(θ)‖`` — Lemma A.1 bounds both by
    ``K√n`` when ``radius = C/√n``; the ``1/√n`` is left to the caller.

    For ntklib networks nothing of size ``N·O·P`` is formed: the difference
    norm comes from per-layer inputs and cotangents at ``θ`` and ``θ̃``
    (:func:`jacobian_distance`), the operator norm from ``λ_max`` of the full
    NTK ``J Jᵀ`` ``(N·O, N·O)`` (structured derivatives). Generic callables
    use dense ``J``. Pairs are vectorised with ``vmap``, or ``lax.map`` in
    chunks of ``batch_size`` to bound memory.

    ReLU networks violate (A.3): their ratio is not bounded at small radius
    (the Jacobian jumps at kinks); use erf/tanh to see the lemma.
    """
    fn, x = _check(f, params0, x)
    if not (isinstance(radius, (int, float, np.number)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
    if not isinstance(n_pairs, (int, np.integer)) or n_pairs <= 0:
        raise ValueError(f"n_pairs must be a positive int, got {n_pairs!r}")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    k1, k2 = jax.random.split(key)
    pa = sample_ball(k1, params0, radius, int(n_pairs))
    pb = sample_ball(k2, params0, radius, int(n_pairs))
    return _lipschitz_jit(f, pa, pb, None if batch_size is None else int(batch_size), x)
