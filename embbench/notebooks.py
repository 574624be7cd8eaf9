"""Run the project's notebooks through papermill with validated, layered params files.

``run_notebook("01_embed", ["params/01_embed.yaml", "params/demo/01_embed.yaml"])`` merges the
files (later wins), validates the result against the stage's config (unknown keys and bad values
fail here, naming the file, instead of papermill's silent warning), executes
``notebooks/01_embed.ipynb`` and writes the executed copy to ``<reports_dir>/notebooks/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from embbench._malloc import missing_allocator_env
from embbench._threads import lower_priority
from embbench._utils import stable_hash
from embbench.analysis import AnalysisError
from embbench.config import ConfigError, read_params_files
from embbench.paths import params_dir, project_root, reports_dir
from embbench.report import ReportError, export_html
from embbench.stages import config_for
from embbench.tracking import NOTEBOOK_ENV, NOTEBOOK_OUTPUT_ENV, default_tracking_uri

logger = logging.getLogger(__name__)

NOTEBOOKS = ("01_embed", "02_finetune", "03_toptune", "04_crosstune", "05_analysis")


def notebook_path(name: str) -> Path:
    """``notebooks/<name>.ipynb``; raise naming the notebooks that exist."""
    path = project_root() / "notebooks" / f"{name}.ipynb"
    if not path.is_file():
        have = sorted(p.stem for p in (project_root() / "notebooks").glob("*.ipynb"))
        raise FileNotFoundError(f"no notebook {path}; notebooks: {have}")
    return path


def resolve_params(
    name: str, params_files: Iterable[str | Path] = (), overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Merge and validate the parameters for notebook ``name``; return the dict papermill gets."""
    params, origin = read_params_files(params_files)
    params.update(overrides or {})
    cfg = config_for(name).from_params(params, origin)
    # Pass only what was given: the notebook's own defaults stay visible in its parameters cell.
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k in params}


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


class KernelLogRelay:
    """papermill's ``stdout_file``: forwards the kernel's log lines to this process's stderr.

    Notebooks log to stdout (see :func:`embbench.setup_logging`); lines in the log format are
    written to the terminal as they come, other output stays in the notebook only. When nothing
    has come for ``heartbeat_s`` seconds a "still running" line is written, so a terminal is
    never silent for longer.
    """

    def __init__(self, name: str, *, heartbeat_s: float = 25.0, stream: Any = None) -> None:
        self.name = name
        self.heartbeat_s = heartbeat_s
        self.stream = stream
        self._buf = ""
        self._start = self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _emit(self, text: str) -> None:
        from tqdm import tqdm

        self._last = time.monotonic()
        # tqdm.write keeps papermill's cell bar intact below the line.
        tqdm.write(text, file=self.stream or sys.stderr)

    def write(self, text: str) -> None:
        """Take a chunk of the kernel's stdout; forward its complete log lines."""
        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if _LOG_LINE.match(line):
                self._emit(line)

    def flush(self) -> None:
        """Nothing is buffered beyond an incomplete line."""

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            if time.monotonic() - self._last >= self.heartbeat_s:
                minutes, seconds = divmod(int(time.monotonic() - self._start), 60)
                self._emit(
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')} INFO embbench.notebooks: "
                    f"{self.name} still running ({minutes} min {seconds} s)"
                )

    def __enter__(self) -> KernelLogRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def _ipc_kernel_manager() -> type:
    """A kernel manager on local IPC sockets (papermill's default TCP makes ipykernel warn)."""
    from jupyter_client.manager import KernelManager

    class IPCKernelManager(KernelManager):
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("transport", "ipc")
            kwargs.setdefault("ip", str(Path(tempfile.mkdtemp(prefix="embbench-kernel-")) / "k"))
            super().__init__(**kwargs)
            self._clients: list[Any] = []

        def client(self, **kwargs: Any) -> Any:
            kc = super().client(**kwargs)
            self._clients.append(kc)
            return kc

        def shutdown_kernel(self, *args: Any, **kwargs: Any) -> None:
            # papermill leaves the channels of a kernel it was given (a warm kernel) open: stop
            # them here, or their client warns "Could not destroy zmq context" when collected
            for kc in self._clients:
                kc.stop_channels()
            self._clients.clear()
            super().shutdown_kernel(*args, **kwargs)

    return IPCKernelManager


