"""Stage 04 (notebook ``04_crosstune``): does adapting on dataset A help retrieval on dataset B?

Two grids, both parameters:

- **Cross-tuning** (``finetuned_on`` x ``datasets``): each model fine-tuned on A by stage 02
  (found in ``runs_dir()/finetuned_models.json``, recipe ``recipe``; its classification head
  removed) embeds target B, and B's retrieval is scored exactly like stage 01 (mode
  ``cross-tuned``, record field ``source_dataset`` = A).
- **Cross-top-tuning** (``toptuned_on`` x ``datasets``): the MLP top-tuned on X by stage 03
  (:func:`embbench.toptune.load_toptuned`) maps the same backbone's pretrained embeddings of Y
  to its last hidden layer, and Y's retrieval is scored (mode ``cross-top-tuned``, record field
  ``tuned_on`` = X).

Every cell's record carries the same backbone's pretrained metrics on the target
(``pretrained_metrics``: the stage-01 record, computed through :func:`run_embed` when
missing), and the result table the differences (``delta_mMP@5``...): the paper's figure 7.
Cells whose record exists (same config hash) are skipped on rerun; missing sources (a model
not fine-tuned or top-tuned on a source yet) raise, naming the stage to run, unless
``skip_missing``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from embbench._utils import stable_hash
from embbench.config import StageConfig, register_stage
from embbench.results import ResultStore

logger = logging.getLogger(__name__)

STAGE = "crosstune"
CROSS_TUNED = "cross-tuned"
CROSS_TOP_TUNED = "cross-top-tuned"
CROSSTUNE_VERSION = 1  # bump when this module changes what it computes


class CrosstuneError(RuntimeError):
    """A cross-tuning cell cannot run; the message names the missing input and the fix."""


@register_stage("04_crosstune")
class CrosstuneConfig(StageConfig):
    """Parameters of stage 04, mirrored by ``notebooks/04_crosstune.ipynb`` and its params file."""

    models: list[str] = Field(default_factory=lambda: ["resnet50"])  # base registry names
    weights: str = "pretrained"  # weights of the pretrained baseline and top-tuning inputs
    recipe: Literal["A1", "A2", "A3"] = "A2"  # the 02_finetune recipe of the fine-tuned models
    finetuned_on: list[str] = Field(default_factory=list)  # source datasets A ([] = none)
    toptuned_on: list[str] = Field(default_factory=list)  # source datasets X ([] = none)
    datasets: list[str] = Field(default_factory=lambda: ["demo"])  # target datasets B / Y
    include_diagonal: bool = False  # also score source == target (stages 02/03 do already)
    skip_missing: bool = False  # skip cells whose source model is missing instead of failing
    data_root: dict[str, str] = Field(default_factory=dict)  # dataset -> folder
    label: str = ""  # relevance label on the targets; "" = each dataset's default
    protocol: Literal["", "within", "cross"] = ""  # retrieval protocol; "" = dataset default
    k: int = Field(5, ge=1, le=100)  # cut-off of the @k retrieval metrics
    max_images: int = Field(0, ge=0)  # per split, 0 = all (seeded, class-preserving)
    batch_size: int = Field(64, ge=1)  # images per forward pass (per GPU)
    num_workers: int = Field(2, ge=0)  # DataLoader decoding processes
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast dtype on CUDA
    backend: Literal["milvus", "exact"] = "milvus"  # retrieval backend
    milvus_uri: str = ""  # "" = Milvus Lite file runs/milvus.db; or http://host:19530
    tracking_uri: str = ""  # "" = sqlite runs/mlflow.db (or $MLFLOW_TRACKING_URI)
    experiment: str = "embbench"  # MLflow experiment name
    overwrite: Literal["never", "always"] = "never"  # recompute finished cells?
    seed: int = 0  # subsampling seed

    hash_exclude = frozenset(
        {
            "models",
            "finetuned_on",
            "toptuned_on",
            "datasets",
            "include_diagonal",
            "skip_missing",
            "data_root",
            "batch_size",
            "num_workers",
            "device",
            "backend",
            "milvus_uri",
            "tracking_uri",
            "experiment",
            "overwrite",
        }
    )

    @field_validator("models", "datasets")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one entry")
        return v

    @model_validator(mode="after")
    def _some_source(self) -> CrosstuneConfig:
        if not self.finetuned_on and not self.toptuned_on:
            raise ValueError(
                "finetuned_on and toptuned_on are both empty: name the datasets the models "
                "were fine-tuned (02_finetune) or top-tuned (03_toptune) on"
            )
        return self


def grid(cfg: CrosstuneConfig) -> list[dict[str, str]]:
    """The cells of ``cfg``: dicts with mode, model, source and target, in run order."""
    cells = []
    for target in cfg.datasets:
        for model in cfg.models:
            pairs = ((CROSS_TUNED, cfg.finetuned_on), (CROSS_TOP_TUNED, cfg.toptuned_on))
            for mode, sources in pairs:
                for source in sources:
                    if source == target and not cfg.include_diagonal:
                        continue
                    cells.append({"mode": mode, "model": model, "source": source, "target": target})
    return cells


class _Targets:
    """Per-run caches: target catalogues and plans, pretrained embedders and baselines."""

    def __init__(self, cfg: CrosstuneConfig, store: ResultStore) -> None:
        self.cfg = cfg
        self.store = store
        self._cats: dict[str, tuple[Any, dict]] = {}
        self._embedders: dict[str, Any] = {}
        self._baselines: dict[tuple[str, str], dict] = {}

    def catalogue(self, dataset: str) -> tuple[Any, dict]:
        if dataset not in self._cats:
            from embbench.embed_stage import load_catalogue, retrieval_plan

            cat = load_catalogue(dataset, self.cfg.data_root, self.cfg.max_images, self.cfg.seed)
            self._cats[dataset] = (
                cat,
                retrieval_plan(dataset, cat, self.cfg.label, self.cfg.protocol),
            )
        return self._cats[dataset]

    def pretrained_embedder(self, model: str):
        if model not in self._embedders:
            from embbench.models import create_embedder

            self._embedders[model] = create_embedder(model, weights=self.cfg.weights)
        return self._embedders[model]

    def embed(self, embedder, dataset: str) -> dict[str, Any]:
        """The (cached) embedding sets of the splits the target's retrieval plan needs."""
        from embbench.embed import embed_splits

        cat, plan = self.catalogue(dataset)
        cfg = self.cfg
        return embed_splits(
            embedder, cat, sorted({plan["query_split"], plan["index_split"]}),
            batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device,
            precision=cfg.precision, progress=False,
        )

    def baseline(self, model: str, dataset: str) -> dict:
        """Stage 01's record of ``model`` pretrained on ``dataset`` (run now when missing)."""
        key = (model, dataset)
        if key not in self._baselines:
            from embbench.embed_stage import EmbedConfig, run_embed

            cfg = self.cfg
            ecfg = EmbedConfig(
                models=[model],
                weights=cfg.weights,
                datasets=[dataset],
                data_root=cfg.data_root,
                label=cfg.label,
                protocol=cfg.protocol,
                k=cfg.k,
                max_images=cfg.max_images,
                batch_size=cfg.batch_size,
                num_workers=cfg.num_workers,
                device=cfg.device,
                precision=cfg.precision,
                backend=cfg.backend,
                milvus_uri=cfg.milvus_uri,
                tracking_uri=cfg.tracking_uri,
                experiment=cfg.experiment,
                overwrite="never",
                seed=cfg.seed,
            )
            row = run_embed(ecfg, store=self.store).iloc[0].to_dict()
            metric_names = [c for c in row if "@" in c]
            self._baselines[key] = {
                "metrics": {m: float(row[m]) for m in metric_names},
                "mlflow_run_id": row.get("mlflow_run_id"),
                "weights": row.get("weights"),
            }
        return self._baselines[key]


