"""A cell's one MLflow run: resumed when a crash left it open, and the record logged into it.

The cell engine runs each cell inside exactly one MLflow run. :func:`cell_run` finds a run of the
same cell (config hash, stage, mode) that an earlier attempt left ``RUNNING`` or ``FAILED`` and
resumes it, else starts a new one (named by :func:`embbench.tracking.run_name`, nested under
a deployment variant's plain cell). :func:`log_record` logs a finished record's tags, parameters,
metrics and JSON artifacts into the active run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from embbench._utils import metric_key
from embbench.records import ResultRecord
from embbench.tracking import cell_params, log_json_artifact, log_params, mlflow_run, run_name

logger = logging.getLogger(__name__)


@contextmanager
def cell_run(
    *,
    stage: str,
    mode: str,
    model: str,
    dataset: str,
    config_hash: str,
    tags: Mapping[str, str],
    source: str | None = None,
    variant: str | None = None,
    task: str = "image-image",
    parent_run_id: Callable[[], str | None] = lambda: None,
    on_start: Callable[[], None] = lambda: None,
) -> Iterator[Any]:
    """The cell's one MLflow run: a run left RUNNING or FAILED by a crash is resumed.

    Args:
        stage: The record's stage name.
        mode: The cell's mode.
        model: The zoo model name.
        dataset: The dataset scored.
        config_hash: The cell's hash (a run of another hash is another cell's).
        tags: The tags a new run starts with.
        source: The dataset the model was tuned on (cross-tuning cells).
        variant: The cell's deployment variant.
        task: The cell's task; other tasks than image-image end the run's name.
        parent_run_id: Called for a new run only: the run to nest it under, or ``None``.
        on_start: Called inside a new run only, before the cell's work (e.g. to log its input).

    Yields:
        The active MLflow run.
    """
    import mlflow

    stale = mlflow.search_runs(
        filter_string=f"tags.config_hash = '{config_hash}' and tags.stage = '{stage}' and "
        f"tags.mode = '{mode}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    if stale:
        logger.info(
            "resuming MLflow run %s of %s %s %s on %s, left %s by an earlier attempt",
            stale[0].info.run_id,
            stage,
            mode,
            model,
            dataset,
            stale[0].info.status,
        )
        with mlflow.start_run(run_id=stale[0].info.run_id) as run:
            yield run
        return
    top = "top-" if "top" in mode else ""
    origin = f"{top}from-{source}" if source else None
    name = run_name(stage, model, dataset, origin, variant, None if task == "image-image" else task)
    with mlflow_run(name, tags=dict(tags), parent_run_id=parent_run_id()) as run:
        on_start()
        yield run


def record_metrics(record: ResultRecord) -> dict[str, float]:
    """The MLflow metrics of a record: retrieval, test classification, baseline and deltas."""
    metrics: dict[str, Any] = {metric_key(k): v for k, v in record.metrics.items()}
    metrics.update({f"test_{k}": v for k, v in record.classification.items()})
    metrics.update({f"pretrained_{metric_key(k)}": v for k, v in record.pretrained_metrics.items()})
    metrics.update(
        {
            f"delta_{metric_key(k)}": v - record.pretrained_metrics[k]
            for k, v in record.metrics.items()
            if k in record.pretrained_metrics
        }
    )
    if record.val_accuracy is not None:
        metrics["val_accuracy"] = record.val_accuracy
    metrics.update(
        n_queries=record.n_queries, n_lone=record.n_lone, n_failed_images=len(record.failed_images)
    )
    return {k: float(v) for k, v in metrics.items()}


def log_record(
    record: ResultRecord,
    own_params: Mapping[str, Any],
    cell: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
) -> None:
    """Log a finished record into the active MLflow run.

    Args:
        record: The cell's record.
        own_params: The stage config's own fields (the hash-excluded ones left out).
        cell: The cell's identity (stage, mode, model, dataset, source, variant, data root).
        tags: Extra tags the stage asked for.
    """
    import mlflow

    lin = record.lineage
    mlflow.set_tags(
        {
            "family": record.family,
            "backbone": record.backbone,
            "weights": lin.weights_kind,
            "lineage": lin.describe(),
            "backend": record.backend,
            **({"tuned_on": record.tuned_on} if record.tuned_on else {}),
            **(tags or {}),
        }
    )
    log_params(
        cell_params(
            own_params,
            {
                **cell,
                **record.model_dump(include={"label", "protocol", "query_split", "index_split"}),
            },
        )
    )
    mlflow.log_metrics(record_metrics(record))
    log_json_artifact(record.model_dump(mode="json"), "result.json")
    if record.failed_images:
        log_json_artifact(record.failed_images, "failed_images.json")


__all__ = ["cell_run", "log_record", "record_metrics"]
