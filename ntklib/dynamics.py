"""Training dynamics: the linearized network (5.1), closed-form MSE predictions
(5.7)/(5.9), and recorded gradient descent (A.9) / gradient flow (A.10).

Conventions (section 2–3 of the source):

* A network maps ``x`` of shape ``(N, ...)`` to ``f(θ, x)`` of shape ``(N, O)``
  (``O = k`` outputs). Stacked over the training set it is the vector
  ``f(𝒳) = vec([f(x)]_{x∈𝒳}) ∈ ℝ^{k|𝒟|}``; we vectorise **over (example,
  output)**, i.e. ``f.reshape(-1)`` of the ``(N, O)`` array, index
  ``i·O + a``. A full kernel ``Θ̂`` of shape ``(N1, N2, O, O)``
  (``empirical_ntk(..., trace_axes=())``) is the matrix
  ``Θ̂[(i, a), (j, b)] = Θ̂[i, j, a, b]`` of shape ``(N1·O, N2·O)`` in that
  order. A traced kernel ``(N1, N2)`` acts on every output channel alike,
  i.e. as ``Θ̂ ⊗ I_O`` (what the analytic per-output kernel predicts).
* MSE loss with ``ℓ(ŷ, y) = ½‖ŷ − y‖²``, in one of two normalisations:

  - ``"mean"``, eq. (2.4): ``L = 1/(k|𝒟|) Σ_x ½‖f(x) − y‖²``; gradient flow
    (3.1)/(3.8) is ``ḟ = −(η/(k|𝒟|)) Θ̂ (f − y)`` — the ``t/k|𝒟|`` scaling of
    (5.3)–(5.9);
  - ``"sum"``, eq. (A.8): ``L = ½‖g(θ)‖²`` with ``g = f(𝒳) − 𝒴`` (A.5), so a
    gradient-descent step is (A.9) ``θ ← θ − η J(θ)ᵀ g(θ)`` and the flow
    ``θ̇ = −η J(θ)ᵀ g(θ)`` is (A.10) (which has ``η = 1``).

* Time: gradient flow is ``θ̇_t = −η ∇_θ L`` (3.1); gradient-descent step
  number ``t`` is the Euler approximation of flow time ``t``, so closed-form
  predictions, flow and descent all use the same ``(η, t)``.
* Learning rates may be one scalar or a pytree with one (non-negative) rate
  per parameter leaf, as the layer-wise rates of (A.2). With per-leaf rates
  ``η_p`` the function-space kernel becomes ``Σ_p η_p ∂f/∂θ_p ∂f/∂θ_pᵀ``
  (e.g. ``Σ_l η_l Θ̂^l`` from :func:`ntklib.layerwise_ntk`); pass that kernel
  with ``learning_rate=1`` to :func:`gradient_descent_mse`.

The caller chooses the dtype (float64 for identities); nothing here flips
``jax_enable_x64``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .empirical import METHODS, _as_array, _check_params_fit, empirical_ntk, method_costs
from .layers import Conv, Dense, Serial

__all__ = [
    "linearize",
    "gradient_descent_mse",
    "Trajectory",
    "train_gradient_descent",
    "train_gradient_flow",
    "layerwise_learning_rates",
    "equivalent_ntk_learning_rates",
    "NORMALIZATIONS",
]

NORMALIZATIONS = ("mean", "sum")


# --------------------------------------------------------------------------- helpers

def _net_fn(f) -> Callable:
    if isinstance(f, Serial):
        return f.apply
    if callable(f):
        return f
    raise TypeError(f"f must be an ntklib network or a callable f(params, x), got {type(f).__name__}")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_normalization(normalization):
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS} ('mean': L = 1/(k|D|) Σ ½‖f−y‖², eq. (2.4); "
                         f"'sum': L = ½‖f−y‖², eq. (A.8)), got {normalization!r}")


def _check_scalar_rate(lr, name="learning_rate"):
    if _is_concrete(lr):
        try:
            v = np.asarray(lr, dtype=float)
        except (TypeError, ValueError):
            v = None
        if v is None or v.ndim != 0 or not np.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {lr!r}")


def _lr_tree(learning_rate, params):
    """A pytree like ``params`` with one rate per leaf (scalar rates are broadcast)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if isinstance(learning_rate, (int, float, np.number)) or (hasattr(learning_rate, "ndim")
                                                               and learning_rate.ndim == 0):
        _check_scalar_rate(learning_rate)
        rates = [learning_rate] * len(leaves)
    else:
        rates, lr_def = jax.tree_util.tree_flatten(learning_rate)
        if lr_def != treedef:
            raise ValueError("learning_rate must be a scalar or a pytree with the structure of params (one rate per "
                             f"leaf); params is {treedef}, learning_rate is {lr_def}")
        for r, leaf in zip(rates, leaves):
            if _is_concrete(r):
                v = np.asarray(r)
                if not np.all(np.isfinite(v)) or np.any(v < 0):
                    raise ValueError(f"learning_rate: every per-leaf rate must be finite and >= 0, got {r!r}")
                try:
                    np.broadcast_shapes(v.shape, np.shape(leaf))
                except ValueError as e:
                    raise ValueError(f"learning_rate: a per-leaf rate of shape {v.shape} does not broadcast to its "
                                     f"parameter of shape {np.shape(leaf)}") from e
    return treedef.unflatten([jnp.asarray(r, dtype=jnp.result_type(leaf)) for r, leaf in zip(rates, leaves)])