def run_crosstune(cfg: CrosstuneConfig, store: ResultStore | None = None) -> pd.DataFrame:
    """Score every cell of the grid (skipping finished ones); one row per cell.

    Returns:
        Columns: mode, model, source, dataset (the target), the retrieval metrics, the
        pretrained metrics (``pretrained_<metric>``) and their differences (``delta_<metric>``),
        the source model used, and the MLflow run id. Missing cells (``skip_missing``) have a
        ``status`` saying what to run.

    Raises:
        CrosstuneError: A source model is missing (unless ``skip_missing``); the message lists
            every missing cell and the stage to run.
    """
    from embbench.finetune import register_finetuned_models
    from embbench.tracking import setup_mlflow

    store = store or ResultStore()
    setup_mlflow(cfg.tracking_uri, cfg.experiment)
    register_finetuned_models()
    cells = grid(cfg)
    sources = {id(c): _find_source(cfg, c, store) for c in cells}
    missing = [c for c in cells if sources[id(c)] is None]
    if missing and not cfg.skip_missing:
        raise CrosstuneError(
            "missing source models for "
            + "; ".join(_missing_text(cfg, c) for c in missing)
            + ". Run those stages first, or set skip_missing=True."
        )
    targets = _Targets(cfg, store)
    rows = []
    for c in cells:
        src = sources[id(c)]
        if src is None:
            logger.warning("skipping %s", _missing_text(cfg, c))
            rows.append({**_cell_cols(c), "status": "missing: " + _missing_text(cfg, c)})
            continue
        if c["mode"] == CROSS_TUNED:
            record = _cross_tuned_cell(cfg, c, src, targets, store)
        else:
            record = _cross_top_tuned_cell(cfg, c, src, targets, store)
        rows.append(result_row(record))
    return pd.DataFrame(
        rows, columns=None if rows else ["mode", "model", "source", "dataset", "status"]
    )


