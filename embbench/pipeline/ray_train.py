"""Stage 02 on Ray Train: the DDP path of :mod:`embbench.stages.finetune` in a ``TorchTrainer``.

Ray Train starts ``num_workers`` worker processes (one per GPU, or CPU workers), joins them in
one torch process group (NCCL on GPUs, gloo on CPUs) and sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``, exactly what ``torchrun`` does; every worker then runs stage 02's grid through
the cell engine, as each rank of ``torchrun -m embbench.stages.finetune`` does: data sharded
per rank, gradients synchronised by DDP, rank 0 alone writing checkpoints, records and the
MLflow runs. A worker lost with its node fails the attempt; with ``max_failures`` Ray Train
starts the group again and the training resumes from its last checkpoint.

Ray is optional (``pip install 'embbench[ray]'``): it is imported inside the functions.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from embbench._ray import connect, import_ray
from embbench.paths import runs_dir
from embbench.stages.finetune import FinetuneConfig, run_finetune

logger = logging.getLogger(__name__)


def finetune_loop(config: Mapping[str, Any]) -> None:
    """The body of every Ray Train worker: stage 02's grid, this worker one rank of it."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:  # the worker's folder is not the driver's
        params = Path(tmp) / "02_finetune.yaml"
        params.write_text(config["params_yaml"])
        cfg = FinetuneConfig.from_files(params)
    table = run_finetune(cfg)  # rank 0 returns the rows; the other ranks take part only
    ray.train.report({"cells": len(table)})


def finetune_on_ray_train(
    files: Sequence[str | Path],
    overrides: Mapping[str, Any] | None = None,
    *,
    num_workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1,
    max_failures: int = 0,
    address: str = "",
) -> dict[str, Any]:
    """Run stage 02 with ``num_workers`` DDP workers of a Ray Train ``TorchTrainer``.

    Args:
        files: Stage 02's layered params files.
        overrides: Config overrides (``--set``).
        num_workers: Training processes (the DDP world size).
        use_gpu: One GPU per worker (NCCL); else CPU workers (gloo).
        cpus_per_worker: CPUs each worker asks for.
        max_failures: Restarts of the worker group after a lost worker (each resumes from the
            last checkpoint).
        address: The Ray cluster (see :func:`embbench._ray.connect`); ""
            starts Ray here for the run.

    Returns:
        Rank 0's last report (``cells``: the cells it finished).

    Raises:
        ConfigError: A params file is invalid (before Ray starts).
        RayRunError: Ray is missing or the cluster unreachable.
    """
    cfg = FinetuneConfig.from_files(*files, **dict(overrides or {}))  # a bad file: said here
    params_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    ray = import_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    connect(ray, address)
    try:
        trainer = TorchTrainer(
            finetune_loop,
            train_loop_config={"params_yaml": params_yaml},
            scaling_config=ScalingConfig(
                num_workers=num_workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": cpus_per_worker},
            ),
            run_config=RunConfig(
                name="finetune",
                storage_path=str(runs_dir() / "ray_train"),
                failure_config=FailureConfig(max_failures=max_failures),
            ),
        )
        result = trainer.fit()
    finally:
        ray.shutdown()
    return dict(result.metrics or {})


__all__ = ["finetune_loop", "finetune_on_ray_train"]
