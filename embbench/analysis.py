"""Stage 05 (notebook ``05_analysis``): the paper's tables and figures from the tracked runs.

Nothing here recomputes an embedding or a metric from images: every number comes from the runs
that stages 01-04 logged (MLflow runs with their ``result.json`` artifact, or the result records
on disk) and, for confidence intervals and paired tests, from the per-query arrays saved beside
each record. Everything is plain pandas; :mod:`embbench.plots` draws, :mod:`embbench.report`
renders.

- :func:`load_results`: one row per tracked run (latest run of each cell), metrics as columns.
- :func:`table3` (mMP@5 per model type, pretrained vs top-tuned, with the improvement) and
  :func:`table2` (fine-tuning: mR@1, validation accuracy, training time and GPU-hours).
- figure data: :func:`model_facts_table` (2), :func:`metric_correlation` (3),
  :func:`best_per_type` and :func:`zscore_vs_size` (4), :func:`tuning_effect` (6),
  :func:`cross_deltas` (7).
- beyond the paper: :func:`add_confidence_intervals` (bootstrap over queries) and
  :func:`paired_tests` (do two models really differ on a dataset?).
- :func:`practical_guide` and :func:`guide_sentences`: which model and strategy to pick for
  visual search and for categorisation on the data at hand, and what it costs.

Missing cells (a model not run on a dataset, a run without per-query arrays) stay missing
(``NaN``), never zero.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from embbench.config import StageConfig, register_stage
from embbench.metrics import bootstrap_ci, metric_names, paired_bootstrap_test
from embbench.results import ResultStore

logger = logging.getLogger(__name__)

MODES = ("pretrained", "top-tuned", "fine-tuned", "cross-tuned", "cross-top-tuned")
TUNED_MODES = ("top-tuned", "fine-tuned")
CROSS_MODES = ("cross-tuned", "cross-top-tuned")
MODE_LABELS = {
    "pretrained": "Pretrained",
    "top-tuned": "Top-tuned",
    "fine-tuned": "Fine-tuned",
    "cross-tuned": "Cross-tuned",
    "cross-top-tuned": "Cross-top-tuned",
}
FAMILIES = ("supervised", "ssl", "text-image")
FAMILY_LABELS = {
    "supervised": "Supervised",
    "ssl": "SSL",
    "text-image": "Text-image",
    "unknown": "Unknown",
}
MEAN = "Mean"
IMPROVEMENT = "improvement"

# Canonical columns read from a record, and where each may be found (dotted paths into the
# record, first hit wins; ``a+b`` sums the fields present; a factor converts seconds to hours).
# Stages 02-04 add these fields through ``score_and_record(extra=...)``; the aliases keep the
# analysis tolerant of other spellings and older runs.
_HOURS = 1.0 / 3600.0
_FIELD_ALIASES: dict[str, tuple[tuple[str, float], ...]] = {
    "val_accuracy": (
        ("val_accuracy", 1.0),
        ("finetune.val_accuracy", 1.0),
        ("val_metrics.accuracy", 1.0),
        ("classification.val.accuracy", 1.0),
        ("run_metrics.val_accuracy", 1.0),
    ),
    "test_accuracy": (
        ("test_accuracy", 1.0),
        ("classification.accuracy", 1.0),
        ("classification.test.accuracy", 1.0),
        ("test_metrics.accuracy", 1.0),
        ("classification_metrics.accuracy", 1.0),
        ("run_metrics.test_accuracy", 1.0),
        ("run_metrics.accuracy", 1.0),
    ),
    "train_hours": (
        ("train_hours", 1.0),
        ("train_wall_s", _HOURS),
        ("training_wall_s", _HOURS),
        ("finetune.train_wall_s", _HOURS),
        ("tuner_wall_s+final_fit_wall_s", _HOURS),  # 03_toptune: search + final training
        ("run_metrics.train_wall_s", _HOURS),
    ),
    "gpu_hours": (
        ("gpu_hours", 1.0),
        ("finetune.gpu_hours", 1.0),
        ("run_metrics.gpu_hours", 1.0),
    ),
    "source_dataset": (("source_dataset", 1.0), ("finetuned_on", 1.0), ("finetune_dataset", 1.0)),
    "tuned_on": (("tuned_on", 1.0), ("toptuned_on", 1.0), ("toptune_dataset", 1.0)),
    "base_model": (("base_model", 1.0), ("pretrained_model", 1.0), ("finetuned_from", 1.0)),
}
_ID_COLUMNS = (
    "stage",
    "mode",
    "model",
    "dataset",
    "family",
    "backbone",
    "paper_name",
    "weights_kind",
    "label",
    "protocol",
    "query_split",
    "index_split",
    "k",
    "embed_dim",
    "n_queries",
    "n_lone",
    "wall_s",
    "config_hash",
    "dataset_fingerprint",
    "per_query_file",
    "mlflow_run_id",
    "git_sha",
)
_SKIP_PREFIXES = ("config.", "versions.", "caches.", "failed_images", "metrics.", "params.")


class AnalysisError(ValueError):
    """The runs cannot be analysed (none found, wrong experiment...); the message says why."""


@register_stage("05_analysis")
class AnalysisConfig(StageConfig):
    """Parameters of stage 05, mirrored by ``notebooks/05_analysis.ipynb`` and its params file."""

    source: Literal["mlflow", "records"] = "mlflow"  # MLflow runs, or result records on disk
    tracking_uri: str = ""  # "" = sqlite runs/mlflow.db (or $MLFLOW_TRACKING_URI)
    experiment: str = "embbench"  # MLflow experiment holding the runs
    models: list[str] = Field(default_factory=list)  # keep only these models; [] = all
    datasets: list[str] = Field(default_factory=list)  # keep only these datasets; [] = all
    k: int = Field(5, ge=1, le=100)  # cut-off of the @k metrics; runs with another k are left out
    metric: str = "mMP@5"  # headline retrieval metric (table 3, figures 4-7, the guide)
    n_boot: int = Field(1000, ge=0)  # bootstrap resamples for CIs and paired tests; 0 = none
    confidence: float = Field(0.95, gt=0.0, lt=1.0)  # CI level; tests use alpha = 1 - confidence
    pairs: Literal["best", "all"] = "best"  # paired tests: best vs each other, or every pair
    seed: int = 0  # bootstrap seed
    facts: bool = True  # figure 2: compute parameters and GFLOPs (builds each model once, cached)
    report: bool = True  # render_report writes <reports_dir>/<report_name>.html
    report_name: str = "report"  # HTML file name, without extension
    title: str = "Image embeddings for e-commerce: benchmark report"  # heading of the report

    hash_exclude = frozenset({"tracking_uri", "report", "report_name", "title"})

    @field_validator("report_name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", v) or v.endswith(".html"):
            raise ValueError(
                f"report_name={v!r} must be a plain file name without '.html' or folders, "
                "e.g. 'report' (written to reports/report.html)"
            )
        return v

    @model_validator(mode="after")
    def _metric_exists(self) -> AnalysisConfig:
        allowed = metric_names(self.k)
        if self.metric not in allowed:
            raise ValueError(
                f"metric={self.metric!r} is not a retrieval metric at k={self.k}; "
                f"choose one of {allowed}"
            )
        return self

    @property
    def alpha(self) -> float:
        """Significance level of the paired tests (1 - confidence)."""
        return 1.0 - self.confidence


# --------------------------------------------------------------------------------- loading


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        elif value is None or isinstance(value, str | int | float | bool | np.generic):
            out[name] = value
    return out


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def normalise_record(record: Mapping[str, Any], k: int) -> dict[str, Any]:
    """One analysis row from a result record (or an MLflow run turned into one).

    Args:
        record: A record as written by ``score_and_record`` (stages 01-04), possibly with
            ``run_metrics`` (the MLflow run's other metrics) and ``start_time`` added.
        k: The metric cut-off; its metric names become columns.

    Returns:
        A flat mapping: identifying columns, one column per retrieval metric (``NaN`` when
        absent), the canonical cost/accuracy columns, and every other scalar field flattened
        with dots.
    """
    flat = _flatten(record)
    row: dict[str, Any] = {
        key: value for key, value in flat.items() if not key.startswith(_SKIP_PREFIXES)
    }
    for col in _ID_COLUMNS:
        row[col] = record.get(col)
    if row.get("weights_kind") is None:
        row["weights_kind"] = flat.get("weights_used.kind")
    row["weights_fell_back"] = bool(flat.get("weights_used.fell_back") or False)
    metrics = record.get("metrics") or {}
    for name in metric_names(k):
        row[name] = _num(metrics.get(name))
    for col, aliases in _FIELD_ALIASES.items():
        value: Any = None
        for path, factor in aliases:
            parts = [flat.get(p) for p in path.split("+")]
            present = [v for v in parts if v is not None]
            if not present:
                continue
            value = present[0] if len(parts) == 1 else sum(_num(v) for v in present)
            if factor != 1.0:
                value = _num(value) * factor
            break
        row[col] = value
    for col in ("val_accuracy", "test_accuracy", "train_hours", "gpu_hours"):
        row[col] = _num(row[col])
    row["timestamp"] = record.get("start_time") or record.get("saved")
    return row


def _latest_first(df: pd.DataFrame) -> pd.DataFrame:
    ts = pd.to_datetime(df["timestamp"], utc=True, errors="coerce", format="mixed")
    return df.assign(_ts=ts).sort_values("_ts", ascending=False, na_position="last")


CELL_KEY = ("stage", "mode", "model", "dataset", "label", "protocol", "source_dataset", "tuned_on")


def latest_only(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the most recent run of each cell (stage, mode, model, dataset, label, protocol, source).

    Returns:
        The de-duplicated table and how many older runs were dropped.
    """
    if df.empty:
        return df, 0
    ordered = _latest_first(df)
    key = [c for c in CELL_KEY if c in ordered]
    dedup = ordered.drop_duplicates(subset=key, keep="first").drop(columns="_ts")
    return dedup.sort_index().reset_index(drop=True), len(df) - len(dedup)


def records_frame(records: Iterable[Mapping[str, Any]], k: int) -> pd.DataFrame:
    """Analysis rows for every record of a known mode measured at cut-off ``k``.

    Records of other cut-offs are left out (their @k metrics do not compare); records without a
    mode tag (e.g. a tuner's trial runs) are not results and are skipped.
    """
    rows = []
    skipped_k = 0
    for rec in records:
        if rec.get("mode") not in MODES:
            continue
        rec_k = rec.get("k")
        if rec_k is not None and int(rec_k) != int(k):
            skipped_k += 1
            continue
        rows.append(normalise_record(rec, k))
    rows.extend(baseline_rows(rows, k))
    if skipped_k:
        logger.warning("left out %d run(s) measured at another cut-off than k=%d", skipped_k, k)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # the dataset shown in tables: its name, plus the label when one dataset was scored twice
    df["dataset_id"] = df["dataset"]
    labels = df.groupby("dataset")["label"].nunique(dropna=True)
    ambiguous = set(labels[labels > 1].index)
    if ambiguous:
        df["dataset"] = [
            f"{d} ({lab})" if d in ambiguous else d
            for d, lab in zip(df["dataset"], df["label"], strict=True)
        ]
    # runs that did not record a model's family/backbone/name (e.g. rebuilt from MLflow tags)
    # take them from the model's other runs
    for col in ("family", "backbone", "paper_name"):
        known = df.dropna(subset=[col]).drop_duplicates("model").set_index("model")[col]
        df[col] = df[col].fillna(df["model"].map(known))
    df["family"] = df["family"].fillna("unknown")
    df["paper_name"] = df["paper_name"].fillna(df["model"])
    df["entry"] = [_entry(r) for r in df.to_dict("records")]
    return df


BASELINE_STAGE = "toptune-baseline"


def baseline_rows(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Pretrained rows rebuilt from the ``pretrained_metrics`` that tuned records carry.

    Stages 03 and 04 score the pretrained embeddings on exactly the data they tuned or evaluated
    on (stage 03's label may differ from stage 01's, e.g. categories instead of products) and
    store them in their record. When no pretrained result with the same model, dataset, label
    and protocol exists, that baseline becomes a ``pretrained`` row (stage
    ``toptune-baseline``; no per-query arrays, so no CI): tuned results always have their
    like-for-like reference.
    """
    have = {
        (r["model"], r["dataset"], r.get("label"), r.get("protocol"))
        for r in rows
        if r["mode"] == "pretrained"
    }
    dims = {
        r["model"]: r.get("embed_dim")
        for r in rows
        if r["mode"] == "pretrained" and r.get("embed_dim") is not None
    }
    out = []
    for r in rows:
        if r["mode"] == "pretrained":
            continue
        values = {m: _num(r.get(f"pretrained_metrics.{m}")) for m in metric_names(k)}
        key = (r["model"], r["dataset"], r.get("label"), r.get("protocol"))
        if key in have or all(math.isnan(v) for v in values.values()):
            continue
        row = {c: r.get(c) for c in (*_ID_COLUMNS, "timestamp", "weights_fell_back")}
        row.update(values)
        row.update(
            stage=BASELINE_STAGE,
            mode="pretrained",
            config_hash=None,
            per_query_file=None,
            embed_dim=dims.get(r["model"]),
            baseline_of=r.get("mlflow_run_id"),
            val_accuracy=math.nan,
            test_accuracy=math.nan,
            train_hours=math.nan,
            gpu_hours=math.nan,
            source_dataset=None,
            tuned_on=None,
            base_model=None,
        )
        out.append(row)
    return out


def _text(value: Any) -> str | None:
    """``value`` when it is a non-empty string, else ``None`` (NaN, None, "")."""
    return value if isinstance(value, str) and value else None


def _entry(row: Mapping[str, Any]) -> str:
    """A short unique label of one result: model, mode and where it was tuned."""
    mode = row.get("mode")
    label = str(row.get("model"))
    if mode and mode != "pretrained":
        label += f" [{mode}"
        src = _text(row.get("source_dataset")) or _text(row.get("tuned_on"))
        if mode in CROSS_MODES and src:
            label += f" from {src}"
        label += "]"
    return label


def mlflow_records(tracking_uri: str = "", experiment: str = "embbench") -> list[dict[str, Any]]:
    """The result records of every finished result run in an MLflow experiment.

    A result run has a ``mode`` tag (pretrained, top-tuned...). Its record is the run's
    ``result.json`` artifact when it has one; otherwise it is rebuilt from the run's tags and
    retrieval metrics (fields the run does not carry stay missing), and a run with neither (a
    tuner's search or trial run) is not a result. Every other metric of the run is added under
    ``run_metrics``. Fine-tuning runs (``mode: training``) whose model was never scored for
    retrieval become ``fine-tuned`` records without retrieval metrics, so table 2 lists them.

    Raises:
        AnalysisError: The store or the experiment does not exist.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    from mlflow.artifacts import load_dict
    from mlflow.exceptions import MlflowException

    from embbench.tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :]
        if not Path(db).is_file():
            raise AnalysisError(
                f"no MLflow store at {db} (tracking_uri={uri!r}): run stages 01-04 first "
                "(make demo), or set tracking_uri / $MLFLOW_TRACKING_URI to your store"
            )
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise AnalysisError(
            f"MLflow experiment {experiment!r} not found at {uri}; experiments there: {names}. "
            "Set `experiment` in params/05_analysis.yaml to the one stages 01-04 logged to."
        )
    runs = mlflow.search_runs(
        experiment_ids=[exp.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        output_format="list",
    )
    out: list[dict[str, Any]] = []
    trainings = []
    for run in runs:
        tags = run.data.tags
        mode = tags.get("mode")
        if tags.get("stage") == "finetune" and mode == "training":
            trainings.append(run)
            continue
        if mode not in MODES:
            continue
        record: dict[str, Any] | None = None
        try:
            record = load_dict(f"{run.info.artifact_uri.rstrip('/')}/result.json")
        except (MlflowException, OSError, ValueError):
            record = None
        metrics = run.data.metrics
        retrieval = {
            key.replace("_at_", "@"): value
            for key, value in metrics.items()
            if _RETRIEVAL_KEY.match(key)
        }
        others = {key: v for key, v in metrics.items() if not _RETRIEVAL_KEY.match(key)}
        if not isinstance(record, dict):
            if not retrieval:
                continue  # a tuner's search or trial run, not a result
            record = {
                "stage": tags.get("stage"),
                "mode": mode,
                "model": tags.get("model"),
                "dataset": tags.get("dataset"),
                "family": tags.get("family"),
                "backbone": tags.get("backbone"),
                "weights_kind": tags.get("weights"),
                "config_hash": tags.get("config_hash"),
                "source_dataset": tags.get("source_dataset"),
                "tuned_on": tags.get("tuned_on"),
                "base_model": tags.get("base_model"),
                "git_sha": tags.get("git_sha"),
                "metrics": retrieval,
                "n_queries": others.get("n_queries"),
                "n_lone": others.get("n_lone"),
            }
        out.append(_with_run(record, run, others))
    # fine-tuning runs whose model was not (yet) scored for retrieval: table 2 shows them with
    # their retrieval metrics missing
    scored = {r.get("train_mlflow_run_id") for r in out}
    for run in trainings:
        if run.info.run_id in scored:
            continue
        tags, m = run.data.tags, run.data.metrics
        record = {
            "stage": "finetune",
            "mode": "fine-tuned",
            "model": tags.get("model"),
            "dataset": tags.get("dataset"),
            "family": tags.get("family"),
            "backbone": tags.get("backbone"),
            "weights_kind": tags.get("weights"),
            "recipe": tags.get("recipe"),
            "git_sha": tags.get("git_sha"),
            "metrics": {},
            "val_accuracy": m.get("val_accuracy"),
            "train_wall_s": m.get("train_wall_s"),
            "gpu_hours": m.get("gpu_hours"),
            "test_accuracy": m.get("test_accuracy"),
            "not_scored": True,
        }
        out.append(_with_run(record, run, {}))
    return out


_RETRIEVAL_KEY = re.compile(r"^(?:(?:mMP|MAP|MRR|NDCG)_at_\d+|mR_at_1)$")


def _with_run(record: Mapping[str, Any], run: Any, others: Mapping[str, float]) -> dict:
    out = dict(record)
    out["mlflow_run_id"] = run.info.run_id
    out["start_time"] = pd.Timestamp(run.info.start_time, unit="ms", tz="UTC").isoformat()
    out["run_metrics"] = dict(others)
    return out


def load_results(cfg: AnalysisConfig, store: ResultStore | None = None) -> pd.DataFrame:
    """One table of every tracked result (the latest run of each cell), metrics as columns.

    Args:
        cfg: Where to read (``source``, ``tracking_uri``, ``experiment``), which ``k``, and
            optional ``models`` / ``datasets`` filters.
        store: Result records on disk (``source="records"``; default ``runs/results``).

    Returns:
        One row per result, with the ``stage``, ``mode``, ``model``, ``dataset``, ``family``...
        columns, one column per retrieval metric, ``val_accuracy``, ``test_accuracy``,
        ``train_hours``, ``gpu_hours``, ``source_dataset``, ``tuned_on``, ``base_model``, and
        ``attrs["superseded"]``: how many older runs of the same cells were dropped.

    Raises:
        AnalysisError: Nothing to analyse; the message says where it looked.
    """
    if cfg.source == "mlflow":
        records = mlflow_records(cfg.tracking_uri, cfg.experiment)
        where = f"MLflow experiment {cfg.experiment!r} ({cfg.tracking_uri or 'default store'})"
    else:
        store = store or ResultStore()
        records = store.records()
        where = f"result records under {store.root}"
    df = records_frame(records, cfg.k)
    if not df.empty and cfg.models:
        df = df[df["model"].isin(cfg.models)]
    if not df.empty and cfg.datasets:
        df = df[df["dataset_id"].isin(cfg.datasets)]
    if df.empty:
        raise AnalysisError(
            f"no results at k={cfg.k} in {where}"
            + (f" for models {cfg.models}" if cfg.models else "")
            + (f" and datasets {cfg.datasets}" if cfg.datasets else "")
            + ": run stages 01-04 first (make demo), or check source/experiment/k in "
            "params/05_analysis.yaml"
        )
    df, dropped = latest_only(df.reset_index(drop=True))
    if dropped:
        logger.info("kept the latest run of each cell; %d older run(s) left out", dropped)
    df.attrs["superseded"] = dropped
    df.attrs["source"] = where
    return df


def runs_summary(df: pd.DataFrame) -> pd.DataFrame:
    """The runs behind the analysis: model, dataset, mode, weights and run id, one per row."""
    cols = [
        c
        for c in ("dataset", "model", "mode", "entry", "weights_kind", "mlflow_run_id", "git_sha")
        if c in df
    ]
    return df[cols].sort_values(["dataset", "model", "mode"]).reset_index(drop=True)


def weights_summary(df: pd.DataFrame) -> dict[str, Any]:
    """Which weights the results used: counts per kind and the models run with random weights.

    Returns:
        ``{"counts": {kind: n}, "random_models": [...], "fell_back_models": [...]}``; a kind of
        ``"unknown"`` stands for runs that did not record it.
    """
    kinds = df["weights_kind"].fillna("unknown").astype(str)
    random_models = sorted(set(df.loc[kinds == "random", "model"]))
    fell = df["weights_fell_back"].fillna(False).astype(bool) if "weights_fell_back" in df else None
    fell_back = sorted(set(df.loc[fell, "model"])) if fell is not None else []
    return {
        "counts": kinds.value_counts().to_dict(),
        "random_models": random_models,
        "fell_back_models": fell_back,
    }


# ----------------------------------------------------------------------- per-query arrays


class PerQuery:
    """Loads (and memoises) the per-query arrays saved beside each result record.

    Args:
        store: The result store holding the records (default ``runs/results``).
    """

    def __init__(self, store: ResultStore | None = None) -> None:
        self.store = store or ResultStore()
        self._memo: dict[Path, dict[str, np.ndarray] | None] = {}

    def path(self, row: Mapping[str, Any]) -> Path | None:
        """Where ``row``'s arrays are (``None`` when the run saved none on this machine)."""
        stage, dataset = row.get("stage"), row.get("dataset_id", row.get("dataset"))
        model, mode, chash = row.get("model"), row.get("mode"), row.get("config_hash")
        if not all(isinstance(v, str) and v for v in (stage, dataset, model, mode, chash)):
            return None
        json_path = self.store.path(stage, dataset, model, mode, chash)
        # runs read from MLflow lack ``per_query_file``: the record was logged before the store
        # named the file, which is always <record stem>-per_query.npz
        name = _text(row.get("per_query_file")) or f"{json_path.stem}-per_query.npz"
        path = json_path.with_name(name)
        return path if path.is_file() else None

    def identity(self, row: Mapping[str, Any]) -> str | None:
        """A key that changes whenever ``row``'s arrays change (path, size, mtime)."""
        path = self.path(row)
        if path is None:
            return None
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"

    def __call__(self, row: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
        """The arrays of ``row`` (``None`` when the run saved none or they are not on disk)."""
        path = self.path(row)
        if path is None:
            return None
        if path not in self._memo:
            try:
                with np.load(path, allow_pickle=False) as z:
                    self._memo[path] = {key: z[key] for key in z.files}
            except (OSError, ValueError) as exc:
                logger.warning("per-query arrays %s unreadable: %s", path, exc)
                self._memo[path] = None
        return self._memo[path]


class BootstrapCache:
    """Bootstrap results keyed by the per-query files and settings they came from.

    Bootstrapping hundreds of results over tens of thousands of queries takes minutes; the
    report is rerun after every stage. Each CI and paired test is stored in
    ``<runs_dir>/analysis/bootstrap.json`` under a key made of the per-query files' identity
    (path, size, modification time), the metric and the bootstrap settings, so only new or
    changed results are resampled.

    Args:
        path: The cache file (default ``<runs_dir>/analysis/bootstrap.json``).
    """

    def __init__(self, path: Path | None = None) -> None:
        from embbench.paths import runs_dir

        self.path = Path(path) if path is not None else runs_dir() / "analysis" / "bootstrap.json"
        self._data: dict[str, Any] = {}
        self._dirty = False
        if self.path.is_file():
            try:
                import json

                self._data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                logger.warning("ignoring unreadable bootstrap cache %s (%s)", self.path, exc)

    @staticmethod
    def key(*parts: Any) -> str:
        """The cache key of ``parts``."""
        from embbench._utils import stable_hash

        return stable_hash(list(parts), length=24)

    def get(self, key: str) -> Any:
        """The stored value, or ``None``."""
        return self._data.get(key)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (written by :meth:`save`)."""
        self._data[key] = value
        self._dirty = True

    def save(self) -> None:
        """Write the cache if anything was added."""
        if not self._dirty:
            return
        from embbench._utils import atomic_write_json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self._data)
        self._dirty = False


def _identity(loader: Any, row: Mapping[str, Any]) -> str | None:
    fn = getattr(loader, "identity", None)
    return fn(row) if callable(fn) else None


def add_confidence_intervals(
    df: pd.DataFrame,
    loader: Callable[[Mapping[str, Any]], dict[str, np.ndarray] | None],
    *,
    k: int,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    cache: BootstrapCache | None = None,
) -> pd.DataFrame:
    """Add ``<metric> low`` / ``<metric> high``: percentile bootstrap CIs over the queries.

    Rows without per-query arrays keep ``NaN`` bounds (shown as missing, never as zero).

    Args:
        df: The results table.
        loader: Row -> per-query arrays (see :class:`PerQuery`).
        k: The metric cut-off.
        n_boot: Bootstrap resamples (0 leaves every bound missing).
        seed: Bootstrap seed.
        confidence: Coverage of the intervals.
        cache: Reuses intervals computed earlier from the same per-query files.

    Returns:
        A copy of ``df`` with two columns per metric.
    """
    out = df.copy()
    names = metric_names(k)
    lows = {m: np.full(len(out), np.nan) for m in names}
    highs = {m: np.full(len(out), np.nan) for m in names}
    if n_boot > 0:
        for i, row in enumerate(out.to_dict("records")):
            ident = _identity(loader, row) if cache is not None else None
            key = BootstrapCache.key("ci", ident, n_boot, seed, confidence) if ident else None
            hit = cache.get(key) if key and cache is not None else None
            if hit is None:
                arrays = loader(row)
                if not arrays:
                    continue
                hit = {}
                for m in names:
                    values = arrays.get(m)
                    if values is None or len(values) == 0:
                        continue
                    hit[m] = bootstrap_ci(
                        values, n_boot=n_boot, seed=seed, alpha=1.0 - confidence
                    )
                if key and cache is not None:
                    cache.put(key, hit)
            for m, (lo, hi) in hit.items():
                if m in lows:
                    lows[m][i], highs[m][i] = lo, hi
    for m in names:
        out[f"{m} low"] = lows[m]
        out[f"{m} high"] = highs[m]
    return out


def ci_table(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Long table of every result's metrics with their CI bounds (for the report)."""
    rows = []
    for row in df.to_dict("records"):
        for m in metric_names(k):
            if pd.isna(row.get(m)):
                continue
            rows.append(
                {
                    "dataset": row["dataset"],
                    "entry": row["entry"],
                    "metric": m,
                    "value": row[m],
                    "low": row.get(f"{m} low", np.nan),
                    "high": row.get(f"{m} high", np.nan),
                    "n_queries": row.get("n_queries"),
                }
            )
    return pd.DataFrame(
        rows, columns=["dataset", "entry", "metric", "value", "low", "high", "n_queries"]
    )


def aligned(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Two runs' per-query values of ``metric`` on their common queries, in the same order.

    Queries are matched by the saved ``query_index`` (the query's position in its split), so
    runs that excluded different lone queries still pair up correctly.
    """
    va, vb = np.asarray(a[metric], dtype=float), np.asarray(b[metric], dtype=float)
    qa = np.asarray(a.get("query_index", np.arange(len(va))))
    qb = np.asarray(b.get("query_index", np.arange(len(vb))))
    if len(qa) != len(va) or len(qb) != len(vb):
        raise ValueError(
            f"per-query arrays of {metric}: query_index has {len(qa)}/{len(qb)} entries for "
            f"{len(va)}/{len(vb)} values"
        )
    _, ia, ib = np.intersect1d(qa, qb, assume_unique=True, return_indices=True)
    return va[ia], vb[ib]


def _pairable(ra: Mapping[str, Any], rb: Mapping[str, Any]) -> str:
    """Why two results cannot be compared query by query ('' when they can)."""
    for col in ("dataset_fingerprint", "label", "protocol", "query_split"):
        va, vb = ra.get(col), rb.get(col)
        if isinstance(va, str) and isinstance(vb, str) and va != vb:
            return f"different {col}"
    return ""


def paired_test(
    ra: Mapping[str, Any],
    rb: Mapping[str, Any],
    loader: Callable[[Mapping[str, Any]], dict[str, np.ndarray] | None],
    metric: str,
    *,
    n_boot: int,
    seed: int,
    alpha: float,
    cache: BootstrapCache | None = None,
) -> dict[str, Any]:
    """Paired bootstrap test of two results on their common queries.

    Returns:
        ``{"diff", "low", "high", "p_value", "n_common", "note"}``; NaN values and a ``note``
        when the test could not be run (no per-query arrays, different query sets).
    """
    nan = math.nan
    empty = {"diff": nan, "low": nan, "high": nan, "p_value": nan, "n_common": 0}
    why = _pairable(ra, rb)
    if why:
        return {**empty, "note": why}
    key = None
    if cache is not None:
        ia, ib = _identity(loader, ra), _identity(loader, rb)
        if ia and ib:
            key = BootstrapCache.key("paired", ia, ib, metric, n_boot, seed, alpha)
            hit = cache.get(key)
            if hit is not None:
                return hit
    pa, pb = loader(ra), loader(rb)
    if not pa or not pb or metric not in pa or metric not in pb:
        return {**empty, "note": "no per-query arrays"}
    a, b = aligned(pa, pb, metric)
    if len(a) == 0:
        return {**empty, "note": "no common queries"}
    res = paired_bootstrap_test(a, b, n_boot=n_boot, seed=seed, alpha=alpha)
    out = {**res, "n_common": len(a), "note": ""}
    if key is not None and cache is not None:
        cache.put(key, out)
    return out


def holm(p_values: Iterable[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN)."""
    p = np.asarray(list(p_values), dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if not len(ok):
        return out
    order = ok[np.argsort(p[ok])]
    m = len(order)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        out[idx] = running
    return out


def paired_tests(
    df: pd.DataFrame,
    loader: Callable[[Mapping[str, Any]], dict[str, np.ndarray] | None],
    metric: str,
    *,
    pairs: Literal["best", "all"] = "best",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    cache: BootstrapCache | None = None,
) -> pd.DataFrame:
    """Do two results really differ on a dataset? Paired bootstrap over the shared queries.

    Per dataset, the best result (by ``metric``) is compared with every other one
    (``pairs="best"``), or every pair is compared (``"all"``). p-values are Holm-adjusted within
    each dataset.

    Returns:
        One row per pair: ``dataset``, ``a``, ``b`` (entries), ``mean a``, ``mean b``, ``diff``
        (a - b on the common queries), ``low``, ``high``, ``p_value``, ``p_holm``,
        ``significant`` (``p_holm < alpha``; missing when untested), ``n_common``, ``note``.
    """
    cols = [
        "dataset",
        "a",
        "b",
        "mean a",
        "mean b",
        "diff",
        "low",
        "high",
        "p_value",
        "p_holm",
        "significant",
        "n_common",
        "note",
    ]
    if n_boot <= 0 or df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for dataset, group in df[df[metric].notna()].groupby("dataset", sort=True):
        ranked = group.sort_values(metric, ascending=False).to_dict("records")
        if len(ranked) < 2:
            continue
        if pairs == "best":
            todo = [(ranked[0], other) for other in ranked[1:]]
        else:
            todo = [(x, y) for i, x in enumerate(ranked) for y in ranked[i + 1 :]]
        block = []
        for ra, rb in todo:
            res = paired_test(
                ra, rb, loader, metric, n_boot=n_boot, seed=seed, alpha=alpha, cache=cache
            )
            block.append(
                {
                    "dataset": dataset,
                    "a": ra["entry"],
                    "b": rb["entry"],
                    "mean a": ra[metric],
                    "mean b": rb[metric],
                    **{k: res[k] for k in ("diff", "low", "high", "p_value", "n_common", "note")},
                }
            )
        adjusted = holm(r["p_value"] for r in block)
        for r, p in zip(block, adjusted, strict=True):
            r["p_holm"] = p
            r["significant"] = bool(p < alpha) if not np.isnan(p) else None
        rows.extend(block)
    out = pd.DataFrame(rows, columns=cols)
    out.attrs["n_boot"] = n_boot
    return out


def resolvable(n_tests: int, n_boot: int, alpha: float) -> bool:
    """Whether ``n_boot`` resamples can reach significance after Holm over ``n_tests`` tests.

    The smallest bootstrap p-value is ``1 / (n_boot + 1)``; Holm multiplies it by the number of
    tests.
    """
    return n_boot > 0 and n_tests / (n_boot + 1.0) <= alpha


# ------------------------------------------------------------------------------ the tables


def _ordered(values: Iterable[str], preferred: Iterable[str]) -> list[str]:
    values = [v for v in dict.fromkeys(values) if isinstance(v, str)]
    first = [p for p in preferred if p in values]
    return first + sorted(v for v in values if v not in first)


def table3(df: pd.DataFrame, metric: str = "mMP@5") -> pd.DataFrame:
    """The paper's table 3: ``metric`` per model type and dataset, pretrained vs top-tuned.

    Each cell is the mean over the models of that type (family) run in that mode on that
    dataset; ``Mean`` is the mean over datasets, and missing (NaN) when the row lacks a dataset
    that others have (a mean over fewer datasets would not compare). For each type, the
    ``improvement`` row is top-tuned minus pretrained, cell by cell.

    Returns:
        A table indexed by (type, row) with row in ``pretrained``, ``top-tuned``,
        ``improvement``; columns = datasets, then ``Mean``; ``attrs["n_models"]`` holds the
        number of models behind each cell.
    """
    sub = df[df["mode"].isin(["pretrained", "top-tuned"]) & df[metric].notna()]
    datasets = sorted(df.loc[df[metric].notna(), "dataset"].unique())
    if sub.empty:
        return pd.DataFrame(columns=[*datasets, MEAN])
    means = sub.pivot_table(
        index=["family", "mode"], columns="dataset", values=metric, aggfunc="mean"
    )
    counts = sub.pivot_table(
        index=["family", "mode"], columns="dataset", values=metric, aggfunc="count"
    )
    families = _ordered(sub["family"], FAMILIES)
    index = []
    for fam in families:
        index += [(fam, "pretrained"), (fam, "top-tuned"), (fam, IMPROVEMENT)]
    out = pd.DataFrame(
        np.nan, index=pd.MultiIndex.from_tuples(index, names=["type", "row"]), columns=datasets
    )
    for fam in families:
        for mode in ("pretrained", "top-tuned"):
            if (fam, mode) in means.index:
                out.loc[(fam, mode), means.columns] = means.loc[(fam, mode)].to_numpy()
    out[MEAN] = out.mean(axis=1, skipna=False) if datasets else np.nan
    for fam in families:
        out.loc[(fam, IMPROVEMENT)] = (
            out.loc[(fam, "top-tuned")].to_numpy() - out.loc[(fam, "pretrained")].to_numpy()
        )
    out.attrs["n_models"] = counts
    out.attrs["metric"] = metric
    return out


def table2(df: pd.DataFrame, metric: str = "mR@1") -> pd.DataFrame:
    """The paper's table 2: fine-tuning results per model and dataset.

    Returns:
        One row per fine-tuned result: ``dataset``, ``paper_name``, ``model`` (the base),
        ``finetuned_model`` (its registered name), ``recipe``, ``metric`` (retrieval of the
        headless model; missing when it was not evaluated), ``val_accuracy``,
        ``test_accuracy``, ``train_hours`` and ``gpu_hours``; sorted by dataset, then
        validation accuracy.
    """
    cols = [
        "dataset",
        "paper_name",
        "model",
        "finetuned_model",
        "recipe",
        metric,
        "val_accuracy",
        "test_accuracy",
        "train_hours",
        "gpu_hours",
    ]
    sub = df[df["mode"] == "fine-tuned"]
    out = sub.reindex(columns=cols)
    return out.sort_values(
        ["dataset", "val_accuracy", metric], ascending=[True, False, False], na_position="last"
    ).reset_index(drop=True)


# ---------------------------------------------------------------------------- figure data


def model_facts_table(
    df: pd.DataFrame,
    *,
    compute: bool = True,
    facts_fn: Callable[[str], Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """Figure 2's data: embedding size, parameters and GFLOPs of each base model analysed.

    Args:
        df: The results table (its pretrained and top-tuned models are the base models).
        compute: Compute parameters and FLOPs with :func:`embbench.models.model_facts`
            (builds each model once with random weights; cached). When False, or when a model
            cannot be built, those columns stay missing.
        facts_fn: Replaces ``model_facts`` (tests).

    Returns:
        One row per model: ``model``, ``paper_name``, ``family``, ``backbone``, ``embed_dim``,
        ``params_m``, ``gflops``, ``gmacs``, ``error``.
    """
    base = df[df["mode"].isin(["pretrained", "top-tuned"])]
    base = base[base["mode"] == "pretrained"] if (base["mode"] == "pretrained").any() else base
    rows = []
    if compute and facts_fn is None:
        from embbench.models import model_facts as facts_fn
    for model, group in base.groupby("model", sort=True):
        first = group.iloc[0]
        row = {
            "model": model,
            "paper_name": first.get("paper_name"),
            "family": first.get("family"),
            "backbone": first.get("backbone"),
            "embed_dim": _num(first.get("embed_dim")),
            "params_m": math.nan,
            "gflops": math.nan,
            "gmacs": math.nan,
            "error": "",
        }
        if compute and facts_fn is not None:
            try:
                facts = facts_fn(model)
                row.update(
                    {
                        "params_m": _num(facts.get("params_m")),
                        "gflops": _num(facts.get("gflops")),
                        "gmacs": _num(facts.get("gmacs")),
                    }
                )
                if math.isnan(row["embed_dim"]):
                    row["embed_dim"] = _num(facts.get("embed_dim"))
            except Exception as exc:  # noqa: BLE001 - any build failure leaves the cell missing
                first = str(exc).split(". ")[0].rstrip(".")
                row["error"] = f"{type(exc).__name__}: {first}"[:160]
                logger.warning("model facts of %s unavailable: %s", model, row["error"])
        rows.append(row)
    cols = [
        "model",
        "paper_name",
        "family",
        "backbone",
        "embed_dim",
        "params_m",
        "gflops",
        "gmacs",
        "error",
    ]
    return pd.DataFrame(rows, columns=cols)


def metric_correlation(
    df: pd.DataFrame, k: int = 5, method: Literal["pearson", "spearman"] = "pearson"
) -> pd.DataFrame:
    """Figure 3's data: correlation between the retrieval metrics over every result.

    Classification accuracy (``test_accuracy``) joins when at least three results have it.

    Returns:
        A square correlation matrix (empty when fewer than three results have every metric).
    """
    names = metric_names(k)
    cols = list(names)
    if df.get("test_accuracy") is not None and df["test_accuracy"].notna().sum() >= 3:
        cols.append("test_accuracy")
    data = df[names].dropna()
    if len(data) < 3:
        return pd.DataFrame(index=cols, columns=cols, dtype=float)
    return df[cols].corr(method=method, min_periods=3)


def results_long(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Figure 4a / 5 data: every result with a value of ``metric``, with its CI if computed."""
    cols = [
        "dataset",
        "model",
        "paper_name",
        "family",
        "mode",
        "entry",
        "embed_dim",
        metric,
        f"{metric} low",
        f"{metric} high",
    ]
    return df[df[metric].notna()].reindex(columns=cols).reset_index(drop=True)


def best_per_type(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Figure 4b's data: per dataset, the best model of each (mode, family) type.

    Returns:
        One row per (dataset, mode, family): ``type`` (e.g. ``Top-tuned SSL``), ``model``,
        ``paper_name`` and the value.
    """
    sub = df[df[metric].notna() & df["mode"].isin(["pretrained", "top-tuned", "fine-tuned"])]
    cols = ["dataset", "mode", "family", "type", "model", "paper_name", metric]
    if sub.empty:
        return pd.DataFrame(columns=cols)
    idx = sub.groupby(["dataset", "mode", "family"])[metric].idxmax()
    best = sub.loc[idx.to_numpy()].copy()
    best["type"] = [
        f"{MODE_LABELS.get(m, m)} {FAMILY_LABELS.get(f, f)}"
        for m, f in zip(best["mode"], best["family"], strict=True)
    ]
    return (
        best.reindex(columns=cols).sort_values(["dataset", "mode", "family"]).reset_index(drop=True)
    )


def zscore_vs_size(df: pd.DataFrame, metric: str, mode: str = "pretrained") -> pd.DataFrame:
    """Figure 4c's data: each model's z-scored ``metric`` (within dataset) vs embedding size.

    The metric is standardised across the models of ``mode`` on each dataset (so datasets of
    different difficulty compare), then averaged per model. A dataset with a single model gives
    no z-score.

    Returns:
        One row per model: ``model``, ``paper_name``, ``family``, ``embed_dim``, ``z`` (mean
        z-score), ``n_datasets``.
    """
    sub = df[(df["mode"] == mode) & df[metric].notna()].copy()
    cols = ["model", "paper_name", "family", "embed_dim", "z", "n_datasets"]
    if sub.empty:
        return pd.DataFrame(columns=cols)
    grp = sub.groupby("dataset")[metric]
    std = grp.transform(lambda s: s.std(ddof=0))
    sub["z"] = (sub[metric] - grp.transform("mean")) / std.where(std > 0)
    out = sub.groupby("model").agg(
        paper_name=("paper_name", "first"),
        family=("family", "first"),
        embed_dim=("embed_dim", "first"),
        z=("z", "mean"),
        n_datasets=("z", "count"),
    )
    return out.reset_index().reindex(columns=cols)


def tuning_effect(
    df: pd.DataFrame,
    metric: str,
    *,
    tuned: str = "top-tuned",
    loader: Callable[[Mapping[str, Any]], dict[str, np.ndarray] | None] | None = None,
    n_boot: int = 0,
    seed: int = 0,
    alpha: float = 0.05,
    cache: BootstrapCache | None = None,
) -> pd.DataFrame:
    """Figure 6's data: ``tuned`` minus pretrained ``metric`` per model and dataset.

    With a ``loader`` and ``n_boot > 0`` each difference gets a paired bootstrap test on the
    shared queries.

    Returns:
        One row per (model, dataset) run in both modes: ``pretrained``, ``tuned``, ``delta``,
        ``relative`` (delta / pretrained), ``p_value``, ``significant``.
    """
    cols = [
        "model",
        "paper_name",
        "family",
        "dataset",
        "pretrained",
        "tuned",
        "delta",
        "relative",
        "p_value",
        "significant",
    ]
    pre = df[(df["mode"] == "pretrained") & df[metric].notna()]
    tun = df[(df["mode"] == tuned) & df[metric].notna()]
    if pre.empty or tun.empty:
        return pd.DataFrame(columns=cols)
    base_col = tun["base_model"].where(tun["base_model"].notna(), tun["model"])
    tun = tun.assign(_base=base_col)
    merged = tun.merge(
        pre, left_on=["_base", "dataset"], right_on=["model", "dataset"], suffixes=("", "_pre")
    )
    rows = []
    for r in merged.to_dict("records"):
        test = {"p_value": math.nan}
        if loader is not None and n_boot > 0:
            ra = {k: r[k] for k in df.columns if k in r}
            rb = {k: r.get(f"{k}_pre", r.get(k)) for k in df.columns}
            test = paired_test(
                ra, rb, loader, metric, n_boot=n_boot, seed=seed, alpha=alpha, cache=cache
            )
        p = test["p_value"]
        rows.append(
            {
                "model": r["_base"],
                "paper_name": r.get("paper_name_pre", r.get("paper_name")),
                "family": r.get("family_pre", r.get("family")),
                "dataset": r["dataset"],
                "pretrained": r[f"{metric}_pre"],
                "tuned": r[metric],
                "delta": r[metric] - r[f"{metric}_pre"],
                "relative": (r[metric] - r[f"{metric}_pre"]) / r[f"{metric}_pre"]
                if r[f"{metric}_pre"]
                else math.nan,
                "p_value": p,
                "significant": (bool(p < alpha) if not np.isnan(p) else None),
            }
        )
    return pd.DataFrame(rows, columns=cols).sort_values(["dataset", "model"]).reset_index(drop=True)


def cross_deltas(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Figure 7's data: cross-tuned minus pretrained ``metric``, per backbone and dataset pair.

    A cross result evaluates, on ``dataset`` (the target), a backbone adapted on another
    dataset: fine-tuned there (``cross-tuned``, ``source_dataset``) or with the MLP top-tuned
    there (``cross-top-tuned``, ``tuned_on``). The reference is the same backbone's pretrained
    result on the target: the one stage 04 stored in the record (``pretrained_metrics``, same
    data and label), else the pretrained row of the results table.

    Returns:
        One row per cross result: ``mode``, ``model`` (the backbone), ``target``, ``source``,
        ``cross``, ``pretrained``, ``delta`` (missing when the reference is).
    """
    cols = ["mode", "model", "family", "target", "source", "cross", "pretrained", "delta"]
    cross = df[df["mode"].isin(CROSS_MODES) & df[metric].notna()]
    if cross.empty:
        return pd.DataFrame(columns=cols)
    pre = df[(df["mode"] == "pretrained") & df[metric].notna()]
    ref = {(m, d): v for m, d, v in zip(pre["model"], pre["dataset"], pre[metric], strict=True)}
    rows = []
    for r in cross.to_dict("records"):
        base = _text(r.get("base_model")) or r["model"]
        if r["mode"] == "cross-top-tuned":
            source = _text(r.get("tuned_on")) or _text(r.get("source_dataset"))
        else:
            source = _text(r.get("source_dataset")) or _text(r.get("tuned_on"))
        stored = _num(r.get(f"pretrained_metrics.{metric}"))
        reference = stored if not math.isnan(stored) else ref.get((base, r["dataset"]), math.nan)
        rows.append(
            {
                "mode": r["mode"],
                "model": base,
                "family": r.get("family"),
                "target": r["dataset"],
                "source": source,
                "cross": r[metric],
                "pretrained": reference,
                "delta": r[metric] - reference,
            }
        )
    return pd.DataFrame(rows, columns=cols).sort_values(["mode", "target", "source", "model"])


# -------------------------------------------------------------------------- practical guide


def strategy_costs(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Every result with its gain over the same base model's pretrained result and its cost.

    Returns:
        The rows of modes pretrained, top-tuned and fine-tuned with ``base``, ``score``
        (``metric``), ``gain`` (score minus the base's pretrained score), ``train_hours``,
        ``gpu_hours`` (0 for pretrained), ``gain_per_hour`` and ``gain_per_gpu_hour`` (missing
        when the cost is unknown or zero).
    """
    sub = df[df["mode"].isin(["pretrained", *TUNED_MODES])].copy()
    if sub.empty:
        return sub.assign(base=[], score=[], gain=[], gain_per_hour=[], gain_per_gpu_hour=[])
    sub["base"] = sub["base_model"].where(sub["base_model"].notna(), sub["model"])
    pre = sub[sub["mode"] == "pretrained"]
    ref = {(m, d): v for m, d, v in zip(pre["model"], pre["dataset"], pre[metric], strict=True)}
    sub["score"] = sub[metric]
    sub["gain"] = [
        s - ref.get((b, d), math.nan) if mode != "pretrained" else 0.0
        for s, b, d, mode in zip(
            sub["score"], sub["base"], sub["dataset"], sub["mode"], strict=True
        )
    ]
    pretrained = sub["mode"] == "pretrained"
    sub.loc[pretrained, "train_hours"] = 0.0
    sub.loc[pretrained, "gpu_hours"] = 0.0
    hours = sub["train_hours"].where(sub["train_hours"] > 0)
    gpu = sub["gpu_hours"].where(sub["gpu_hours"] > 0)
    sub["gain_per_hour"] = sub["gain"] / hours
    sub["gain_per_gpu_hour"] = sub["gain"] / gpu
    return sub.reset_index(drop=True)


GUIDE_COLUMNS = [
    "dataset",
    "task",
    "strategy",
    "model",
    "paper_name",
    "score_name",
    "score",
    "low",
    "high",
    "gain",
    "train_hours",
    "gpu_hours",
    "gain_per_hour",
    "gain_per_gpu_hour",
    "recommended",
]


def practical_guide(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The practical guide for the data at hand: best model per task, strategy and dataset.

    Tasks: ``visual search`` (scored by the retrieval ``metric``; strategies pretrained,
    top-tuned, fine-tuned) and ``categorisation`` (classification accuracy on the test split,
    or validation accuracy when only that was recorded; strategies top-tuned and fine-tuned).
    For each, the best model of each strategy, its gain over the same model's pretrained
    embeddings, its training cost and the gain per hour / per GPU-hour. ``recommended`` marks
    the best score of each (dataset, task); a tie goes to the cheaper strategy.

    Returns:
        One row per (dataset, task, strategy) that has results (columns :data:`GUIDE_COLUMNS`).
    """
    costs = strategy_costs(df, metric)
    rows: list[dict[str, Any]] = []
    if costs.empty:
        return pd.DataFrame(columns=GUIDE_COLUMNS)
    acc = costs["test_accuracy"].where(costs["test_accuracy"].notna(), costs["val_accuracy"])
    acc_name = np.where(costs["test_accuracy"].notna(), "test accuracy", "val accuracy")
    costs = costs.assign(_acc=acc, _acc_name=acc_name)
    for dataset, group in costs.groupby("dataset", sort=True):
        for task, score_col, modes in (
            ("visual search", "score", ("pretrained", *TUNED_MODES)),
            ("categorisation", "_acc", TUNED_MODES),
        ):
            block = []
            for mode in modes:
                cand = group[(group["mode"] == mode) & group[score_col].notna()]
                if cand.empty:
                    continue
                best = cand.loc[cand[score_col].idxmax()]
                block.append(
                    {
                        "dataset": dataset,
                        "task": task,
                        "strategy": mode,
                        "model": best["model"],
                        "paper_name": best.get("paper_name"),
                        "score_name": metric if task == "visual search" else best["_acc_name"],
                        "score": float(best[score_col]),
                        "low": best.get(f"{metric} low", math.nan)
                        if task == "visual search"
                        else math.nan,
                        "high": best.get(f"{metric} high", math.nan)
                        if task == "visual search"
                        else math.nan,
                        "gain": best["gain"] if task == "visual search" else math.nan,
                        "train_hours": best["train_hours"],
                        "gpu_hours": best["gpu_hours"],
                        "gain_per_hour": best["gain_per_hour"]
                        if task == "visual search"
                        else math.nan,
                        "gain_per_gpu_hour": best["gain_per_gpu_hour"]
                        if task == "visual search"
                        else math.nan,
                        "recommended": False,
                        "_entry": best["entry"],
                        "_order": MODES.index(mode),
                    }
                )
            if block:
                top = max(b["score"] for b in block)
                winner = min(
                    (b for b in block if b["score"] >= top - 1e-12), key=lambda b: b["_order"]
                )
                winner["recommended"] = True
            rows.extend(block)
    out = pd.DataFrame(rows)
    out.attrs["entries"] = dict(
        zip(
            zip(out["dataset"], out["task"], out["strategy"], strict=True),
            out["_entry"],
            strict=True,
        )
    )
    return out.reindex(columns=GUIDE_COLUMNS)


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _cost(r: Mapping[str, Any]) -> str:
    hours, gpu = r.get("train_hours"), r.get("gpu_hours")
    parts = []
    if isinstance(hours, float) and not math.isnan(hours):
        parts.append(f"{hours:.2f} h of training")
    if isinstance(gpu, float) and not math.isnan(gpu):
        parts.append(f"{gpu:.2f} GPU-hours" if gpu > 0 else "no GPU")
    return ", ".join(parts) if parts else "cost not recorded"


def guide_sentences(
    guide: pd.DataFrame,
    *,
    table: pd.DataFrame | None = None,
    paired: pd.DataFrame | None = None,
    alpha: float = 0.05,
) -> list[str]:
    """Plain-language recommendations generated from the guide's numbers (nothing hard-coded).

    Args:
        guide: :func:`practical_guide`'s table.
        table: :func:`table3`'s table, for a sentence on model types across datasets.
        paired: :func:`paired_tests`' table, to say whether the winner is significantly better.
        alpha: Significance level quoted.

    Returns:
        One sentence per (dataset, task), plus one on model types when ``table`` is given.
    """
    out: list[str] = []
    if guide.empty:
        return ["No results to base a recommendation on: run stages 01-04 first."]
    tasks = ("visual search", "categorisation")
    ordered = guide.assign(_t=guide["task"].map({t: i for i, t in enumerate(tasks)}))
    for (dataset, _, task), block in ordered.groupby(["dataset", "_t", "task"], sort=True):
        recs = block.to_dict("records")
        win = next(r for r in recs if r["recommended"])
        name = f"{win['model']} ({win['strategy']})"
        s = f"{dataset}, {task}: use {name}, {win['score_name']} {_fmt(win['score'])}"
        if not math.isnan(win["low"]) and not math.isnan(win["high"]):
            s += f" (95% CI {_fmt(win['low'])}-{_fmt(win['high'])})"
        s += "."
        if win["strategy"] != "pretrained":
            if task == "visual search" and not math.isnan(win["gain"]):
                s += f" It gains {win['gain']:+.3f} over its pretrained embeddings for {_cost(win)}"
                if not math.isnan(win["gain_per_gpu_hour"]):
                    s += f" ({win['gain_per_gpu_hour']:+.3f} per GPU-hour)"
                elif not math.isnan(win["gain_per_hour"]):
                    s += f" ({win['gain_per_hour']:+.3f} per hour of tuning)"
                s += "."
            else:
                s += f" Cost: {_cost(win)}."
        others = [r for r in recs if not r["recommended"]]
        for r in others:
            diff = win["score"] - r["score"]
            s += (
                f" Best {r['strategy']}: {r['model']} at {_fmt(r['score'])} "
                f"({diff:+.3f} behind; {_cost(r)})."
            )
        if paired is not None and not paired.empty and task == "visual search":
            entries = guide.attrs.get("entries", {})
            win_entry = entries.get((dataset, task, win["strategy"]))
            hits = paired[(paired["dataset"] == dataset) & (paired["a"] == win_entry)]
            n_sig = int((hits["significant"] == True).sum())  # noqa: E712
            n_tested = int(hits["significant"].notna().sum())
            if n_tested and not resolvable(n_tested, paired.attrs.get("n_boot", 0), alpha):
                s += (
                    f" (Too few bootstrap resamples to test its lead over {n_tested} results: "
                    "raise n_boot.)"
                )
            elif n_tested:
                s += (
                    f" It is significantly better than {n_sig} of the {n_tested} other results "
                    f"tested (paired bootstrap, Holm-adjusted, alpha={alpha:.2f})."
                )
        out.append(s)
    if table is not None and not table.empty and MEAN in table:
        rows = table[table.index.get_level_values("row") != IMPROVEMENT][MEAN].dropna()
        if len(rows):
            (fam, mode), value = rows.idxmax(), rows.max()
            out.append(
                f"Across datasets, the best model type on average is "
                f"{MODE_LABELS.get(mode, mode).lower()} {FAMILY_LABELS.get(fam, fam)} "
                f"(mean {table.attrs.get('metric', 'score')} {value:.3f})."
            )
        imp = table.xs(IMPROVEMENT, level="row")[MEAN].dropna()
        for fam, value in imp.items():
            out.append(
                f"Top-tuning changes the mean {table.attrs.get('metric', 'score')} of "
                f"{FAMILY_LABELS.get(fam, fam)} models by {value:+.3f}."
            )
    return out


# ------------------------------------------------------------------------------- the stage


@dataclass
class Analysis:
    """Every table and figure's data of stage 05, computed once from the tracked runs."""

    cfg: AnalysisConfig
    results: pd.DataFrame
    table3: pd.DataFrame
    table2: pd.DataFrame
    facts: pd.DataFrame
    correlation: pd.DataFrame
    tuning: pd.DataFrame
    cross: pd.DataFrame
    paired: pd.DataFrame
    ci: pd.DataFrame
    guide: pd.DataFrame
    sentences: list[str]
    notes: list[str] = field(default_factory=list)


def run_analysis(
    cfg: AnalysisConfig,
    store: ResultStore | None = None,
    *,
    facts_fn: Callable[[str], Mapping[str, Any]] | None = None,
) -> Analysis:
    """Load the runs and compute every table, figure's data, CI, test and the guide.

    Args:
        cfg: The stage's parameters.
        store: Result records (for ``source="records"`` and the per-query arrays).
        facts_fn: Replaces :func:`embbench.models.model_facts` (tests).

    Returns:
        The :class:`Analysis`.
    """
    store = store or ResultStore()
    loader = PerQuery(store)
    cache = BootstrapCache()
    notes: list[str] = []
    results = load_results(cfg, store)
    if results.attrs.get("superseded"):
        notes.append(
            f"{results.attrs['superseded']} older run(s) of the same cells were superseded by "
            "newer ones and left out."
        )
    results = add_confidence_intervals(
        results,
        loader,
        k=cfg.k,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
        confidence=cfg.confidence,
        cache=cache,
    )
    scored = results[cfg.metric].notna() & results[f"{cfg.metric} low"].isna()
    baseline = results["stage"] == BASELINE_STAGE
    if cfg.n_boot and (scored & ~baseline).any():
        notes.append(
            f"{int((scored & ~baseline).sum())} result(s) have no per-query arrays on this "
            "machine (runs/results): their confidence intervals and paired tests are missing."
        )
    if baseline.any():
        notes.append(
            f"{int(baseline.sum())} pretrained result(s) are the baselines that stages 03/04 "
            "scored on their own data and label (no stage-01 run matches them); they have no "
            "per-query arrays, hence no confidence interval."
        )
    facts = model_facts_table(results, compute=cfg.facts, facts_fn=facts_fn)
    failed = facts[facts["error"] != ""]
    if len(failed):
        notes.append("Model facts (figure 2) unavailable for " + ", ".join(failed["model"]) + ".")
    paired = paired_tests(
        results,
        loader,
        cfg.metric,
        pairs=cfg.pairs,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
        alpha=cfg.alpha,
        cache=cache,
    )
    if not paired.empty:
        widest = int(paired.groupby("dataset").size().max())
        if not resolvable(widest, cfg.n_boot, cfg.alpha):
            notes.append(
                f"n_boot={cfg.n_boot} resamples cannot show significance after the Holm "
                f"correction over {widest} comparisons (smallest p = {widest}/(n_boot+1)); "
                f"use n_boot >= {math.ceil(widest / cfg.alpha)} for the paired tests."
            )
    t3 = table3(results, cfg.metric)
    guide = practical_guide(results, cfg.metric)
    tuning = tuning_effect(
        results,
        cfg.metric,
        loader=loader,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
        alpha=cfg.alpha,
        cache=cache,
    )
    cache.save()
    return Analysis(
        cfg=cfg,
        results=results,
        table3=t3,
        table2=table2(results, "mR@1"),
        facts=facts,
        correlation=metric_correlation(results, cfg.k),
        tuning=tuning,
        cross=cross_deltas(results, cfg.metric),
        paired=paired,
        ci=ci_table(results, cfg.k),
        guide=guide,
        sentences=guide_sentences(guide, table=t3, paired=paired, alpha=cfg.alpha),
        notes=notes,
    )


__all__ = [
    "MODES",
    "Analysis",
    "AnalysisConfig",
    "AnalysisError",
    "BootstrapCache",
    "PerQuery",
    "add_confidence_intervals",
    "aligned",
    "best_per_type",
    "ci_table",
    "cross_deltas",
    "guide_sentences",
    "latest_only",
    "load_results",
    "metric_correlation",
    "mlflow_records",
    "model_facts_table",
    "normalise_record",
    "paired_test",
    "paired_tests",
    "practical_guide",
    "resolvable",
    "records_frame",
    "results_long",
    "run_analysis",
    "runs_summary",
    "strategy_costs",
    "table2",
    "table3",
    "tuning_effect",
    "weights_summary",
    "zscore_vs_size",
]
