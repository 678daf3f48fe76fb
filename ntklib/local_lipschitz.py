"""Lemma A.1 (local Lipschitzness of the Jacobian) and the random-matrix facts behind it.

* Theorem A.2 (Vershynin 2010, Corollary 5.35), eq. (A.12): for an ``N × n``
  matrix ``A`` (``N ≥ n``) of independent standard Gaussians and every
  ``t ≥ 0``, with probability at least ``1 − 2 exp(−t²/2)``,

      √N − √n − t ≤ s_min(A) ≤ s_max(A) ≤ √N + √n + t                  (A.12)

  where ``s_min = s_n`` and ``s_max = s_1`` are the extreme *singular values*.
  :func:`gaussian_singular_values` samples them, :func:`vershynin_bounds`
  gives both sides (also the printed upper side ``√N + √n + √t``), and
  :func:`binomial_interval` the Clopper–Pearson interval of a failure
  frequency; :func:`operator_norm` is ``‖W‖_op = s_max(W)`` of (A.15).
* (A.13)–(A.17): the post-activations ``x^{l-1}(θ, 𝒳)`` entering each weight
  layer and the backpropagated signals ``δ^l(θ, 𝒳) = ∂f/∂h^l`` leaving it
  (:func:`layer_signals`), and, for two parameter points, everything Lemma
  A.1's proof bounds (:func:`pair_statistics`): the signal norms (A.16), their
  differences (A.17), ``‖J(θ)‖``, ``‖J(θ)‖_F`` (A.18) and ``‖J(θ) − J(θ̃)‖_F``
  (A.24), all without forming the ``(N·O, P)`` Jacobian.
  :func:`sample_pair` draws the two points uniformly from ``B(θ0, r)`` (A.11).

Conventions are those of :mod:`ntklib.jacobian`: ``J(θ) = ∇_θ f(𝒳, θ)`` has
rows in (example, output) order; for a dense layer ``h = c_w x ω + c_b β``
(``c_w = c_b = 1`` in the standard parametrization (A.1)) its Jacobian block is
``c_w x^{l-1}(x) ⊗ δ^l(x)`` (A.19). No ``1/n`` or ``n^{-1/2}`` factor is
applied here: the caller scales as (A.7), (A.11), (A.16) do. The caller
chooses the dtype (float64 for identities).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .empirical import _as_array, _check_params_fit, _cotangents
from .jacobian import _layer_diff_sq
from .layers import Dense, Serial

__all__ = [
    "gaussian_singular_values",
    "vershynin_bounds",
    "binomial_interval",
    "operator_norm",
    "LayerSignals",
    "layer_signals",
    "PairStatistics",
    "pair_statistics",
    "sample_pair",
]


# --------------------------------------------------------------------------- Theorem A.2, (A.12)

def _rng(rng):
    """A numpy ``Generator`` from an int seed (or the Generator itself)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0:
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a non-negative int seed or a numpy.random.Generator, got {rng!r}")


def gaussian_singular_values(rng, shape, num: int, *, chunk: int = 512):
    """Extreme singular values of ``num`` independent ``N × n`` standard Gaussian matrices (A.12).

    Drawn with numpy (``rng``: an int seed or a ``numpy.random.Generator``;
    PCG64 streams are the same on every platform) and LAPACK's batched SVD:
    nothing is compiled, which matters when many shapes are sampled once each.

    Args:
      rng: seed or Generator; the matrices are drawn in chunks of ``chunk``,
        in order, so the result depends only on ``(rng, shape, num, chunk)``.
      shape: ``(N, n)`` with ``N ≥ n ≥ 1`` (Theorem A.2 is stated for tall
        matrices; ``s_min`` is the ``n``-th singular value).
      num: number of matrices.
      chunk: matrices per batched SVD (memory ``chunk·N·n``).

    Returns: ``(s_min, s_max)``, float64 numpy arrays of shape ``(num,)``. For
    ``n = 1`` both are the column's Euclidean norm (a ``χ_N`` variable),
    computed without an SVD.
    """
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or any(not isinstance(d, (int, np.integer)) or d < 1 for d in shape) or shape[0] < shape[1]):
        raise ValueError(f"shape must be (N, n) with N >= n >= 1, got {shape!r}")
    if not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    gen = _rng(rng)
    big, small = int(shape[0]), int(shape[1])
    lo, hi = np.empty(num), np.empty(num)
    for start in range(0, int(num), int(chunk)):
        m = min(int(chunk), int(num) - start)
        a = gen.standard_normal((m, big, small))
        if small == 1:                                 # a column: its only singular value is its norm
            s = np.linalg.norm(a[..., 0], axis=-1)
            lo[start:start + m], hi[start:start + m] = s, s
        else:
            s = np.linalg.svd(a, compute_uv=False)     # descending
            lo[start:start + m], hi[start:start + m] = s[:, -1], s[:, 0]
    return lo, hi


