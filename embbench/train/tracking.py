"""The MLflow run of one training: opened (or reopened on resume), per-epoch metrics, closed.

MLflow is imported inside the functions: it is only needed on rank 0, and a training without
tracking (``experiment=""``) never loads it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embbench._utils import metric_key
from embbench.metrics import confusion_matrix
from embbench.models import get_model_spec
from embbench.tracking import log_json_artifact, log_params, provenance_tags, source_tags
from embbench.train.errors import FinetuneError
from embbench.train.job import TrainJob

logger = logging.getLogger(__name__)

__all__ = ["finish_run", "kill_run", "log_epoch", "start_run", "training_tags"]


def training_tags(job: TrainJob, recipe: str) -> dict[str, str]:
    """The training run's tags: provenance, what it trains, the model's family and backbone.

    The family and backbone group the training run with its cell's run in the MLflow UI.
    """
    spec = get_model_spec(job.model)
    return {
        **provenance_tags(),
        "stage": "finetune",
        "mode": "training",
        "model": job.model,
        "dataset": job.dataset,
        "recipe": recipe,
        "train_hash": job.train_hash,
        "family": spec.family,
        "backbone": spec.backbone,
    }


def start_run(
    experiment: str,
    *,
    run_id: str | None,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, Any],
) -> str:
    """Reopen ``run_id`` when it still exists, else create a run in ``experiment``; its id.

    The run is a child of the active run when there is one (the cell's run, opened by the
    cell engine), and is written through the client, so it never disturbs the active run.

    Raises:
        FinetuneError: The experiment does not exist (:func:`embbench.tracking.setup_mlflow`
            creates it).
    """
    import mlflow

    client = mlflow.MlflowClient()
    if run_id:
        try:
            client.update_run(run_id, status="RUNNING")
            return run_id
        except Exception as exc:  # deleted run, or another tracking store
            logger.warning("cannot reopen MLflow run %s (%s); starting a new one", run_id, exc)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise FinetuneError(
            f"MLflow experiment {experiment!r} does not exist; call "
            "embbench.tracking.setup_mlflow first (run_finetune does)"
        )
    tags = {**source_tags(), **tags}
    parent = mlflow.active_run()
    if parent is not None:
        tags = {**tags, "mlflow.parentRunId": parent.info.run_id}
    run = client.create_run(found.experiment_id, tags=tags, run_name=run_name)
    run_id = run.info.run_id
    log_params(params, run_id=run_id)
    return run_id


def log_epoch(run_id: str, stats: dict[str, float], epoch: int) -> None:
    """One epoch's statistics as metric steps (``val_mMP@5`` is logged as ``val_mMP_at_5``)."""
    import mlflow

    metrics = {metric_key(k): float(v) for k, v in stats.items()}
    mlflow.log_metrics(metrics, step=epoch, run_id=run_id)


def finish_run(run_id: str, summary: dict, test: dict, *, model_path: Path, run_dir: Path) -> None:
    """Log the summary, the headless model and the test confusion matrix; mark it finished.

    Args:
        run_id: The training's run.
        summary: The training summary (see :meth:`embbench.train.FineTuner.fit`).
        test: The test predictions (``y_true``, ``y_pred``).
        model_path: The headless state dict.
        run_dir: Where ``confusion_matrix.csv`` is written.
    """
    import mlflow

    metrics = {
        "train_wall_s": summary["train_wall_s"],
        "gpu_hours": summary["gpu_hours"],
        "lr_scaled": summary["lr_scaled"],
        **{f"test_{k}": v for k, v in summary["classification"].items()},
    }
    client = mlflow.MlflowClient()
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, run_id=run_id)
    mlflow.log_metric(
        "val_accuracy",
        float(summary["val_accuracy"]),
        step=max(summary["epochs"] - 1, 0),
        run_id=run_id,
    )
    log_json_artifact(summary, "summary.json", run_id=run_id)
    client.log_artifact(run_id, str(model_path), artifact_path="headless")
    if test["y_true"]:
        matrix, order = confusion_matrix(test["y_true"], test["y_pred"])
        rows, cols = np.nonzero(matrix)
        cm = pd.DataFrame(
            {
                "true": [order[i] for i in rows],
                "pred": [order[j] for j in cols],
                "count": matrix[rows, cols],
            }
        )
        cm_path = run_dir / "confusion_matrix.csv"
        cm.to_csv(cm_path, index=False)  # sparse: (true, pred, count) of non-zero cells
        client.log_artifact(run_id, str(cm_path))
    client.set_terminated(run_id, status="FINISHED")


def kill_run(run_id: str) -> None:
    """Mark an interrupted training's run as killed (never raises)."""
    import mlflow

    with contextlib.suppress(Exception):
        mlflow.MlflowClient().set_terminated(run_id, status="KILLED")
