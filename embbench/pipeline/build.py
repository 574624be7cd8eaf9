"""Build, compile and run locally the Kubeflow Pipelines v2 pipeline of a grid.

Every cell task (:mod:`embbench.pipeline.grid`) becomes one task that runs ``embbench
run-cell`` in the project's image; the report task runs ``embbench report`` after every cell.

On a cluster each task gets

- **resources** by the cell's mode (:data:`DEFAULT_RESOURCES`): CPU and memory for retrieval and
  top-tuning, GPUs of the ``accelerator_type`` pipeline parameter for embedding and fine-tuning
  (a cell with several GPUs runs under torchrun inside its task), optional node selectors and
  the GPU taint's toleration;
- **retries** with exponential back-off, for pre-emptible nodes;
- **caching** keyed by the cell key, so a resubmitted pipeline skips finished tasks (and the
  cell engine skips finished cells anyway);
- **secrets** as environment variables (``MILVUS_TOKEN``, ``MLFLOW_TRACKING_TOKEN``, ...) from one
  Kubernetes secret, never as parameters; the Milvus and MLflow URIs are pipeline parameters;
- **a volume**: a PersistentVolumeClaim (ReadWriteMany, since tasks run side by side on several
  nodes) mounted at ``mount_path`` holding the data, the embedding cache, the runs (records,
  checkpoints, tuner state), the reports and the model hub cache (``EMBBENCH_*``, ``HF_HOME``).

kfp and kfp-kubernetes are the optional ``pipeline`` extra, imported inside the functions.
"""

# No ``from __future__ import annotations``: kfp reads the pipeline function's annotations as
# types.
import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from embbench._malloc import PROCESS_ENV
from embbench._utils import stable_hash
from embbench.paths import runs_dir
from embbench.pipeline.grid import PipelineGrid, check_stages, pipeline_grid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskResources:
    """What one task asks Kubernetes for.

    Attributes:
        cpu: CPU request and limit (``"2"``, ``"500m"``).
        memory: Memory request and limit (``"8G"``).
        gpus: Accelerators of the pipeline's ``accelerator_type`` (0 = none).
    """

    cpu: str = "2"
    memory: str = "8G"
    gpus: int = 0


# By mode. The paper's jobs: 2 CPUs / 8 GB; GPU jobs for embedding and training (fine-tuning on
# 4 GPUs x 128 = its global batch of 512).
DEFAULT_RESOURCES: dict[str, TaskResources] = {
    "pretrained": TaskResources("4", "16G", 1),
    "fine-tuned": TaskResources("16", "64G", 4),
    "top-tuned": TaskResources("2", "8G", 0),
    "cross-tuned": TaskResources("4", "16G", 1),
    "cross-top-tuned": TaskResources("2", "8G", 0),
    "report": TaskResources("2", "8G", 0),
}