def _cell_cols(c: dict) -> dict:
    return {"mode": c["mode"], "model": c["model"], "source": c["source"], "dataset": c["target"]}


def _missing_text(cfg: CrosstuneConfig, c: dict) -> str:
    if c["mode"] == CROSS_TUNED:
        return (
            f"{c['model']} fine-tuned on {c['source']} with recipe {cfg.recipe} "
            f"(02_finetune models=[{c['model']}] datasets=[{c['source']}] recipe={cfg.recipe})"
        )
    return (
        f"{c['model']} top-tuned on {c['source']} "
        f"(03_toptune models=[{c['model']}] datasets=[{c['source']}])"
    )


def _find_source(cfg: CrosstuneConfig, c: dict, store: ResultStore) -> dict | None:
    """The fine-tuned index entry, or the newest top-tuning record, of a cell's source."""
    if c["mode"] == CROSS_TUNED:
        from embbench.finetune import find_finetuned

        return find_finetuned(c["model"], c["source"], cfg.recipe)
    from embbench.models import get_model_spec

    name = get_model_spec(c["model"]).name
    hits = [
        r
        for r in store.records("toptune")
        if r.get("model") in (c["model"], name)
        and r.get("dataset") == c["source"]
        and r.get("mode") == "top-tuned"
        and r.get("toptune_model_path")
    ]
    return max(hits, key=lambda r: r.get("saved", "")) if hits else None


