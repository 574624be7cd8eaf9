"""The two kfp components: one-line wrappers around :mod:`embbench.pipeline.task`.

Kubeflow ships each function's source into every task (a lightweight Python component), so
the bodies are one import and one call into the image's embbench. ``cell_key`` and
``grid_key`` are inputs only so that the task cache is keyed by them. Only
:mod:`embbench.pipeline.build` imports this module, inside its functions (kfp is optional).
"""

# No ``from __future__ import annotations``: kfp reads the annotations as types.
from kfp.dsl import HTML, Output


def run_cell(
    params: str,
    notebook: str,
    model: str,
    dataset: str,
    mode: str,
    source: str,
    cell_key: str,
    milvus_uri: str,
    tracking_uri: str,
    nproc: int = 1,
    task: str = "image-image",
):
    """Run one cell of the grid with ``embbench run-cell``."""
    # kfp ships this body alone into the task container: its imports must be inside it
    from embbench.pipeline.task import run_cell_task

    run_cell_task(
        params, notebook, model, dataset, mode, source, milvus_uri, tracking_uri, nproc, task
    )


def render_report(params: str, grid_key: str, tracking_uri: str, report: Output[HTML]):
    """Render notebook 05 with ``embbench report`` into the task's HTML artifact."""
    # kfp ships this body alone into the task container: its imports must be inside it
    from embbench.pipeline.task import render_report_task

    render_report_task(params, tracking_uri, report.path)