# what a notebook's kernel gets unless the environment says otherwise
KERNEL_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "MLFLOW_CONFIGURE_LOGGING": "false",
}


def kernel_env(name: str = "", output: Path | None = None) -> dict[str, str]:
    """The environment a notebook's kernel starts with; this process's is left as it is.

    This process's variables, :data:`KERNEL_ENV_DEFAULTS` where unset, glibc's allocator
    settings (read when the kernel starts), the project's MLflow store unless
    ``MLFLOW_TRACKING_URI`` says otherwise (MLflow used before the notebook's ``setup_mlflow``
    would default to ``./mlruns`` under ``notebooks/``) and, for notebook ``name``, the
    variables its MLflow runs name it by (not ``ipykernel_launcher.py``).
    """
    env = {**KERNEL_ENV_DEFAULTS, **os.environ, **missing_allocator_env()}
    env.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri())
    if name:
        env[NOTEBOOK_ENV] = str(notebook_path(name))
        env[NOTEBOOK_OUTPUT_ENV] = str(output or "")
    return env


def start_kernel(env: Mapping[str, str], kernel_name: str = "python3") -> Any:
    """A started kernel manager (IPC sockets) whose kernel has ``env``, in ``notebooks/``."""
    km = _ipc_kernel_manager()(kernel_name=kernel_name)
    km.start_kernel(cwd=str(project_root() / "notebooks"), env=dict(env))
    return km


