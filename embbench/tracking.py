"""MLflow tracking and run provenance.

Default store: a local sqlite database ``<runs_dir>/mlflow.db`` with artifacts in
``<runs_dir>/mlartifacts`` (MLflow 3 refuses the plain ``./mlruns`` file store). ``make
mlflow-ui`` serves it. Teams with a tracking server pass its URI (``tracking_uri`` parameter or
the ``MLFLOW_TRACKING_URI`` environment variable); credentials come only from MLflow's own
environment variables (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``) and
are never logged. Keys that look like secrets are refused by :func:`log_params`.

The local store is created once, atomically: under a file lock (``mlflow.db.lock``) it is built
in a temporary file and renamed into place, so two first runs never race on its tables and a
full disk never leaves a half-made store. A store found half-made (no ``alembic_version``, e.g.
from an older embbench) is moved aside and rebuilt when it holds no runs, else reported with the
path to move aside. A tracking server is probed (``GET /health``, 3 s timeout) before any work.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

from embbench._errors import UserError
from embbench.paths import project_root, runs_dir
from embbench.services import MLFLOW_HTTP_DEFAULTS, ServiceUnreachableError, check_tracking

__all__ = [
    "ServiceUnreachableError",
    "TrackingStoreError",
    "check_tracking",
    "cell_params",
    "close_stale_run",
    "default_tracking_uri",
    "ensure_sqlite_store",
    "flatten",
    "git_info",
    "log_catalogue_input",
    "log_json_artifact",
    "log_params",
    "mlflow_run",
    "package_versions",
    "provenance",
    "provenance_tags",
    "run_name",
    "setup_mlflow",
    "source_tags",
    "ui_link",
]

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


def default_tracking_uri(uri: str = "") -> str:
    """``uri`` if given, else ``MLFLOW_TRACKING_URI`` if set, else the project's sqlite store."""
    env = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(runs_dir() / 'mlflow.db').resolve()}"


class TrackingStoreError(UserError, RuntimeError):
    """The local MLflow store is damaged and holds runs; the message says what to move aside."""


def _store_state(db: Path) -> tuple[bool, int | None, str]:
    """``(healthy, n_runs, problem)`` of an existing sqlite store (``n_runs`` None: unknown)."""
    import sqlite3

    if db.stat().st_size == 0:
        return False, 0, "it is empty (0 bytes)"
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            rows = con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            tables = {r[0] for r in rows}
            n_runs = (
                con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
            )
            version = (
                con.execute("SELECT version_num FROM alembic_version").fetchall()
                if "alembic_version" in tables
                else []
            )
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        return False, None, f"it is not a readable sqlite database ({err})"
    missing = sorted({"experiments", "runs", "alembic_version"} - tables)
    if missing or not version:
        what = f"table(s) {missing} missing" if missing else "no alembic version recorded"
        return False, n_runs, f"it was left half-made ({what}; {len(tables)} tables)"
    return True, n_runs, ""


def ensure_sqlite_store(db: Path) -> None:
    """Create the sqlite store ``db`` once, atomically; repair or report a half-made one.

    Raises:
        TrackingStoreError: ``db`` is damaged and holds runs (or cannot be read); the message
            gives the command that moves it aside.
    """
    db = Path(db)
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock"):
        if db.exists():
            healthy, n_runs, problem = _store_state(db)
            if healthy:
                return
            if n_runs != 0:
                held = "some runs" if n_runs is None else f"{n_runs} run(s)"
                raise TrackingStoreError(
                    f"MLflow store {db}: {problem}, and it holds {held}. Move it aside "
                    f"(mv {db} {db}.broken) and rerun to start a new store; the old file "
                    "keeps its runs for inspection"
                )
            aside = db.with_name(f"{db.name}.half-made-{int(time.time())}")
            logger.warning(
                "MLflow store %s: %s and holds no runs; moved to %s and rebuilt", db, problem, aside
            )
            db.replace(aside)
        _build_store(db)