def _cross_tuned_cell(cfg, c: dict, entry: dict, targets: _Targets, store: ResultStore) -> dict:
    """Embed target B with the model fine-tuned on A; score; record the pretrained baseline."""
    from embbench.embed import embedding_cache
    from embbench.embed_stage import score_and_record
    from embbench.models import create_embedder

    model, source, target = c["model"], c["source"], c["target"]
    cat, plan = targets.catalogue(target)
    name = entry["spec"]["name"]
    embedder = create_embedder(name, device="cpu")
    splits = sorted({plan["query_split"], plan["index_split"]})
    keys = {s: embedding_cache(embedder, cat, s).key for s in splits}
    chash = stable_hash(
        {
            "cfg": cfg.config_hash(),
            "source": source,
            "train_hash": entry.get("train_hash"),
            "sha256": entry.get("sha256"),
            "plan": plan,
            "caches": keys,
            "version": CROSSTUNE_VERSION,
        }
    )
    done = store.get(STAGE, target, model, CROSS_TUNED, chash)
    if done and cfg.overwrite == "never":
        logger.info("skip %s %s -> %s: finished (%s)", model, source, target, chash)
        return done
    baseline = targets.baseline(model, target)
    t0 = time.perf_counter()
    sets = targets.embed(embedder, target)
    record = score_and_record(
        stage=STAGE,
        mode=CROSS_TUNED,
        model=model,
        dataset=target,
        cat=cat,
        plan=plan,
        query=sets[plan["query_split"]],
        index=sets[plan["index_split"]],
        cfg=cfg,
        config_hash=chash,
        spec=embedder.spec,
        weights_used=embedder.weights_used,
        extra={
            "source_dataset": source,
            "finetuned_model": name,
            "recipe": entry.get("recipe"),
            "train_hash": entry.get("train_hash"),
            "checkpoint": entry["spec"].get("checkpoint_path"),
            "checkpoint_sha256": entry.get("sha256"),
            "pretrained_metrics": baseline["metrics"],
            "pretrained_mlflow_run_id": baseline["mlflow_run_id"],
            "pretrained_weights": baseline["weights"],
            "embed_wall_s": round(time.perf_counter() - t0, 3),
            "crosstune_version": CROSSTUNE_VERSION,
        },
        store=store,
        tags={"source_dataset": source, "recipe": str(entry.get("recipe"))},
    )
    _log_deltas(record)
    return record


def _cross_top_tuned_cell(
    cfg, c: dict, source_record: dict, targets: _Targets, store: ResultStore
) -> dict:
    """Apply the MLP top-tuned on X to Y's pretrained embeddings; score on Y."""
    from embbench.cache import EmbeddingCache
    from embbench.embed import embedding_cache
    from embbench.embed_stage import score_and_record
    from embbench.toptune import load_toptuned

    model, source, target = c["model"], c["source"], c["target"]
    cat, plan = targets.catalogue(target)
    embedder = targets.pretrained_embedder(model)
    splits = sorted({plan["query_split"], plan["index_split"]})
    keys = {s: embedding_cache(embedder, cat, s).key for s in splits}
    tuner_id = {
        "toptune_hash": source_record.get("config_hash"),
        "toptune_model_path": source_record.get("toptune_model_path"),
    }
    chash = stable_hash(
        {
            "cfg": cfg.config_hash(),
            "tuned_on": source,
            **tuner_id,
            "plan": plan,
            "caches": keys,
            "version": CROSSTUNE_VERSION,
        }
    )
    done = store.get(STAGE, target, model, CROSS_TOP_TUNED, chash)
    if done and cfg.overwrite == "never":
        logger.info("skip %s top-tuned %s -> %s: finished (%s)", model, source, target, chash)
        return done
    source_kind = (source_record.get("weights_used") or {}).get("kind")
    if source_kind and source_kind != embedder.weights_used.get("kind"):
        logger.warning(
            "%s: the MLP top-tuned on %s took %s embeddings, the target's are %s; set weights "
            "as in 03_toptune",
            model,
            source,
            source_kind,
            embedder.weights_used.get("kind"),
        )
    baseline = targets.baseline(model, target)
    t0 = time.perf_counter()
    sets = targets.embed(embedder, target)
    mlp = load_toptuned(source_record)
    derived = {}
    for split, es in sets.items():
        identity = {
            "source_cache": keys[split],
            **tuner_id,
            "mode": CROSS_TOP_TUNED,
            "tuned_on": source,
            "normalized": False,
            "crosstune_version": CROSSTUNE_VERSION,
        }
        cache = EmbeddingCache(target, model, split, identity)
        if cache.is_complete() and cfg.overwrite == "never":
            derived[split] = cache.load()
            continue
        vectors = (
            mlp.embed(np.asarray(es.vectors))
            if len(es.vectors)
            else np.zeros((0, mlp.embed_dim), np.float32)
        )
        derived[split] = cache.save_complete(
            vectors,
            es.item_ids,
            provenance={"toptune_model_path": str(mlp.path), "tuned_on": source},
            failed=list(es.failed),
        )
    record = score_and_record(
        stage=STAGE,
        mode=CROSS_TOP_TUNED,
        model=model,
        dataset=target,
        cat=cat,
        plan=plan,
        query=derived[plan["query_split"]],
        index=derived[plan["index_split"]],
        cfg=cfg,
        config_hash=chash,
        spec=embedder.spec,
        weights_used=embedder.weights_used,
        extra={
            "tuned_on": source,
            "source_dataset": source,
            "toptune_record_hash": source_record.get("config_hash"),
            "toptune_model_path": str(mlp.path),
            "toptune_label": mlp.label,
            "source_caches": {s: str(es.path) for s, es in sets.items()},
            "pretrained_metrics": baseline["metrics"],
            "pretrained_mlflow_run_id": baseline["mlflow_run_id"],
            "pretrained_weights": baseline["weights"],
            "embed_wall_s": round(time.perf_counter() - t0, 3),
            "crosstune_version": CROSSTUNE_VERSION,
        },
        store=store,
        tags={"tuned_on": source, "source_dataset": source},
    )
    _log_deltas(record)
    return record


