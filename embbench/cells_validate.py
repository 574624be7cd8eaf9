"""The cell engine's pre-work check: every problem of a grid, found before the first cell runs.

Every model, dataset, data root, label, protocol and the retrieval backend are checked (and
every dataset loaded and planned) before any work, so a typo in the fifth model fails in
seconds, not after four models have run. The stage adds its own checks; the Milvus server is
probed when the grid needs one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from embbench._registry import UnknownNameError, did_you_mean
from embbench.catalogue import CatalogueError
from embbench.config import ConfigError, GridConfig
from embbench.datasets import list_datasets, register_user_catalogues
from embbench.models import get_model_spec
from embbench.retrieval import list_backends
from embbench.services import ServiceUnreachableError, check_milvus, check_storage


class GridError(ConfigError):
    """The grid cannot run: every problem found before the first cell, with its fix."""


def validate_grid(
    cfg: GridConfig,
    models: Iterable[str],
    datasets: Iterable[str],
    load: Callable[[str], object],
    stage_check: Callable[[], list[str]],
    *,
    probe_milvus: bool = True,
) -> None:
    """Check the whole grid before any work.

    Args:
        cfg: The stage config.
        models: The grid's models.
        datasets: The grid's datasets.
        load: Loads and plans one dataset (raising on a bad catalogue, label or split).
        stage_check: The stage's own problems, asked only when the shared checks pass.
        probe_milvus: Probe the Milvus server when the grid needs one (the main process only).

    Raises:
        StorageError: The cache, runs or reports folder cannot be written (read-only, full).
        GridError: Listing every problem found (unknown models and datasets with close
            matches, an unknown backend, a missing split or label), each with its fix.
    """
    check_storage()
    problems: list[str] = []
    # a user's catalogue is named by its data_root key (cache, records, MLflow, report)
    register_user_catalogues(cfg.data_root)
    if cfg.backend not in list_backends():
        problems.append(f"backend {cfg.backend!r} is unknown; choose one of {list_backends()}")
    for model in dict.fromkeys(models):
        try:
            get_model_spec(model)
        except UnknownNameError as exc:
            problems.append(str(exc))
    known = set(list_datasets())
    for dataset in dict.fromkeys(datasets):
        if dataset not in known:
            problems.append(did_you_mean(dataset, sorted(known), "dataset"))
            continue
        try:
            load(dataset)
        except (CatalogueError, GridError, ValueError, TypeError) as exc:
            problems.append(f"dataset {dataset!r}: {exc}")
    if not problems:
        problems += stage_check()
    if probe_milvus and (cfg.backend == "milvus" or getattr(cfg, "indexes", 0)):
        try:
            check_milvus(cfg.milvus_uri, os.environ.get("MILVUS_TOKEN", ""))
        except ServiceUnreachableError as exc:
            problems.append(str(exc))
    if problems:
        raise GridError(
            f"{len(problems)} problem(s) in the grid, found before running any cell:\n- "
            + "\n- ".join(problems)
        )


__all__ = ["GridError", "validate_grid"]
