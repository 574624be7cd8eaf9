"""MLflow tracking and run provenance.

Default store: a local sqlite database ``<runs_dir>/mlflow.db`` with artifacts in
``<runs_dir>/mlartifacts`` (MLflow 3 refuses the plain ``./mlruns`` file store). ``make
mlflow-ui`` serves it. Teams with a tracking server pass its URI (``tracking_uri`` parameter or
the ``MLFLOW_TRACKING_URI`` environment variable); credentials come only from MLflow's own
environment variables (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``) and
are never logged. Keys that look like secrets are refused by :func:`log_params`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from embbench.paths import project_root, runs_dir

logger = logging.getLogger(__name__)

_SECRET_HINTS = ("token", "password", "secret", "api_key", "apikey", "credential")
TRACKED_PACKAGES = (
    "embbench",
    "torch",
    "torchvision",
    "timm",
    "open-clip-torch",
    "tensorflow-cpu",
    "keras",
    "keras-tuner",
    "pymilvus",
    "milvus-lite",
    "mlflow",
    "numpy",
    "pandas",
    "scikit-learn",
)


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's local sqlite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(runs_dir() / 'mlflow.db').resolve()}"


def setup_mlflow(uri: str = "", experiment: str = "embbench") -> str:
    """Point MLflow at ``uri`` (default :func:`default_tracking_uri`) and select ``experiment``.

    A new experiment on a local store gets its artifacts under ``<runs_dir>/mlartifacts``.

    Returns:
        The tracking URI in use.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(experiment) is None:
        artifact_location = None
        if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            art = runs_dir() / "mlartifacts"
            art.mkdir(parents=True, exist_ok=True)
            artifact_location = art.resolve().as_uri()
        client.create_experiment(experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment)
    return uri


def _check_no_secret(key: str) -> None:
    if any(h in key.lower() for h in _SECRET_HINTS):
        raise ValueError(
            f"refusing to log {key!r} to MLflow: it looks like a secret; "
            "credentials belong in environment variables only"
        )


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to ``a.b.c`` keys."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def log_params(params: Mapping[str, Any]) -> None:
    """Log flattened params (lists as JSON, long values truncated with a note)."""
    import mlflow

    flat = flatten(params)
    clean = {}
    for key, value in flat.items():
        _check_no_secret(key)
        text = json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)
        clean[key] = text if len(text) <= 6000 else text[:5980] + "...(truncated)"
    for i in range(0, len(clean), 100):
        mlflow.log_params(dict(list(clean.items())[i : i + 100]))


def log_json_artifact(obj: Any, name: str, artifact_path: str | None = None) -> None:
    """Log ``obj`` as JSON file ``name`` into the active run's artifacts."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


@contextmanager
def mlflow_run(
    name: str,
    *,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
) -> Iterator[Any]:
    """Start an MLflow run with provenance tags (git sha, versions, host) and params."""
    import mlflow

    all_tags = {**provenance_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=name, nested=nested, tags=all_tags) as run:
        if params:
            log_params(params)
        yield run


@lru_cache(maxsize=1)
def git_info() -> dict[str, Any]:
    """The checkout's commit and whether it has uncommitted changes (``unknown`` outside git)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=project_root(),
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=project_root(),
                check=True,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
        return {"git_sha": sha, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": "unknown", "git_dirty": None}


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Installed versions of the packages that change results."""
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance() -> dict[str, Any]:
    """Git state, package versions, Python and platform: stored in every result record."""
    return {
        **git_info(),
        "versions": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def provenance_tags() -> dict[str, str]:
    """:func:`provenance` as MLflow tags."""
    p = provenance()
    tags = {"git_sha": str(p["git_sha"]), "git_dirty": str(p["git_dirty"]), "python": p["python"]}
    tags.update({f"version.{k}": v for k, v in p["versions"].items()})
    return tags
