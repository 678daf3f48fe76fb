r"""Analytic infinite-width kernels: the NNGP kernel 𝒦 and the NTK Θ of fully-connected networks.

Networks are those of eq. (2.1), ``ntklib.mlp([n]*L, k, φ, W_std=σ_w, b_std=σ_b)``:
``L`` hidden layers ``h^{l+1} = x^l W^{l+1} + b^{l+1}``, ``x^{l+1} = φ(h^{l+1})``
and a linear readout ``f = h^{L+1}``, with ``φ ∈ {erf, ReLU, identity}``. The
kernels are per output: the limits, as all hidden widths ``n → ∞``, of the
covariance ``E[f_a(x) f_a(x')]`` and of the traced empirical NTK
``empirical_ntk(net, params, x, x')`` (mean over outputs, (3.9)).

NNGP recursion (both parametrizations: the function is the same)
-----------------------------------------------------------------
With ``Σ^l(x, x') = [[𝒦^l(x,x), 𝒦^l(x,x')], [𝒦^l(x',x), 𝒦^l(x',x')]]`` and
``(u, v) ~ N(0, Σ^l)``::

    𝒦^1(x, x')     = σ_w² x·x'/n_0 + σ_b²
    𝒦^{l+1}(x, x') = σ_w² E[φ(u) φ(v)] + σ_b²,           l = 1, …, L
    𝒦̇^l(x, x')     = E[φ'(u) φ'(v)]

``𝒦^l`` is the covariance of the pre-activations ``h^l`` at initialisation, and
``𝒦 = 𝒦^{L+1}`` that of the outputs.

NTK, NTK parametrization (2.1)
------------------------------
::

    Θ^1 = 𝒦^1,   Θ^{l+1} = 𝒦^{l+1} + σ_w² 𝒦̇^l ⊙ Θ^l,   Θ = Θ^{L+1}.

Unrolled, ``Θ = Σ_{l=1}^{L+1} 𝒦^l ⊙ Ḋ^l`` with the backward products
``Ḋ^{L+1} = 1``, ``Ḋ^l = σ_w² 𝒦̇^l ⊙ Ḋ^{l+1}`` (the limit of ``δ^l·δ'^l``,
(A.13)). The term ``𝒦^l ⊙ Ḋ^l`` is the contribution of the ``l``-th Dense
layer (its weights, ``σ_w² E[x^{l-1}·x'^{l-1}]/n_{l-1} ⊙ Ḋ^l``, plus its bias,
``σ_b² Ḋ^l``): it is what ``layerwise_ntk`` returns for that layer as ``n → ∞``.

NTK, standard parametrization (A.1) with the 1/n of (A.7)
---------------------------------------------------------
Here ``Θ̂ = (1/n) J Jᵀ`` with all hidden widths ``n``. The trainable ``W^l``
of (A.1) is ``σ_w/√n_{l-1}`` times the ``ω^l`` of (2.1) and the function is the
same, so ``∂f/∂W^l = (√n_{l-1}/σ_w) ∂f/∂ω^l`` and ``∂f/∂b^l = ∂f/∂β^l / σ_b``.
Hence, per layer, ``(1/n)·``[weights of layer l] ``= (n_{l-1}/n) E^{l-1} ⊙ Ḋ^l``
and ``(1/n)·``[bias of layer l] ``= Ḋ^l / n``, with
``E^{l-1} = E[x^{l-1}·x'^{l-1}]/n_{l-1}`` (``E^0 = x·x'/n_0``,
``E^{l} = E[φ(u)φ(v)]`` under ``Σ^l``). As ``n → ∞`` every bias term and the
first layer (``n_0/n → 0``) vanish, and a hidden weight layer ``l ≥ 2`` keeps
``E^{l-1} ⊙ Ḋ^l``, i.e. ``1/σ_w²`` times its NTK-parametrization weight
contribution. The recursion is::

    Θ_std^1 = 0,   Θ_std^{l+1} = E^l + σ_w² 𝒦̇^l ⊙ Θ_std^l,   Θ_std = Θ_std^{L+1},

i.e. ``Θ_std = Σ_{l=2}^{L+1} E^{l-1} ⊙ Ḋ^l`` (the same ``Ḋ^l`` as above). With
no hidden layer (``L = 0``) there is no width ``n`` and (A.7) is undefined.

Closed forms of the Gaussian expectations (``Σ = Σ^l``)
-------------------------------------------------------
* erf (Williams 1997)::

      E[φ(u)φ(v)]   = (2/π) arcsin( 2Σ12 / √((1+2Σ11)(1+2Σ22)) )
      E[φ'(u)φ'(v)] = (4/π) / √((1+2Σ11)(1+2Σ22) − 4Σ12²)

* ReLU (arc-cosine kernel, Cho & Saul 2009), ``θ = arccos(Σ12/√(Σ11Σ22))``::

      E[φ(u)φ(v)]   = √(Σ11Σ22) (sin θ + (π − θ) cos θ) / (2π)
      E[φ'(u)φ'(v)] = (π − θ) / (2π)

  computed as ``θ = atan2(√(Σ11Σ22 − Σ12²), Σ12)`` and
  ``E[φφ] = (√(Σ11Σ22 − Σ12²) + (π − θ) Σ12)/(2π)``: no division, exact at
  ``x = x'`` (``θ = 0``) and finite for zero inputs.
* identity: ``E[uv] = Σ12``, ``E[1·1] = 1``.

``tanh`` and the other ntklib activations have no closed form and are refused.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .layers import Activation, Dense, Erf, Identity, Relu, Serial

__all__ = ["Kernels", "infinite_width_kernels", "kernels_of", "ANALYTIC_ACTIVATIONS"]

ANALYTIC_ACTIVATIONS = ("erf", "relu", "identity")
_NO_CLOSED_FORM = ("tanh", "sigmoid", "gelu")
_PARAMETRIZATIONS = ("ntk", "standard")


class Kernels(NamedTuple):
    """Infinite-width kernels of a fully-connected network (a pytree).

    Attributes:
      nngp: ``𝒦 = 𝒦^{L+1}(x1, x2)``, the output covariance, shape ``(N1, N2)``.
      ntk: ``Θ(x1, x2)``, shape ``(N1, N2)``; for ``parametrization="standard"``
        the ``n → ∞`` limit of ``(1/n) J Jᵀ`` of (A.7).
      nngp_layers: ``[𝒦^1, …, 𝒦^{L+1}]``, the pre-activation covariances of
        every Dense layer's output, each ``(N1, N2)``.
      ntk_layers: the contribution of each Dense layer (weights and bias) to
        ``ntk``, ``L + 1`` arrays of shape ``(N1, N2)`` summing to ``ntk``;
        the limits of the blocks of ``ntklib.layerwise_ntk`` (divided by ``n``
        in the standard parametrization, where the first entry is zero).
    """

    nngp: jax.Array
    ntk: jax.Array
    nngp_layers: list
    ntk_layers: list


# --------------------------------------------------------------------------- Gaussian expectations

def _safe_sqrt(a):
    """``√max(a, 0)`` with a zero (not infinite) gradient at ``a ≤ 0``."""
    pos = a > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, a, 1)), 0)


def _expectations(act: str, s11, s12, s22):
    """``(E[φ(u)φ(v)], E[φ'(u)φ'(v)])`` for ``(u, v) ~ N(0, [[s11, s12], [s12, s22]])`` (broadcasting)."""
    if act == "identity":
        return s12, jnp.ones_like(s12)
    det = s11 * s22 - s12 * s12          # ≥ 0 for a covariance; clipped against rounding below
    if act == "erf":
        a, b = 1 + 2 * s11, 1 + 2 * s22
        rho = jnp.clip(2 * s12 / jnp.sqrt(a * b), -1, 1)
        e = (2 / math.pi) * jnp.arcsin(rho)
        # (1+2Σ11)(1+2Σ22) − 4Σ12² = 1 + 2(Σ11+Σ22) + 4 det ≥ 1
        ed = (4 / math.pi) / jnp.sqrt(1 + 2 * (s11 + s22) + 4 * jnp.maximum(det, 0))
        return e, ed
    if act == "relu":
        root = _safe_sqrt(det)                       # √(Σ11Σ22) sin θ
        theta = jnp.arctan2(root, s12)               # ∈ [0, π], = arccos of the clipped correlation
        e = (root + (math.pi - theta) * s12) / (2 * math.pi)
        ed = (math.pi - theta) / (2 * math.pi)
        return e, ed
    raise AssertionError(act)  # pragma: no cover - names are validated before


# --------------------------------------------------------------------------- the recursion

def _kernels(x1, x2, W_std, b_std, *, acts: tuple, parametrization: str) -> Kernels:
    sym = x2 is None
    x2_ = x1 if sym else x2
    sw2, sb2 = W_std * W_std, b_std * b_std
    n0 = x1.shape[-1]
    gram = x1 @ x2_.T / n0
    if sym:
        gram = (gram + gram.T) / 2
    else:
        sq1, sq2 = jnp.sum(x1 * x1, -1) / n0, jnp.sum(x2 * x2, -1) / n0
    K = sw2 * gram + sb2                              # 𝒦^1
    # its diagonals 𝒦^1(x, x), 𝒦^1(x', x'); read off K itself when x2 is None, so that Σ12 = Σ11 = Σ22 bitwise at x = x'
    d1, d2 = (jnp.diagonal(K),) * 2 if sym else (sw2 * sq1 + sb2, sw2 * sq2 + sb2)
    nngp, E, Kdot = [K], [gram], []                   # E[l] = E^l, Kdot[l-1] = 𝒦̇^l
    for act in acts:
        e, ed = _expectations(act, d1[:, None], K, d2[None, :])
        K = sw2 * e + sb2
        if sym:
            d1 = d2 = jnp.diagonal(K)
        else:
            d1 = sw2 * _expectations(act, d1, d1, d1)[0] + sb2
            d2 = sw2 * _expectations(act, d2, d2, d2)[0] + sb2
        nngp.append(K)
        E.append(e)
        Kdot.append(ed)
    depth = len(acts)
    back = jnp.ones_like(K)                           # Ḋ^{L+1}
    contrib = [None] * (depth + 1)
    for i in range(depth, -1, -1):                    # Dense layer l = i + 1
        if parametrization == "ntk":
            contrib[i] = nngp[i] * back               # 𝒦^l ⊙ Ḋ^l
        else:
            contrib[i] = E[i] * back if i > 0 else jnp.zeros_like(K)   # E^{l-1} ⊙ Ḋ^l, first layer → 0
        if i > 0:
            back = back * (sw2 * Kdot[i - 1])         # Ḋ^{l-1} = σ_w² 𝒦̇^{l-1} ⊙ Ḋ^l
    ntk = contrib[0]
    for c in contrib[1:]:
        ntk = ntk + c
    return Kernels(nngp=K, ntk=ntk, nngp_layers=nngp, ntk_layers=contrib)


# --------------------------------------------------------------------------- validation

def _activation_name(a, where: str) -> str:
    if isinstance(a, Activation):
        name = a.name.lower()
        if a in (Erf, Relu, Identity):
            return name
        if name in _NO_CLOSED_FORM:
            raise ValueError(f"{where}: activation {a.name!r} has no closed-form infinite-width kernel; "
                             f"supported: {ANALYTIC_ACTIVATIONS}")
        raise ValueError(f"{where}: activation {a.name!r} is not an ntklib Erf/Relu/Identity; "
                         f"supported: {ANALYTIC_ACTIVATIONS}")
    if isinstance(a, str):
        name = a.lower()
        if name in ANALYTIC_ACTIVATIONS:
            return name
        if name in _NO_CLOSED_FORM:
            raise ValueError(f"{where}: activation {a!r} has no closed-form infinite-width kernel; "
                             f"supported: {ANALYTIC_ACTIVATIONS}")
        raise ValueError(f"{where}: unknown activation {a!r}; supported: {ANALYTIC_ACTIVATIONS}")
    raise TypeError(f"{where}: activation must be a name in {ANALYTIC_ACTIVATIONS} or ntklib.Erf/Relu/Identity, "
                    f"got {type(a).__name__}")


def _check_std(value, name: str):
    if isinstance(value, jax.core.Tracer):
        return
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from e
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_inputs(x, name: str):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            x = np.asarray(x)
        except Exception as e:  # pragma: no cover - np.asarray accepts almost anything
            raise TypeError(f"{name} must be an array of shape (N, n_0), got {type(x).__name__}") from e
    if x.dtype == object or not (jnp.issubdtype(x.dtype, jnp.number) or jnp.issubdtype(x.dtype, jnp.bool_)):
        raise TypeError(f"{name} must be a numeric array of shape (N, n_0), got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, n_0) (batch, features), got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one feature, got shape {tuple(x.shape)}")
    if not isinstance(x, jax.core.Tracer) and not bool(np.all(np.isfinite(np.asarray(x)))):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return x


# --------------------------------------------------------------------------- public API

def infinite_width_kernels(x1, x2=None, *, depth: int, activation="erf", W_std=1.0, b_std=0.0,
                           parametrization: str = "ntk") -> Kernels:
    """NNGP kernel and NTK of ``mlp([n]*depth, k, activation, W_std, b_std, parametrization)`` as ``n → ∞``.

    The recursions are in the module docstring: (2.1) for ``"ntk"``; for
    ``"standard"`` the limit of ``(1/n) J Jᵀ`` of (A.7), where the first layer
    and all biases drop out.

    Args:
      x1: inputs ``(N1, n_0)``.
      x2: inputs ``(N2, n_0)``; ``None`` means ``x1``.
      depth: ``L``, the number of hidden layers (``0``: a single linear layer).
      activation: ``"erf"``, ``"relu"``, ``"identity"`` (or ``ntklib.Erf`` /
        ``Relu`` / ``Identity``), or a sequence of ``depth`` of them, one per
        hidden layer.
      W_std, b_std: ``σ_w, σ_b ≥ 0``.
      parametrization: ``"ntk"`` (2.1) or ``"standard"`` (A.1)/(A.7)
        (needs ``depth ≥ 1``).

    Returns: :class:`Kernels` ``(nngp, ntk, nngp_layers, ntk_layers)``, in the
    floating dtype of the inputs. Pure and ``jit``-compatible in ``x1``, ``x2``,
    ``W_std``, ``b_std`` (``depth``, ``activation``, ``parametrization`` are
    static); runs eagerly unless the caller jits it, e.g.
    ``jax.jit(partial(infinite_width_kernels, depth=3, activation="relu"))``
    for repeated calls. Never changes JAX's global configuration.
    """
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)):
        raise TypeError(f"depth must be an int (the number of hidden layers L), got {type(depth).__name__}")
    depth = int(depth)
    if depth < 0:
        raise ValueError(f"depth must be >= 0 (the number of hidden layers L), got {depth}")
    if isinstance(activation, (str, Activation)):
        acts = (_activation_name(activation, "activation"),) * depth
    elif isinstance(activation, (tuple, list)):
        if len(activation) != depth:
            raise ValueError(f"activation: a sequence must have one entry per hidden layer (depth={depth}), "
                             f"got {len(activation)}")
        acts = tuple(_activation_name(a, f"activation[{i}]") for i, a in enumerate(activation))
    else:
        raise TypeError(f"activation must be a name in {ANALYTIC_ACTIVATIONS}, ntklib.Erf/Relu/Identity, or a "
                        f"sequence of them (one per hidden layer), got {type(activation).__name__}")
    if parametrization not in _PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {_PARAMETRIZATIONS}, got {parametrization!r}")
    if parametrization == "standard" and depth == 0:
        raise ValueError("parametrization='standard' needs depth >= 1: the 1/n of (A.7) normalises by the hidden "
                         "width n, and a network without hidden layers has none")
    _check_std(W_std, "W_std")
    _check_std(b_std, "b_std")
    x1 = _check_inputs(x1, "x1")
    if x2 is not None:
        x2 = _check_inputs(x2, "x2")
        if x2.shape[-1] != x1.shape[-1]:
            raise ValueError(f"x2 must have the same number of features as x1: x1 is {tuple(x1.shape)}, "
                             f"x2 is {tuple(x2.shape)}")
    dtype = jnp.result_type(x1) if x2 is None else jnp.result_type(x1, x2)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    x1 = jnp.asarray(x1, dtype)
    x2 = None if x2 is None else jnp.asarray(x2, dtype)
    W_std, b_std = jnp.asarray(W_std, dtype), jnp.asarray(b_std, dtype)
    return _kernels(x1, x2, W_std, b_std, acts=acts, parametrization=parametrization)


def _describe_mlp(net: Serial):
    """``(acts, W_std, b_std, parametrization)`` of an ntklib MLP, or ValueError naming what is unsupported."""
    if not isinstance(net, Serial):
        raise TypeError(f"net must be an ntklib network (ntklib.mlp / serial), got {type(net).__name__}")
    layers = net.layers
    if len(layers) % 2 == 0:
        raise ValueError(f"net: analytic kernels need Dense, φ, Dense, φ, …, Dense (an odd number of layers); "
                         f"got {len(layers)} layers")
    dense = layers[0::2]
    acts = layers[1::2]
    for i, layer in enumerate(dense):
        if not isinstance(layer, Dense):
            raise ValueError(f"net: layer {2 * i} must be Dense for the analytic kernels, got "
                             f"{getattr(layer, 'name', type(layer).__name__)}")
    for i, layer in enumerate(acts):
        if not isinstance(layer, Activation):
            raise ValueError(f"net: layer {2 * i + 1} must be an activation (Erf, Relu, Identity), got "
                             f"{getattr(layer, 'name', type(layer).__name__)}")
    first = dense[0]
    for i, layer in enumerate(dense):
        if layer.init_scheme != "normal":
            raise ValueError(f"net: layer {2 * i} uses init={layer.init_scheme!r}; the analytic kernels assume "
                             "the Gaussian init of (2.1)/(A.1) (init='normal')")
        for attr in ("W_std", "b_std", "parametrization"):
            if getattr(layer, attr) != getattr(first, attr):
                raise ValueError(f"net: all Dense layers must share {attr}; layer 0 has {getattr(first, attr)!r}, "
                                 f"layer {2 * i} has {getattr(layer, attr)!r}")
    names = tuple(_activation_name(a, f"net layer {2 * i + 1}") for i, a in enumerate(acts))
    return names, first.W_std, first.b_std, first.parametrization


def kernels_of(net: Serial, x1, x2=None) -> Kernels:
    """:func:`infinite_width_kernels` of an ``ntklib.mlp`` network, reading depth, φ, σ's and parametrization off it.

    The hidden widths and the output width do not enter (the kernels are per
    output, for all hidden widths ``→ ∞``). Raises ``ValueError`` naming what
    is unsupported: a layer other than Dense/Erf/Relu/Identity in the
    alternating pattern, Dense layers with different σ's or parametrizations,
    or the Glorot init.
    """
    acts, W_std, b_std, parametrization = _describe_mlp(net)
    return infinite_width_kernels(x1, x2, depth=len(acts), activation=acts, W_std=W_std, b_std=b_std,
                                  parametrization=parametrization)
