"""Keras side of top-tuning: the MLP hypermodel, the keras-tuner search and the final training.

This is the only embbench module that imports keras. Keras fixes its backend on first import, so
the backend is chosen (``use_keras_backend``) before the import below; ``embbench.toptune``
chooses the configured one before importing this module.

The model (the paper's top-tuning head): L2-normalised frozen embeddings -> 2 or 3 ``Dense``
hidden layers (``hidden_1`` ... ``hidden_n``) -> ``Dense`` softmax ``classifier``, trained with
sparse categorical cross-entropy. The top-tuned embedding of an input is the output of the last
hidden layer, i.e. the input of ``classifier``.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embbench._toptune_backend import use_keras_backend

use_keras_backend("auto")  # no-op when embbench.toptune already chose one

import keras  # noqa: E402
import keras_tuner  # noqa: E402

logger = logging.getLogger(__name__)

OBJECTIVE = "val_accuracy"  # trials are selected on the validation split's accuracy
PREDICT_BATCH = 4096


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


def make_tuner(
    hypermodel: MLPHyperModel,
    *,
    directory: Path,
    project_name: str,
    max_trials: int,
    executions_per_trial: int,
    seed: int,
    overwrite: bool = False,
) -> keras_tuner.BayesianOptimization:
    """A Bayesian-optimisation tuner whose state lives in ``directory/project_name``.

    With ``overwrite=False`` an existing project is reloaded: finished trials are kept, an
    interrupted one is run again, and only the remaining ``max_trials`` are new.
    """
    return keras_tuner.BayesianOptimization(
        hypermodel,
        objective=keras_tuner.Objective(OBJECTIVE, direction="max"),
        max_trials=max_trials,
        executions_per_trial=executions_per_trial,
        seed=seed + 1,  # keras-tuner treats seed 0 as "no seed" (random)
        directory=str(directory),
        project_name=project_name,
        overwrite=overwrite,
        max_consecutive_failed_trials=3,
    )


@contextmanager
def _gc_frozen() -> Iterator[None]:
    """Exclude the objects that exist now from garbage collection while the search runs.

    keras-tuner calls ``gc.collect()`` (twice) before building each trial's model; in a process
    holding torch, pandas, MLflow... that full collection took ~0.7 s each on 2 cores. Frozen
    objects are still freed by reference counting; they are unfrozen afterwards.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def _tensorflow_hidden() -> Iterator[None]:
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
    with _tensorflow_hidden():
        keras.utils.set_random_seed(seed)


def completed_trials(tuner: keras_tuner.Tuner) -> int:
    """How many trials of the tuner's project have finished."""
    return sum(t.status == "COMPLETED" for t in tuner.oracle.trials.values())


def run_search(
    tuner: keras_tuner.Tuner,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
) -> int:
    """Run (or resume) the search; return how many trials finished in this call.

    The arrays are passed by reference to every trial: the embeddings are never re-read.
    """
    before = completed_trials(tuner)
    set_seed(seed)
    with _gc_frozen():
        tuner.search(
            x_train,
            y_train,
            validation_data=(x_val, y_val),
            epochs=epochs,
            batch_size=batch_size,
            shuffle=True,
            verbose=0,
        )
    return completed_trials(tuner) - before


def trial_summaries(tuner: keras_tuner.Tuner) -> list[dict]:
    """One dict per trial: id, status, score (mean best val accuracy), hyperparameters, metrics.

    ``history`` maps each metric to its per-epoch mean over the trial's executions.
    """
    out = []
    for trial_id in sorted(tuner.oracle.trials):
        trial = tuner.oracle.trials[trial_id]
        metrics, history = {}, {}
        for name in trial.metrics.metrics:
            best = trial.metrics.get_best_value(name)
            if best is not None:
                metrics[name] = float(best)
            history[name] = [float(np.mean(obs.value)) for obs in trial.metrics.get_history(name)]
        out.append(
            {
                "trial_id": trial_id,
                "status": trial.status,
                "score": None if trial.score is None else float(trial.score),
                "best_step": trial.best_step,
                "hyperparameters": dict(trial.hyperparameters.values),
                "metrics": metrics,
                "history": history,
            }
        )
    return out


def best_trial(tuner: keras_tuner.Tuner):
    """The completed trial with the highest validation accuracy."""
    best = tuner.oracle.get_best_trials(1)
    if not best:
        raise RuntimeError(
            f"keras-tuner finished no trial in {tuner.project_dir}; see the errors above"
        )
    return best[0]