def vershynin_bounds(N, n, t, *, upper: str = "t"):
    """The two sides of (A.12): ``(√N − √n − t, √N + √n + t)``.

    ``upper="sqrt_t"`` gives the upper side as printed in the source,
    ``√N + √n + √t`` (a typo: Vershynin's Corollary 5.35 has ``+ t``); the lower
    side is the same in both. Both hold, in the corrected form, with probability
    at least ``1 − 2 exp(−t²/2)``. ``t`` may be an array.
    """
    if upper not in ("t", "sqrt_t"):
        raise ValueError(f"upper must be 't' (Vershynin's bound) or 'sqrt_t' (as printed in (A.12)), got {upper!r}")
    t = np.asarray(t, dtype=float)
    if np.any(t < 0) or not np.all(np.isfinite(t)):
        raise ValueError(f"t must be finite and >= 0, got {t!r}")
    lower = math.sqrt(N) - math.sqrt(n) - t
    upper_side = math.sqrt(N) + math.sqrt(n) + (t if upper == "t" else np.sqrt(t))
    return lower, upper_side


def binomial_interval(k, m, confidence: float = 0.999):
    """Two-sided Clopper–Pearson ("exact") confidence interval for a probability from ``k`` successes in ``m`` trials.

    ``lo = Beta⁻¹(α/2; k, m−k+1)`` (``0`` if ``k = 0``), ``hi = Beta⁻¹(1−α/2;
    k+1, m−k)`` (``1`` if ``k = m``), ``α = 1 − confidence``: it covers the true
    probability with probability at least ``confidence``. ``k`` may be an array.
    """
    from scipy.stats import beta

    if not (0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    k = np.asarray(k)
    if not isinstance(m, (int, np.integer)) or m < 1 or np.any(k < 0) or np.any(k > m):
        raise ValueError(f"need integers 0 <= k <= m and m >= 1, got k={k!r}, m={m!r}")
    alpha = 1.0 - confidence
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k == 0, 0.0, beta.ppf(alpha / 2, np.maximum(k, 1), m - k + 1))
        hi = np.where(k == m, 1.0, beta.ppf(1 - alpha / 2, k + 1, np.maximum(m - k, 1)))
    return lo, hi


def operator_norm(a) -> float:
    """``‖A‖_op = s_max(A)``, the largest singular value (the operator norm of (A.15)).

    Small matrices (``min(shape) ≤ 64``) by a full SVD; larger ones as
    ``√λ_max`` of the smaller Gram matrix ``AᵀA`` or ``AAᵀ`` (LAPACK ``syevr``,
    top eigenvalue only), which is several times faster than an SVD and, for
    the *largest* singular value, accurate to a few ulps. Cost ``O(N·n²)``:
    a square ``4096 × 4096`` matrix takes tens of seconds on two CPU cores.
    """
    from scipy.linalg import eigvalsh

    a = np.asarray(a)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"a must be a non-empty 2-D matrix, got shape {a.shape}")
    if min(a.shape) <= 64:
        return float(np.linalg.svd(a, compute_uv=False)[0])
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
    m = gram.shape[0]
    lam = eigvalsh(gram, subset_by_index=[m - 1, m - 1], driver="evr")[0]
    return float(np.sqrt(max(lam, 0.0)))


# --------------------------------------------------------------------------- (A.13)–(A.17)

class LayerSignals(NamedTuple):
    """Per weight layer ``l = 1, …, L+1`` (list index ``l − 1``).

    ``inputs[l-1]``: ``x^{l-1}(θ, 𝒳)``, shape ``(N, n_{l-1})`` (``x^0 = 𝒳``);
    ``deltas[l-1]``: ``δ^l(θ, 𝒳)`` of (A.13)/(A.14), shape ``(O, N, n_l)`` with
    ``deltas[l-1][a, i] = ∂f_a(x_i)/∂h^l(x_i)`` (``δ^{L+1}`` is the identity).
    """

    inputs: list
    deltas: list