SECRET_ENV = (
    "MILVUS_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


@dataclass(frozen=True)
class PipelineOptions:
    """How the grid runs on the cluster (everything that is not a params file).

    Attributes:
        image: The project's image (see the Dockerfile), e.g. ``registry/embbench:0.1.0-cuda``.
        name: The pipeline's name.
        resources: Mode -> resources; missing modes take :data:`DEFAULT_RESOURCES`.
        accelerator_type: Default of the ``accelerator_type`` pipeline parameter.
        gpu_node_selector: Node labels GPU tasks must run on (e.g. a GPU node pool).
        gpu_toleration: Tolerate the ``nvidia.com/gpu`` taint on GPU tasks.
        pvc: The PersistentVolumeClaim holding data, cache and runs ("" = none).
        mount_path: Where the claim is mounted.
        secret: The Kubernetes secret whose keys :data:`SECRET_ENV` become environment
            variables ("" = none); every key is optional.
        retries: Retries of a failed task (pre-empted node); back-off doubles from
            ``backoff``.
        backoff: First back-off duration.
        caching: Let Kubeflow reuse a finished task with the same cell key.
        milvus_uri: Default of the ``milvus_uri`` pipeline parameter ("" = the params').
        tracking_uri: Default of the ``tracking_uri`` pipeline parameter ("" = the params').
        local: Build for kfp's local runner (no volume, secrets, GPUs or node selectors).
    """

    image: str = "embbench:latest"
    name: str = "embbench-grid"
    resources: Mapping[str, TaskResources] = field(default_factory=dict)
    accelerator_type: str = "nvidia.com/gpu"
    gpu_node_selector: Mapping[str, str] = field(default_factory=dict)
    gpu_toleration: bool = True
    pvc: str = "embbench-data"
    mount_path: str = "/mnt/embbench"
    secret: str = "embbench-secrets"
    retries: int = 3
    backoff: str = "60s"
    caching: bool = True
    milvus_uri: str = ""
    tracking_uri: str = ""
    local: bool = False

    def resources_for(self, mode: str) -> TaskResources:
        """The resources of a task of ``mode``."""
        return self.resources.get(mode) or DEFAULT_RESOURCES.get(mode) or TaskResources()

    def volume_env(self) -> dict[str, str]:
        """The environment that points embbench's folders into the volume."""
        if not self.pvc or self.local:
            return {}
        root = self.mount_path.rstrip("/")
        return {
            "EMBBENCH_DATA": f"{root}/data",
            "EMBBENCH_CACHE": f"{root}/cache",
            "EMBBENCH_RUNS": f"{root}/runs",
            "EMBBENCH_REPORTS": f"{root}/reports",
            "HF_HOME": f"{root}/hf",
            "TORCH_HOME": f"{root}/torch",
        }


@contextlib.contextmanager
def _cheap_task_checks() -> Iterator[None]:
    """Make kfp's per-setter container check cheap while a pipeline is built.

    kfp 2.x's ``PipelineTask._ensure_container_spec_exists`` runs on every task setter
    (resources, env variables, retries...) and calls ``inspect.stack()`` just to name the caller
    in its error message. That reads the source of every frame and scans ``sys.modules`` once
    per frame: with TensorFlow and torch loaded it took ~80 ms a call, and the paper's grid makes
    ~6,000 calls (8.5 minutes to compile inside the test suite instead of ~20 s). The same check,
    with the caller named through ``sys._getframe``, runs while the pipeline is built; kfp's own
    method is put back afterwards. Left alone if a kfp release drops the method.
    """
    from kfp.dsl import pipeline_task  # optional dependency (the `pipeline` extra)

    task_cls = pipeline_task.PipelineTask
    original = task_cls.__dict__.get("_ensure_container_spec_exists")
    if original is None:
        yield
        return

    def check(self: Any) -> None:
        if self.container_spec is None:
            caller = sys._getframe(1).f_code.co_name
            raise ValueError(
                f"{caller} can only be used on single-step components, not pipelines used as "
                "components, or special components like importers."
            )

    task_cls._ensure_container_spec_exists = check
    try:
        yield
    finally:
        task_cls._ensure_container_spec_exists = original


def build_pipeline(grid: PipelineGrid, options: PipelineOptions) -> Any:
    """The kfp pipeline function of ``grid`` (call it under ``kfp.local`` or compile it)."""
    with _cheap_task_checks():
        return _build_pipeline(grid, options)


def _build_pipeline(grid: PipelineGrid, options: PipelineOptions) -> Any:
    from kfp import dsl  # optional dependency (the `pipeline` extra)

    # components imports kfp (the optional `pipeline` extra): only when a pipeline is built
    from embbench.pipeline import components

    run_cell = dsl.component(
        components.run_cell, base_image=options.image, install_kfp_package=False
    )
    render_report = dsl.component(
        components.render_report, base_image=options.image, install_kfp_package=False
    )

    @dsl.pipeline(
        name=options.name,
        description="embbench: every cell of the grid is one task (embbench run-cell)",
    )
    def grid_pipeline(
        params: str = json.dumps(grid.params, sort_keys=True),
        milvus_uri: str = options.milvus_uri,
        tracking_uri: str = options.tracking_uri,
        accelerator_type: str = options.accelerator_type,
    ):
        tasks = {}
        for pc in grid.cells:
            res = options.resources_for(pc.cell.mode)
            gpus = 0 if options.local else res.gpus
            task = run_cell(
                params=params,
                notebook=pc.notebook,
                model=pc.cell.model,
                dataset=pc.cell.dataset,
                mode=pc.cell.mode,
                source=pc.cell.source or "",
                task=pc.cell.task,
                cell_key=pc.key,
                milvus_uri=milvus_uri,
                tracking_uri=tracking_uri,
                nproc=max(gpus, 1),
            )
            task.set_display_name(pc.label)
            _configure(task, res, gpus, accelerator_type, options, pc.key)
            task.after(*[tasks[k] for k in pc.after])
            tasks[pc.key] = task
        if grid.report_yaml is not None:
            report = render_report(params=params, grid_key=grid.grid_key, tracking_uri=tracking_uri)
            report.set_display_name("05 report")
            _configure(
                report, options.resources_for("report"), 0, accelerator_type, options, grid.grid_key
            )
            report.after(*tasks.values())

    return grid_pipeline


def _configure(
    task: Any,
    res: TaskResources,
    gpus: int,
    accelerator_type: Any,
    options: PipelineOptions,
    key: str,
) -> None:
    """Resources, retries, caching, secrets, volume and environment of one task."""
    task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu)
    task.set_memory_request(res.memory).set_memory_limit(res.memory)
    task.set_retry(
        num_retries=options.retries, backoff_duration=options.backoff, backoff_factor=2.0
    )
    # The image is the code version: a new image computes again, like a new cell key.
    task.set_caching_options(
        enable_caching=options.caching, cache_key=stable_hash([key, options.image])
    )
    task.set_env_variable("MLFLOW_DISABLE_TELEMETRY", "true")
    for name, value in PROCESS_ENV.items():  # glibc reads them at start-up (embbench._malloc)
        task.set_env_variable(name, value)
    if options.local:
        return
    from kfp import kubernetes  # optional dependency (kfp-kubernetes, the `pipeline` extra)

    if gpus:
        task.set_accelerator_type(accelerator_type).set_accelerator_limit(gpus)
        for label, value in options.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        if options.gpu_toleration:
            kubernetes.add_toleration(
                task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"
            )
    if options.secret:
        kubernetes.use_secret_as_env(
            task,
            secret_name=options.secret,
            secret_key_to_env={k: k for k in SECRET_ENV},
            optional=True,
        )
    if options.pvc:
        kubernetes.mount_pvc(task, pvc_name=options.pvc, mount_path=options.mount_path)
    for name, value in options.volume_env().items():
        task.set_env_variable(name, value)


