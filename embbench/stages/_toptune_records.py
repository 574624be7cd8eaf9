"""The records stage 03 writes, read back as tables: one row per cell, per trial, per mode."""

from __future__ import annotations

import numpy as np
import pandas as pd

from embbench.metrics import CLASSIFICATION_KEYS
from embbench.records import ResultRecord, ResultStore, record_row

STAGE = "toptune"
MODE = "top-tuned"

__all__ = ["MODE", "STAGE", "pretrained_vs_toptuned", "result_row", "trials_table"]


def result_row(record: ResultRecord) -> dict:
    """The flat table row of a top-tuning record (what :func:`run_toptune` returns)."""
    d = record.details
    return {
        **record_row(record),
        "label": record.label,
        **{k: record.classification.get(k) for k in CLASSIFICATION_KEYS},
        "balanced_accuracy": record.classification.get("balanced_accuracy"),
        "val_accuracy": record.val_accuracy,
        "n_classes": d.get("n_classes"),
        "hidden_layers": d.get("hidden_layers"),
        "n_trials": d.get("n_trials"),
        "n_new_trials": d.get("n_new_trials"),
        "best_trial": d.get("best_trial"),
        **{f"hp_{k}": v for k, v in (d.get("best_hyperparameters") or {}).items()},
        "keras_backend": d.get("keras_backend"),
        "train_s": record.timings.train_s,
        "toptune_model_path": record.toptune_model_path,
    }


def trials_table(results: pd.DataFrame, store: ResultStore | None = None) -> pd.DataFrame:
    """One row per search trial of the cells in ``results`` (a :func:`run_toptune` table).

    Columns: model, dataset, trial (0-based), trial_id, status, val_accuracy (the trial's
    objective), best_so_far, and each hyperparameter.
    """
    store = store or ResultStore()
    rows = []
    for _, r in results.iterrows():
        rec = store.get(STAGE, r["dataset"], r["model"], MODE, r["config_hash"])
        best_so_far = -np.inf
        for i, t in enumerate(rec.details.get("trials", []) if rec else []):
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
    if "task" in results:  # the probe and kNN rows have no retrieval metrics
        results = results[results["task"] == "image-image"]
    wide = results[["model", "dataset", *cols]].rename(columns=names)
    return wide.melt(
        id_vars=["model", "dataset"],
        value_vars=[names[c] for c in cols],
        var_name="mode",
        value_name=metric,
    )
