"""ntklib: the Neural Tangent Kernel at finite and infinite width, in JAX.

The library behind the ntk-book. Pure functions over parameter pytrees;
the caller chooses the dtype (enable ``jax_enable_x64`` yourself for float64).
"""

from .analytic import ANALYTIC_ACTIVATIONS, Kernels, infinite_width_kernels, kernels_of
from .dynamics import (
    NORMALIZATIONS,
    Trajectory,
    equivalent_ntk_learning_rates,
    gradient_descent_mse,
    layerwise_learning_rates,
    linearize,
    train_gradient_descent,
    train_gradient_flow,
)
from .empirical import METHODS, conv_costs, empirical_ntk, layerwise_ntk, method_costs
from .jacobian import (
    JacobianNorms,
    LipschitzSample,
    frobenius_split,
    jacobian,
    jacobian_distance,
    jacobian_norms,
    lipschitz_ratios,
    sample_ball,
)
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

__all__ = [
    "Activation",
    "activation",
    "ANALYTIC_ACTIVATIONS",
    "cnn",
    "Conv",
    "conv_costs",
    "Dense",
    "empirical_ntk",
    "equivalent_ntk_learning_rates",
    "Erf",
    "Flatten",
    "frobenius_split",
    "Gelu",
    "GlobalAvgPool",
    "gradient_descent_mse",
    "Identity",
    "infinite_width_kernels",
    "jacobian",
    "jacobian_distance",
    "jacobian_norms",
    "JacobianNorms",
    "Kernels",
    "kernels_of",
    "layerwise_learning_rates",
    "layerwise_ntk",
    "linearize",
    "lipschitz_ratios",
    "LipschitzSample",
    "method_costs",
    "METHODS",
    "mlp",
    "NORMALIZATIONS",
    "Relu",
    "sample_ball",
    "Serial",
    "serial",
    "Sigmoid",
    "Tanh",
    "train_gradient_descent",
    "train_gradient_flow",
    "Trajectory",
]