def _build_store(db: Path) -> None:
    """Initialise a store in a temporary file, then rename it to ``db``."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    art = runs_dir() / "mlartifacts"
    art.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{tmp}"
    try:
        store = SqlAlchemyStore(uri, art.resolve().as_uri())
        # MLflow creates an empty "Default" experiment (id 0); embbench logs to named
        # experiments only, so it is soft-deleted: the UI does not list a stray empty experiment.
        store.delete_experiment(store.DEFAULT_EXPERIMENT_ID)
        tmp.replace(db)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        # MLflow caches one engine per URI: a failed build (disk full) must not leave this
        # process's next attempt talking to the half-made file it had open
        engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()


# The experiment's kind. MLflow 3.17's UI does not read it to pick its view (see ML_WORKFLOW and
# ui_link); later UIs switch to "Model training" on opening an experiment tagged so.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def setup_mlflow(uri: str = "", experiment: str = "embbench") -> str:
    """Point MLflow at ``uri`` (default :func:`default_tracking_uri`) and select ``experiment``.

    A local sqlite store is created once, atomically (:func:`ensure_sqlite_store`); a tracking
    server is probed first (:func:`check_tracking`, seconds, not minutes of retries), and
    MLflow's HTTP timeout and retries are bounded for the rest of the run
    (:data:`embbench.services.MLFLOW_HTTP_DEFAULTS`, unless set in the environment). A new
    experiment on a local store gets its artifacts under ``<runs_dir>/mlartifacts``.

    Returns:
        The tracking URI in use.

    Raises:
        ServiceUnreachableError: The tracking server does not answer (the message names it).
        TrackingStoreError: The local store is damaged and holds runs.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for var, value in MLFLOW_HTTP_DEFAULTS.items():  # seconds, not minutes; the user's env wins
        os.environ.setdefault(var, value)
    uri = uri or default_tracking_uri()
    check_tracking(uri)
    if uri.startswith("sqlite:///"):
        ensure_sqlite_store(Path(uri[len("sqlite:///") :]))
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(experiment) is None:
        artifact_location = None
        if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            art = runs_dir() / "mlartifacts"
            art.mkdir(parents=True, exist_ok=True)
            artifact_location = art.resolve().as_uri()
        try:
            client.create_experiment(experiment, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException as err:  # created at once by another process
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    exp = mlflow.set_experiment(experiment)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        # typed for ML, not GenAI (the 3.17 UI also needs ui_link's workflowType)
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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


def log_params(params: Mapping[str, Any], run_id: str | None = None) -> None:
    """Log flattened params (lists as JSON, long values truncated with a note).

    Args:
        params: Nested mapping; keys are flattened to ``a.b``.
        run_id: The run to log into (default: the active run).
    """
    import mlflow
    from mlflow.entities import Param

    flat = flatten(params)
    clean = {}
    for key, value in flat.items():
        _check_no_secret(key)
        text = json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)
        clean[key] = text if len(text) <= 6000 else text[:5980] + "...(truncated)"
    items = list(clean.items())
    for i in range(0, len(items), 100):
        if run_id is None:
            mlflow.log_params(dict(items[i : i + 100]))
        else:
            mlflow.MlflowClient().log_batch(
                run_id, params=[Param(k, v) for k, v in items[i : i + 100]]
            )


def log_json_artifact(
    obj: Any, name: str, artifact_path: str | None = None, run_id: str | None = None
) -> None:
    """Log ``obj`` as JSON file ``name`` into a run's artifacts (default: the active run)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        if run_id is None:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
        else:
            mlflow.MlflowClient().log_artifact(run_id, str(path), artifact_path=artifact_path)


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

    all_tags = {
        **provenance_tags(),
        **source_tags(),
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=name, nested=nested, tags=all_tags) as run:
        if params:
            log_params(params)
        yield run


@lru_cache(maxsize=1)
def _git(*args: str) -> str:
    """The stripped output of ``git args`` in the project root (raises when git fails)."""
    return subprocess.run(
        ["git", *args],
        cwd=project_root(),
        check=True,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()


def git_info() -> dict[str, Any]:
    """The checkout's commit and whether it has uncommitted changes (``unknown`` outside git)."""
    try:
        sha = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
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


def close_stale_run(run_id: str | None) -> None:
    """Mark FINISHED the run of a recorded cell that a crash left RUNNING (record written)."""
    if not run_id:
        return
    import mlflow

    client = mlflow.MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="FINISHED")
    except mlflow.exceptions.MlflowException:
        logger.debug("run %s of a finished cell is not in this tracking store", run_id)


