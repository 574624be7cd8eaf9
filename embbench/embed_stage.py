"""Stage 01 (notebook ``01_embed``): pretrained embeddings -> retrieval metrics.

For every (model, dataset) cell: load the catalogue, embed the splits the retrieval protocol
needs (cached, resumable), search with the chosen backend (Milvus by default, built from the
cache; or the exact in-process backend), score mMP@k, mR@1, MAP@k, MRR@k, NDCG@k, write a result
record and log one MLflow run. Finished cells are skipped unless ``overwrite="always"``.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from embbench._utils import stable_hash
from embbench.config import StageConfig, register_stage
from embbench.results import ResultStore

logger = logging.getLogger(__name__)


@register_stage("01_embed")
class EmbedConfig(StageConfig):
    """Parameters of stage 01, mirrored by ``notebooks/01_embed.ipynb`` and its params file."""

    models: list[str] = Field(default_factory=lambda: ["resnet50"])  # registry names
    weights: str = "pretrained"  # pretrained | random | auto (pretrained, else random) | ckpt path
    datasets: list[str] = Field(default_factory=lambda: ["demo"])  # dataset registry names
    data_root: dict[str, str] = Field(
        default_factory=dict
    )  # dataset -> folder; default data/<name>
    label: str = ""  # label column for relevance; "" = the dataset's default
    protocol: Literal["", "within", "cross"] = ""  # "" = the dataset's default
    k: int = Field(5, ge=1, le=100)  # cut-off of the @k metrics
    max_images: int = Field(0, ge=0)  # per split, 0 = all (seeded, class-preserving subsample)
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
        }
    )

    @field_validator("models", "datasets")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one entry")
        return v


def load_catalogue(name: str, data_root: dict[str, str], max_images: int = 0, seed: int = 0):
    """Create the catalogue ``name`` (root from ``data_root`` or the default) and subsample it."""
    from embbench.datasets import create_catalogue

    root = data_root.get(name) or None
    cat = create_catalogue(name, root)
    return cat.subset(max_images, seed=seed)


def retrieval_plan(name: str, cat, label: str = "", protocol: str = "") -> dict:
    """Label column, protocol and query/index splits for dataset ``name`` (overrides win)."""
    from embbench.datasets import get_dataset_info

    info = get_dataset_info(name) if name in _dataset_names() else None
    # The six public datasets have curated defaults; a user's catalogue keeps its own label.
    label = label or (info.default_label if info and info.public else cat.default_label)
    protocol = protocol or (info.protocol if info else "within")
    query_split = info.query_split if info else "test"
    index_split = info.index_split if info else query_split
    if protocol == "within":
        index_split = query_split
    elif index_split == query_split:
        index_split = "train"
    for split in {query_split, index_split}:
        if split not in cat.splits:
            raise ValueError(
                f"dataset {name!r}: protocol {protocol!r} needs split {split!r}, "
                f"the catalogue has {cat.splits}"
            )
    if label not in cat.label_columns:
        raise ValueError(f"dataset {name!r}: label {label!r} not among {list(cat.label_columns)}")
    return {
        "label": label,
        "protocol": protocol,
        "query_split": query_split,
        "index_split": index_split,
    }


def _dataset_names() -> list[str]:
    from embbench.datasets import list_datasets

    return list_datasets()


def evaluate_embeddings(
    query,
    index,
    *,
    query_labels,
    index_labels,
    protocol: str,
    k: int,
    backend: str,
    milvus_uri: str = "",
    collection: str = "embbench",
):
    """L2-normalise and score one query/index pair with the chosen backend."""
    from embbench.retrieval import create_backend, search_and_evaluate

    kwargs = (
        {"uri": milvus_uri or None, "collection_prefix": collection} if backend == "milvus" else {}
    )
    be = create_backend(backend, **kwargs)
    try:
        return search_and_evaluate(
            np.asarray(query),
            query_labels,
            np.asarray(index),
            index_labels,
            k=k,
            protocol=protocol,
            backend=be,
        )
    finally:
        close = getattr(be, "close", None)
        if close:
            close()


def run_embed(cfg: EmbedConfig, store: ResultStore | None = None) -> pd.DataFrame:
    """Run every (model, dataset) cell of ``cfg``; return one row per cell with its metrics."""
    from embbench.embed import embed_splits
    from embbench.models import create_embedder
    from embbench.tracking import setup_mlflow

    store = store or ResultStore()
    setup_mlflow(cfg.tracking_uri, cfg.experiment)
    rows = []
    for dataset in cfg.datasets:
        cat = load_catalogue(dataset, cfg.data_root, cfg.max_images, cfg.seed)
        plan = retrieval_plan(dataset, cat, cfg.label, cfg.protocol)
        for model in cfg.models:
            embedder = create_embedder(model, weights=cfg.weights, device="cpu")
            splits = sorted({plan["query_split"], plan["index_split"]})
            from embbench.embed import embedding_cache

            keys = {s: embedding_cache(embedder, cat, s).key for s in splits}
            chash = stable_hash({"cfg": cfg.config_hash(), "plan": plan, "caches": keys})
            done = store.get("embed", dataset, model, "pretrained", chash)
            if done and cfg.overwrite == "never":
                logger.info("skip %s on %s: finished (%s)", model, dataset, chash)
                rows.append(_row(done))
                continue
            t0 = time.perf_counter()
            sets = embed_splits(
                embedder, cat, splits, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                device=cfg.device, precision=cfg.precision,
            )
            record = score_and_record(
                stage="embed",
                mode="pretrained",
                model=model,
                dataset=dataset,
                cat=cat,
                plan=plan,
                query=sets[plan["query_split"]],
                index=sets[plan["index_split"]],
                cfg=cfg,
                config_hash=chash,
                spec=embedder.spec,
                weights_used=embedder.weights_used,
                extra={"embed_wall_s": time.perf_counter() - t0},
                store=store,
            )
            rows.append(_row(record))
    return pd.DataFrame(rows)


def score_and_record(
    *,
    stage: str,
    mode: str,
    model: str,
    dataset: str,
    cat,
    plan: dict,
    query,
    index,
    cfg,
    config_hash: str,
    spec,
    weights_used: dict,
    extra: dict | None = None,
    store: ResultStore,
    tags: dict | None = None,
) -> dict:
    """Evaluate cached query/index sets, save the result record and log one MLflow run.

    Shared by every stage that produces embeddings (pretrained, top-tuned, fine-tuned,
    cross-tuned), so their numbers compare one to one.
    """
    import mlflow

    from embbench.tracking import log_json_artifact, mlflow_run, provenance

    t0 = time.perf_counter()
    q_labels = query.labels(cat.items, plan["label"])
    i_labels = index.labels(cat.items, plan["label"])
    result = evaluate_embeddings(
        query.vectors,
        index.vectors,
        query_labels=q_labels,
        index_labels=i_labels,
        protocol=plan["protocol"],
        k=cfg.k,
        backend=cfg.backend,
        milvus_uri=cfg.milvus_uri,
        collection=_collection_name(dataset, model, mode),
    )
    failed = list(query.failed) + ([] if index is query else list(index.failed))
    record = {
        "stage": stage,
        "mode": mode,
        "model": model,
        "dataset": dataset,
        "config_hash": config_hash,
        "config": cfg.model_dump(mode="json"),
        "family": spec.family,
        "backbone": spec.backbone,
        "paper_name": spec.paper_name,
        "weights_used": weights_used,
        "weights_kind": weights_used.get("kind"),
        **plan,
        "k": cfg.k,
        "backend": cfg.backend,
        "metrics": result.summary,
        "n_queries": result.n_queries,
        "n_lone": result.n_lone,
        "n_index": int(len(index.vectors)),
        "embed_dim": int(query.vectors.shape[1]),
        "dataset_fingerprint": cat.fingerprint(),
        "dataset_root": cat.root,
        "caches": {"query": str(query.path), "index": str(index.path)},
        "failed_images": failed,
        "search_wall_s": round(time.perf_counter() - t0, 3),
        **(extra or {}),
        **provenance(),
    }
    record["wall_s"] = round(
        sum(v for k, v in record.items() if k.endswith("wall_s") and isinstance(v, int | float)), 3
    )
    run_tags = {
        "stage": stage,
        "mode": mode,
        "model": model,
        "dataset": dataset,
        "family": spec.family,
        "backbone": spec.backbone,
        "weights": str(weights_used.get("kind")),
        "config_hash": config_hash,
        **(tags or {}),
    }
    with mlflow_run(
        f"{stage}:{model}:{dataset}:{mode}",
        tags=run_tags,
        params={"config": record["config"], **plan, "weights_used": weights_used, "k": cfg.k},
    ) as run:
        mlflow.log_metrics({_metric_key(k): float(v) for k, v in result.summary.items()})
        mlflow.log_metrics(
            {"n_queries": result.n_queries, "n_lone": result.n_lone, "n_failed_images": len(failed)}
        )
        record["mlflow_run_id"] = run.info.run_id
        log_json_artifact(record, "result.json")
        if failed:
            log_json_artifact(failed, "failed_images.json")
    path = store.save(
        record,
        per_query={
            **{k: v for k, v in result.per_query.items()},
            "query_index": result.query_index,
        },
    )
    logger.info(
        "%s %s %s on %s: %s (record %s)",
        stage,
        mode,
        model,
        dataset,
        ", ".join(f"{k}={v:.4f}" for k, v in result.summary.items()),
        path,
    )
    return record


def _collection_name(*parts: str) -> str:
    """A valid Milvus collection name (letters, digits, underscores; starts with a letter)."""
    name = re.sub(r"\W", "_", "_".join(parts))
    return name if name[:1].isalpha() else f"c_{name}"


def _metric_key(name: str) -> str:
    """MLflow metric names cannot hold '@': mMP@5 -> mMP_at_5."""
    return name.replace("@", "_at_")


def _row(record: dict) -> dict:
    from embbench.metrics import metric_names

    metrics = record["metrics"]
    ordered = {m: metrics[m] for m in metric_names(record.get("k", 5)) if m in metrics}
    return {
        "model": record["model"],
        "dataset": record["dataset"],
        "mode": record["mode"],
        "family": record.get("family"),
        "weights": record.get("weights_kind"),
        **ordered,
        "n_queries": record.get("n_queries"),
        "n_lone": record.get("n_lone"),
        "n_failed": len(record.get("failed_images", [])),
        "mlflow_run_id": record.get("mlflow_run_id"),
    }


__all__ = [
    "EmbedConfig",
    "run_embed",
    "score_and_record",
    "retrieval_plan",
    "load_catalogue",
    "evaluate_embeddings",
]