def _inv_m(normalization, y):
    """``1/m``: ``1/(k|𝒟|)`` for ``"mean"`` (2.4), ``1`` for ``"sum"`` (A.8); traced, so one compile serves both."""
    return jnp.asarray(1.0 / y.size if normalization == "mean" else 1.0, jnp.result_type(y))


def _mse(fx, y, inv_m):
    """``L = (1/m) Σ ½‖f(x) − y‖²``: eq. (2.4) with ``1/m = 1/(k|𝒟|)``, or (A.8) with ``1/m = 1``."""
    return inv_m * (0.5 * jnp.sum((fx - y) ** 2))


def _tree_norm(a, b):
    """``‖a − b‖₂`` over all leaves of two pytrees."""
    sq = sum(jnp.sum((u - v) ** 2) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    return jnp.sqrt(sq)


# --------------------------------------------------------------------------- (5.1)

def linearize(f, params0) -> Callable:
    """The linearized network (5.1) around ``params0``.

    ``f_lin(θ, x) = f(θ0, x) + ∇_θ f(θ0, x) (θ − θ0)``, evaluated with one
    ``jax.jvp`` (never a Jacobian). ``f`` is an ntklib network or any callable
    ``f(params, x)``; ``f_lin`` has the same signature and output shape
    ``(N, O)`` and composes with ``jit``/``vmap``/``grad``.
    """
    fn = _net_fn(f)

    def f_lin(params, x):
        dparams = jax.tree_util.tree_map(lambda p, p0: p - p0, params, params0)
        f0, df = jax.jvp(lambda p: fn(p, x), (params0,), (dparams,))
        return f0 + df

    return f_lin


# --------------------------------------------------------------------------- (5.7), (5.9)

def _kernel_matrix(k, n, o, name):
    """Full ``(N1, N2, O, O) -> (N1·O, N2·O)`` (vec over (example, output)); traced kernels pass through."""
    k = jnp.asarray(k)
    if k.ndim == 2:
        return k, False
    if k.ndim == 4:
        if k.shape[2:] != (o, o):
            raise ValueError(f"{name}: a full kernel must have shape (N1, N2, O, O) with O = {o} outputs (from "
                             f"y_train), got {k.shape}")
        return jnp.transpose(k, (0, 2, 1, 3)).reshape(k.shape[0] * o, k.shape[1] * o), True
    raise ValueError(f"{name} must be a traced kernel (N1, N2) or a full kernel (N1, N2, O, O), got shape {k.shape}")


@partial(jax.jit, static_argnums=0)
def _decompose(full, k, r, ktx):
    """``Θ̂ = V diag(λ) Vᵀ`` (λ clipped at 0), the range cut-off, ``c = Vᵀ r`` and ``Θ̂(x', 𝒳) V``."""
    lam, v = jnp.linalg.eigh(0.5 * (k + k.T))
    lam = jnp.maximum(lam, 0)
    tol = jnp.max(lam) * k.shape[0] * jnp.finfo(k.dtype).eps
    c = v.T @ (r.reshape(-1) if full else r)          # (M,) or (N, O): residual in the eigenbasis
    kv = None if ktx is None else ktx @ v             # (M_test, M)
    return v, lam, tol, c, kv


@partial(jax.jit, static_argnums=0)
def _predict_core(full, v, lam, tol, rate, c, kv, f0, f0t, ts):
    """(5.7)/(5.9) at times ``ts`` ``(T,)`` in the eigenbasis ``Θ̂ = V diag(λ) Vᵀ``; ``c = Vᵀ(f_0 − y)``."""
    ts = ts[:, None]                                                      # (T, 1)
    inf = jnp.isinf(ts)
    a = rate * jnp.where(inf, 0, ts)                                      # ηt/m, finite rows only
    pos, on_range = lam > 0, lam > tol
    lam_safe = jnp.where(pos, lam, 1)
    decay = -jnp.expm1(-a * lam)                                          # 1 − e^{−ηλt/m}: (T, M)
    fit = jnp.where(inf, on_range.astype(lam.dtype), decay)               # λ φ_t(λ)
    phi = jnp.where(inf, jnp.where(on_range, 1 / lam_safe, 0), jnp.where(pos, decay / lam_safe, a))   # φ_t(λ)
    n, o = f0.shape
    if full:
        f_train = f0 - jnp.einsum("mk,tk->tm", v, fit * c).reshape(-1, n, o)
        f_test = None if kv is None else f0t - jnp.einsum("pk,tk->tp", kv, phi * c).reshape(-1, *f0t.shape)
    else:
        f_train = f0 - jnp.einsum("nk,tk,ko->tno", v, fit, c)
        f_test = None if kv is None else f0t - jnp.einsum("pk,tk,ko->tpo", kv, phi, c)
    return f_train, f_test


def gradient_descent_mse(ntk_train_train, y_train, learning_rate, *, f0_train, ntk_test_train=None, f0_test=None,
                         normalization: str = "mean"):
    """Closed-form MSE dynamics of the linearized network, (5.7) and (5.9).

    With ``m = k|𝒟| = N·O`` (``normalization="mean"``, eq. (2.4)) or
    ``m = 1`` (``"sum"``, eq. (A.8)) and ``r = f_0(𝒳) − 𝒴``:

        f_t(𝒳)  = f_0(𝒳) − (I − e^{−ηΘ̂t/m}) r                             (5.6)–(5.7)
        f_t(x') = f_0(x') − Θ̂(x', 𝒳) Θ̂⁻¹ (I − e^{−ηΘ̂t/m}) r                (5.9)

    ``Θ̂⁻¹`` is never formed: with ``Θ̂ = V diag(λ) Vᵀ`` (``eigh`` of the
    symmetrised kernel, negative rounding eigenvalues clipped to 0),

        Θ̂⁻¹(I − e^{−ηΘ̂t/m}) = V diag(φ_t(λ)) Vᵀ,  φ_t(λ) = −expm1(−ηλt/m)/λ,

    with the limit ``φ_t(0) = ηt/m``, so singular kernels (e.g. a duplicated
    training point) work at every finite ``t``: this is the exact solution of
    the linear ODE ``ḟ = −(η/m)Θ̂(f − y)``. At ``t = ∞``, ``φ_∞(λ) = 1/λ`` on
    the range of Θ̂ and ``0`` on its null space (eigenvalues below
    ``λ_max · M · eps``, ``M`` the matrix size): the pseudo-inverse, the
    limit whenever the joint train/test kernel is positive semi-definite
    (then ``Θ̂(x', 𝒳)`` vanishes on the null space of ``Θ̂``). For a kernel that is only numerically singular
    the finite-``t`` result drifts from the ``t = ∞`` one like
    ``eps · ηt/m``, i.e. only at absurdly large ``t``.

    Args:
      ntk_train_train: ``Θ̂(𝒳, 𝒳)``, traced ``(N, N)`` (acting as ``Θ̂ ⊗ I_O``)
        or full ``(N, N, O, O)`` (``empirical_ntk(..., trace_axes=())``; its
        matrix is taken over vec-(example, output) order, see module doc).
      y_train: targets ``𝒴``, shape ``(N, O)``.
      learning_rate: scalar ``η ≥ 0`` (for per-layer rates, scale the kernel).
      f0_train: ``f_0(𝒳)``, shape ``(N, O)`` (zeros for a centred model).
      ntk_test_train: ``Θ̂(x', 𝒳)``, ``(N_test, N)`` or ``(N_test, N, O, O)``,
        same kind as ``ntk_train_train``; optional.
      f0_test: ``f_0(x')``, shape ``(N_test, O)``; required with
        ``ntk_test_train``.
      normalization: ``"mean"`` (2.4) or ``"sum"`` (A.8).

    Returns:
      ``predict(t) -> (f_train_t, f_test_t)``: ``t ≥ 0`` a scalar (outputs
      ``(N, O)``, ``(N_test, O)``) or a 1-D array of times (outputs with a
      leading time axis ``(T, …)``); ``t = jnp.inf`` allowed. ``f_test_t`` is
      ``None`` without test data. ``predict`` is pure and ``jit``-able.
    """
    _check_normalization(normalization)
    _check_scalar_rate(learning_rate)
    y = jnp.asarray(y_train)
    f0 = jnp.asarray(f0_train)
    if y.ndim != 2:
        raise ValueError(f"y_train must have shape (N, O), got {y.shape}")
    n, o = y.shape
    if f0.shape != y.shape:
        raise ValueError(f"f0_train must have the shape of y_train {y.shape}, got {f0.shape}")
    k, full = _kernel_matrix(ntk_train_train, n, o, "ntk_train_train")
    m_rows = n * o if full else n
    if k.shape != (m_rows, m_rows):
        raise ValueError(f"ntk_train_train must be ({n}, {n}) or ({n}, {n}, {o}, {o}) for y_train of shape {y.shape}, "
                         f"got {jnp.shape(ntk_train_train)}")
    if (ntk_test_train is None) != (f0_test is None):
        raise ValueError("ntk_test_train and f0_test must be given together (both or neither)")
    dtype = jnp.result_type(k, y, f0)
    k, y, f0 = k.astype(dtype), y.astype(dtype), f0.astype(dtype)
    ktx = f0t = None
    if ntk_test_train is not None:
        f0t = jnp.asarray(f0_test, dtype)
        if f0t.ndim != 2 or f0t.shape[1] != o:
            raise ValueError(f"f0_test must have shape (N_test, {o}), got {f0t.shape}")
        nt = f0t.shape[0]
        ktx, full_t = _kernel_matrix(ntk_test_train, nt, o, "ntk_test_train")
        if full_t != full:
            raise ValueError("ntk_test_train must be of the same kind (traced or full) as ntk_train_train, got shapes "
                             f"{jnp.shape(ntk_test_train)} and {jnp.shape(ntk_train_train)}")
        if ktx.shape != ((nt * o if full else nt), m_rows):
            raise ValueError(f"ntk_test_train must have shape ({nt}, {n}) or ({nt}, {n}, {o}, {o}) for f0_test "
                             f"{f0t.shape} and y_train {y.shape}, got {jnp.shape(ntk_test_train)}")
        ktx = ktx.astype(dtype)

    m = float(n * o) if normalization == "mean" else 1.0
    rate = jnp.asarray(learning_rate, dtype) / m
    v, lam, tol, c, kv = _decompose(full, k, f0 - y, ktx)

    def predict(t):
        t_arr = jnp.asarray(t, dtype)
        if t_arr.ndim > 1:
            raise ValueError(f"t must be a scalar or a 1-D array of times, got shape {t_arr.shape}")
        if _is_concrete(t_arr) and (np.any(np.isnan(np.asarray(t_arr))) or np.any(np.asarray(t_arr) < 0)):
            raise ValueError(f"t must be >= 0 (jnp.inf allowed), got {t!r}")
        f_train, f_test = _predict_core(full, v, lam, tol, rate, c, kv, f0, f0t, jnp.atleast_1d(t_arr))
        if t_arr.ndim == 0:
            f_train = f_train[0]
            f_test = None if f_test is None else f_test[0]
        return f_train, f_test

    return predict


# --------------------------------------------------------------------------- trainers

class Trajectory(NamedTuple):
    """What the trainers record, stacked over the ``T`` recorded times.

    Attributes:
      times: ``(T,)`` times; for gradient descent the step numbers ``t`` of (A.9).
      f_train, f_lin_train: ``(T, N, O)`` network ``f_t(𝒳)`` and linearized ``f^lin_t(𝒳)`` (5.1).
      f_test, f_lin_test: ``(T, N_test, O)`` on ``x_test``, or ``None``.
      param_distance, param_distance_lin: ``(T,)`` ``‖θ_t − θ_0‖₂`` (Theorem 4.1), for both models.
      ntk: ``(T, N, N, O, O)`` full ``Θ̂_t(𝒳, 𝒳)`` of (3.9), or ``None`` (``record_ntk=False``).
      loss, loss_lin: ``(T,)`` the training loss (2.4)/(A.8) of both models.
      params, params_lin: the parameters at the last recorded time.
      num_steps: gradient-descent steps taken, or accepted ODE-solver steps.
    """

    times: Any
    f_train: Any
    f_lin_train: Any
    f_test: Any
    f_lin_test: Any
    param_distance: Any
    param_distance_lin: Any
    ntk: Any
    loss: Any
    loss_lin: Any
    params: Any
    params_lin: Any
    num_steps: Any


def _check_training_inputs(f, params0, x_train, y_train, x_test, normalization, ntk_method):
    fn = _net_fn(f)
    _check_normalization(normalization)
    if ntk_method not in METHODS:
        raise ValueError(f"ntk_method must be one of {METHODS}, got {ntk_method!r}")
    x_train = _as_array(x_train, "x_train")
    y_train = jnp.asarray(y_train)
    if isinstance(f, Serial):
        _check_params_fit(f, params0, x_train)
    out = jax.eval_shape(fn, params0, x_train)
    if len(out.shape) != 2:
        raise ValueError(f"f(params, x) must return shape (N, O), got {out.shape}")
    if y_train.shape != out.shape:
        raise ValueError(f"y_train must have shape (N, O) = {out.shape} (one row per example of x_train, one column "
                         f"per network output), got {y_train.shape}")
    if x_test is not None:
        x_test = _as_array(x_test, "x_test")
        if tuple(x_test.shape[1:]) != tuple(x_train.shape[1:]):
            raise ValueError(f"x_test must have the per-example shape of x_train: x_train is {tuple(x_train.shape)}, "
                             f"x_test is {tuple(x_test.shape)}")
    if ntk_method == "auto":
        costs = method_costs(f, params0, x_train, trace_axes=())
        ntk_method = min(costs, key=costs.get)
    return x_train, y_train.astype(out.dtype), x_test, ntk_method


def _show_progress(progress) -> bool:
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def _record(f, record_ntk, ntk_method, inv_m, params0, params, params_lin, x, y, x_test):
    """One record: outputs, distances, NTK, losses of the network and its linearization."""
    fn = _net_fn(f)
    f_lin = linearize(fn, params0)
    ft, flt = fn(params, x), f_lin(params_lin, x)
    rec = dict(
        f_train=ft, f_lin_train=flt,
        f_test=None if x_test is None else fn(params, x_test),
        f_lin_test=None if x_test is None else f_lin(params_lin, x_test),
        param_distance=_tree_norm(params, params0), param_distance_lin=_tree_norm(params_lin, params0),
        ntk=empirical_ntk(f, params, x, method=ntk_method, trace_axes=()) if record_ntk else None,
        loss=_mse(ft, y, inv_m), loss_lin=_mse(flt, y, inv_m),
    )
    return rec


_record_jit = jax.jit(_record, static_argnums=(0, 1, 2))


def _gradients(f, inv_m, params0, params, params_lin, x, y):
    fn = _net_fn(f)
    f_lin = linearize(fn, params0)
    g = jax.grad(lambda p: _mse(fn(p, x), y, inv_m))(params)
    g_lin = jax.grad(lambda p: _mse(f_lin(p, x), y, inv_m))(params_lin)
    return g, g_lin


@partial(jax.jit, static_argnums=(0, 1))
def _gd_advance(f, n_steps, inv_m, params0, params, params_lin, x, y, lr):
    """``n_steps`` steps of (A.9), ``θ ← θ − η ∇_θ L``, for the network and its linearization, in one scan."""
    def step(state, _):
        p, pl = state
        g, gl = _gradients(f, inv_m, params0, p, pl, x, y)
        p = jax.tree_util.tree_map(lambda a, r, b: a - r * b, p, lr, g)
        pl = jax.tree_util.tree_map(lambda a, r, b: a - r * b, pl, lr, gl)
        return (p, pl), None

    (params, params_lin), _ = jax.lax.scan(step, (params, params_lin), None, length=n_steps)
    return params, params_lin


def _stack(records, times, params, params_lin, num_steps):
    out = {}
    for key in records[0]:
        out[key] = None if records[0][key] is None else jnp.stack([r[key] for r in records])
    return Trajectory(times=times, params=params, params_lin=params_lin, num_steps=num_steps, **out)


def train_gradient_descent(f, params0, x_train, y_train, learning_rate, steps: int, *, record_every: int = 1,
                           x_test=None, normalization: str = "mean", record_ntk: bool = True,
                           ntk_method: str = "auto", progress=None) -> Trajectory:
    """Full-batch gradient descent (A.9) on the MSE, recording network and linearized model.

    Runs ``θ_{t+1} = θ_t − η ∇_θ L(θ_t)`` (with ``normalization="sum"`` this is
    exactly (A.9), ``θ − η J(θ)ᵀ g(θ)``) and, in parallel from the same
    ``θ_0``, the same descent on the linearized model (5.1). Steps between
    records run in one ``jax.lax.scan``; the step and record functions are
    ``jit``-compiled once per network/normalisation (``f`` is a static
    argument: pass the same network object or function, not a new lambda per
    call, to reuse the compilation).

    Args:
      f: ntklib network or callable ``f(params, x) -> (N, O)``.
      params0: initial parameters ``θ_0``.
      x_train: ``(N, ...)``; y_train: ``(N, O)``.
      learning_rate: scalar ``η ≥ 0`` or a pytree like ``params0`` with one
        rate per leaf (e.g. :func:`layerwise_learning_rates`).
      steps: number of steps (``≥ 0``).
      record_every: record at steps ``0, r, 2r, …`` and at ``steps``.
      x_test: optional ``(N_test, ...)`` inputs whose outputs are recorded.
      normalization: ``"mean"`` (2.4) or ``"sum"`` (A.8).
      record_ntk: record the full kernel ``Θ̂_t(𝒳, 𝒳)`` ``(N, N, O, O)``.
      ntk_method: method of :func:`ntklib.empirical_ntk` for it.
      progress: tqdm bar over steps; ``None`` (default) shows it when stderr
        is a terminal, ``False`` never, ``True`` always.

    Returns: a :class:`Trajectory` with ``times`` the recorded step numbers.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(record_every, (int, np.integer)) or record_every <= 0:
        raise ValueError(f"record_every must be a positive int, got {record_every!r}")
    x, y, x_test, ntk_method = _check_training_inputs(f, params0, x_train, y_train, x_test, normalization, ntk_method)
    lr = _lr_tree(learning_rate, params0)
    record_steps = list(range(0, steps + 1, int(record_every)))
    if record_steps[-1] != steps:
        record_steps.append(steps)

    show = _show_progress(progress)
    if show:  # notebook-aware bar only when shown: tqdm.auto warns in notebooks without ipywidgets
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    params, params_lin = params0, params0
    inv_m = _inv_m(normalization, y)
    records = [_record_jit(f, record_ntk, ntk_method, inv_m, params0, params, params_lin, x, y, x_test)]
    with tqdm(total=steps, unit="step", desc="gradient descent", disable=not show) as bar:
        for prev, nxt in zip(record_steps[:-1], record_steps[1:]):
            params, params_lin = _gd_advance(f, nxt - prev, inv_m, params0, params, params_lin, x, y, lr)
            records.append(_record_jit(f, record_ntk, ntk_method, inv_m, params0, params, params_lin, x, y, x_test))
            bar.update(nxt - prev)
    times = jnp.asarray(record_steps, dtype=jnp.result_type(y))
    return _stack(records, times, params, params_lin, int(steps))


_SOLVERS = ("tsit5", "dopri5", "dopri8")


def _solver(solver):
    import diffrax

    if isinstance(solver, str):
        name = solver.lower()
        if name not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS} or a diffrax solver instance, got {solver!r}")
        return {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8}[name]()
    if isinstance(solver, diffrax.AbstractSolver):
        return solver
    raise ValueError(f"solver must be one of {_SOLVERS} or a diffrax solver instance, got {solver!r}")


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _flow_solve(f, record_ntk, ntk_method, solver, max_steps, show, inv_m, params0, x, y, x_test, lr, times, rtol,
                atol):
    import diffrax

    # The ODE state is a pair of leaf lists: the network's θ and the linearized model's, leaf by leaf. (A flat
    # ravel_pytree vector made every matmul of the vector field operate on slices of one long array, which
    # XLA:CPU runs tens of times slower inside the solver loop once the width reaches a few hundred.)
    leaves0, treedef = jax.tree_util.tree_flatten(params0)
    lr_leaves = jax.tree_util.tree_leaves(lr)

    def vector_field(t, state, args):
        g, gl = _gradients(f, inv_m, params0, treedef.unflatten(state[0]), treedef.unflatten(state[1]), x, y)
        return tuple([-r * a for r, a in zip(lr_leaves, jax.tree_util.tree_leaves(d))] for d in (g, gl))

    meter = diffrax.TqdmProgressMeter() if show else diffrax.NoProgressMeter()
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), solver, t0=jnp.zeros((), times.dtype), t1=times[-1], dt0=None,
        y0=(list(leaves0), list(leaves0)), saveat=diffrax.SaveAt(ts=times),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps, progress_meter=meter)
    recs = jax.lax.map(lambda s: _record(f, record_ntk, ntk_method, inv_m, params0, treedef.unflatten(s[0]),
                                         treedef.unflatten(s[1]), x, y, x_test), sol.ys)
    last = tuple(treedef.unflatten([a[-1] for a in s]) for s in sol.ys)
    return recs, last, sol.stats["num_accepted_steps"]


def train_gradient_flow(f, params0, x_train, y_train, learning_rate, times, *, rtol: float = 1e-8,
                        atol: float = 1e-8, x_test=None, normalization: str = "mean", record_ntk: bool = True,
                        ntk_method: str = "auto", solver="tsit5", max_steps: int = 100_000,
                        progress=None) -> Trajectory:
    """Gradient flow (A.10) ``θ̇ = −η ∇_θ L(θ)`` by an adaptive ODE solver (diffrax).

    The network and its linearization (5.1) are integrated together as one
    ODE from the same ``θ_0`` with an explicit Runge–Kutta solver (Tsit5 by
    default) under a PID step-size controller with tolerances ``rtol``,
    ``atol``; the state is saved only at ``times`` (``SaveAt(ts=times)``, no
    dense output, so memory is ``O(T·P)`` however many steps are taken).
    With ``normalization="sum"`` and ``η = 1`` the flow is exactly (A.10).

    ReLU networks have a discontinuous gradient field: the adaptive solver
    then takes many tiny steps at the kinks (it stays correct and its memory
    stays bounded, but it is slow) — prefer :func:`train_gradient_descent`
    for ReLU (see ``ntk-experiment-facts.md``).

    Args:
      f, params0, x_train, y_train, learning_rate, x_test, normalization,
      record_ntk, ntk_method, progress: as in :func:`train_gradient_descent`
        (the progress bar is diffrax's tqdm meter over ``t``).
      times: 1-D non-decreasing array of times ``≥ 0`` to record at (time
        starts at 0 with ``θ_0``).
      rtol, atol: solver tolerances (``> 0``).
      solver: ``"tsit5"``, ``"dopri5"``, ``"dopri8"`` or a diffrax solver.
      max_steps: the solver's step budget (it raises when exceeded).

    Returns: a :class:`Trajectory`; ``num_steps`` counts accepted solver steps.
    """
    x, y, x_test, ntk_method = _check_training_inputs(f, params0, x_train, y_train, x_test, normalization, ntk_method)
    lr = _lr_tree(learning_rate, params0)
    ts = np.asarray(times, dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError(f"times must be a non-empty 1-D array, got shape {ts.shape}")
    if not np.all(np.isfinite(ts)) or np.any(ts < 0):
        raise ValueError(f"times must be finite and >= 0 (use gradient_descent_mse for t = ∞), got {times!r}")
    if np.any(np.diff(ts) < 0):
        raise ValueError("times must be non-decreasing")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(tol, (int, float, np.number)) and math.isfinite(tol) and tol > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {tol!r}")
    if not isinstance(max_steps, (int, np.integer)) or max_steps <= 0:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    solver = _solver(solver)
    dtype = jnp.result_type(y)
    times_j = jnp.asarray(ts, dtype)
    if ts[-1] == 0:  # nothing to integrate
        rec = _record_jit(f, record_ntk, ntk_method, _inv_m(normalization, y), params0, params0, params0, x, y,
                          x_test)
        recs = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (ts.size, *a.shape)), rec)
        return Trajectory(times=times_j, params=params0, params_lin=params0, num_steps=0, **recs)
    recs, (params, params_lin), n_acc = _flow_solve(
        f, record_ntk, ntk_method, solver, int(max_steps), _show_progress(progress), _inv_m(normalization, y),
        params0, x, y, x_test, lr, times_j, jnp.asarray(rtol, dtype), jnp.asarray(atol, dtype))
    return Trajectory(times=times_j, params=params, params_lin=params_lin, num_steps=int(n_acc), **recs)


# --------------------------------------------------------------------------- (A.2) learning rates

def _weight_layer_fans(net: Serial, input_shape, dtype=None):
    """``[(layer index, layer, fan_in)]`` for every weight layer, from shapes only."""
    if not isinstance(net, Serial):
        raise TypeError(f"net must be an ntklib network (serial/mlp/cnn), got {type(net).__name__}")
    shape = tuple(input_shape)
    params = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), shape, dtype)[1])
    out, x = [], jax.ShapeDtypeStruct(shape, dtype or jnp.zeros(()).dtype)
    for i, (layer, p) in enumerate(zip(net.layers, params)):
        if isinstance(layer, Dense):
            out.append((i, layer, x.shape[-1]))
        elif isinstance(layer, Conv):
            out.append((i, layer, layer.filter_size * x.shape[-1]))
        elif layer.has_weights:  # pragma: no cover - every ntklib weight layer is handled above
            raise TypeError(f"no learning-rate rule for layer {layer!r}")
        x = jax.eval_shape(layer.apply, p, x)
    return out, params


def _check_eta(eta, name):
    if not (isinstance(eta, (int, float, np.number)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {eta!r}")


def layerwise_learning_rates(net: Serial, eta0: float, input_shape):
    """The layer-wise NTK-parametrization learning rates of (A.2), as printed.

        η^l_{NTK,W} = n_l/(n_max σ_w²) · η0,    η^l_{NTK,b} = n_l/(n_max σ_b²) · η0      (A.2)

    which the source claims make an NTK network (2.1) follow the same
    gradient-descent dynamics as a standard network (A.1) trained with
    ``η_std = η0/n_max``. We read ``n_l`` as the fan-in of layer ``l`` (the
    ``n_l`` of the normaliser in (2.1), ``F·C_in`` for a convolution) and
    ``n_max`` as the largest fan-in; ``n_max`` is returned so the standard
    network's ``η_std = η0/n_max`` can be formed. When ``σ_b = 0`` the bias
    ``β`` has no effect on ``f`` (``b = 0·β``) and its rate is set to 0
    instead of ``∞``.

    This is the printed formula, implemented as is. Whether it really makes
    the two parametrizations coincide is checked in the book (``tests/
    test_dynamics.py`` measures it): the weight rates do, the bias rates are
    ``n_l`` times too large; :func:`equivalent_ntk_learning_rates` gives the
    rates derived from ``W = (σ_w/√fan_in) ω``.

    Args:
      net: an ntklib network in NTK parametrization.
      eta0: the layer-independent rate ``η0 ≥ 0``.
      input_shape: input shape with batch axis, e.g. ``x.shape``.

    Returns: ``(rates, n_max)``: ``rates`` a pytree like the params
    (``{"W": η_W, "b": η_b}`` per weight layer, ``()`` otherwise).
    """
    _check_eta(eta0, "eta0")
    fans, params = _weight_layer_fans(net, input_shape)
    for _, layer, _ in fans:
        if layer.parametrization != "ntk":
            raise ValueError("layerwise_learning_rates: (A.2) is defined for NTK-parametrized networks (2.1); "
                             f"layer {layer!r} is standard-parametrized")
    n_max = max(fan for _, _, fan in fans)
    rates = [() for _ in net.layers]
    for i, layer, fan in fans:
        rw = fan / (n_max * layer.W_std**2) * eta0 if layer.W_std > 0 else 0.0
        rb = fan / (n_max * layer.b_std**2) * eta0 if layer.b_std > 0 else 0.0
        rates[i] = {"W": rw, "b": rb}
    return tuple(rates), n_max


def equivalent_ntk_learning_rates(net: Serial, eta_std: float, input_shape):
    """Per-leaf rates under which ``net`` follows standard-parametrization GD with rate ``eta_std`` exactly.

    A weight layer uses ``W = c_w ω``, ``b = c_b β`` with ``(c_w, c_b) =``
    :meth:`Dense.scales` (``c_w = σ_w/√fan_in``, ``c_b = σ_b`` in NTK
    parametrization (2.1); ``1, 1`` in standard (A.1)). Since
    ``∇_ω L = c_w ∇_W L``, a step ``ω ← ω − η_ω ∇_ω L`` moves ``W`` by
    ``−η_ω c_w² ∇_W L``; it equals the standard step ``−η_std ∇_W L`` iff

        η_ω = η_std / c_w² = η_std · fan_in / σ_w²,     η_β = η_std / c_b² = η_std / σ_b².

    Compared with (A.2) at ``η_std = η0/n_max``: the weight rate is (A.2)'s
    with ``n_l = fan_in``; the bias rate lacks (A.2)'s factor ``n_l``. The
    equivalence holds step by step, to rounding, when the standard network
    starts from ``W_0 = c_w ω_0``, ``b_0 = c_b β_0``. It needs ``σ_b > 0``: a
    standard network with ``σ_b = 0`` still trains its bias, an NTK network
    with ``σ_b = 0`` cannot (its rate is then set to 0). Standard-
    parametrized layers get ``η_std`` itself.

    Returns: a pytree like the params (``{"W": η_ω, "b": η_β}`` per weight layer).
    """
    _check_eta(eta_std, "eta_std")
    fans, _ = _weight_layer_fans(net, input_shape)
    rates = [() for _ in net.layers]
    for i, layer, fan in fans:
        c_w, c_b = layer.scales(fan)
        rates[i] = {"W": eta_std / c_w**2 if c_w > 0 else 0.0, "b": eta_std / c_b**2 if c_b > 0 else 0.0}
    return tuple(rates)
