"""Stage 03 (notebook ``03_toptune``): top-tuning on frozen embeddings, as in the paper.

For every (model, dataset) cell, run by the cell engine:

1. the model's pretrained embeddings of every split come from the cache (computed when
   missing), L2-normalised once and kept in memory for the whole search; labels come from the
   catalogue (the dataset's default label unless ``label`` names another);
2. keras-tuner Bayesian optimisation of a small MLP (2-3 ``Dense`` hidden layers + softmax,
   cross-entropy) over learning rate, momentum, hidden layers, units, activation, optimizer and
   gradient clip value: ``max_trials`` trials, each run ``executions_per_trial`` times for
   ``search_epochs`` epochs, selected on validation accuracy. The tuner's state lives in
   ``<runs_dir>/toptune/<dataset>/<model>/search-<key>``, keyed by the data and the search
   space, not ``max_trials``: an interrupted search resumes, a larger budget extends it;
3. the best trial continues from its best-epoch checkpoint for up to ``final_epochs`` epochs with
   early stopping on validation loss;
4. test-split classification: accuracy, precision/recall/F1 macro and weighted, confusion matrix;
5. the top-tuned embeddings (the last hidden layer's output) of every split go to the embedding
   cache under a derived identity; the engine scores them next to the pretrained baseline on
   the same data, with the same backend.

MLflow: the cell's run holds the search (best hyper-parameters, final model, classification,
confusion matrix) with one nested child run per trial. Keras's backend is chosen by
``keras_backend`` before keras is imported (:mod:`embbench.toptune.backend`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, ValidationInfo, field_validator

from embbench._threads import apply_thread_budget, resolve_thread_budget
from embbench._utils import atomic_write_json, stable_hash
from embbench.cache import EmbeddingCache, EmbeddingSet
from embbench.cells import Cell, CellInputs, Produced, StageSteps, run_grid
from embbench.config import GridConfig, register_stage
from embbench.records import ResultStore
from embbench.stagekit import EmbedderPool, lineage_of, weights_problem
from embbench.stages import _baselines
from embbench.stages._toptune_mlflow import log_search
from embbench.stages._toptune_records import (
    MODE,
    STAGE,
    pretrained_vs_toptuned,
    result_row,
    trials_table,
)
from embbench.toptune import (
    ACTIVATIONS,
    OPTIMIZERS,
    TEST,
    TRAIN,
    VAL,
    SearchSpace,
    TopTuneError,
    fill_zero_rows,
    prepare_data,
    required_splits,
    test_classification,
    toptune_dir,
    use_keras_backend,
)

logger = logging.getLogger(__name__)

TOPTUNE_VERSION = 2  # bump when this module changes what it computes


@register_stage("03_toptune")
class TopTuneConfig(GridConfig):
    """Parameters of stage 03, mirrored by ``notebooks/03_toptune.ipynb`` and its params file.

    The shared fields (:class:`~embbench.config.GridConfig`) embed missing splits and score
    retrieval; these are the search (the paper's budgets are the defaults).
    """

    max_trials: int = Field(20, ge=1)  # Bayesian-optimisation trials (paper: 20)
    executions_per_trial: int = Field(2, ge=1)  # trainings per trial, averaged (paper: 2)
    search_epochs: int = Field(30, ge=1)  # epochs per execution during the search (paper: 30)
    final_epochs: int = Field(1000, ge=0)  # max epochs continuing the best trial (paper: 1000)
    patience: int = Field(20, ge=1)  # early stopping on val loss, epochs (paper: unstated)
    hidden_layers: list[int] = Field(default_factory=lambda: [2, 3])  # [min, max] (paper: 2-3)
    units: list[int] = Field(default_factory=lambda: [128, 256, 512, 1024])  # per-layer choices
    learning_rate: list[float] = Field(default_factory=lambda: [1e-4, 1e-1])  # [min, max], log
    momentum: list[float] = Field(default_factory=lambda: [0.0, 0.95])  # [min, max]; Adam beta_1
    activations: list[str] = Field(default_factory=lambda: ["relu", "gelu", "tanh", "selu"])
    optimizers: list[str] = Field(default_factory=lambda: ["sgd", "adam", "rmsprop"])
    clipvalue: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0, 5.0])  # 0 = none
    keras_backend: Literal["auto", "tensorflow", "torch", "jax"] = "auto"  # auto = fastest
    train_batch_size: int = Field(256, ge=1)  # embeddings per training step
    # classification baselines on the frozen embeddings, for every model (image-only included)
    baselines: list[Literal["probe", "knn"]] = Field(default_factory=lambda: ["probe", "knn"])
    knn_k: int = Field(20, ge=1)  # kNN neighbours that vote (DINO: 20)
    knn_temperature: float = Field(0.07, gt=0)  # kNN vote weight exp(sim / T) (DINO: 0.07)

    # the baselines' fields change only their own cells: in those cells' identity instead
    hash_exclude = GridConfig.hash_exclude | {
        "keras_backend",
        "baselines",
        "knn_k",
        "knn_temperature",
    }

    @field_validator("units", "activations", "optimizers", "clipvalue")
    @classmethod
    def _non_empty(cls, v: list) -> list:
        if not v:
            raise ValueError("must name at least one entry")
        return v

    @field_validator("hidden_layers")
    @classmethod
    def _hidden_range(cls, v: list[int]) -> list[int]:
        if len(v) != 2 or not 1 <= v[0] <= v[1] <= 8:
            raise ValueError("must be [min, max] with 1 <= min <= max <= 8 (paper: [2, 3])")
        return v

    @field_validator("units", "clipvalue")
    @classmethod
    def _distinct_sorted(cls, v: list, info: ValidationInfo) -> list:
        low, cast, problem = {
            "units": (1, int, "every choice must be a positive number of units"),
            "clipvalue": (0, float, "clip values must be >= 0 (0 = no clipping)"),
        }[info.field_name]
        if any(x < low for x in v):
            raise ValueError(problem)
        return sorted({cast(x) for x in v})

    @field_validator("learning_rate")
    @classmethod
    def _lr_range(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not 0 < v[0] <= v[1]:
            raise ValueError("must be [min, max] with 0 < min <= max (sampled log-uniformly)")
        return v

    @field_validator("momentum")
    @classmethod
    def _momentum_range(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not 0 <= v[0] <= v[1] < 1:
            raise ValueError("must be [min, max] with 0 <= min <= max < 1")
        return v

    @field_validator("activations", "optimizers")
    @classmethod
    def _known_choices(cls, v: list[str], info: ValidationInfo) -> list[str]:
        allowed, what = {
            "activations": (ACTIVATIONS, "activation"),
            "optimizers": (OPTIMIZERS, "optimizer"),
        }[info.field_name]
        bad = [x for x in v if x not in allowed]
        if bad:
            raise ValueError(f"unknown {what}(s) {bad}; choose from {list(allowed)}")
        return v

    def search_space(self) -> dict[str, tuple]:
        """The search space, as keyword arguments of :class:`embbench.toptune.SearchSpace`."""
        return {
            "hidden_layers": tuple(self.hidden_layers),
            "units": tuple(self.units),
            "learning_rate": tuple(self.learning_rate),
            "momentum": tuple(self.momentum),
            "activations": tuple(self.activations),
            "optimizers": tuple(self.optimizers),
            "clipvalue": tuple(self.clipvalue),
        }


def search_key(cfg: TopTuneConfig, label: str, cache_keys: Mapping[str, str]) -> str:
    """The tuner folder's key: data and search space, not ``max_trials`` (so budgets extend)."""
    return stable_hash(
        {
            "version": TOPTUNE_VERSION,
            "label": label,
            "train": cache_keys[TRAIN],
            "val": cache_keys[VAL],
            "max_images": cfg.max_images,
            "space": cfg.search_space(),
            "search_epochs": cfg.search_epochs,
            "executions_per_trial": cfg.executions_per_trial,
            "train_batch_size": cfg.train_batch_size,
            "seed": cfg.seed,
        }
    )


class TopTuneSteps(StageSteps):
    """Stage 03's steps for the cell engine."""

    def __init__(self, cfg: TopTuneConfig) -> None:
        use_keras_backend(cfg.keras_backend)  # before anything below can import keras
        # Keras trains in this process: all the cores for its threads (no DataLoader here)
        apply_thread_budget(resolve_thread_budget(cfg.threads, 0, "cpu"))
        self.cfg = cfg
        self.pretrained = EmbedderPool(cfg)

    def grid(self) -> list[Cell]:
        """Every (model, dataset) pair, dataset by dataset; then the probe and kNN cells."""
        cfg = self.cfg
        tuned = [Cell(STAGE, MODE, m, d) for d in cfg.datasets for m in cfg.models]
        return tuned + _baselines.baseline_cells(STAGE, cfg.models, cfg.datasets, cfg.baselines)

    def check(self, cells: Sequence[Cell], inputs: Mapping[str, CellInputs]) -> list[str]:
        """Every dataset needs train, val and test splits; the weights must be usable."""
        problems = [weights_problem(self.cfg.weights)]
        for name, inp in inputs.items():
            try:
                required_splits(inp.catalogue, inp.plan.as_dict(), name)
            except TopTuneError as exc:
                problems.append(str(exc))
        return [p for p in problems if p]

    def _splits(self, inputs: CellInputs) -> list[str]:
        return required_splits(inputs.catalogue, inputs.plan.as_dict(), inputs.dataset)

    def identity(self, cell: Cell, inputs: CellInputs) -> dict[str, Any]:
        """The cache keys of the pretrained embeddings the search learns from."""
        if cell.task != "image-image":  # a probe or kNN baseline
            return _baselines.baseline_identity(
                self.pretrained,
                cell,
                inputs,
                self._splits(inputs),
                knn_k=self.cfg.knn_k,
                knn_temperature=self.cfg.knn_temperature,
            )
        keys = self.pretrained.cache_keys(cell.model, inputs, self._splits(inputs))
        return {"caches": keys, "version": TOPTUNE_VERSION}

    def produce(self, cell: Cell, inputs: CellInputs) -> Produced:
        """Search, train the best MLP further, classify test, embed every split with it."""
        cfg, plan = self.cfg, inputs.plan
        if cell.task != "image-image":  # a probe or kNN baseline on the same embeddings
            return _baselines.produce_baseline(
                self.pretrained,
                cell,
                inputs,
                self._splits(inputs),
                knn_k=cfg.knn_k,
                knn_temperature=cfg.knn_temperature,
                device=cfg.device,
                seed=cfg.seed,
            )
        t0 = time.perf_counter()
        sets = self.pretrained.embed(cell.model, inputs, self._splits(inputs))
        embed_s = round(time.perf_counter() - t0, 3)
        keys = {s: str(es.meta.get("key")) for s, es in sets.items()}
        tune_key = stable_hash({"cfg": cfg.config_hash(), "plan": plan.as_dict(), "caches": keys})
        tuned = _tune(cfg, cell, inputs, sets, keys, tune_key)
        emb = self.pretrained(cell.model)
        q, i = plan.query_split, plan.index_split
        return Produced(
            query=tuned["sets"][q],
            index=tuned["sets"][i],
            lineage=lineage_of(emb, cell.model).model_copy(update={"toptuned_on": cell.dataset}),
            spec=emb.spec,
            classification=tuned["classification"],
            val_accuracy=tuned["val_accuracy"],
            timings={"embed_s": embed_s, "train_s": tuned["train_s"]},
            toptune_model_path=tuned["toptune_model_path"],
            details=tuned["details"],
            tags={"keras_backend": tuned["details"]["keras_backend"]},
            baseline=(sets[q], sets[i]),
        )


def _tune(
    cfg: TopTuneConfig,
    cell: Cell,
    inputs: CellInputs,
    sets: Mapping[str, EmbeddingSet],
    keys: Mapping[str, str],
    tune_key: str,
) -> dict[str, Any]:
    """The search, the final training, the test classification and the top-tuned caches."""
    model, dataset, label = cell.model, cell.dataset, inputs.plan.label
    data = prepare_data(sets, inputs.catalogue, label, dataset=dataset, model=model)
    # keras: imported only now, after the configured backend is chosen
    from embbench.toptune import keras_model, search

    base = toptune_dir(dataset, model)
    out_dir = base / f"final-{tune_key}"
    if cfg.overwrite == "always" and out_dir.exists():
        shutil.rmtree(out_dir)
    hypermodel = keras_model.MLPHyperModel(
        SearchSpace(**cfg.search_space()), data.dim, len(data.classes)
    )
    tuner = search.make_tuner(
        hypermodel,
        directory=base,
        project_name=f"search-{search_key(cfg, label, keys)}",
        max_trials=cfg.max_trials,
        executions_per_trial=cfg.executions_per_trial,
        seed=cfg.seed,
        overwrite=cfg.overwrite == "always",
    )
    x_val, y_val = data.x[VAL][data.seen(VAL)], data.y[VAL][data.seen(VAL)]
    x_tr, y_tr = data.x[TRAIN], data.y[TRAIN]
    arrays = search.TrainArrays(x_tr, y_tr, x_val, y_val)
    logger.info(
        "top-tuning %s on %s: %d trial(s) x %d execution(s) x %d epoch(s), %d classes, %d train "
        "/ %d val embeddings of dim %d, Keras backend %s; %d trial(s) already done (%s)",
        model,
        dataset,
        cfg.max_trials,
        cfg.executions_per_trial,
        cfg.search_epochs,
        len(data.classes),
        len(y_tr),
        len(y_val),
        data.dim,
        keras_model.keras_facts()["keras_backend"],
        search.completed_trials(tuner),
        tuner.project_dir,
    )
    t0 = time.perf_counter()
    fit = {"batch_size": cfg.train_batch_size, "seed": cfg.seed}  # the search and the final fit
    n_new = search.run_search(tuner, arrays, epochs=cfg.search_epochs, **fit)
    tuner_wall = time.perf_counter() - t0
    trials = search.trial_summaries(tuner)
    t0 = time.perf_counter()
    final_model, final = search.train_final(
        tuner, arrays, epochs=cfg.final_epochs, patience=cfg.patience, **fit
    )
    final_wall = time.perf_counter() - t0
    best = next(t for t in trials if t["trial_id"] == final["best_trial"])
    hidden = keras_model.hidden_layer_names(final_model)

    probs = keras_model.predict(final_model, data.x[TEST])
    pred = data.classes[np.argmax(probs, axis=1)] if len(probs) else data.labels[TEST][:0]
    classification, cm_path = test_classification(data, pred, data.seen(TEST), out_dir)

    embed_model = keras_model.embedding_model(final_model)
    model_path = keras_model.save_model(final_model, out_dir / "model.keras")
    facts = keras_model.keras_facts()
    atomic_write_json(
        out_dir / "toptune.json",
        {
            "source_model": model,
            "source_dataset": dataset,
            "label": label,
            "classes": data.classes.tolist(),
            "input_dim": data.dim,
            "embed_dim": int(embed_model.outputs[0].shape[-1]),
            "hidden_layers": hidden,
            "hyperparameters": best["hyperparameters"],
            "input_normalization": "l2",
            "cell_hash": tune_key,
            "search_dir": str(tuner.project_dir),
            "source_caches": keys,
            **facts,
        },
    )
    tt_sets: dict[str, EmbeddingSet] = {}
    n_zero: dict[str, int] = {}
    for split, es in sets.items():
        vectors = keras_model.predict(embed_model, data.x[split])
        n_zero[split] = fill_zero_rows(vectors, f"{model} on {dataset}/{split}")
        identity = {
            "source_cache": keys[split],
            "toptune": tune_key,
            "mode": MODE,
            "normalized": False,
            "toptune_version": TOPTUNE_VERSION,
        }
        tt_sets[split] = EmbeddingCache(dataset, model, split, identity).save_complete(
            vectors,
            es.item_ids,
            provenance={"toptune_model_path": str(model_path), **facts},
            failed=list(es.failed),
        )
    log_search(trials, best, final, classification, out_dir, model_path, cm_path)
    return {
        "sets": tt_sets,
        "classification": {k: float(v) for k, v in classification.items()},
        "val_accuracy": final["val_accuracy"],
        "train_s": round(tuner_wall + final_wall, 3),
        "toptune_model_path": str(model_path),
        "details": {
            "n_classes": len(data.classes),
            "n_unseen": data.n_unseen,
            "n_zero_embeddings": n_zero,
            "toptune_dir": str(out_dir),
            "search_dir": str(tuner.project_dir),
            "confusion_matrix_path": str(cm_path),
            "keras_backend": facts["keras_backend"],
            "keras_versions": {"keras": facts["keras"], "keras_tuner": facts["keras_tuner"]},
            "hidden_layers": len(hidden),
            "best_trial": final["best_trial"],
            "best_hyperparameters": best["hyperparameters"],
            "trials": [{k: v for k, v in t.items() if k != "history"} for t in trials],
            "n_trials": len(trials),
            "n_new_trials": n_new,
            "final_training": {k: v for k, v in final.items() if k != "history"},
            "tuner_s": round(tuner_wall, 3),
            "final_fit_s": round(final_wall, 3),
            "source_caches": {s: str(es.path) for s, es in sets.items()},
            "toptuned_caches": {s: str(es.path) for s, es in tt_sets.items()},
        },
    }


def run_toptune(cfg: TopTuneConfig, store: ResultStore | None = None) -> pd.DataFrame:
    """Top-tune every (model, dataset) cell of ``cfg``; one row per cell.

    Finished cells (same config, plan and source embeddings) are read back unless
    ``overwrite="always"``. Missing pretrained embeddings are computed (and cached) first.

    Returns:
        One row per cell: test classification metrics, top-tuned retrieval metrics, the
        pretrained baseline's metrics (``pretrained_<metric>``) on the same data and their
        differences, the search budget and outcome, and where the model and MLflow run are.
    """
    records = run_grid(cfg, TopTuneSteps(cfg), store=store)
    return pd.DataFrame([result_row(r) for r in records])


__all__ = [
    "TopTuneConfig",
    "TopTuneSteps",
    "pretrained_vs_toptuned",
    "result_row",
    "run_toptune",
    "search_key",
    "trials_table",
]
