"""A top-tuning cell's search in MLflow: one nested child run per trial, the final fit's series.

Called by :mod:`embbench.stages.toptune` inside the cell's active run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from embbench.tracking import log_json_artifact, log_params, mlflow_run

__all__ = ["log_search", "log_series"]


def log_search(
    trials: list[dict],
    best: dict,
    final: dict,
    classification: dict,
    out_dir: Path,
    model_path: Path,
    cm_path: Path,
) -> None:
    """The search, into the cell's active MLflow run, with one nested child run per trial."""
    import mlflow

    parent = mlflow.active_run()
    if parent is None:
        return
    log_params({"best": best["hyperparameters"], "best_trial": best["trial_id"]})
    grouping = {
        k: v
        for k, v in parent.data.tags.items()
        if k in ("stage", "model", "dataset", "family", "backbone", "weights")
    }
    for t in trials:
        tags = {**grouping, "run_kind": "trial", "trial_id": t["trial_id"], "status": t["status"]}
        with mlflow_run(
            f"{parent.info.run_name}/trial-{t['trial_id']}",
            tags=tags,
            params=t["hyperparameters"],
            nested=True,
        ) as child:
            if t["score"] is not None:
                mlflow.log_metric("objective_val_accuracy", t["score"])
            mlflow.log_metrics({f"best_{k}": v for k, v in t["metrics"].items()})
            log_series(child.info.run_id, t["history"])
    log_series(parent.info.run_id, final["history"], prefix="final_")
    mlflow.log_metrics(
        {"final_val_loss": final["val_loss"], "final_epochs_run": final["epochs_run"]}
    )
    mlflow.log_artifact(str(model_path), artifact_path="model")
    mlflow.log_artifact(str(out_dir / "toptune.json"), artifact_path="model")
    mlflow.log_artifact(str(cm_path))
    log_json_artifact(
        [{k: v for k, v in t.items() if k != "history"} for t in trials], "trials.json"
    )


def log_series(run_id: str, series: Mapping[str, list[float]], prefix: str = "") -> None:
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
