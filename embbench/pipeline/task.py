"""What a pipeline task does, in the project's image: call the ``embbench`` command line.

The kfp components (:mod:`embbench.pipeline.components`) are one-line wrappers around these
functions, so the pipeline package stays small and a task has no logic of its own:
``embbench run-cell`` runs the cell through the cell engine, ``embbench report`` renders
notebook 05.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def _params_file(params_json: str, notebook: str) -> str:
    """Write ``notebook``'s params (from the pipeline's ``params`` parameter) to a file."""
    text = json.loads(params_json)[notebook]
    with tempfile.NamedTemporaryFile("w", suffix=f"_{notebook}.yaml", delete=False) as f:
        f.write(text)
    return f.name


def run_cell_task(
    params_json: str,
    notebook: str,
    model: str,
    dataset: str,
    mode: str,
    source: str,
    milvus_uri: str,
    tracking_uri: str,
    nproc: int,
    task: str = "image-image",
) -> None:
    """Run one cell with ``embbench run-cell`` (under torchrun when ``nproc`` > 1).

    Raises:
        RuntimeError: ``embbench run-cell`` failed (its log is the task's log).
    """
    args = [
        "run-cell",
        notebook,
        "-f",
        _params_file(params_json, notebook),
        "--model",
        model,
        "--dataset",
        dataset,
        "--mode",
        mode,
    ]
    args += ["--source", source] if source else []
    args += ["--task", task] if task != "image-image" else []
    args += ["--set", f"milvus_uri={milvus_uri}"] if milvus_uri else []
    args += ["--set", f"tracking_uri={tracking_uri}"] if tracking_uri else []
    cmd = [sys.executable, "-m", "embbench", *args]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "-m",
            "embbench",
            *args,
        ]
    sys.stdout.write(" ".join(cmd) + "\n")
    sys.stdout.flush()
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        raise RuntimeError(
            f"embbench run-cell exited with {rc}: {mode} {task} {model} on {dataset}"
        )


def render_report_task(params_json: str, tracking_uri: str, output: str) -> None:
    """Render notebook 05 with ``embbench report`` and copy the HTML to ``output``.

    Raises:
        RuntimeError: ``embbench report`` failed or did not say where it wrote.
    """
    cmd = [
        sys.executable,
        "-m",
        "embbench",
        "report",
        "-f",
        _params_file(params_json, "05_analysis"),
    ]
    cmd += ["--set", f"tracking_uri={tracking_uri}"] if tracking_uri else []
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    sys.stdout.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"embbench report exited with {done.returncode}")
    written = [
        ln.split(":", 1)[1].strip() for ln in done.stdout.splitlines() if ln.startswith("report:")
    ]
    if not written:
        raise RuntimeError("embbench report did not say where it wrote the report")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(written[-1], output)


__all__ = ["render_report_task", "run_cell_task"]