def compile_pipeline(
    params: Mapping[str, Sequence[str | Path]],
    output: str | Path,
    *,
    image: str,
    **options: Any,
) -> PipelineGrid:
    """Compile the pipeline of ``params`` (notebook -> layered params files) to ``output``.

    Args:
        params: E.g. ``{"01_embed": ["params/01_embed.yaml"], "05_analysis": [...]}``.
        output: The pipeline package (``pipeline.yaml``), submitted with ``kfp.Client``.
        image: The project's image, pushed where the cluster pulls from.
        **options: Further :class:`PipelineOptions` fields.

    Returns:
        The grid compiled (its ``cells`` are the tasks besides the report).
    """
    from kfp import compiler  # optional dependency (the `pipeline` extra)

    grid = pipeline_grid(params)
    _warn_lite(grid, options)
    pipe = build_pipeline(grid, PipelineOptions(image=image, **options))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipe, str(output))
    logger.info(
        "compiled %d cell tasks%s into %s",
        len(grid.cells),
        " + the report" if grid.report_yaml else "",
        output,
    )
    return grid


def _warn_lite(grid: PipelineGrid, options: Mapping[str, Any]) -> None:
    """Warn when tasks would share a Milvus Lite file (one process per file)."""
    if options.get("milvus_uri"):
        return
    if any(
        "backend: milvus" in pc.params_yaml and "milvus_uri: ''" in pc.params_yaml
        for pc in grid.cells
    ):
        logger.warning(
            "some cells search Milvus Lite files (milvus_uri is empty): on a cluster "
            "give a Milvus server with the milvus_uri pipeline parameter"
        )


def run_local(
    params: Mapping[str, Sequence[str | Path]],
    *,
    milvus_uri: str = "",
    tracking_uri: str = "",
    pipeline_root: str | Path | None = None,
    enable_caching: bool = False,
    options: PipelineOptions | None = None,
) -> PipelineGrid:
    """Run the same pipeline on this machine with kfp's local runner (tasks as subprocesses).

    Tasks run one after the other in this Python environment, with this process's environment
    (``EMBBENCH_*`` folders, tokens); give a Milvus server (``milvus-lite server``) and an
    MLflow server when cells should also run side by side in other processes.

    Args:
        params: Notebook -> layered params files.
        milvus_uri: Milvus URI for every cell ("" = the params').
        tracking_uri: MLflow tracking URI ("" = the params').
        pipeline_root: Where kfp keeps task outputs (default ``<runs>/kfp-local``).
        enable_caching: Use kfp's local task cache (off: every task runs, and the cell engine
            skips finished cells).
        options: Build options (``local`` is forced on).

    Raises:
        GridError: The engine's up-front checks of stages 01-03 failed (before any task).
        RuntimeError: A task failed (kfp's message names it).
    """
    from kfp import local  # optional dependency (the `pipeline` extra)

    # the data is here: the checks a notebook runs before its first cell, once, before the
    # tasks (as `embbench ray run` does; `compile` cannot, the data is on the cluster's volume)
    overrides = {k: v for k, v in (("milvus_uri", milvus_uri), ("tracking_uri", tracking_uri)) if v}
    check_stages(params, overrides)

    root = Path(pipeline_root) if pipeline_root else runs_dir() / "kfp-local"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        enable_caching=enable_caching,
    )
    grid = pipeline_grid(params)
    opts = replace(options or PipelineOptions(), local=True, caching=enable_caching)
    pipe = build_pipeline(grid, opts)
    with warnings.catch_warnings():  # "non-Python base image": the tasks run in this venv
        warnings.filterwarnings("ignore", message=".*base image.*", category=RuntimeWarning)
        pipe(milvus_uri=milvus_uri, tracking_uri=tracking_uri)
    return grid


__all__ = [
    "DEFAULT_RESOURCES",
    "SECRET_ENV",
    "PipelineOptions",
    "TaskResources",
    "build_pipeline",
    "compile_pipeline",
    "run_local",
]
