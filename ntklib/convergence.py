"""Measured quantities of the convergence proofs of Appendix A: Theorem A.3
(gradient descent, (A.27)–(A.47)) and Theorem A.4 (gradient flow, (A.48)–(A.56)).

Conventions as in :mod:`ntklib.jacobian`: ``J(θ) = ∇_θ f(𝒳, θ)`` (A.6) is the
``(N·O, P)`` matrix with rows in (example, output) order; ``g(θ) = f(𝒳, θ) − 𝒴``
(A.5) is flattened the same way; the loss is the "sum" MSE (A.8)
``L = ½‖g(θ)‖²``, so a gradient-descent step is (A.9)
``θ_{t+1} = θ_t − η J(θ_t)ᵀ g(θ_t)``. Nothing here divides by the width:
Appendix A's empirical NTK is ``Θ̂ = (1/n) J Jᵀ`` (A.7) and its learning rate
``η = η0/n``; the caller applies the ``1/n`` and ``n^{-1/2}`` factors.

For ntklib networks no ``(N·O, P)`` Jacobian is formed: products
``J(θ_a) J(θ_b)ᵀ`` and differences ``J(θ_a) − J(θ_b)`` are assembled layer by
layer from each weight layer's inputs ``x^{l-1}`` and backpropagated signals
``δ^l`` (A.13), (A.19) at the two parameter points. Generic callables
``f(params, x)`` fall back to dense Jacobians.

The caller chooses the dtype (float64 for the identities); nothing here flips
``jax_enable_x64``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .empirical import _check_params_fit, _conv_block, _cotangents, _dense_block
from .jacobian import _check, _dense_jacobian
from .layers import Conv, Dense, Serial

__all__ = [
    "cross_ntk",
    "gauss_legendre",
    "DescentDiagnostics",
    "descent_diagnostics",
    "ntk_eigenvalues",
]


# --------------------------------------------------------------------------- helpers

def _tree_norm(a, b):
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return jnp.sqrt(sum(jnp.sum((u - v) ** 2) for u, v in leaves))


def _as_matrix(k):
    """``(N1, N2, O, O) -> (N1·O, N2·O)`` in (example, output) order."""
    n1, n2, o, _ = k.shape
    return jnp.transpose(k, (0, 2, 1, 3)).reshape(n1 * o, n2 * o)


def _structured_cross(net: Serial, cot_a, cot_b):
    """``J(θ_a) J(θ_b)ᵀ`` ``(N, N, O, O)`` from the cotangents ``(inputs, deltas)`` at both points."""
    (ia, da), (ib, db) = cot_a, cot_b
    total = 0
    for k, li in enumerate(net.weight_layers()):
        layer = net.layers[li]
        if isinstance(layer, Dense):
            total = total + _dense_block(layer, None, ia[k], ib[k], da[k], db[k], False)
        elif isinstance(layer, Conv):
            total = total + _conv_block(layer, None, ia[k], ib[k], da[k], db[k], False)
        else:  # pragma: no cover - every ntklib weight layer is handled above
            raise TypeError(f"no structured rule for layer {layer!r}")
    return total


def _op(mat):
    """Largest singular value of a small square matrix."""
    return jnp.linalg.svd(mat, compute_uv=False)[0]


def _sym_eigvalsh(mat):
    return jnp.linalg.eigvalsh(0.5 * (mat + mat.T))


# --------------------------------------------------------------------------- J(θ_a) J(θ_b)ᵀ

@partial(jax.jit, static_argnums=0)
def _cross_jit(f, pa, pb, x):
    if isinstance(f, Serial):
        return _as_matrix(_structured_cross(f, _cotangents(f, pa, x), _cotangents(f, pb, x)))
    return _dense_jacobian(f, pa, x) @ _dense_jacobian(f, pb, x).T


def cross_ntk(f, params_a, params_b, x):
    """The cross kernel ``J(θ_a) J(θ_b)ᵀ``, shape ``(N·O, N·O)``, rows/columns in (example, output) order.

    With ``θ_a = θ_b`` it is the full empirical NTK of (3.9) (``n Θ̂`` of
    (A.7)); with ``θ_a = θ̃_t`` on the segment ``[θ_t, θ_{t+1}]`` and
    ``θ_b = θ_t`` it is the matrix ``J(θ̃_t) J(θ_t)ᵀ`` of (A.33)–(A.36). It is
    not symmetric unless ``θ_a = θ_b``. For ntklib networks each weight layer
    contributes ``c_w² (x_a^{l-1} x_b^{l-1ᵀ}) ⊙ (δ_a^l δ_b^{lᵀ}) + c_b² δ_a^l δ_b^{lᵀ}``
    (A.19), from one forward and ``O`` backward passes at each point.
    """
    _, x = _check(f, params_a, x)
    if jax.tree_util.tree_structure(params_a) != jax.tree_util.tree_structure(params_b):
        raise ValueError("params_b must have the tree structure of params_a")
    if isinstance(f, Serial):
        _check_params_fit(f, params_b, x)
    return _cross_jit(f, params_a, params_b, x)


def gauss_legendre(num: int):
    """Nodes and weights of the ``num``-point Gauss–Legendre rule on ``[0, 1]`` (exact for degree ``2·num − 1``).

    Used for the integral form of the mean value theorem that replaces (A.32):
    ``g(θ_{t+1}) − g(θ_t) = (∫₀¹ J(θ_t + s(θ_{t+1} − θ_t)) ds) (θ_{t+1} − θ_t)``.
    """
    if not isinstance(num, (int, np.integer)) or num <= 0:
        raise ValueError(f"num must be a positive int, got {num!r}")
    nodes, weights = np.polynomial.legendre.leggauss(int(num))
    return tuple(float(s) for s in (nodes + 1) / 2), tuple(float(w) for w in weights / 2)


# --------------------------------------------------------------------------- Theorem A.3

class DescentDiagnostics(NamedTuple):
    """What :func:`descent_diagnostics` measures along gradient descent (A.9); ``T`` steps.

    Attributes (no ``1/n`` applied anywhere):
      residual: ``(T+1,)`` ``‖g(θ_t)‖₂`` — (A.27), first line.
      step: ``(T,)`` ``‖θ_{t+1} − θ_t‖₂`` — (A.27), second line; (A.30).
      distance: ``(T+1,)`` ``‖θ_t − θ_0‖₂``.
      jac_op, jac_fro: ``(T+1,)`` ``‖J(θ_t)‖_op``, ``‖J(θ_t)‖_F`` — Lemma A.1 (A.11), second line.
      jac_diff_fro, jac_diff_op: ``(T+1,)`` ``‖J(θ_t) − J(θ_0)‖_F`` and ``‖·‖_op`` — (A.11) first line, (A.45).
      ntk_drift: ``(T+1,)`` ``‖J(θ_t)J(θ_t)ᵀ − J(θ_0)J(θ_0)ᵀ‖_F`` (``n`` times (A.28)'s/(A.44)'s left side).
      ntk_min_eig: ``(T+1,)`` ``λ_min(J(θ_t)J(θ_t)ᵀ)``.
      contraction: ``(T, S)`` ``‖I − η J(θ_t + s Δ_t) J(θ_t)ᵀ‖_op`` for ``s`` in ``s_values``,
        ``Δ_t = θ_{t+1} − θ_t`` — the factor of (A.34)–(A.36) at the point ``θ̃_t`` of the printed (A.32).
      contraction_mean: ``(T,)`` ``‖I − η J̄_t J(θ_t)ᵀ‖_op`` with ``J̄_t = ∫₀¹ J(θ_t + sΔ_t) ds``
        (Gauss–Legendre): the factor that the corrected (A.32) really produces.
      kernel_gap: ``(T,)`` ``‖J(θ_0)J(θ_0)ᵀ − J̄_t J(θ_t)ᵀ‖_op``: ``n/η0`` times the third term of (A.39).
      mean_value_defect: ``(T,)`` ``‖g(θ_{t+1}) − (I − η J̄_t J(θ_t)ᵀ) g(θ_t)‖₂``: zero up to rounding and
        quadrature error if the integral form of (A.31)–(A.33) holds.
      point_defect: ``(T, S)`` the same with ``J(θ_t + sΔ_t)``, ``s ∈ s_values``, in place of ``J̄_t``: the
        defect of the single-point form of the printed (A.32) (``s = 0`` is the linearization error).
      ntk0: ``(N·O, N·O)`` ``J(θ_0)J(θ_0)ᵀ``.
      params: the parameters ``θ_T`` after the last step.
    """

    residual: Any
    step: Any
    distance: Any
    jac_op: Any
    jac_fro: Any
    jac_diff_fro: Any
    jac_diff_op: Any
    ntk_drift: Any
    ntk_min_eig: Any
    contraction: Any
    contraction_mean: Any
    kernel_gap: Any
    mean_value_defect: Any
    point_defect: Any
    ntk0: Any
    params: Any


def _make_cot(f):
    """``θ -> (cotangents, J(θ)-handle)``: structured cotangents for ntklib nets, the dense Jacobian otherwise."""
    if isinstance(f, Serial):
        return lambda p, x: _cotangents(f, p, x)
    return lambda p, x: _dense_jacobian(f, p, x)


def _cross(f, ca, cb):
    if isinstance(f, Serial):
        return _as_matrix(_structured_cross(f, ca, cb))
    return ca @ cb.T


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _descent_jit(f, steps, s_values, nodes, weights, params0, x, y, lr):
    """The descent itself; it returns small matrices and vectors, the norms are taken on the host."""
    fn = f.apply if isinstance(f, Serial) else f
    cot = _make_cot(f)
    y_flat = y.reshape(-1)

    def residual(p):
        return fn(p, x).reshape(-1) - y_flat

    def loss(p):
        return 0.5 * jnp.sum(residual(p) ** 2)

    c0 = cot(params0, x)

    def state_record(p, c):
        return dict(g=residual(p), distance=_tree_norm(p, params0), ktt=_cross(f, c, c), kt0=_cross(f, c, c0))

    # the points θ_t + s(θ_{t+1} − θ_t) at which J is needed besides θ_t itself (s = 1 gives θ_{t+1})
    fractions = tuple(sorted((set(s_values) | set(nodes) | {1.0}) - {0.0}))
    index = {s: i for i, s in enumerate(fractions)}
    frac = jnp.asarray(fractions, dtype=y.dtype)

    def step(carry, _):
        p, c = carry
        grad = jax.grad(loss)(p)
        p_next = jax.tree_util.tree_map(lambda a, b: a - lr * b, p, grad)
        points = jax.tree_util.tree_map(lambda a, b: a[None] + frac.reshape((-1,) + (1,) * a.ndim) * (b - a)[None],
                                        p, p_next)
        cs = jax.vmap(lambda q: cot(q, x))(points)          # cotangents at every fraction, one batched pass
        crosses = jax.vmap(lambda cq: _cross(f, cq, c))(cs)  # J(θ_s) J(θ_t)ᵀ for every fraction s
        c_next = jax.tree_util.tree_map(lambda a: a[index[1.0]], cs)

        def cross_at(s):
            return _cross(f, c, c) if s == 0.0 else crosses[index[s]]

        rec = state_record(p, c)
        rec.update(step=_tree_norm(p_next, p),
                   cross=jnp.stack([cross_at(s) for s in s_values]),
                   jbar_jt=sum(w * cross_at(s) for s, w in zip(nodes, weights)))
        return (p_next, c_next), rec

    (p_last, c_last), recs = jax.lax.scan(step, (params0, c0), None, length=steps)
    return recs, state_record(p_last, c_last), p_last


def _host_diagnostics(recs, last, params, lr):
    """Norms, eigenvalues and singular values of the recorded small matrices (float64 numpy)."""
    r = {k: np.asarray(v) for k, v in recs.items()}
    state = {k: np.concatenate([r[k], np.asarray(last[k])[None]]) for k in ("g", "distance", "ktt", "kt0")}
    ktt, kt0 = state["ktt"], state["kt0"]
    k00 = ktt[0]
    eye = np.eye(k00.shape[0])
    lam = np.linalg.eigvalsh(0.5 * (ktt + np.swapaxes(ktt, -1, -2)))
    diff = ktt - kt0 - np.swapaxes(kt0, -1, -2) + k00          # (J_t − J_0)(J_t − J_0)ᵀ
    g = state["g"]
    g_now, g_next = g[:-1], g[1:]
    jbar = r["jbar_jt"]
    op = lambda m: np.linalg.svd(m, compute_uv=False)[..., 0]  # noqa: E731
    return DescentDiagnostics(
        residual=np.linalg.norm(g, axis=-1),
        step=r["step"],
        distance=state["distance"],
        jac_op=np.sqrt(np.maximum(lam[:, -1], 0)),
        jac_fro=np.sqrt(np.trace(ktt, axis1=-2, axis2=-1)),
        jac_diff_fro=np.sqrt(np.maximum(np.trace(diff, axis1=-2, axis2=-1), 0)),
        jac_diff_op=np.sqrt(np.maximum(np.linalg.eigvalsh(0.5 * (diff + np.swapaxes(diff, -1, -2)))[:, -1], 0)),
        ntk_drift=np.linalg.norm(ktt - k00, axis=(-2, -1)),
        ntk_min_eig=lam[:, 0],
        contraction=op(eye - lr * r["cross"]),
        contraction_mean=op(eye - lr * jbar),
        kernel_gap=op(k00 - jbar),
        mean_value_defect=np.linalg.norm(g_next - (g_now - lr * np.einsum("tij,tj->ti", jbar, g_now)), axis=-1),
        point_defect=np.linalg.norm(
            g_next[:, None] - (g_now[:, None] - lr * np.einsum("tsij,tj->tsi", r["cross"], g_now)), axis=-1),
        ntk0=k00,
        params=params,
    )


def descent_diagnostics(f, params0, x, y, learning_rate, steps: int, *, s_values=(0.0, 0.5, 1.0),
                        quadrature: int = 3) -> DescentDiagnostics:
    """Run gradient descent (A.9) on ``L = ½‖g(θ)‖²`` (A.8) and measure every quantity of Theorem A.3's proof.

    ``θ_{t+1} = θ_t − η J(θ_t)ᵀ g(θ_t)`` for ``steps`` steps (Appendix A uses
    ``η = η0/n``). At every step ``t`` it records the residual, the step
    length and the distance from ``θ_0`` of (A.27)/(A.30); the Lemma A.1
    quantities ``‖J(θ_t)‖`` and ``‖J(θ_t) − J(θ_0)‖`` of (A.11)/(A.45); the
    kernel drift ``‖J_tJ_tᵀ − J_0J_0ᵀ‖_F`` of (A.44); and the contraction
    factor ``‖I − η J(θ̃_t) J(θ_t)ᵀ‖_op`` of (A.34)–(A.36), both at the
    points ``θ̃_t = θ_t + s(θ_{t+1} − θ_t)``, ``s ∈ s_values`` (the single
    mean-value point of the printed (A.32)) and with the averaged Jacobian
    ``J̄_t = ∫₀¹ J(θ_t + s(θ_{t+1} − θ_t)) ds`` of the integral form, computed
    by ``quadrature``-point Gauss–Legendre. That integral form is an identity,
    ``g(θ_{t+1}) = (I − η J̄_t J(θ_t)ᵀ) g(θ_t)``; its defect is recorded too.

    Everything runs in one ``jax.lax.scan``, compiled once per network,
    ``steps``, ``s_values`` and ``quadrature`` (pass the same network object
    to reuse the compilation). For ntklib networks each step costs a few
    forward/backward passes on the ``N`` training inputs (one per distinct
    point ``θ̃_t``) and never forms ``J``.

    Args:
      f: ntklib network or callable ``f(params, x) -> (N, O)``.
      params0: ``θ_0``.
      x: training inputs ``(N, ...)``; y: targets ``(N, O)``.
      learning_rate: scalar ``η > 0``.
      steps: number of steps ``T ≥ 1``.
      s_values: fractions ``s ∈ [0, 1]`` of the step at which the contraction is measured.
      quadrature: number of Gauss–Legendre nodes for ``J̄_t``.

    Returns: a :class:`DescentDiagnostics`.
    """
    fn, x = _check(f, params0, x)
    y = jnp.asarray(y)
    out = jax.eval_shape(fn, params0, x)
    if y.shape != out.shape:
        raise ValueError(f"y must have shape (N, O) = {out.shape}, got {y.shape}")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not (isinstance(learning_rate, (int, float, np.number)) and np.isfinite(learning_rate)
            and learning_rate > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}")
    s_values = tuple(float(s) for s in s_values)
    if not s_values or any(not 0.0 <= s <= 1.0 for s in s_values):
        raise ValueError(f"s_values must be a non-empty sequence of numbers in [0, 1], got {s_values!r}")
    nodes, weights = gauss_legendre(quadrature)
    dtype = out.dtype
    recs, last, params = _descent_jit(f, int(steps), s_values, nodes, weights, params0, x, y.astype(dtype),
                                      jnp.asarray(learning_rate, dtype))
    return _host_diagnostics(recs, last, params, float(learning_rate))


# --------------------------------------------------------------------------- Theorem A.4, (A.50)

@partial(jax.jit, static_argnums=0)
def _eigs_jit(f, params_batch, x):
    cot = _make_cot(f)

    def one(p):
        c = cot(p, x)
        return _sym_eigvalsh(_cross(f, c, c))

    return jax.lax.map(one, params_batch)


def ntk_eigenvalues(f, params_batch, x):
    """Eigenvalues (ascending) of ``J(θ)J(θ)ᵀ`` at each point of a stacked batch of parameters.

    ``params_batch`` is a pytree like the params with a leading axis ``M``
    (e.g. from :func:`ntklib.sample_ball`); the result has shape
    ``(M, N·O)``. Divided by ``n`` these are the eigenvalues of the
    standard-parametrization ``Θ̂ = (1/n) J Jᵀ`` (A.7) whose minimum (A.50)
    bounds from below on the ball ``B(θ_0, C n^{-1/2})``. Points are
    processed one after another (``lax.map``) to bound memory.
    """
    leaves = jax.tree_util.tree_leaves(params_batch)
    if not leaves or any(np.ndim(v) < 1 for v in leaves) or len({np.shape(v)[0] for v in leaves}) != 1:
        raise ValueError("params_batch must be a pytree of arrays with one common leading (batch) axis")
    first = jax.tree_util.tree_map(lambda v: v[0], params_batch)
    _check(f, first, x)
    return _eigs_jit(f, params_batch, jnp.asarray(x))

