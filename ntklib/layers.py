"""Layers and networks in NTK and standard parametrization, stax style.

A layer is a small frozen dataclass with two pure functions,

* ``init(key, input_shape) -> (output_shape, params)``
* ``apply(params, x) -> y``

and, for the weight layers, the few facts the structured-derivative kernels
need (:meth:`Dense.scales`, :meth:`Conv.patches`). ``serial`` composes layers
into a :class:`Serial` network, which is itself a layer. Parameters are plain
pytrees: a tuple with one entry per layer, ``{"W": ..., "b": ...}`` for weight
layers and ``()`` for the others.

Parametrizations (shapes follow the book: a row vector ``x^l`` of width
``n_l`` is multiplied from the left, ``h^{l+1} = x^l W^{l+1} + b^{l+1}``):

* ``"ntk"``, eq. (2.1): the trainable parameters are ``ω, β ~ N(0, 1)`` and the
  layer computes ``W = σ_w/√fan_in · ω``, ``b = σ_b · β``.
* ``"standard"``, eq. (A.1): the trainable parameters are ``W ~ N(0,
  σ_w²/fan_in)`` and ``b ~ N(0, σ_b²)`` themselves. The source prints the
  variance as ``σ_w²/n_l``; with its own indexing ``h^l = x^{l-1} W^l`` the
  normaliser is the fan-in ``n_{l-1}`` (see the errata chapter).
* ``init="glorot_uniform"`` (standard parametrization only), eq. (2.2):
  ``W, b ~ U(-√k, √k)`` with ``k = 6/(fan_in + fan_out)``.

For a convolution ``fan_in = F · C_in`` (filter size times input channels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "Dense",
    "Conv",
    "Activation",
    "Erf",
    "Relu",
    "Tanh",
    "Identity",
    "Sigmoid",
    "Gelu",
    "Flatten",
    "GlobalAvgPool",
    "Serial",
    "serial",
    "mlp",
    "cnn",
]

PARAMETRIZATIONS = ("ntk", "standard")
INITS = ("normal", "glorot_uniform")
PADDINGS = ("SAME", "CIRCULAR")


def _check_shape(input_shape, rank: int, layer: str) -> tuple:
    """Validate ``input_shape``: batch axis first (any value), then positive ints."""
    shape = tuple(input_shape)
    if len(shape) != rank or any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
        raise ValueError(f"{layer}: input_shape must be a tuple of {rank} entries (batch first, then positive "
                         f"ints), got {input_shape!r}")
    return shape


def _check_common(name: str, W_std, b_std, parametrization, init):
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"{name}: parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
    if init not in INITS:
        raise ValueError(f"{name}: init must be one of {INITS}, got {init!r}")
    if init == "glorot_uniform" and parametrization != "standard":
        raise ValueError(f"{name}: init='glorot_uniform' is eq. (2.2), a standard-parametrization init; "
                         "use parametrization='standard'")
    if not (W_std >= 0 and math.isfinite(W_std)):
        raise ValueError(f"{name}: W_std must be a finite number >= 0, got {W_std!r}")
    if not (b_std >= 0 and math.isfinite(b_std)):
        raise ValueError(f"{name}: b_std must be a finite number >= 0, got {b_std!r}")


def _draw(key, shape, dtype, scale, init, fan_in, fan_out):
    """Draw one parameter tensor: N(0, scale²) or Glorot U(-√k, √k)."""
    if init == "glorot_uniform":
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return jax.random.uniform(key, shape, dtype, -limit, limit)
    return scale * jax.random.normal(key, shape, dtype)


def _weight_scales(layer, fan_in: int) -> tuple[float, float]:
    """``(c_w, c_b)``: the layer uses ``W = c_w · params["W"]``, ``b = c_b · params["b"]``.

    NTK parametrization (2.1): ``(σ_w/√fan_in, σ_b)``; standard (A.1): ``(1, 1)``.
    """
    if layer.parametrization == "ntk":
        return layer.W_std / math.sqrt(fan_in), layer.b_std
    return 1.0, 1.0


def _init_stds(layer, fan_in: int) -> tuple[float, float]:
    """Standard deviations of the drawn ``params["W"]``, ``params["b"]``: the complement of :func:`_weight_scales`."""
    if layer.parametrization == "ntk":
        return 1.0, 1.0
    return layer.W_std / math.sqrt(fan_in), layer.b_std


def _check_params(name: str, params, w_shape: tuple, b_shape: tuple):
    if not isinstance(params, dict) or set(params) != {"W", "b"}:
        raise ValueError(f"{name}: params must be a dict with keys 'W' and 'b', got {type(params).__name__} "
                         f"{sorted(params) if isinstance(params, dict) else ''}")
    if tuple(params["W"].shape) != w_shape or tuple(params["b"].shape) != b_shape:
        raise ValueError(f"{name}: params do not fit the layer: expected W{w_shape}, b{b_shape}, "
                         f"got W{tuple(params['W'].shape)}, b{tuple(params['b'].shape)}")


@dataclass(frozen=True)
class Dense:
    """Fully-connected layer ``h = x W + b`` on inputs of shape ``(N, n_in)``.

    Args:
      out_dim: output width ``n_out``.
      W_std, b_std: ``σ_w`` and ``σ_b`` of (2.1)/(A.1).
      parametrization: ``"ntk"`` (2.1) or ``"standard"`` (A.1).
      init: ``"normal"`` or ``"glorot_uniform"`` (2.2, standard only).

    Parameters: ``{"W": (n_in, n_out), "b": (n_out,)}``.
    """

    out_dim: int
    W_std: float = 1.0
    b_std: float = 0.0
    parametrization: str = "ntk"
    init_scheme: str = "normal"
    has_weights = True

    def __post_init__(self):
        if not isinstance(self.out_dim, int) or self.out_dim <= 0:
            raise ValueError(f"Dense: out_dim must be a positive int, got {self.out_dim!r}")
        _check_common("Dense", self.W_std, self.b_std, self.parametrization, self.init_scheme)

    def scales(self, fan_in: int) -> tuple[float, float]:
        """``(c_w, c_b)`` with ``W_used = c_w · params["W"]``, ``b_used = c_b · params["b"]``."""
        return _weight_scales(self, fan_in)

    def init(self, key, input_shape, dtype=None):
        n, n_in = _check_shape(input_shape, 2, "Dense")
        dtype = dtype or jnp.zeros(()).dtype
        kw, kb = jax.random.split(key)
        w_scale, b_scale = _init_stds(self, n_in)
        W = _draw(kw, (n_in, self.out_dim), dtype, w_scale, self.init_scheme, n_in, self.out_dim)
        b = _draw(kb, (self.out_dim,), dtype, b_scale, self.init_scheme, n_in, self.out_dim)
        return (n, self.out_dim), {"W": W, "b": b}

    def apply(self, params, x):
        if x.ndim != 2:
            raise ValueError(f"Dense: x must have shape (N, n_in), got {x.shape}; use Flatten or GlobalAvgPool first")
        _check_params("Dense", params, (x.shape[-1], self.out_dim), (self.out_dim,))
        c_w, c_b = self.scales(x.shape[-1])
        return c_w * (x @ params["W"]) + c_b * params["b"]


@dataclass(frozen=True)
class Conv:
    """2-D convolution, stride 1, on NHWC inputs ``(N, H, W, C_in)``.

    ``h[n, p, c] = Σ_{f, i} x_pad[n, p + f, i] W[f, i, c] + b[c]``, with
    ``padding`` ``"SAME"`` (zeros) or ``"CIRCULAR"`` (periodic), so every layer
    keeps ``D = H·W`` pixels, as assumed in section 6.2.1.

    Parameters: ``{"W": (F_h, F_w, C_in, C_out), "b": (C_out,)}``.
    """

    out_channels: int
    filter_shape: tuple = (3, 3)
    padding: str = "SAME"
    W_std: float = 1.0
    b_std: float = 0.0
    parametrization: str = "ntk"
    init_scheme: str = "normal"
    has_weights = True

    def __post_init__(self):
        if not isinstance(self.out_channels, int) or self.out_channels <= 0:
            raise ValueError(f"Conv: out_channels must be a positive int, got {self.out_channels!r}")
        fs = tuple(self.filter_shape)
        if len(fs) != 2 or any(not isinstance(f, int) or f <= 0 for f in fs):
            raise ValueError(f"Conv: filter_shape must be two positive ints, got {self.filter_shape!r}")
        object.__setattr__(self, "filter_shape", fs)
        if self.padding not in PADDINGS:
            raise ValueError(f"Conv: padding must be one of {PADDINGS}, got {self.padding!r}")
        _check_common("Conv", self.W_std, self.b_std, self.parametrization, self.init_scheme)

    @property
    def filter_size(self) -> int:
        return self.filter_shape[0] * self.filter_shape[1]

    def scales(self, fan_in: int) -> tuple[float, float]:
        """``(c_w, c_b)`` as for :meth:`Dense.scales`, ``fan_in = F · C_in``."""
        return _weight_scales(self, fan_in)

    def init(self, key, input_shape, dtype=None):
        n, h, w, c_in = _check_shape(input_shape, 4, "Conv")
        dtype = dtype or jnp.zeros(()).dtype
        fan_in = self.filter_size * c_in
        fan_out = self.filter_size * self.out_channels
        kw, kb = jax.random.split(key)
        w_scale, b_scale = _init_stds(self, fan_in)
        W = _draw(kw, (*self.filter_shape, c_in, self.out_channels), dtype, w_scale, self.init_scheme, fan_in, fan_out)
        b = _draw(kb, (self.out_channels,), dtype, b_scale, self.init_scheme, fan_in, fan_out)
        return (n, h, w, self.out_channels), {"W": W, "b": b}

    def _pad(self, x):
        if self.padding == "CIRCULAR":
            fh, fw = self.filter_shape
            pads = ((0, 0), ((fh - 1) // 2, fh // 2), ((fw - 1) // 2, fw // 2), (0, 0))
            return jnp.pad(x, pads, mode="wrap"), "VALID"
        return x, "SAME"

    def patches(self, x):
        """im2col: ``(N, H, W, C_in) -> (N, H·W, F·C_in)``, the inputs each output pixel sees."""
        xp, pad = self._pad(x)
        p = jax.lax.conv_general_dilated_patches(
            xp, self.filter_shape, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return p.reshape(x.shape[0], x.shape[1] * x.shape[2], -1)

    def apply(self, params, x):
        if x.ndim != 4:
            raise ValueError(f"Conv: x must have shape (N, H, W, C_in), got {x.shape}")
        _check_params("Conv", params, (*self.filter_shape, x.shape[-1], self.out_channels), (self.out_channels,))
        c_w, c_b = self.scales(self.filter_size * x.shape[-1])
        xp, pad = self._pad(x)
        y = jax.lax.conv_general_dilated(xp, params["W"], (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return c_w * y + c_b * params["b"]


@dataclass(frozen=True)
class Activation:
    """Element-wise nonlinearity ``x^{l} = φ(h^{l})``; no parameters."""

    name: str
    fn: Callable = None
    has_weights = False

    def init(self, key, input_shape, dtype=None):
        return tuple(input_shape), ()

    def apply(self, params, x):
        return self.fn(x)


Erf = Activation("Erf", jax.scipy.special.erf)
Relu = Activation("Relu", jax.nn.relu)
Tanh = Activation("Tanh", jnp.tanh)
Identity = Activation("Identity", lambda x: x)
Sigmoid = Activation("Sigmoid", jax.nn.sigmoid)
Gelu = Activation("Gelu", lambda x: jax.nn.gelu(x, approximate=False))


@dataclass(frozen=True)
class _Reshape:
    name: str
    has_weights = False

    def init(self, key, input_shape, dtype=None):
        shape = tuple(input_shape)
        if len(shape) < 2:
            raise ValueError(f"{self.name}: input_shape must have a batch axis and features, got {input_shape!r}")
        if self.name == "Flatten":
            return (shape[0], math.prod(shape[1:])), ()
        if len(shape) != 4:
            raise ValueError(f"GlobalAvgPool: input_shape must be (N, H, W, C), got {input_shape!r}")
        return (shape[0], shape[-1]), ()

    def apply(self, params, x):
        if self.name == "Flatten":
            return x.reshape(x.shape[0], -1)
        return x.mean(axis=(1, 2))


Flatten = _Reshape("Flatten")
GlobalAvgPool = _Reshape("GlobalAvgPool")


@dataclass(frozen=True)
class Serial:
    """A network: layers applied in order. ``params`` is a tuple, one entry per layer."""

    layers: tuple
    has_weights = True

    def init(self, key, input_shape, dtype=None):
        """Draw parameters. ``input_shape`` includes the batch axis (any size)."""
        keys = jax.random.split(key, len(self.layers))
        shape, params = tuple(input_shape), []
        for k, layer in zip(keys, self.layers):
            shape, p = layer.init(k, shape, dtype)
            params.append(p)
        return shape, tuple(params)

    def check_params(self, params):
        if not isinstance(params, (tuple, list)) or len(params) != len(self.layers):
            length = len(params) if hasattr(params, "__len__") else "?"
            raise ValueError(f"params must be a tuple with one entry per layer ({len(self.layers)}), "
                             f"got {type(params).__name__} of length {length}")

    def apply(self, params, x):
        """Network output ``f(x) = h^{L+1}(x)``, shape ``(N, O)`` for an MLP."""
        self.check_params(params)
        for layer, p in zip(self.layers, params):
            x = layer.apply(p, x)
        return x

    def __call__(self, params, x):
        return self.apply(params, x)

    def apply_with_taps(self, params, x, taps):
        """Forward pass adding ``taps[i]`` to the output of the ``i``-th weight layer.

        Returns ``(f(x), inputs)`` where ``inputs[i]`` is the input of that layer.
        With all-zero taps the output is ``f(x)``, and the cotangent of a tap is
        ``δ^l = ∂f/∂h^l`` of (A.13): this is how structured derivatives get
        backpropagated signals through public ``jax.vjp`` only.
        """
        inputs, i = [], 0
        for layer, p in zip(self.layers, params):
            if layer.has_weights:
                inputs.append(x)
                x = layer.apply(p, x) + taps[i]
                i += 1
            else:
                x = layer.apply(p, x)
        return x, inputs

    def weight_layers(self):
        """Indices (into ``layers``) of the layers with trainable parameters."""
        return [i for i, layer in enumerate(self.layers) if layer.has_weights]


def serial(*layers) -> Serial:
    """Compose layers; nested ``Serial`` networks are flattened so params stay a flat tuple."""
    flat = []
    for layer in layers:
        if isinstance(layer, Serial):
            flat.extend(layer.layers)
        elif hasattr(layer, "init") and hasattr(layer, "apply"):
            flat.append(layer)
        else:
            raise TypeError(f"serial: every argument must be an ntklib layer, got {layer!r}")
    return Serial(tuple(flat))


_ACTIVATIONS = {"erf": Erf, "relu": Relu, "tanh": Tanh, "identity": Identity, "sigmoid": Sigmoid, "gelu": Gelu}


def activation(name) -> Activation:
    """Look an activation up by name (``"erf"``, ``"relu"``, ...) or pass one through."""
    if isinstance(name, Activation):
        return name
    if isinstance(name, str) and name.lower() in _ACTIVATIONS:
        return _ACTIVATIONS[name.lower()]
    raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)} or an ntklib Activation, got {name!r}")


def mlp(widths, out_dim: int, activation_fn: Any = "erf", *, W_std: float = 1.0, b_std: float = 0.0,
        parametrization: str = "ntk", init: str = "normal") -> Serial:
    """Fully-connected network (2.1): ``len(widths)`` hidden layers then a linear readout.

    ``mlp([n]*L, k)`` is the network of section 2 with ``L`` hidden layers of
    width ``n`` and ``k`` outputs: ``Dense(n), φ, …, Dense(n), φ, Dense(k)``.
    """
    act = activation(activation_fn)
    kw = dict(W_std=W_std, b_std=b_std, parametrization=parametrization, init_scheme=init)
    layers = []
    for w in widths:
        layers += [Dense(int(w), **kw), act]
    layers.append(Dense(int(out_dim), **kw))
    return serial(*layers)


def cnn(channels, out_dim: int, activation_fn: Any = "relu", *, filter_shape=(3, 3), padding: str = "SAME",
        W_std: float = 1.0, b_std: float = 0.0, parametrization: str = "ntk") -> Serial:
    """Convolutional network: ``Conv(c), φ`` per entry of ``channels``, ``GlobalAvgPool``, ``Dense(out_dim)``."""
    act = activation(activation_fn)
    kw = dict(W_std=W_std, b_std=b_std, parametrization=parametrization)
    layers = []
    for c in channels:
        layers += [Conv(int(c), filter_shape, padding, **kw), act]
    layers += [GlobalAvgPool, Dense(int(out_dim), **kw)]
    return serial(*layers)
