"""A finished fine-tuning's headless model, registered by name (for ``01_embed``) and in MLflow.

Called by :mod:`embbench.stages.finetune` (which re-exports :func:`register_trained`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from embbench.models import create_embedder, get_model_spec
from embbench.models.finetuned import finetuned_name, register_finetuned
from embbench.train import TrainJob

logger = logging.getLogger(__name__)

__all__ = ["register_in_mlflow", "register_trained"]


def register_trained(cell: TrainJob, summary: Mapping[str, Any], registry: dict | None) -> Any:
    """Register a finished training's headless model by name and list it in the index.

    The index entry records the weights the training started from (``start_weights``), so
    every later use of the model (01, 04) can say whether it began from pretrained weights.
    """
    base = get_model_spec(cell.model)
    dc = dict(summary["eval_data_config"])
    dc["input_size"] = tuple(dc["input_size"])
    recipe = summary["recipe"]
    return register_finetuned(
        finetuned_name(cell.model, cell.dataset, recipe),
        cell.model,
        cell.model_path.resolve(),
        paper_name=f"{base.paper_name} (fine-tuned on {cell.dataset}, {recipe})",
        notes=(
            f"fine-tuned from {base.name} on {cell.dataset} with recipe {recipe} "
            f"(training {cell.train_hash}, MLflow run {summary.get('mlflow_run_id')})"
        ),
        data_config=dc,
        extra_model_kwargs=summary.get("extra_model_kwargs", {}),
        index_entry={
            "dataset": cell.dataset,
            "recipe": recipe,
            "label": summary["label"],
            "train_hash": cell.train_hash,
            "sha256": summary.get("model_sha256"),
            "val_accuracy": summary["val_accuracy"],
            "start_weights": summary.get("embedder_weights") or {},
            "mlflow_run_id": summary.get("mlflow_run_id"),
            "mlflow_registry": registry,
        },
        overwrite=True,
    )


def register_in_mlflow(spec_name: str) -> dict | None:
    """Log the headless model into the cell's run and register it (stores with a registry)."""
    import mlflow
    import torch

    run = mlflow.active_run()
    if run is None:
        return None
    try:
        # a retried or resumed cell reopens its run: the version it registered is the one
        # (the client's search: mlflow 3.17's fluent one fails on its own default max_results)
        done = mlflow.MlflowClient().search_model_versions(
            f"name='{spec_name}' and run_id='{run.info.run_id}'"
        )
        if done:
            v = max(done, key=lambda mv: int(mv.version))
            logger.info("%s: version %s registered by this run already", spec_name, v.version)
            return {"name": spec_name, "version": str(v.version), "model_uri": v.source}
        embedder = create_embedder(spec_name, device="cpu")
        model = embedder.model.eval()
        requirements = [f"torch=={torch.__version__.split('+')[0]}", "timm"]
        log_model = functools.partial(
            mlflow.pytorch.log_model,
            model,
            name="model",
            pip_requirements=requirements,
            registered_model_name=spec_name,
        )
        try:
            # The safe graph format (torch.export), not a pickle that runs code when loaded.
            example = np.zeros((1, *embedder.input_size), np.float32)
            info = log_model(serialization_format="pt2", input_example=example)
        except Exception as exc:  # an architecture torch.export cannot trace
            logger.info(
                "%s: torch.export failed (%s: %s); logging the model as a pickle",
                spec_name,
                type(exc).__name__,
                exc,
            )
            info = log_model(serialization_format="pickle")
        version = getattr(info, "registered_model_version", None)
        return {"name": spec_name, "version": version, "model_uri": info.model_uri}
    except Exception as exc:  # file stores have no registry; a server may refuse
        logger.warning(
            "could not register %s in MLflow's model registry (%s: %s); the state "
            "dict is still logged with the training run",
            spec_name,
            type(exc).__name__,
            exc,
        )
        return None