def _check_net(net, params, x):
    if not isinstance(net, Serial):
        raise TypeError(f"net must be an ntklib network (ntklib.mlp / serial), got {type(net).__name__}")
    for i in net.weight_layers():
        if not isinstance(net.layers[i], Dense):
            raise ValueError(f"only Dense weight layers are supported (Lemma A.1 is about MLPs), layer {i} is "
                             f"{type(net.layers[i]).__name__}")
    x = _as_array(x, "x")
    if x.ndim != 2:
        raise ValueError(f"x must have shape (N, n_0), got {tuple(x.shape)}")
    _check_params_fit(net, params, x)
    return x


@partial(jax.jit, static_argnums=0)
def _signals_jit(net, params, x):
    return _cotangents(net, params, x)


def layer_signals(net: Serial, params, x) -> LayerSignals:
    """The forward signals ``x^{l-1}(θ, 𝒳)`` and backward signals ``δ^l(θ, 𝒳)`` of every Dense layer (A.13)–(A.14).

    One forward pass and one ``vjp`` per output (through zero "taps" added to
    each layer's pre-activation, as the structured NTK does). With them the
    Jacobian block of layer ``l`` is ``c_w x^{l-1}(x) ⊗ δ^l(x)`` for the weights
    and ``c_b δ^l(x)`` for the bias (A.19).
    """
    x = _check_net(net, params, x)
    inputs, deltas = _signals_jit(net, params, x)
    return LayerSignals(list(inputs), list(deltas))


class PairStatistics(NamedTuple):
    """What Lemma A.1's proof bounds, at two parameter points ``θ_a``, ``θ_b`` (no width scaling applied).

    Attributes (per-layer entries are arrays of length ``L + 1``, index ``l − 1``
    for weight layer ``l``):
      distance: ``‖θ_a − θ_b‖₂``.
      input_norms: ``‖x^{l-1}(θ_a, 𝒳)‖_F`` (A.16; entry 0 is ``‖𝒳‖_F``).
      delta_norms: ``‖δ^l(θ_a, 𝒳)‖_F`` (A.16; Frobenius, which dominates the operator norm).
      input_diffs: ``‖x^{l-1}(θ_a, 𝒳) − x^{l-1}(θ_b, 𝒳)‖_F`` (A.17; entry 0 is 0).
      delta_diffs: ``‖δ^l(θ_a, 𝒳) − δ^l(θ_b, 𝒳)‖_F`` (A.17).
      max_input_norms: ``max_x ‖x^{l-1}(θ_a, x)‖``; max_delta_norms: ``max_x ‖δ^l(θ_a, x)‖_F``.
      jac_op: ``‖J(θ_a)‖`` (spectral); jac_frob: ``‖J(θ_a)‖_F`` (A.18).
      jac_diff: ``‖J(θ_a) − J(θ_b)‖_F`` (A.24).
      sign_changes: number of pre-activations ``h^l_j(x)`` (over units ``j`` and
        inputs ``x``) whose sign differs between ``θ_a`` and ``θ_b``; for ReLU, the
        kinks of ``φ`` crossed, where ``φ'`` and hence ``J`` jump.
    """

    distance: Any
    input_norms: Any
    delta_norms: Any
    input_diffs: Any
    delta_diffs: Any
    max_input_norms: Any
    max_delta_norms: Any
    jac_op: Any
    jac_frob: Any
    jac_diff: Any
    sign_changes: Any


def _ntk_from_signals(net, inputs, deltas):
    """Full ``J Jᵀ`` ``(N·O, N·O)`` in (example, output) order, from the signals (A.19)."""
    o, n = deltas[0].shape[:2]
    k = 0.0
    for li, xin, d in zip(net.weight_layers(), inputs, deltas):
        c_w, c_b = net.layers[li].scales(xin.shape[-1])
        gd = jnp.einsum("aik,bjk->iajb", d, d)
        gx = xin @ xin.T
        k = k + (c_w**2 * gx[:, None, :, None] + c_b**2) * gd
    return k.reshape(n * o, n * o)