def _deltas(record: dict) -> dict[str, float]:
    pre = record.get("pretrained_metrics") or {}
    return {k: float(v) - float(pre[k]) for k, v in record["metrics"].items() if k in pre}


def _log_deltas(record: dict) -> None:
    """Add the differences from pretrained to the cell's MLflow run."""
    import mlflow

    from embbench.embed_stage import _metric_key

    run_id = record.get("mlflow_run_id")
    deltas = _deltas(record)
    if run_id and deltas:
        client = mlflow.MlflowClient()
        for k, v in deltas.items():
            client.log_metric(run_id, f"delta_{_metric_key(k)}", v)
    logger.info(
        "%s %s on %s (from %s): %s",
        record["mode"],
        record["model"],
        record["dataset"],
        record.get("source_dataset"),
        ", ".join(f"delta {k} {v:+.4f}" for k, v in deltas.items()),
    )


def result_row(record: dict) -> dict:
    """The flat table row of a cross-tuning record."""
    metrics = dict(record.get("metrics", {}))
    pre = dict(record.get("pretrained_metrics") or {})
    return {
        "mode": record["mode"],
        "model": record["model"],
        "source": record.get("source_dataset"),
        "dataset": record["dataset"],
        "family": record.get("family"),
        **metrics,
        **{f"pretrained_{k}": v for k, v in pre.items()},
        **{f"delta_{k}": v for k, v in _deltas(record).items()},
        "source_model": record.get("finetuned_model") or record.get("toptune_model_path"),
        "n_queries": record.get("n_queries"),
        "config_hash": record.get("config_hash"),
        "mlflow_run_id": record.get("mlflow_run_id"),
        "status": "done",
    }


def delta_matrix(results: pd.DataFrame, mode: str, metric: str = "mMP@5") -> pd.DataFrame:
    """Source x target table of the mean ``delta_<metric>`` over models (figure 7's numbers).

    Args:
        results: A :func:`run_crosstune` table.
        mode: ``cross-tuned`` or ``cross-top-tuned``.
        metric: The retrieval metric.

    Returns:
        Rows = source dataset (fine-tuned or top-tuned on), columns = target dataset.
    """
    col = f"delta_{metric}"
    sub = results[(results["mode"] == mode)] if "mode" in results else results.iloc[:0]
    if col not in sub or sub.empty:
        return pd.DataFrame()
    return sub.pivot_table(index="source", columns="dataset", values=col, aggfunc="mean")


__all__ = [
    "CROSS_TOP_TUNED",
    "CROSS_TUNED",
    "CrosstuneConfig",
    "CrosstuneError",
    "delta_matrix",
    "grid",
    "result_row",
    "run_crosstune",
]
