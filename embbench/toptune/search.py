"""The keras-tuner search of top-tuning and the final training of its best trial.

Resumable: the tuner's state lives in a folder; an interrupted trial is run again, finished ones
are kept, and a larger ``max_trials`` adds trials to the same search. Imports keras, so the
backend must be chosen first (:func:`embbench.toptune.backend.use_keras_backend`).

A resumed search gives the records of an uninterrupted one (``tests/test_resume_faults.py``
kills one with SIGKILL between trials and compares). keras-tuner 1.4.8 alone does not: its
Bayesian oracle draws the optimiser's restarts from a numpy ``RandomState`` that it never saves
(``oracle.json`` holds only the hyperparameter sampler's integer ``seed_state``), reloads trials
in file-system order, and every trial trains with whatever TensorFlow/numpy/Python RNG state the
trials before it in *this process* left. So:

- :class:`ResumableBayesianOracle` saves and restores that ``RandomState`` in ``oracle.json``,
  orders reloaded trials by number, as they were created, and does not train the last finished
  trial again (keras-tuner saves it as still running);
- :class:`SeededTuner` seeds Python, numpy and the backend at the start of every trial from the
  search seed and the trial's number (:func:`trial_seed`), so a trial's training depends on its
  hyperparameters and seed only, not on what ran before it in the process.

Together the oracle proposes the same hyperparameters in the same order and each trial trains
the same way whether or not the process was restarted in between; the finished trials kept on
resume are those an uninterrupted run computes. An interrupted trial is rerun from its start
with the same seed.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from embbench.toptune._keras import keras, keras_tuner
from embbench.toptune.keras_model import PREDICT_BATCH, MLPHyperModel, set_seed

logger = logging.getLogger(__name__)

__all__ = [
    "TrainArrays",
    "OBJECTIVE",
    "ResumableBayesianOracle",
    "SeededTuner",
    "best_trial",
    "completed_trials",
    "load_checkpoint",
    "make_tuner",
    "run_search",
    "train_final",
    "trial_seed",
    "trial_summaries",
]


class TrainArrays(NamedTuple):
    """The embeddings the search and the final fit both train and validate on.

    The arrays are passed by reference to every trial: the embeddings are never re-read.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    def fit_data(self) -> dict[str, Any]:
        """The data arguments of ``Model.fit`` and ``Tuner.search``: train and validation data."""
        return {"x": self.x_train, "y": self.y_train, "validation_data": (self.x_val, self.y_val)}


OBJECTIVE = "val_accuracy"  # trials are selected on the validation split's accuracy


def trial_seed(seed: int, trial_id: str) -> int:
    """The seed of one trial's training: the search seed and the trial's number."""
    return (int(seed) * 1_000_003 + int(trial_id) * 7_919 + 1) % (2**31 - 1)


