"""Keras side of top-tuning: the MLP, its hypermodel, seeding, prediction, saving and loading.

With :mod:`embbench.toptune.search` the only embbench modules that use keras. Keras fixes its
backend on first import, so both import it from :mod:`embbench.toptune._keras`, which chooses
the backend (``use_keras_backend``) first; the stage chooses the configured one before
importing this module.

The model (the paper's top-tuning head): L2-normalised frozen embeddings -> 2 or 3 ``Dense``
hidden layers (``hidden_1`` ... ``hidden_n``) -> ``Dense`` softmax ``classifier``, trained with
sparse categorical cross-entropy. The top-tuned embedding of an input is the output of the last
hidden layer, i.e. the input of ``classifier``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from embbench.toptune._keras import keras, keras_tuner
from embbench.toptune.space import SearchSpace

logger = logging.getLogger(__name__)

__all__ = [
    "PREDICT_BATCH",
    "MLPHyperModel",
    "SearchSpace",
    "build_mlp",
    "embedding_model",
    "hidden_layer_names",
    "keras_facts",
    "load_model",
    "make_optimizer",
    "predict",
    "save_model",
    "set_seed",
    "tensorflow_hidden",
]

PREDICT_BATCH = 4096


def make_optimizer(
    name: str, learning_rate: float, momentum: float, clipvalue: float
) -> keras.optimizers.Optimizer:
    """A Keras optimizer; ``momentum`` is SGD/RMSprop momentum and Adam-family ``beta_1``.

    Adagrad has no momentum term, so there it is unused.
    """
    clip = float(clipvalue) if clipvalue and clipvalue > 0 else None
    opt = keras.optimizers
    if name == "sgd":
        return opt.SGD(learning_rate, momentum=momentum, clipvalue=clip)
    if name == "rmsprop":
        return opt.RMSprop(learning_rate, momentum=momentum, clipvalue=clip)
    if name == "adagrad":
        return opt.Adagrad(learning_rate, clipvalue=clip)
    adam_like = {"adam": opt.Adam, "adamw": opt.AdamW, "nadam": opt.Nadam, "adamax": opt.Adamax}
    if name not in adam_like:
        raise ValueError(f"unknown optimizer {name!r}")
    return adam_like[name](learning_rate, beta_1=momentum, clipvalue=clip)


def _int(hp: keras_tuner.HyperParameters, name: str, lo: int, hi: int) -> int:
    return hp.Fixed(name, lo) if lo == hi else hp.Int(name, lo, hi)


def _float(hp: keras_tuner.HyperParameters, name: str, lo: float, hi: float, log: bool) -> float:
    if lo == hi:
        return hp.Fixed(name, float(lo))
    return hp.Float(name, float(lo), float(hi), sampling="log" if log else "linear")


def _choice(hp: keras_tuner.HyperParameters, name: str, values: tuple) -> Any:
    return hp.Fixed(name, values[0]) if len(values) == 1 else hp.Choice(name, list(values))


def build_mlp(
    hp: keras_tuner.HyperParameters, space: SearchSpace, input_dim: int, n_classes: int
) -> keras.Model:
    """Build and compile the top-tuning MLP for the hyperparameters ``hp`` draws from ``space``."""
    lo, hi = space.hidden_layers
    n_hidden = _int(hp, "hidden_layers", lo, hi)
    activation = _choice(hp, "activation", space.activations)
    inputs = keras.Input(shape=(input_dim,), name="embedding")
    x = inputs
    for i in range(1, hi + 1):
        if i <= lo:
            units = _choice(hp, f"units_{i}", space.units)
        else:  # layers beyond the minimum exist only in some trials
            with hp.conditional_scope("hidden_layers", list(range(i, hi + 1))):
                units = _choice(hp, f"units_{i}", space.units)
        if i <= n_hidden:
            x = keras.layers.Dense(units, activation=activation, name=f"hidden_{i}")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="classifier")(x)
    model = keras.Model(inputs, outputs, name="toptune_mlp")
    optimizer = make_optimizer(
        _choice(hp, "optimizer", space.optimizers),
        _float(hp, "learning_rate", *space.learning_rate, log=True),
        _float(hp, "momentum", *space.momentum, log=False),
        _choice(hp, "clipvalue", space.clipvalue),
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class MLPHyperModel(keras_tuner.HyperModel):
    """keras-tuner hypermodel around :func:`build_mlp`; counts the models it builds."""

    def __init__(self, space: SearchSpace, input_dim: int, n_classes: int) -> None:
        super().__init__(name="toptune_mlp", tunable=True)
        self.space = space
        self.input_dim = input_dim
        self.n_classes = n_classes
        self.builds = 0

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        """Build one trial's model."""
        self.builds += 1
        return build_mlp(hp, self.space, self.input_dim, self.n_classes)


@contextmanager
def tensorflow_hidden() -> Iterator[None]:
    """Keep Keras from importing TensorFlow just to check types, under another backend.

    ``keras.utils.set_random_seed`` and ``.keras`` (de)serialisation probe ``tf.available``,
    which imports TensorFlow when it is installed: seconds and hundreds of MB for nothing under
    the torch or JAX backend. While this context is active those probes see no TensorFlow.
    """
    if keras.backend.backend() == "tensorflow" or "tensorflow" in sys.modules:
        yield
        return
    patched = []
    for name in ("keras.src.utils.rng_utils", "keras.src.saving.serialization_lib"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "tf"):
            patched.append((module, module.tf))
            module.tf = _NoTensorFlow()
    try:
        yield
    finally:
        for module, tf in patched:
            module.tf = tf


class _NoTensorFlow:
    available = False


def set_seed(seed: int) -> None:
    """Seed Python, numpy, the backend and Keras's initialisers (``set_random_seed``)."""
    with tensorflow_hidden():
        keras.utils.set_random_seed(seed)


def hidden_layer_names(model: keras.Model) -> list[str]:
    """The names of the model's hidden Dense layers, in order."""
    return [layer.name for layer in model.layers if layer.name.startswith("hidden_")]


def embedding_model(model: keras.Model) -> keras.Model:
    """The MLP without its classifier: outputs the last hidden layer."""
    return keras.Model(model.inputs[0], model.get_layer("classifier").input, name="toptune_embed")


def predict(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """``model`` applied to ``x`` in large batches, as float32 numpy."""
    if len(x) == 0:
        out_dim = int(model.outputs[0].shape[-1])
        return np.zeros((0, out_dim), np.float32)
    # Called eagerly, batch by batch: ``model.predict`` compiles a tf.function per model, and
    # the many models of a search then make TensorFlow warn about retracing.
    out = [
        keras.ops.convert_to_numpy(model(x[i : i + PREDICT_BATCH], training=False))
        for i in range(0, len(x), PREDICT_BATCH)
    ]
    return np.concatenate(out).astype(np.float32, copy=False)


def save_model(model: keras.Model, path: Path) -> Path:
    """Save the whole model in Keras format (backend-independent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    with tensorflow_hidden():
        model.save(tmp)
    tmp.replace(path)
    return path


def load_model(path: Path) -> keras.Model:
    """Load a model saved by :func:`save_model` (any backend)."""
    with tensorflow_hidden():
        return keras.saving.load_model(path, compile=False)


def keras_facts() -> Mapping[str, str]:
    """Keras and keras-tuner versions and the backend in use."""
    return {
        "keras": keras.__version__,
        "keras_tuner": keras_tuner.__version__,
        "keras_backend": keras.backend.backend(),
    }