@partial(jax.jit, static_argnums=0)
def _pair_jit(net, pa, pb, x):
    ia, da = _cotangents(net, pa, x)
    ib, db = _cotangents(net, pb, x)
    dist = jnp.sqrt(sum(jnp.sum((u - v) ** 2) for u, v in zip(jax.tree_util.tree_leaves(pa),
                                                               jax.tree_util.tree_leaves(pb))))
    fro = lambda a: jnp.sqrt(jnp.sum(a**2))  # noqa: E731
    layers = net.weight_layers()
    ntk = _ntk_from_signals(net, ia, da)
    lam = jnp.linalg.eigvalsh(0.5 * (ntk + ntk.T))[-1]
    diff_sq = sum(_layer_diff_sq(net.layers[li], ia[k], ib[k], da[k], db[k]) for k, li in enumerate(layers))
    flips = [jnp.sum(jnp.sign(net.layers[li].apply(pa[li], ia[k])) != jnp.sign(net.layers[li].apply(pb[li], ib[k])))
             for k, li in enumerate(layers)]
    return PairStatistics(
        distance=dist,
        input_norms=jnp.stack([fro(a) for a in ia]),
        delta_norms=jnp.stack([fro(d) for d in da]),
        input_diffs=jnp.stack([fro(a - b) for a, b in zip(ia, ib)]),
        delta_diffs=jnp.stack([fro(a - b) for a, b in zip(da, db)]),
        max_input_norms=jnp.stack([jnp.max(jnp.linalg.norm(a, axis=-1)) for a in ia]),
        max_delta_norms=jnp.stack([jnp.max(jnp.sqrt(jnp.sum(d**2, axis=(0, 2)))) for d in da]),
        jac_op=jnp.sqrt(jnp.maximum(lam, 0)),
        jac_frob=jnp.sqrt(jnp.trace(ntk)),
        jac_diff=jnp.sqrt(jnp.maximum(diff_sq, 0)),
        sign_changes=jnp.stack(flips),
    )


def pair_statistics(net: Serial, params_a, params_b, x) -> PairStatistics:
    """The quantities of (A.16)–(A.18) at ``θ_a`` and of (A.17), (A.24) between ``θ_a`` and ``θ_b``.

    Everything comes from :func:`layer_signals` at the two points: ``‖J(θ_a)‖``
    is ``√λ_max`` of the full NTK ``J Jᵀ`` assembled from the signals (A.19),
    ``‖J‖_F² = tr J Jᵀ``, and ``‖J(θ_a) − J(θ_b)‖_F`` is taken layer by layer in a
    cancellation-free form (as :func:`ntklib.jacobian_distance`). Memory is
    that of two forward/backward passes: it runs at widths where ``J`` would
    not fit. Only MLPs (Dense weight layers) are supported.
    """
    x = _check_net(net, params_a, x)
    if jax.tree_util.tree_structure(params_a) != jax.tree_util.tree_structure(params_b):
        raise ValueError("params_b must have the tree structure of params_a")
    return _pair_jit(net, params_a, params_b, x)


def sample_pair(rng, params0, radius):
    """Two points ``θ_a, θ_b`` drawn independently and uniformly from ``B(θ0, radius)`` (A.11).

    Each point is ``θ0 + radius · U^{1/P} · u/‖u‖`` with ``u`` a standard
    Gaussian over all ``P`` parameters (a uniform direction) and ``U ~ U[0, 1)``,
    the distribution of :func:`ntklib.sample_ball`. The draws use numpy
    (``rng``: an int seed or a ``numpy.random.Generator``; for each point, ``U``
    then ``u`` leaf by leaf in ``tree_leaves`` order), so nothing is compiled
    per network size and the streams are the same on every platform. Returns
    two pytrees like ``params0`` (jax arrays of its dtype).
    """
    if not (isinstance(radius, (int, float, np.number)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
    leaves, treedef = jax.tree_util.tree_flatten(params0)
    if not leaves:
        raise ValueError("params0 has no parameters")
    gen = _rng(rng)
    p = sum(int(np.size(leaf)) for leaf in leaves)

    def point():
        dist = radius * math.exp(math.log(gen.random()) / p)
        u = [gen.standard_normal(np.shape(leaf)) for leaf in leaves]
        scale = dist / math.sqrt(sum(float(np.sum(a * a)) for a in u))
        return treedef.unflatten([jnp.asarray(np.asarray(leaf) + scale * a, dtype=jnp.result_type(leaf))
                                  for leaf, a in zip(leaves, u)])

    a = point()
    return a, point()
