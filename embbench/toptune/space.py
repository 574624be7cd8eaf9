"""The search space of top-tuning (plain data: no keras import)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ACTIVATIONS", "OPTIMIZERS", "SearchSpace"]

OPTIMIZERS = ("sgd", "adam", "adamw", "nadam", "adamax", "rmsprop", "adagrad")
ACTIVATIONS = (
    "relu",
    "gelu",
    "selu",
    "elu",
    "tanh",
    "sigmoid",
    "silu",
    "swish",
    "leaky_relu",
    "mish",
    "softplus",
    "linear",
)


@dataclass(frozen=True)
class SearchSpace:
    """The hyperparameter ranges of the Bayesian search.

    Attributes:
        hidden_layers: ``(min, max)`` number of hidden layers.
        units: Choices of units per hidden layer (each layer chooses on its own).
        learning_rate: ``(min, max)``, sampled log-uniformly.
        momentum: ``(min, max)``: SGD/RMSprop momentum, Adam-family ``beta_1``.
        activations: Choices of the hidden layers' activation (one for all layers).
        optimizers: Choices among ``sgd``, ``adam``, ``adamw``, ``nadam``, ``adamax``,
            ``rmsprop``, ``adagrad``.
        clipvalue: Choices of gradient clip value; 0 = no clipping.
    """

    hidden_layers: tuple[int, int]
    units: tuple[int, ...]
    learning_rate: tuple[float, float]
    momentum: tuple[float, float]
    activations: tuple[str, ...]
    optimizers: tuple[str, ...]
    clipvalue: tuple[float, ...]