class WarmKernel:
    """A kernel for notebook ``name``, started with its imports done while another one runs.

    Papermill starts each notebook's kernel (about 1 s) and the first cell imports the stage
    (3-4 s of torch, timm, MLflow, ...) while the cores are otherwise idle; the demo starts the
    next notebook's kernel and runs those imports in the background instead. The kernel gets
    this process's environment when it starts (allocator settings included, read by glibc
    then); :meth:`take` sets what is the notebook's own (``EMBBENCH_NOTEBOOK``, ...) before
    papermill runs it. A kernel that failed to start is given back as ``None`` (run_notebook then
    starts one, as without a warm kernel), with an INFO line. ``nice`` > 0 lowers the kernel's
    CPU priority (:func:`embbench._threads.lower_priority`) before its imports: a notebook run
    beside another (:mod:`embbench.notebook_graph`).
    """

    def __init__(self, name: str, kernel_name: str = "python3", *, nice: int = 0) -> None:
        self.name = name
        self.km: Any = None
        self.error: BaseException | None = None
        self._kernel_name = kernel_name
        self._nice = nice
        self._imports = (
            f"import embbench, {config_for(name).__module__}, embbench.analysis, "
            "embbench.report, embbench.tracking"
        )
        self._thread = threading.Thread(target=self._start, name=f"warm-{name}", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            self.km = start_kernel(kernel_env(), self._kernel_name)
            if self._nice:
                lower_priority(self.km.provisioner.process.pid, self._nice)
            self._run(self._imports)
        except Exception as exc:  # run_notebook starts a kernel instead
            self.error = exc

    def _run(self, code: str, timeout: float = 300) -> None:
        kc = self.km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            reply = kc.execute_interactive(code, silent=True, store_history=False, timeout=timeout)
            if reply["content"]["status"] != "ok":
                raise RuntimeError(
                    f"{reply['content'].get('ename')}: {reply['content'].get('evalue')}"
                )
        finally:
            kc.stop_channels()

    def take(self, env: Mapping[str, str]) -> Any:
        """The started kernel manager with ``env`` set in the kernel, or ``None``."""
        self._thread.join()
        if self.error is None:
            try:
                self._run(f"import os; os.environ.update({dict(env)!r})", timeout=30)
                return self.km
            except Exception as exc:
                self.error = exc
        logger.info("%s: the warm kernel failed (%s); starting one", self.name, self.error)
        self.close()
        return None

    def close(self) -> None:
        """Shut the kernel down (when it was not taken, or failed), once it has started."""
        self._thread.join(timeout=120)  # still starting: closed after, not left running
        if self.km is not None and self.km.has_kernel:
            self.km.shutdown_kernel(now=True)


def executed_path(name: str, parameters: Mapping[str, Any], folder: Path | None = None) -> Path:
    """Where a run of ``name`` keeps its executed notebook: stage, time and params hash.

    ``<reports_dir>/notebooks/<name>/<YYYYmmdd-HHMMSS>-<hash8>.ipynb``; a run never replaces an
    earlier one. :func:`run_notebook` also copies it to ``<name>/latest.ipynb``.
    """
    folder = folder or reports_dir() / "notebooks" / name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return folder / f"{stamp}-{stable_hash(dict(parameters))[:8]}.ipynb"


def run_notebook(
    name: str,
    params_files: Iterable[str | Path] = (),
    overrides: Mapping[str, Any] | None = None,
    *,
    output: Path | None = None,
    kernel_name: str = "python3",
    progress: bool = True,
    kernel: WarmKernel | None = None,
) -> Path:
    """Execute notebook ``name`` with validated parameters; return the executed notebook's path.

    ``kernel``: a :class:`WarmKernel` started for ``name`` while something else ran (the
    demo's next notebook); without one (or if it failed to start) a kernel is started here,
    with the notebook's environment (:func:`kernel_env`), and shut down after.

    Raises:
        embbench.config.ConfigError: A params file has an unknown key or a bad value.
        papermill.PapermillExecutionError: A cell failed (the executed copy is still written).
    """
    import papermill as pm

    params_files = list(params_files)
    parameters = resolve_params(name, params_files, overrides)
    keep_latest = output is None
    output = output or executed_path(name, parameters)
    output.parent.mkdir(parents=True, exist_ok=True)
    logger.info("%s started with %s -> %s", name, [str(f) for f in params_files], output)
    t0 = time.monotonic()
    # the kernel's environment is given to it, never set in this process: notebooks run at once
    # (embbench.notebook_graph) from threads of one process
    env = kernel_env(name, output)
    own = {k: env[k] for k in (NOTEBOOK_ENV, NOTEBOOK_OUTPUT_ENV)}
    km = kernel.take(own) if kernel else None
    try:
        km = km or start_kernel(env, kernel_name)
        with KernelLogRelay(name) as relay:
            pm.execute_notebook(
                str(notebook_path(name)),
                str(output),
                parameters=parameters,
                kernel_name=kernel_name,
                cwd=str(project_root() / "notebooks"),
                progress_bar=progress,
                log_output=False,
                stdout_file=relay,
                kernel_manager_class=_ipc_kernel_manager(),
                km=km,
            )
    except Exception:
        logger.info(
            "%s failed after %.0f s; executed copy: %s", name, time.monotonic() - t0, output
        )
        raise
    finally:
        if km is not None:  # papermill leaves a kernel it was given running
            km.shutdown_kernel(now=True)
    if keep_latest:
        shutil.copyfile(output, output.parent / "latest.ipynb")
    logger.info("%s done in %.0f s -> %s", name, time.monotonic() - t0, output)
    return output


# ---- stage 05 as a report -----------------------------------------------------------------
REPORT_NOTEBOOK = "05_analysis"


def render_report(
    output: str | Path | None = None,
    params_files: Iterable[str | Path] = (),
    overrides: Mapping[str, Any] | None = None,
    *,
    notebook_output: Path | None = None,
    kernel: WarmKernel | None = None,
) -> Path:
    """Run notebook 05 with validated params and write its HTML report.

    Args:
        output: The HTML file (default ``<reports_dir>/<report_name>.html``).
        params_files: Layered params files (default ``params/05_analysis.yaml``).
        overrides: Parameter values applied last.
        notebook_output: Where the executed notebook goes (default
            ``<reports_dir>/notebooks/05_analysis.ipynb``).
        kernel: A :class:`WarmKernel` for notebook 05 (see :func:`run_notebook`).

    Returns:
        The HTML report's path; the executed notebook's path when the params say
        ``report: false`` and no ``output`` is given.

    Raises:
        embbench.config.ConfigError: A params file has an unknown key or a bad value.
        ReportError: A cell of the notebook failed (the executed copy names it).
    """
    files = list(params_files) or [params_dir() / f"{REPORT_NOTEBOOK}.yaml"]
    params, origin = read_params_files(files)
    params.update(overrides or {})
    cfg = config_for(REPORT_NOTEBOOK).from_params(params, origin)
    try:
        executed = run_notebook(
            REPORT_NOTEBOOK, files, overrides, output=notebook_output, kernel=kernel
        )
    except Exception as exc:
        if type(exc).__name__ != "PapermillExecutionError":
            raise
        where = notebook_output or reports_dir() / "notebooks" / REPORT_NOTEBOOK
        raise ReportError(
            f"notebook {REPORT_NOTEBOOK} failed ({getattr(exc, 'ename', '')}: "
            f"{getattr(exc, 'evalue', exc)}); the executed copy is {where}"
        ) from None
    if output is None and not cfg.report:
        logger.info("report: false in the params; executed notebook only: %s", executed)
        return executed
    output = Path(output) if output else reports_dir() / f"{cfg.report_name}.html"
    latest = sorted((reports_dir() / "notebooks").glob("0[1-4]_*/latest.ipynb"))
    sources = [versioned_notebook(p) for p in latest]
    return export_html(executed, output, title=cfg.title, sources=[*sources, executed])


def versioned_notebook(path: Path) -> Path:
    """The per-run executed notebook that ``<name>/latest.ipynb`` is a copy of.

    ``latest`` moves with the next run; the report names the run it read. Falls back to
    ``path`` when no per-run file has the same bytes (a ``latest`` written by hand).
    """
    path = Path(path)
    if path.name != "latest.ipynb":
        return path
    data = path.read_bytes()
    for run in sorted(path.parent.glob("2*.ipynb"), reverse=True):  # newest first
        if run.stat().st_size == len(data) and run.read_bytes() == data:
            return run
    return path


def report_main(argv: Sequence[str] | None = None, *, dry_run: bool = False) -> int:
    """``embbench report``: render notebook 05 to HTML; returns the exit status.

    ``dry_run`` validates the params files and says what would be rendered, running nothing.
    """
    p = argparse.ArgumentParser(
        prog="embbench report",
        description="Run notebooks/05_analysis.ipynb and write a self-contained HTML report.",
    )
    p.add_argument(
        "-f",
        "--params",
        action="append",
        default=[],
        help="params YAML, layered in order (default params/05_analysis.yaml)",
    )
    p.add_argument(
        "--demo", action="store_true", help="layer params/demo/05_analysis.yaml after the others"
    )
    p.add_argument("--set", action="append", default=[], help="key=value override (YAML value)")
    p.add_argument("--output", default="", help="HTML path (default reports/<report_name>.html)")
    args = p.parse_args(list(argv) if argv is not None else None)
    files = [Path(f) for f in args.params] or [params_dir() / f"{REPORT_NOTEBOOK}.yaml"]
    if args.demo:
        files.append(params_dir() / "demo" / f"{REPORT_NOTEBOOK}.yaml")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    try:
        if dry_run:
            resolve_params(REPORT_NOTEBOOK, files, overrides)
            sys.stdout.write(f"would render {REPORT_NOTEBOOK} with {[str(f) for f in files]}\n")
            return 0
        out = render_report(args.output or None, files, overrides)
    except (ConfigError, AnalysisError, ReportError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    sys.stdout.write(f"report: {out}\n")
    return 0
