"""Stage 03 (notebook ``03_toptune``): top-tuning on frozen embeddings, as in the paper.

For every (model, dataset) cell:

1. Read the model's stage-01 embeddings of every split from the cache (``embed_split`` computes
   only what is missing), L2-normalise them once and keep them in memory for the whole search.
   Labels come from the catalogue: the dataset's default label unless ``label`` names another.
2. keras-tuner Bayesian optimisation of a small MLP (2-3 ``Dense`` hidden layers + softmax,
   cross-entropy) over learning rate, momentum, number of hidden layers, units per layer,
   activation, optimizer and gradient clip value: ``max_trials`` trials, each run
   ``executions_per_trial`` times for ``search_epochs`` epochs, selected on validation accuracy.
   The tuner's state lives in ``<runs_dir>/toptune/<dataset>/<model>/search-<key>`` where the
   key hashes the data and the search space, not ``max_trials``: an interrupted search resumes
   where it stopped, and raising ``max_trials`` adds trials to the same search.
3. The best trial continues from its best-epoch checkpoint (optimizer state included) for up to
   ``final_epochs`` epochs with early stopping on validation loss (best weights restored).
4. Test-split classification: accuracy, precision/recall/F1 macro and weighted, confusion matrix.
5. Top-tuned embeddings (the last hidden layer's output) of every split go to the embedding cache
   under a derived identity and are scored by the same retrieval code as stage 01
   (``score_and_record``, mode ``top-tuned``), next to the pretrained baseline on the same data.

MLflow: one parent run per cell (``toptune:<model>:<dataset>``) holding one nested child run per
trial (hyperparameters, validation metrics), the final model, the classification metrics and the
confusion matrix; the retrieval run of the top-tuned embeddings is its child too.

The final Keras model is saved as ``model.keras`` beside ``toptune.json``; its path is the
record's ``toptune_model_path``. :func:`embbench.toptune.load_toptuned` loads it for
cross-top-tuning; the building blocks of this stage are in :mod:`embbench.toptune`.

Keras's backend is chosen by ``keras_backend`` before keras is imported (see
:mod:`embbench.toptune.backend`); once keras is imported a process cannot switch.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from embbench._utils import (
    atomic_write_json,
    collection_name,
    l2_normalize_rows,
    metric_key,
    stable_hash,
)
from embbench.cache import EmbeddingCache, EmbeddingSet
from embbench.config import StageConfig, register_stage
from embbench.metrics import CLASSIFICATION_KEYS
from embbench.results import ResultStore
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

STAGE = "toptune"
MODE = "top-tuned"
TOPTUNE_VERSION = 1  # bump when this module changes what it computes


@register_stage("03_toptune")
class TopTuneConfig(StageConfig):
    """Parameters of stage 03, mirrored by ``notebooks/03_toptune.ipynb`` and its params file.

    The first block repeats stage 01's names with the same meaning, so one params overlay can
    shrink every stage; the second block is the search (the paper's budgets are the defaults).
    """

    models: list[str] = Field(default_factory=lambda: ["resnet50"])  # registry names
    weights: str = "pretrained"  # pretrained | random | auto | checkpoint path (of the embedder)
    datasets: list[str] = Field(default_factory=lambda: ["demo"])  # dataset registry names
    data_root: dict[str, str] = Field(default_factory=dict)  # dataset -> folder
    label: str = ""  # classification label and retrieval relevance; "" = the dataset's default
    protocol: Literal["", "within", "cross"] = ""  # retrieval protocol; "" = dataset default
    k: int = Field(5, ge=1, le=100)  # cut-off of the @k retrieval metrics
    max_images: int = Field(0, ge=0)  # per split, 0 = all (seeded, class-preserving subsample)
    batch_size: int = Field(64, ge=1)  # images per forward pass when embeddings are missing
    num_workers: int = Field(2, ge=0)  # DataLoader decoding processes (missing embeddings)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (for missing embeddings)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast dtype on CUDA
    backend: Literal["milvus", "exact"] = "milvus"  # retrieval backend
    milvus_uri: str = ""  # "" = Milvus Lite file runs/milvus.db; or http://host:19530
    tracking_uri: str = ""  # "" = sqlite runs/mlflow.db (or $MLFLOW_TRACKING_URI)
    experiment: str = "embbench"  # MLflow experiment name
    overwrite: Literal["never", "always"] = "never"  # never: skip finished cells, resume search
    seed: int = 0  # subsampling, weight initialisation and search seed

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

    hash_exclude = frozenset(
        {
            "models",
            "datasets",
            "data_root",
            "batch_size",
            "num_workers",
            "device",
            "backend",
            "milvus_uri",
            "tracking_uri",
            "experiment",
            "overwrite",
            "keras_backend",
        }
    )

    @field_validator("models", "datasets", "units", "activations", "optimizers", "clipvalue")
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

    @field_validator("units")
    @classmethod
    def _units(cls, v: list[int]) -> list[int]:
        if any(u < 1 for u in v):
            raise ValueError("every choice must be a positive number of units")
        return sorted(set(v))

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

    @field_validator("activations")
    @classmethod
    def _activations(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in ACTIVATIONS]
        if bad:
            raise ValueError(f"unknown activation(s) {bad}; choose from {list(ACTIVATIONS)}")
        return v

    @field_validator("optimizers")
    @classmethod
    def _optimizers(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if o not in OPTIMIZERS]
        if bad:
            raise ValueError(f"unknown optimizer(s) {bad}; choose from {list(OPTIMIZERS)}")
        return v

    @field_validator("clipvalue")
    @classmethod
    def _clip(cls, v: list[float]) -> list[float]:
        if any(c < 0 for c in v):
            raise ValueError("clip values must be >= 0 (0 = no clipping)")
        return sorted({float(c) for c in v})

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


# ---- keys and folders -------------------------------------------------------------------------
def _cache_key(es: EmbeddingSet) -> str:
    return str(es.meta.get("key") or (es.path.name if es.path else ""))


def cell_hash(cfg: TopTuneConfig, plan: Mapping[str, str], cache_keys: Mapping[str, str]) -> str:
    """The result record's hash: config, retrieval plan and the source embeddings' cache keys."""
    return stable_hash(
        {"cfg": cfg.config_hash(), "plan": dict(plan), "caches": dict(sorted(cache_keys.items()))}
    )


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


# ---- the stage --------------------------------------------------------------------------------
def run_toptune(cfg: TopTuneConfig, store: ResultStore | None = None) -> pd.DataFrame:
    """Top-tune every (model, dataset) cell of ``cfg``; one row per cell.

    Finished cells (same config, plan and source embeddings) are read back unless
    ``overwrite="always"``. Missing pretrained embeddings are computed (and cached) first.

    Returns:
        One row per cell: test classification metrics, top-tuned retrieval metrics, the
        pretrained baseline's metrics (``pretrained_<metric>``) on the same data, the search
        budget and outcome, and where the model and MLflow runs are.
    """
    from embbench.embed import embed_splits, embedding_cache
    from embbench.embed_stage import load_catalogue, retrieval_plan
    from embbench.models import create_embedder

    use_keras_backend(cfg.keras_backend)  # before anything below can import keras
    store = store or ResultStore()
    rows = []
    for dataset in cfg.datasets:
        cat = load_catalogue(dataset, cfg.data_root, cfg.max_images, cfg.seed)
        plan = retrieval_plan(dataset, cat, cfg.label, cfg.protocol)
        splits = required_splits(cat, plan, dataset)
        for model in cfg.models:
            embedder = create_embedder(model, weights=cfg.weights, device="cpu")
            keys = {s: embedding_cache(embedder, cat, s).key for s in splits}
            chash = cell_hash(cfg, plan, keys)
            done = store.get(STAGE, dataset, model, MODE, chash)
            if done and cfg.overwrite == "never":
                logger.info("skip top-tuning %s on %s: finished (%s)", model, dataset, chash)
                rows.append(result_row(done))
                continue
            t0 = time.perf_counter()
            sets = embed_splits(
                embedder, cat, splits, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                device=cfg.device, precision=cfg.precision,
            )
            record = toptune_cell(
                cfg,
                model=model,
                dataset=dataset,
                cat=cat,
                plan=plan,
                sets=sets,
                spec=embedder.spec,
                weights_used=embedder.weights_used,
                store=store,
                extra={"embed_wall_s": round(time.perf_counter() - t0, 3)},
            )
            rows.append(result_row(record))
    return pd.DataFrame(rows)


def toptune_cell(
    cfg: TopTuneConfig,
    *,
    model: str,
    dataset: str,
    cat,
    plan: Mapping[str, str],
    sets: Mapping[str, EmbeddingSet],
    spec,
    weights_used: Mapping[str, Any],
    store: ResultStore | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Top-tune one (model, dataset) cell from its cached embeddings; return its result record.

    Args:
        cfg: The stage config (search budget and space, retrieval settings, MLflow).
        model: Model name (for folders, records, MLflow).
        dataset: Dataset name.
        cat: The catalogue the embeddings were computed on (labels).
        plan: Retrieval plan (``label``, ``protocol``, ``query_split``, ``index_split``).
        sets: Split -> pretrained embeddings; train, val, test and the retrieval splits.
        spec: The model's spec (``family``, ``backbone``, ``paper_name``).
        weights_used: The embedder's weights description.
        store: Result store (default: the project's).
        extra: More fields for the record.

    Returns:
        The saved result record (see :func:`result_row` for the main fields).
    """
    import mlflow

    from embbench.tracking import setup_mlflow

    store = store or ResultStore()
    label = plan["label"]
    for split in (plan["query_split"], plan["index_split"]):
        if split not in sets:
            raise TopTuneError(
                f"top-tuning {model} on {dataset!r}: retrieval needs split {split!r} "
                f"(protocol {plan['protocol']!r}) but there are embeddings only for "
                f"{sorted(sets)}. Fix: embed that split."
            )
    keys = {s: _cache_key(es) for s, es in sets.items()}
    chash = cell_hash(cfg, plan, keys)
    done = store.get(STAGE, dataset, model, MODE, chash)
    if done and cfg.overwrite == "never":
        logger.info("skip top-tuning %s on %s: finished (%s)", model, dataset, chash)
        return done
    data = prepare_data(sets, cat, label, dataset=dataset, model=model)
    use_keras_backend(cfg.keras_backend)
    # keras: imported only now, after the configured backend is chosen
    from embbench.toptune import keras_model as K
    from embbench.toptune import search as S

    setup_mlflow(cfg.tracking_uri, cfg.experiment)

    base = toptune_dir(dataset, model)
    skey = search_key(cfg, label, keys)
    out_dir = base / f"final-{chash}"
    if cfg.overwrite == "always" and out_dir.exists():
        shutil.rmtree(out_dir)

    # ---- search (resumable) ----
    hypermodel = K.MLPHyperModel(SearchSpace(**cfg.search_space()), data.dim, len(data.classes))
    tuner = S.make_tuner(
        hypermodel,
        directory=base,
        project_name=f"search-{skey}",
        max_trials=cfg.max_trials,
        executions_per_trial=cfg.executions_per_trial,
        seed=cfg.seed,
        overwrite=cfg.overwrite == "always",
    )
    resumed = S.completed_trials(tuner)
    x_val, y_val = data.x[VAL][data.seen(VAL)], data.y[VAL][data.seen(VAL)]
    x_tr, y_tr = data.x[TRAIN], data.y[TRAIN]
    t0 = time.perf_counter()
    logger.info(
        "top-tuning %s on %s: %d trial(s) x %d execution(s) x %d epoch(s), %d classes, "
        "%d train / %d val embeddings of dim %d, Keras backend %s; %d trial(s) already done (%s)",
        model,
        dataset,
        cfg.max_trials,
        cfg.executions_per_trial,
        cfg.search_epochs,
        len(data.classes),
        len(y_tr),
        len(y_val),
        data.dim,
        K.keras_facts()["keras_backend"],
        resumed,
        tuner.project_dir,
    )
    n_new = S.run_search(
        tuner,
        x_tr,
        y_tr,
        x_val,
        y_val,
        epochs=cfg.search_epochs,
        batch_size=cfg.train_batch_size,
        seed=cfg.seed,
    )
    tuner_wall = time.perf_counter() - t0
    trials = S.trial_summaries(tuner)

    # ---- final training from the best checkpoint ----
    t0 = time.perf_counter()
    final_model, final = S.train_final(
        tuner,
        x_tr,
        y_tr,
        x_val,
        y_val,
        epochs=cfg.final_epochs,
        patience=cfg.patience,
        batch_size=cfg.train_batch_size,
        seed=cfg.seed,
    )
    final_wall = time.perf_counter() - t0
    best = next(t for t in trials if t["trial_id"] == final["best_trial"])
    hidden = K.hidden_layer_names(final_model)

    # ---- classification on test ----
    test_seen = data.seen(TEST)
    probs = K.predict(final_model, data.x[TEST])
    pred = data.classes[np.argmax(probs, axis=1)] if len(probs) else data.labels[TEST][:0]
    classification, cm_path = test_classification(data, pred, test_seen, out_dir)

    # ---- top-tuned embeddings of every split -> cache ----
    embed_model = K.embedding_model(final_model)
    model_path = K.save_model(final_model, out_dir / "model.keras")
    facts = K.keras_facts()
    meta = {
        "source_model": model,
        "source_dataset": dataset,
        "label": label,
        "classes": data.classes.tolist(),
        "input_dim": data.dim,
        "embed_dim": int(embed_model.outputs[0].shape[-1]),
        "hidden_layers": hidden,
        "hyperparameters": best["hyperparameters"],
        "input_normalization": "l2",
        "cell_hash": chash,
        "search_dir": str(tuner.project_dir),
        "source_caches": keys,
        **facts,
    }
    atomic_write_json(out_dir / "toptune.json", meta)
    tt_sets: dict[str, EmbeddingSet] = {}
    n_zero: dict[str, int] = {}
    for split, es in sets.items():
        vectors = K.predict(embed_model, data.x[split])
        n_zero[split] = fill_zero_rows(vectors, f"{model} on {dataset}/{split}")
        identity = {
            "source_cache": keys[split],
            "toptune": chash,
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

    # ---- MLflow: parent run with one child per trial ----
    run_tags = {
        "stage": STAGE,
        "mode": MODE,
        "model": model,
        "dataset": dataset,
        "family": getattr(spec, "family", ""),
        "backbone": getattr(spec, "backbone", ""),
        "config_hash": chash,
        "keras_backend": facts["keras_backend"],
    }
    parent_id = _log_search(
        cfg, run_tags, trials, best, final, classification, out_dir, model_path, cm_path, plan
    )

    # ---- retrieval: top-tuned and the pretrained baseline, same data, same code ----
    pretrained, pretrained_source = _pretrained_baseline(
        cfg, store, model=model, dataset=dataset, cat=cat, plan=plan, sets=sets
    )
    from embbench.embed_stage import score_and_record

    record = score_and_record(
        stage=STAGE,
        mode=MODE,
        model=model,
        dataset=dataset,
        cat=cat,
        plan=dict(plan),
        query=tt_sets[plan["query_split"]],
        index=tt_sets[plan["index_split"]],
        cfg=cfg,
        config_hash=chash,
        spec=spec,
        weights_used=dict(weights_used),
        extra={
            "classification": classification,
            "val_accuracy": final["val_accuracy"],
            "n_classes": len(data.classes),
            "n_unseen": data.n_unseen,
            "n_zero_embeddings": n_zero,
            "toptune_model_path": str(model_path),
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
            "tuner_wall_s": round(tuner_wall, 3),
            "final_fit_wall_s": round(final_wall, 3),
            "pretrained_metrics": pretrained,
            "pretrained_source": pretrained_source,
            "source_model": model,
            "source_dataset": dataset,
            "tuned_on": dataset,
            "source_caches": {s: str(es.path) for s, es in sets.items()},
            "toptuned_caches": {s: str(es.path) for s, es in tt_sets.items()},
            "mlflow_parent_run_id": parent_id,
            **(extra or {}),
        },
        store=store,
        tags={"mlflow.parentRunId": parent_id, "keras_backend": facts["keras_backend"]},
    )
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_metrics(
            {f"retrieval_{metric_key(k)}": float(v) for k, v in record["metrics"].items()}
        )
        if pretrained:
            mlflow.log_metrics(
                {f"pretrained_{metric_key(k)}": float(v) for k, v in pretrained.items()}
            )
    return record


def _log_search(
    cfg: TopTuneConfig,
    tags: dict,
    trials: list[dict],
    best: dict,
    final: dict,
    classification: dict,
    out_dir: Path,
    model_path: Path,
    cm_path: Path,
    plan: Mapping[str, str],
) -> str:
    """The cell's MLflow parent run (trials as child runs); returns its run id."""
    import mlflow

    from embbench.tracking import log_json_artifact, mlflow_run

    name = f"{STAGE}:{tags['model']}:{tags['dataset']}"
    params = {
        "config": cfg.model_dump(mode="json"),
        **dict(plan),
        "best": best["hyperparameters"],
        "best_trial": best["trial_id"],
    }
    with mlflow_run(name, tags={**tags, "run_kind": "search"}, params=params) as parent:
        for t in trials:
            with mlflow_run(
                f"{name}:trial-{t['trial_id']}",
                tags={
                    **tags,
                    "run_kind": "trial",
                    "trial_id": t["trial_id"],
                    "status": t["status"],
                },
                params=t["hyperparameters"],
                nested=True,
            ) as child:
                if t["score"] is not None:
                    mlflow.log_metric("objective_val_accuracy", t["score"])
                mlflow.log_metrics({f"best_{k}": v for k, v in t["metrics"].items()})
                _log_series(child.info.run_id, t["history"])
        _log_series(parent.info.run_id, final["history"], prefix="final_")
        mlflow.log_metrics(
            {
                "final_val_accuracy": final["val_accuracy"],
                "final_val_loss": final["val_loss"],
                "final_epochs_run": final["epochs_run"],
                **{f"test_{k}": float(v) for k, v in classification.items()},
            }
        )
        mlflow.log_artifact(str(model_path), artifact_path="model")
        mlflow.log_artifact(str(out_dir / "toptune.json"), artifact_path="model")
        mlflow.log_artifact(str(cm_path))
        log_json_artifact(
            [{k: v for k, v in t.items() if k != "history"} for t in trials], "trials.json"
        )
        return parent.info.run_id


def _log_series(run_id: str, series: Mapping[str, list[float]], prefix: str = "") -> None:
    """Log per-epoch values as metric steps in few batched calls (not one call per value)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"{prefix}{name}", float(v), now, step)
        for name, values in series.items()
        for step, v in enumerate(values)
        if np.isfinite(v)
    ]
    client = MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def _pretrained_baseline(
    cfg: TopTuneConfig,
    store: ResultStore,
    *,
    model: str,
    dataset: str,
    cat,
    plan: Mapping[str, str],
    sets: Mapping[str, EmbeddingSet],
) -> tuple[dict, str]:
    """The pretrained embeddings' retrieval metrics on exactly these caches.

    A stage-01 record on the same caches, label, protocol and k is reused; otherwise the
    metrics are computed here with the same retrieval code (not stored as a stage-01 record).
    """
    query, index = sets[plan["query_split"]], sets[plan["index_split"]]
    for rec in reversed(store.records("embed")):
        if (
            rec.get("model") == model
            and rec.get("dataset") == dataset
            and rec.get("mode") == "pretrained"
            and rec.get("caches", {}).get("query") == str(query.path)
            and rec.get("caches", {}).get("index") == str(index.path)
            and rec.get("label") == plan["label"]
            and rec.get("protocol") == plan["protocol"]
            and rec.get("k") == cfg.k
        ):
            src = store.path("embed", dataset, model, "pretrained", rec["config_hash"])
            return dict(rec["metrics"]), f"01_embed record {src}"
    from embbench.embed_stage import evaluate_embeddings

    result = evaluate_embeddings(
        l2_normalize_rows(query.vectors),
        l2_normalize_rows(index.vectors),
        query_labels=query.labels(cat.items, plan["label"]),
        index_labels=index.labels(cat.items, plan["label"]),
        protocol=plan["protocol"],
        k=cfg.k,
        backend=cfg.backend,
        milvus_uri=cfg.milvus_uri,
        collection=collection_name(dataset, model, "toptune_baseline"),
    )
    return {k: float(v) for k, v in result.summary.items()}, "computed by 03_toptune"


# ---- reading results --------------------------------------------------------------------------
def result_row(record: Mapping[str, Any]) -> dict:
    """The flat table row of a top-tuning record (what :func:`run_toptune` returns)."""
    metrics = dict(record.get("metrics", {}))
    pretrained = dict(record.get("pretrained_metrics") or {})
    row = {
        "model": record["model"],
        "dataset": record["dataset"],
        "mode": record["mode"],
        "family": record.get("family"),
        "label": record.get("label"),
        **{k: record.get("classification", {}).get(k) for k in CLASSIFICATION_KEYS},
        "val_accuracy": record.get("val_accuracy"),
        "n_classes": record.get("n_classes"),
        **metrics,
        **{f"pretrained_{k}": v for k, v in pretrained.items()},
        "hidden_layers": record.get("hidden_layers"),
        "n_trials": record.get("n_trials"),
        "n_new_trials": record.get("n_new_trials"),
        "best_trial": record.get("best_trial"),
        **{f"hp_{k}": v for k, v in (record.get("best_hyperparameters") or {}).items()},
        "keras_backend": record.get("keras_backend"),
        "tuner_wall_s": record.get("tuner_wall_s"),
        "final_fit_wall_s": record.get("final_fit_wall_s"),
        "config_hash": record.get("config_hash"),
        "toptune_model_path": record.get("toptune_model_path"),
        "mlflow_run_id": record.get("mlflow_run_id"),
        "mlflow_parent_run_id": record.get("mlflow_parent_run_id"),
    }
    for key in metrics:
        if key in pretrained:
            row[f"delta_{key}"] = metrics[key] - pretrained[key]
    return row


def trials_table(results: pd.DataFrame, store: ResultStore | None = None) -> pd.DataFrame:
    """One row per search trial of the cells in ``results`` (a :func:`run_toptune` table).

    Columns: model, dataset, trial (0-based), trial_id, status, val_accuracy (the trial's
    objective), best_so_far, and each hyperparameter.
    """
    store = store or ResultStore()
    rows = []
    for _, r in results.iterrows():
        rec = store.get(STAGE, r["dataset"], r["model"], MODE, r["config_hash"]) or {}
        best_so_far = -np.inf
        for i, t in enumerate(rec.get("trials", [])):
            score = t.get("score")
            if score is not None:
                best_so_far = max(best_so_far, score)
            rows.append(
                {
                    "model": r["model"],
                    "dataset": r["dataset"],
                    "trial": i,
                    "trial_id": t["trial_id"],
                    "status": t["status"],
                    "val_accuracy": score,
                    "best_so_far": best_so_far if np.isfinite(best_so_far) else None,
                    **t["hyperparameters"],
                }
            )
    return pd.DataFrame(rows)


def pretrained_vs_toptuned(results: pd.DataFrame, metric: str = "mMP@5") -> pd.DataFrame:
    """Long table (model, dataset, mode, value) of ``metric`` pretrained vs top-tuned."""
    names = {f"pretrained_{metric}": "pretrained", metric: "top-tuned"}
    cols = [c for c in names if c in results]
    wide = results[["model", "dataset", *cols]].rename(columns=names)
    return wide.melt(
        id_vars=["model", "dataset"],
        value_vars=[names[c] for c in cols],
        var_name="mode",
        value_name=metric,
    )


__all__ = [
    "TopTuneConfig",
    "cell_hash",
    "pretrained_vs_toptuned",
    "result_row",
    "run_toptune",
    "search_key",
    "toptune_cell",
    "trials_table",
]
