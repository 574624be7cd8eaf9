"""Records written before the current schema, read as current ones.

``schema_version`` 1 records (flat dicts written by the first landing) keep every value: known
fields move to their typed place (lineage, timings, provenance), the rest goes to ``details``.
Facts other stages read (e.g. ``toptune_model_path``) left in ``details`` by older version 2
records move to their typed fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SCHEMA_VERSION = 2

_V1_TOP = {
    "stage", "mode", "model", "dataset", "config_hash", "family", "backbone", "paper_name",
    "backend", "protocol", "label", "query_split", "index_split", "k", "metrics", "n_queries",
    "n_lone", "n_index", "embed_dim", "classification", "val_accuracy", "pretrained_metrics",
    "config", "dataset_fingerprint", "dataset_root", "caches", "failed_images",
    "per_query_file", "mlflow_run_id", "saved",
}  # fmt: skip
_V1_PROVENANCE = ("git_sha", "git_dirty", "versions", "python", "platform")
_V1_DROPPED = ("weights_used", "weights_kind", "wall_s", "embed_wall_s", "search_wall_s",
               "train_wall_s", "tuner_wall_s", "final_fit_wall_s", "gpu_hours", "source_dataset",
               "tuned_on", "recipe", "source_model")  # fmt: skip


def migrate_record(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A record of any schema version as a current-schema mapping.

    Version 1 records (flat dicts written by the first landing) keep every value: known fields
    move to their typed place (lineage, timings, provenance), the rest goes to ``details``.
    """
    if int(raw.get("schema_version", 1)) >= SCHEMA_VERSION:
        return _promote(dict(raw))
    old = dict(raw)
    weights = dict(old.get("weights_used") or {})
    mode = old.get("mode")
    source = old.get("source_dataset") or old.get("finetuned_on")
    finetuned = mode in ("fine-tuned", "cross-tuned")
    toptuned = mode in ("top-tuned", "cross-top-tuned")
    if mode == "fine-tuned":
        source = old.get("dataset")
    if mode == "top-tuned":
        source = old.get("tuned_on") or old.get("dataset")
    cfg = old.get("config") or {}
    lineage = {
        "base_model": old.get("model", ""),
        "weights": weights,
        "weights_kind": str(old.get("weights_kind") or weights.get("kind") or "unknown"),
        "finetuned_on": source if finetuned else None,
        "finetune_recipe": old.get("recipe") if finetuned else None,
        # v1 did not record the fine-tuning's starting weights; its config's `weights` did
        "finetune_start": (_kind(cfg.get("weights")) if finetuned else None),
        "toptuned_on": (old.get("tuned_on") or source) if toptuned else None,
    }
    timings = {
        "embed_s": old.get("embed_wall_s"),
        "search_s": old.get("search_wall_s"),
        "train_s": _sum(
            old.get("train_wall_s"), old.get("tuner_wall_s"), old.get("final_fit_wall_s")
        ),
        "wall_s": old.get("wall_s"),
        "gpu_hours": old.get("gpu_hours"),
    }
    new: dict[str, Any] = {k: old[k] for k in _V1_TOP if k in old and old[k] is not None}
    new["classification"] = {
        k: float(v)
        for k, v in (old.get("classification") or {}).items()
        if isinstance(v, int | float)
    }
    new["schema_version"] = SCHEMA_VERSION
    new["lineage"] = lineage
    new["timings"] = {k: v for k, v in timings.items() if v is not None}
    new["provenance"] = {k: old[k] for k in _V1_PROVENANCE if k in old}
    new["caches"] = {k: str(v) for k, v in (old.get("caches") or {}).items()}
    skip = _V1_TOP | set(_V1_PROVENANCE) | set(_V1_DROPPED)
    new["details"] = {k: v for k, v in old.items() if k not in skip}
    new["details"]["migrated_from"] = 1
    return _promote(new)


# read by other stages: typed fields since issue 24 (a flat ``task`` lands in details first)
_PROMOTED = ("toptune_model_path", "task")


def _promote(rec: dict[str, Any]) -> dict[str, Any]:
    """Move the facts other stages read out of ``details`` into their typed fields.

    Records written before tasks existed (no ``task``) were image->image retrieval.
    """
    details = rec.get("details")
    if isinstance(details, Mapping) and any(k in details for k in _PROMOTED):
        details = dict(details)
        for key in _PROMOTED:
            if key in details:
                value = details.pop(key)
                rec.setdefault(key, value)
        rec["details"] = details
    rec.setdefault("task", "image-image")
    return rec


def _kind(weights: Any) -> str | None:
    if weights in (None, ""):
        return None
    return str(weights) if weights in ("pretrained", "random", "auto") else "checkpoint"


def _sum(*values: Any) -> float | None:
    nums = [float(v) for v in values if isinstance(v, int | float)]
    return round(sum(nums), 3) if nums else None


__all__ = ["SCHEMA_VERSION", "migrate_record"]