def load_checkpoint(tuner: keras_tuner.Tuner, trial) -> keras.Model:
    """The trial's model at its best epoch, optimizer state included.

    keras-tuner's own ``load_model`` skips the optimizer's variables (it does not build the
    optimizer first), so continued training would restart the optimizer from scratch.
    """
    model = tuner.hypermodel.build(trial.hyperparameters)
    model.optimizer.build(model.trainable_variables)
    path = Path(tuner.get_trial_dir(trial.trial_id)) / "checkpoint.weights.h5"
    if not path.is_file():
        raise RuntimeError(
            f"trial {trial.trial_id} of {tuner.project_dir} has no checkpoint {path}; "
            "delete that folder to search again"
        )
    model.load_weights(path)
    return model


def train_final(
    tuner: keras_tuner.Tuner,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    epochs: int,
    patience: int,
    batch_size: int,
    seed: int,
) -> tuple[keras.Model, dict]:
    """Continue the best trial from its best-epoch checkpoint, early-stopping on val loss.

    The model ends with the weights of its lowest validation loss, the checkpoint's included
    (never worse on val loss than where it started).

    Returns:
        The model and facts about the run (epochs run, best epoch, val loss/accuracy before and
        after, history).
    """
    trial = best_trial(tuner)
    model = load_checkpoint(tuner, trial)
    set_seed(seed)
    loss0, acc0 = model.evaluate(x_val, y_val, batch_size=PREDICT_BATCH, verbose=0)
    info: dict[str, Any] = {
        "best_trial": trial.trial_id,
        "checkpoint_val_loss": float(loss0),
        "checkpoint_val_accuracy": float(acc0),
        "epochs_run": 0,
        "best_epoch": 0,
        "history": {},
    }
    if epochs <= 0:
        info.update(val_loss=float(loss0), val_accuracy=float(acc0))
        return model, info
    start = [w.copy() for w in model.get_weights()]
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, restore_best_weights=True
    )
    t0 = time.perf_counter()
    hist = model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        callbacks=[stop],
        verbose=0,
    )
    val_loss = [float(v) for v in hist.history["val_loss"]]
    finite = [v for v in val_loss if math.isfinite(v)]
    best = min(finite) if finite else math.inf
    if not best < loss0:
        model.set_weights(start)  # continuing never beat the checkpoint: keep the checkpoint
        best_epoch = 0
    else:
        best_epoch = int(np.nanargmin(np.where(np.isfinite(val_loss), val_loss, np.nan))) + 1
    loss, acc = model.evaluate(x_val, y_val, batch_size=PREDICT_BATCH, verbose=0)
    info.update(
        epochs_run=len(val_loss),
        best_epoch=best_epoch,
        val_loss=float(loss),
        val_accuracy=float(acc),
        fit_wall_s=round(time.perf_counter() - t0, 3),
        history={k: [float(v) for v in vs] for k, vs in hist.history.items()},
    )
    return model, info


def hidden_layer_names(model: keras.Model) -> list[str]:
    """The names of the model's hidden Dense layers, in order."""
    return [layer.name for layer in model.layers if layer.name.startswith("hidden_")]


def embedding_model(model: keras.Model) -> keras.Model:
    """The MLP without its classifier: outputs the last hidden layer."""
    return keras.Model(model.inputs, model.get_layer("classifier").input, name="toptune_embed")


def predict(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """``model`` applied to ``x`` in large batches, as float32 numpy."""
    if len(x) == 0:
        out_dim = int(model.outputs[0].shape[-1])
        return np.zeros((0, out_dim), np.float32)
    return np.asarray(model.predict(x, batch_size=PREDICT_BATCH, verbose=0), dtype=np.float32)


def save_model(model: keras.Model, path: Path) -> Path:
    """Save the whole model in Keras format (backend-independent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    with _tensorflow_hidden():
        model.save(tmp)
    tmp.replace(path)
    return path


def load_model(path: Path) -> keras.Model:
    """Load a model saved by :func:`save_model` (any backend)."""
    with _tensorflow_hidden():
        return keras.saving.load_model(path, compile=False)


def keras_facts() -> Mapping[str, str]:
    """Keras and keras-tuner versions and the backend in use."""
    return {
        "keras": keras.__version__,
        "keras_tuner": keras_tuner.__version__,
        "keras_backend": keras.backend.backend(),
    }
