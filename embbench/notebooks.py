"""Run the project's notebooks through papermill with validated, layered params files.

``run_notebook("01_embed", ["params/01_embed.yaml", "params/demo/01_embed.yaml"])`` merges the
files (later wins), validates the result against the stage's config (unknown keys and bad values
fail here, naming the file, instead of papermill's silent warning), executes
``notebooks/01_embed.ipynb`` and writes the executed copy to ``<reports_dir>/notebooks/``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from embbench.config import read_params_files
from embbench.paths import project_root, reports_dir
from embbench.stages import config_for

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


def run_notebook(
    name: str,
    params_files: Iterable[str | Path] = (),
    overrides: Mapping[str, Any] | None = None,
    *,
    output: Path | None = None,
    kernel_name: str = "python3",
    progress: bool = True,
) -> Path:
    """Execute notebook ``name`` with validated parameters; return the executed notebook's path.

    Raises:
        embbench.config.ConfigError: A params file has an unknown key or a bad value.
        papermill.PapermillExecutionError: A cell failed (the executed copy is still written).
    """
    import papermill as pm

    params_files = list(params_files)
    parameters = resolve_params(name, params_files, overrides)
    output = output or reports_dir() / "notebooks" / f"{name}.ipynb"
    output.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logger.info("running %s with %s -> %s", name, [str(f) for f in params_files], output)
    pm.execute_notebook(
        str(notebook_path(name)),
        str(output),
        parameters=parameters,
        kernel_name=kernel_name,
        cwd=str(project_root() / "notebooks"),
        progress_bar=progress,
        log_output=False,
    )
    return output
