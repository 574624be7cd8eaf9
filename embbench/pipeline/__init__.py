"""The grid on Kubeflow Pipelines or Ray: one task per cell, run by the cell engine.

- :mod:`embbench.pipeline.grid`: the cell tasks and their order, read from the params files, and
  :func:`run_one_cell` (``embbench run-cell``), the one thing a task runs;
- :mod:`embbench.pipeline.build`: the kfp pipeline (resources, retries, caching, secrets,
  volume), :func:`compile_pipeline` and :func:`run_local` (kfp's local runner);
- :mod:`embbench.pipeline.components`: the task bodies (they call the ``embbench`` CLI);
- :mod:`embbench.pipeline.ray_grid`: the same grid on a Ray cluster (``embbench ray run``), one
  Ray task per cell; :mod:`embbench.pipeline.ray_train`: stage 02's DDP path on Ray Train.
  Stage 01's extraction on a Ray Data actor pool (``embed_engine: ray``) is a building block,
  :mod:`embbench.embed_ray`, that the cells of either runner can use.

kfp and Ray are optional dependencies (``pip install .[pipeline]``, ``.[ray]``): importing this
package imports neither.
"""

from __future__ import annotations

from embbench.pipeline.build import (
    DEFAULT_RESOURCES,
    SECRET_ENV,
    PipelineOptions,
    TaskResources,
    build_pipeline,
    compile_pipeline,
    run_local,
)
from embbench.pipeline.grid import (
    CellSelectError,
    CellTask,
    PipelineGrid,
    group_params,
    pipeline_grid,
    run_one_cell,
)

__all__ = [
    "DEFAULT_RESOURCES",
    "SECRET_ENV",
    "CellSelectError",
    "PipelineOptions",
    "CellTask",
    "PipelineGrid",
    "TaskResources",
    "build_pipeline",
    "compile_pipeline",
    "group_params",
    "pipeline_grid",
    "run_local",
    "run_one_cell",
]