class ResumableBayesianOracle(keras_tuner.oracles.BayesianOptimizationOracle):
    """keras-tuner's Bayesian oracle whose whole random state survives a restart.

    keras-tuner saves the integer ``seed_state`` of its random sampler but not the numpy
    ``RandomState`` that draws the starting points of the acquisition's optimiser, so after a
    reload the Bayesian phase proposed other hyperparameters than an uninterrupted search. Here
    that state is saved in ``oracle.json`` (each time keras-tuner saves the oracle, i.e. after
    every trial's creation and end) and restored on reload; reloaded trials are ordered by
    number (keras-tuner reads them in ``glob`` order, which feeds the Gaussian process its rows
    in another order).
    """

    def get_state(self) -> dict:
        """keras-tuner's state plus the optimiser's ``RandomState``."""
        state = super().get_state()
        kind, keys, pos, has_gauss, cached = self._random_state.get_state()
        state["embbench_random_state"] = [
            kind,
            keys.tolist(),
            int(pos),
            int(has_gauss),
            float(cached),
        ]
        return state

    def set_state(self, state: dict) -> None:
        """Restore keras-tuner's state and the optimiser's ``RandomState`` (when saved)."""
        super().set_state(state)
        saved = state.get("embbench_random_state")
        if saved is not None:
            kind, keys, pos, has_gauss, cached = saved
            self._random_state.set_state(
                (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
            )

    def reload(self) -> None:
        """Reload the project, trials in the order they were created; rerun no finished one.

        keras-tuner saves ``oracle.json`` in ``end_trial`` before it drops the ended trial from
        the ongoing ones, and on reload sends every "ongoing" trial to be run again: the last
        finished trial of a killed search was trained once more. Only unfinished trials are
        rerun here.
        """
        super().reload()
        self.trials = dict(sorted(self.trials.items(), key=lambda kv: int(kv[0])))
        self._retry_queue = [t for t in self._retry_queue if self.trials[t].status != "COMPLETED"]


class SeededTuner(keras_tuner.Tuner):
    """A tuner that seeds every trial from the search seed and the trial's number.

    Args:
        search_seed: The search's seed (:func:`trial_seed` derives each trial's).
        **kwargs: :class:`keras_tuner.Tuner`'s arguments.
    """

    def __init__(self, *args: Any, search_seed: int, **kwargs: Any) -> None:
        self.search_seed = int(search_seed)
        super().__init__(*args, **kwargs)

    def run_trial(self, trial, *args: Any, **kwargs: Any):
        """Seed Python, numpy and the backend for this trial, then run it."""
        set_seed(trial_seed(self.search_seed, trial.trial_id))
        return super().run_trial(trial, *args, **kwargs)


def make_tuner(
    hypermodel: MLPHyperModel,
    *,
    directory: Path,
    project_name: str,
    max_trials: int,
    executions_per_trial: int,
    seed: int,
    overwrite: bool = False,
) -> SeededTuner:
    """A Bayesian-optimisation tuner whose state lives in ``directory/project_name``.

    With ``overwrite=False`` an existing project is reloaded: finished trials are kept, an
    interrupted one is run again, and only the remaining ``max_trials`` are new. The search is
    reproducible across restarts (see the module's docstring).
    """
    oracle = ResumableBayesianOracle(
        objective=keras_tuner.Objective(OBJECTIVE, direction="max"),
        max_trials=max_trials,
        seed=seed + 1,  # keras-tuner treats seed 0 as "no seed" (random)
        max_consecutive_failed_trials=3,
    )
    return SeededTuner(
        oracle,
        hypermodel,
        search_seed=seed,
        executions_per_trial=executions_per_trial,
        directory=str(directory),
        project_name=project_name,
        overwrite=overwrite,
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


def completed_trials(tuner: keras_tuner.Tuner) -> int:
    """How many trials of the tuner's project have finished."""
    return sum(t.status == "COMPLETED" for t in tuner.oracle.trials.values())


def run_search(
    tuner: keras_tuner.Tuner,
    arrays: TrainArrays,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
) -> int:
    """Run (or resume) the search on ``arrays``; return how many trials finished in this call."""
    before = completed_trials(tuner)
    set_seed(seed)
    with _gc_frozen():
        tuner.search(
            **arrays.fit_data(),
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
    arrays: TrainArrays,
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
    loss0, acc0 = model.evaluate(arrays.x_val, arrays.y_val, batch_size=PREDICT_BATCH, verbose=0)
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
        **arrays.fit_data(),
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
    loss, acc = model.evaluate(arrays.x_val, arrays.y_val, batch_size=PREDICT_BATCH, verbose=0)
    info.update(
        epochs_run=len(val_loss),
        best_epoch=best_epoch,
        val_loss=float(loss),
        val_accuracy=float(acc),
        fit_wall_s=round(time.perf_counter() - t0, 3),
        history={k: [float(v) for v in vs] for k, vs in hist.history.items()},
    )
    return model, info