# ---- what makes the runs readable in the MLflow UI --------------------------------------------
NOTEBOOK_ENV = "EMBBENCH_NOTEBOOK"  # set by embbench.notebooks.run_notebook for its kernel
NOTEBOOK_OUTPUT_ENV = "EMBBENCH_NOTEBOOK_OUTPUT"  # the executed copy papermill writes
# The MLflow 3.17 UI picks GenAI or "Model training" from its own ``workflowType`` (a URL query
# parameter, else the browser's local storage, default GenAI), not from the experiment's kind
# tag; a link with ``?workflowType=machine_learning`` opens the runs table in ML mode.
ML_WORKFLOW = "machine_learning"


def run_name(stage: str, model: str, dataset: str, *extra: str | None) -> str:
    """The run's name in the MLflow run list: ``stage/model/dataset[/variant]``."""
    return "/".join(str(p) for p in (stage, model, dataset, *extra) if p)


def source_tags(
    argv: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``mlflow.source.*`` tags naming what ran the cell: the notebook, or the embbench CLI.

    A notebook run by :func:`embbench.notebooks.run_notebook` (papermill) names itself in
    ``EMBBENCH_NOTEBOOK``; one open in JupyterLab in ``JPY_SESSION_NAME`` (set by
    jupyter_server for its kernels). A run from the ``embbench`` command (or ``python -m
    embbench``) is named ``embbench <subcommand>``; anything else keeps MLflow's own guess (the
    script's path).
    """
    env = os.environ if environ is None else environ
    notebook = env.get(NOTEBOOK_ENV) or env.get("JPY_SESSION_NAME")
    if notebook:
        tags = {"mlflow.source.type": "NOTEBOOK", "mlflow.source.name": notebook}
        if env.get(NOTEBOOK_OUTPUT_ENV):
            tags["notebook_output"] = env[NOTEBOOK_OUTPUT_ENV]
        return tags
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]) if argv and argv[0] else Path()
    if prog.name == "embbench" or (
        prog.parent.name == "embbench" and prog.name in ("__main__.py", "cli.py")
    ):
        sub = next((a for a in argv[1:] if not a.startswith("-")), "")
        return {"mlflow.source.type": "LOCAL", "mlflow.source.name": f"embbench {sub}".strip()}
    return {}


def log_catalogue_input(name: str, root: str | None, digest: str, context: str) -> None:
    """Log the catalogue as the active run's input dataset (the UI's Dataset column).

    Args:
        name: The catalogue's name (``demo``, ``sop``, a user's own name).
        root: The folder, manifest or URL it was read from (``None``: built in memory).
        digest: :meth:`embbench.catalogue.Catalogue.fingerprint`.
        context: The split(s) the run scored, e.g. ``test`` or ``query+gallery``.
    """
    import warnings

    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    root = str(root or "")
    if root.startswith(("http://", "https://")):
        source = HTTPDatasetSource(root)
    elif root:
        with warnings.catch_warnings():  # "" and file: schemes both map to the local source
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(root).expanduser().resolve()))
    else:
        source = CodeDatasetSource({"embbench": "catalogue built in memory"})
    mlflow.log_input(MetaDataset(source, name=name, digest=digest), context=context)


def cell_params(cfg_params: Mapping[str, Any], cell: Mapping[str, Any]) -> dict[str, Any]:
    """The cell's own parameters: its identity, then the config fields that change its result.

    ``cfg_params`` is the stage config without its grid and runtime fields (its
    ``hash_exclude``: the lists of models and datasets, devices, URIs...), so runs of one grid
    differ only where their cells differ and the UI's "show diff only" shows the model.
    """
    return {**cfg_params, **{k: v for k, v in cell.items() if v not in (None, "")}}


def ui_link(
    experiment: str = "embbench", uri: str = "", base: str = "http://127.0.0.1:5000"
) -> str:
    """The MLflow UI link that opens ``experiment``'s runs table in "Model training" mode.

    ``make mlflow-ui`` prints it. Without the store or the experiment yet, the link opens the
    experiment list in the same mode.
    """
    uri = uri or default_tracking_uri()
    home = f"{base.rstrip('/')}/#/experiments"
    exp = None
    if not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///") :]).is_file():
        import mlflow

        exp = mlflow.MlflowClient(uri).get_experiment_by_name(experiment)
    if exp is None:
        return f"{home}?workflowType={ML_WORKFLOW}"
    return f"{home}/{exp.experiment_id}/runs?workflowType={ML_WORKFLOW}"
