"""ntklib: the Neural Tangent Kernel at finite and infinite width, in JAX.

The library behind the ntk-book. Pure functions over parameter pytrees;
the caller chooses the dtype (enable ``jax_enable_x64`` yourself for float64).
"""

from .empirical import METHODS, conv_costs, empirical_ntk, layerwise_ntk, method_costs
from .layers import (
    Activation,
    Conv,
    Dense,
    Erf,
    Flatten,
    Gelu,
    GlobalAvgPool,
    Identity,
    Relu,
    Serial,
    Sigmoid,
    Tanh,
    activation,
    cnn,
    mlp,
    serial,
)

__version__ = "0.1.0"
