"""Project paths, defined once and overridable by environment variables.

Every file embbench writes lives under one of these folders. The defaults put everything inside
the project checkout so a new user can find it; set the environment variables to move any of them
(e.g. the embedding cache onto a large disk).

| name         | default                    | environment variable   |
|--------------|----------------------------|------------------------|
| PROJECT_ROOT | the checkout               | ``EMBBENCH_ROOT``      |
| DATA_DIR     | ``<root>/data``            | ``EMBBENCH_DATA``      |
| CACHE_DIR    | ``<root>/cache``           | ``EMBBENCH_CACHE``     |
| RUNS_DIR     | ``<root>/runs``            | ``EMBBENCH_RUNS``      |
| REPORTS_DIR  | ``<root>/reports``         | ``EMBBENCH_REPORTS``   |

``RUNS_DIR`` holds the result records, the MLflow sqlite store (``mlflow.db``) and artifacts
(``mlartifacts/``), the Milvus Lite database (``milvus.db``), tuner state and fine-tuning
checkpoints. Paths are resolved at call time, so tests can point them at a temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def _env_path(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default


def project_root() -> Path:
    """The checkout root (``EMBBENCH_ROOT`` overrides)."""
    return _env_path("EMBBENCH_ROOT", _PACKAGE_ROOT)


def data_dir() -> Path:
    """Where datasets and generated catalogues live (``EMBBENCH_DATA``)."""
    return _env_path("EMBBENCH_DATA", project_root() / "data")


def cache_dir() -> Path:
    """Where embedding caches and fetched images live (``EMBBENCH_CACHE``)."""
    return _env_path("EMBBENCH_CACHE", project_root() / "cache")


def runs_dir() -> Path:
    """Where results, MLflow, Milvus Lite, tuner state and checkpoints live (``EMBBENCH_RUNS``)."""
    return _env_path("EMBBENCH_RUNS", project_root() / "runs")


def reports_dir() -> Path:
    """Where rendered notebooks and HTML reports go (``EMBBENCH_REPORTS``)."""
    return _env_path("EMBBENCH_REPORTS", project_root() / "reports")


def params_dir() -> Path:
    """The params/ folder of YAML parameter files shipped with the project."""
    return project_root() / "params"
