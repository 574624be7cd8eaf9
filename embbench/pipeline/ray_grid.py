"""The grid on a Ray cluster: one Ray task per cell, run by the cell engine (``embbench ray run``).

The same cells, order and task body as the Kubeflow pipeline (:mod:`embbench.pipeline.build`):

- every cell of :func:`~embbench.pipeline.grid.pipeline_grid` is one Ray task that runs
  :func:`~embbench.pipeline.grid.run_one_cell` (what ``embbench run-cell`` runs) on a worker;
  a cell asking for several GPUs runs ``embbench run-cell`` under torchrun inside its task;
- the stage order is the tasks' dependencies: a task is given the results of the cells it waits
  for, so Ray starts it only once they have finished (03 after 01, 04 after 02 and 03 ...);
- resources per stage (:data:`DEFAULT_RAY_RESOURCES`): GPUs for embedding and fine-tuning when
  the cluster has any, CPUs for top-tuning and retrieval; a cell that asks for more than any
  node has is refused before any work; a stage 01 cell with ``embed_engine: ray`` asks for no
  GPU by default: it drives a Ray Data actor pool (:mod:`embbench.embed_ray`) that takes them;
- a task lost with its node (or its worker process) is run again elsewhere, up to
  ``max_retries`` times; the cell engine makes the retry resume, not repeat: finished cells are
  read back, a killed training resumes from its checkpoint, embedding caches from their
  finished shards, and the cell's MLflow run left RUNNING is reopened (one run per cell);
- the data, the embedding cache, the records and MLflow are shared by path (``EMBBENCH_*``
  folders on a shared file system, forwarded to the workers) or by URI (``--tracking-uri``,
  ``--milvus-uri``); a Milvus Lite file is one process's, so concurrent cells need a server;
- one progress line per finished cell.

Ray is optional (``pip install 'embbench[ray]'``): it is imported inside the functions.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from embbench._ray import RAY_INSTALL, RayRunError, connect, import_ray, worker_env
from embbench.pipeline.grid import (
    REPORT_NOTEBOOK,
    CellTask,
    PipelineGrid,
    check_stages,
    pipeline_grid,
    run_one_cell,
)
from embbench.pipeline.task import run_cell_task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayResources:
    """What one cell task asks Ray for.

    Attributes:
        cpus: Logical CPUs (``num_cpus``).
        gpus: GPUs (``num_gpus``); a cell with more than one runs under torchrun.
    """

    cpus: float = 1
    gpus: float = 0


# By mode. GPUs are asked for only on a cluster that has some (``gpus="auto"``).
DEFAULT_RAY_RESOURCES: dict[str, RayResources] = {
    "pretrained": RayResources(1, 1),
    "fine-tuned": RayResources(2, 1),
    "top-tuned": RayResources(1, 0),
    "cross-tuned": RayResources(1, 1),
    "cross-top-tuned": RayResources(1, 0),
    "report": RayResources(1, 0),
}


@dataclass(frozen=True)
class RayOptions:
    """How the grid runs on Ray (everything that is not a params file).

    Attributes:
        address: ``auto`` (the running cluster of this machine), ``host:6379`` or
            ``ray://host:10001``; "" starts a Ray instance on this machine for the run.
        resources: Mode -> resources asked; missing modes take :data:`DEFAULT_RAY_RESOURCES`.
            Modes given here are asked for as given, GPUs included.
        gpus: ``auto`` (default resources ask GPUs only when the cluster has some), ``none``
            (never) or ``require`` (the defaults' GPUs are asked; the cluster must have them).
        max_retries: Times a cell task is run again after its node or worker was lost.
        milvus_uri: Milvus URI of every cell ("" = the params').
        tracking_uri: MLflow tracking URI of every cell ("" = the params').
        num_cpus: CPUs of a Ray instance started here (address ""); 0 = all.
    """

    address: str = ""
    resources: Mapping[str, RayResources] = field(default_factory=dict)
    gpus: str = "auto"
    max_retries: int = 3
    milvus_uri: str = ""
    tracking_uri: str = ""
    num_cpus: int = 0


@dataclass
class RayGridResult:
    """What ``embbench ray run`` did: one result per cell (grid order) and the report's path."""

    cells: list[dict] = field(default_factory=list)
    report: str | None = None
    wall_s: float = 0.0


# -------------------------------------------------------------------------------- options
def parse_resources(items: Sequence[str]) -> dict[str, RayResources]:
    """``--resources MODE=CPUS,GPUS`` items (e.g. ``fine-tuned=8,4``) by mode.

    Raises:
        RayRunError: An item that is not ``MODE=CPUS,GPUS`` with numbers.
    """
    resources = {}
    for item in items:
        mode, _, spec = item.partition("=")
        cpus, gpus = (spec.split(",") + ["", ""])[:2]
        try:
            resources[mode] = RayResources(float(cpus or 1), float(gpus or 0))
        except ValueError as exc:
            raise RayRunError(f"--resources {item!r}: expected MODE=CPUS,GPUS ({exc})") from exc
    return resources


# -------------------------------------------------------------------------------- resources
def _nodes(ray: Any) -> list[dict[str, float]]:
    """The alive nodes' total resources."""
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def plan_resources(
    grid: PipelineGrid, options: RayOptions, nodes: Sequence[Mapping[str, float]]
) -> dict[str, RayResources]:
    """Cell key -> what its task asks for; checked against the cluster's nodes.

    Raises:
        RayRunError: A cell asks for more CPUs or GPUs than any node has (before any work),
            or ``gpus="require"`` on a cluster without GPUs.
    """
    if options.gpus not in ("auto", "none", "require"):
        raise RayRunError(f"--gpus {options.gpus!r}: choose auto, none or require")
    has_gpus = any(n.get("GPU", 0) > 0 for n in nodes)
    plan: dict[str, RayResources] = {}
    problems: list[str] = []
    for c in grid.cells:
        mode = c.cell.mode
        res = options.resources.get(mode)
        if res is None:
            res = DEFAULT_RAY_RESOURCES.get(mode, RayResources())
            if options.gpus == "none" or (options.gpus == "auto" and not has_gpus):
                res = replace(res, gpus=0)
            if "\nembed_engine: ray\n" in f"\n{c.params_yaml}":  # its actors take the GPUs
                res = replace(res, gpus=0)
        if not any(n.get("CPU", 0) >= res.cpus and n.get("GPU", 0) >= res.gpus for n in nodes):
            problems.append(f"{c.label} asks for {res.cpus:g} CPU(s) and {res.gpus:g} GPU(s)")
        plan[c.key] = res
    if problems:
        have = "; ".join(
            f"node {i}: {n.get('CPU', 0):g} CPU(s), {n.get('GPU', 0):g} GPU(s)"
            for i, n in enumerate(nodes)
        )
        raise RayRunError(
            f"{len(problems)} cell(s) ask for more than any node of the cluster has, e.g. "
            f"{problems[0]}; the cluster: {have or 'no alive node'}. Fix: add GPU nodes, or "
            "ask for less (--resources MODE=CPUS,GPUS, or --gpus none to run on CPUs)"
        )
    return plan


# ----------------------------------------------------------------------------- the task body
def run_cell_on_worker(
    task: CellTask, overrides: Mapping[str, Any], nproc: int, *_after: Any
) -> dict:
    """The body of a cell's Ray task: the cell through the cell engine, as ``run-cell`` does.

    ``_after`` are the results of the cells this one waits for (Ray passes them only once they
    have finished: that is the dependency).

    Returns:
        The cell's key and label, where and how long it ran, and its record's summary.
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / f"{task.notebook}.yaml"
        params.write_text(task.params_yaml)
        c = task.cell
        if nproc > 1:  # several GPUs: torchrun inside the task (the Kubeflow task's way)
            run_cell_task(
                _params_json(task),
                task.notebook,
                c.model,
                c.dataset,
                c.mode,
                c.source or "",
                str(overrides.get("milvus_uri", "")),
                str(overrides.get("tracking_uri", "")),
                nproc,
                c.task,
            )
        record = run_one_cell(
            task.notebook,
            [params],
            overrides,
            model=c.model,
            dataset=c.dataset,
            mode=c.mode,
            source=c.source or "",
            task=c.task,
        )  # under torchrun above: read back, not recomputed
    return {
        "key": task.key,
        "label": task.label,
        "node": _node_id(),
        "pid": os.getpid(),
        "wall_s": round(time.perf_counter() - t0, 3),
        "record": None if record is None else _record_summary(record),
    }


def _node_id() -> str:
    """The Ray node this task runs on (the host name outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # not in a Ray worker
        return socket.gethostname()


def _params_json(task: CellTask) -> str:
    import json

    return json.dumps({task.notebook: task.params_yaml})


# what a cell task returns of its record to the driver (a small, picklable summary)
_SUMMARY_FIELDS = ("stage", "mode", "task", "model", "dataset", "config_hash", "saved")


def _record_summary(record: Any) -> dict:
    summary = {name: getattr(record, name) for name in _SUMMARY_FIELDS}
    return {**summary, "metrics": dict(record.metrics or {}), "mlflow_run_id": record.mlflow_run_id}


def render_report_on_worker(report_yaml: str, tracking_uri: str, *_after: Any) -> str:
    """The report task: ``embbench report`` with the grid's 05 params; the HTML's path.

    Raises:
        RuntimeError: ``embbench report`` failed or did not say where it wrote.
    """
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / f"{REPORT_NOTEBOOK}.yaml"
        params.write_text(report_yaml)
        cmd = [sys.executable, "-m", "embbench", "report", "-f", str(params)]
        cmd += ["--set", f"tracking_uri={tracking_uri}"] if tracking_uri else []
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"embbench report exited with {done.returncode}: {done.stderr[-2000:]}")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("report:")]
    if not lines:
        raise RuntimeError("embbench report did not say where it wrote the report")
    return lines[-1].split(":", 1)[1].strip()


# ---------------------------------------------------------------------------------- the driver
def _check_milvus(grid: PipelineGrid, options: RayOptions) -> None:
    """Cells running side by side cannot share a Milvus Lite file (one process holds it)."""
    if options.milvus_uri:
        return
    lite = [
        c.label
        for c in grid.cells
        if "backend: milvus" in c.params_yaml and "milvus_uri: ''" in c.params_yaml
    ]
    if lite:
        raise RayRunError(
            f"{len(lite)} cell(s) search a Milvus Lite file (backend: milvus, no milvus_uri), "
            f"e.g. {lite[0]}: one process holds such a file, and Ray runs cells side by side. "
            "Fix: give a Milvus server (--milvus-uri http://HOST:19530; `milvus-lite server "
            "--data-dir DIR --port N` for a small one) or set backend: exact"
        )


def _failure(label: str, exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{label}: {type(cause).__name__}: {text[-1] if text else ''}"


def run_on_ray(
    params: Mapping[str, Sequence[str | Path]],
    options: RayOptions | None = None,
    *,
    on_result: Callable[[dict], None] | None = None,
) -> RayGridResult:
    """Run every cell of ``params``' grid as a Ray task (and the report after them).

    Args:
        params: Notebook -> layered params files (as for the Kubeflow pipeline).
        options: Cluster address, resources, retries, URIs.
        on_result: Called on the driver with each finished cell's result, in finishing order.

    Returns:
        One result per cell in grid order, the report's path (when 05 was given), wall time.

    Raises:
        ConfigError: A params file is invalid (before connecting).
        GridError: The engine's up-front checks of stages 01-03 failed (before connecting).
        RayRunError: Ray is missing, the cluster unreachable or too small (before any work),
            or cells failed (after the others finished; the message lists them).
    """
    options = options or RayOptions()
    ray = import_ray()
    grid = pipeline_grid(params)
    _check_milvus(grid, options)
    overrides = {
        k: v
        for k, v in (("milvus_uri", options.milvus_uri), ("tracking_uri", options.tracking_uri))
        if v
    }
    check_stages(params, overrides)  # what the engine checks before a notebook's first cell
    t0 = time.perf_counter()
    connect(ray, options.address, num_cpus=options.num_cpus)
    try:
        plan = plan_resources(grid, options, _nodes(ray))
        cell_task = ray.remote(run_cell_on_worker)
        refs: dict[str, Any] = {}
        for c in grid.cells:  # grid order is stage order: a cell's prerequisites come first
            res = plan[c.key]
            refs[c.key] = cell_task.options(
                num_cpus=res.cpus,
                num_gpus=res.gpus,
                max_retries=options.max_retries,
                retry_exceptions=False,  # only a lost node or worker is retried
                name=c.label,
            ).remote(c, overrides, max(int(res.gpus), 1), *[refs[k] for k in c.after if k in refs])
        results, failed = _collect(ray, grid, refs, on_result)
        report = None
        if grid.report_yaml is not None and not failed:
            res = options.resources.get("report") or DEFAULT_RAY_RESOURCES["report"]
            report_task = ray.remote(render_report_on_worker).options(
                num_cpus=res.cpus, max_retries=options.max_retries, name="05 report"
            )
            report = ray.get(
                report_task.remote(grid.report_yaml, options.tracking_uri, *refs.values())
            )
            logger.info("report: %s", report)
    finally:
        ray.shutdown()
    if failed:
        raise RayRunError(
            f"{len(failed)} of {len(grid.cells)} cell(s) failed on the Ray cluster (cells "
            "waiting for them did not run):\n- " + "\n- ".join(failed)
        )
    by_key = {r["key"]: r for r in results}
    return RayGridResult(
        [by_key[c.key] for c in grid.cells], report, round(time.perf_counter() - t0, 3)
    )


def _collect(
    ray: Any, grid: PipelineGrid, refs: Mapping[str, Any], on_result: Callable | None
) -> tuple[list[dict], list[str]]:
    """Wait for every cell task, one progress line each; return the results and the failures."""
    labels = {ref: grid.by_key()[key].label for key, ref in refs.items()}
    pending, results, failed = list(refs.values()), [], []
    n = len(pending)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ref = ready[0]
        try:
            result = ray.get(ref)
        except Exception as exc:  # a cell's error, or its node lost more than max_retries times
            failed.append(_failure(labels[ref], exc))
            logger.error("[%d/%d] failed %s", len(results) + len(failed), n, failed[-1])
            continue
        results.append(result)
        rec = result["record"] or {}
        scores = ", ".join(f"{k}={v:.4f}" for k, v in list(rec.get("metrics", {}).items())[:3])
        logger.info(
            "[%d/%d] done %s in %.1f s on node %s%s",
            len(results) + len(failed),
            n,
            result["label"],
            result["wall_s"],
            str(result["node"])[:12],
            f": {scores}" if scores else "",
        )
        if on_result is not None:
            on_result(result)
    return results, failed


__all__ = [
    "DEFAULT_RAY_RESOURCES",
    "RAY_INSTALL",
    "RayGridResult",
    "RayOptions",
    "RayResources",
    "RayRunError",
    "connect",
    "import_ray",
    "plan_resources",
    "render_report_on_worker",
    "run_cell_on_worker",
    "run_on_ray",
    "worker_env",
]
