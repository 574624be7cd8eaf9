"""Result records and MLflow runs -> the analysis frame (one row per result, metrics as columns).

- :func:`mlflow_records` reads the result runs of an MLflow experiment as records;
  :func:`records_frame` turns records into rows (:func:`normalise_record`), adding the
  pretrained baselines that tuned records carry (:func:`baseline_rows`);
- :func:`load_results` does both for a source (MLflow or the records on disk) and keeps the
  latest run of each cell (:func:`latest_only`).

Missing cells stay missing (``NaN``), never zero.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from embbench._errors import UserError
from embbench._utils import metric_name
from embbench.analysis._common import num as _num
from embbench.analysis._common import text as _text
from embbench.analysis.task_rows import IMAGE_TASK, task_columns
from embbench.metrics import metric_names
from embbench.records import ResultRecord, ResultStore, parse_record
from embbench.tracking import default_tracking_uri, flatten
from embbench.vocab import CROSS_MODES, MODES

logger = logging.getLogger(__name__)


_HOURS = 1.0 / 3600.0
_ID_COLUMNS = (
    "stage", "mode", "model", "dataset", "family", "backbone", "paper_name", "label",
    "protocol", "query_split", "index_split", "k", "embed_dim", "n_queries", "n_lone",
    "n_index", "config_hash", "dataset_fingerprint", "per_query_file", "mlflow_run_id",
)  # fmt: skip


class AnalysisError(UserError, ValueError):
    """The runs cannot be analysed (none found, wrong experiment...); the message says why."""


class ResultsQuery(Protocol):
    """What :func:`load_results` reads: where the runs are, which cut-off, which filters.

    The stage config (``AnalysisConfig``) has these fields; any object with them will do.
    """

    source: str  # "mlflow" or "records"
    tracking_uri: str
    experiment: str
    k: int
    models: list[str]
    datasets: list[str]


def _flatten(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` flattened to dotted keys (:func:`embbench.tracking.flatten`), scalars only."""
    scalar = str | int | float | bool | np.generic
    return {k: v for k, v in flatten(d).items() if v is None or isinstance(v, scalar)}


def normalise_record(record: ResultRecord | Mapping[str, Any], k: int) -> dict[str, Any]:
    """One analysis row from a result record (any schema version; see :mod:`embbench.records`).

    Args:
        record: A typed record, or a stored mapping (migrated on the way in).
        k: The metric cut-off; its metric names become columns.

    Returns:
        A flat mapping: identifying columns, the lineage (``weights_kind`` is what the lineage
        STARTED from, so a model fine-tuned from random weights counts as random), one column
        per retrieval metric (``NaN`` when absent), accuracy and cost columns, and the
        record's scalar ``details`` (stage-specific facts) flattened with dots.
    """
    rec = record if isinstance(record, ResultRecord) else parse_record(record)
    lin = rec.lineage
    row: dict[str, Any] = {
        key: value for key, value in _flatten(rec.details).items() if key != "run_metrics"
    }
    row.update({col: getattr(rec, col) for col in _ID_COLUMNS})
    row.update(task_columns(rec))  # the task, its templates, classification metrics
    # unknown here, maybe known from the model's other runs (records_frame fills them in)
    for col in ("family", "backbone", "paper_name", "label"):
        row[col] = None if row[col] in ("", "unknown") else row[col]
    row.update(
        weights_kind=lin.start_kind,
        weights_used=lin.weights_kind,
        weights_fell_back=bool(lin.weights.get("fell_back") or False),
        control=lin.control,
        lineage=lin.describe(),
        base_model=lin.base_model if rec.mode != "pretrained" else None,
        source_dataset=rec.tuned_on if rec.mode in CROSS_MODES else None,
        tuned_on=rec.tuned_on,
        recipe=lin.finetune_recipe,
        variant=str(lin.variant.get("name", "")),
        git_sha=rec.git_sha,
        wall_s=rec.timings.wall_s,
        # where the gallery finds the vectors and images (nothing recomputed that is stored)
        cache_query=rec.caches.get("query"),
        cache_index=rec.caches.get("index"),
        data_root=rec.dataset_root,
        # how to read that catalogue again (checked against dataset_fingerprint before use)
        catalogue_ref=json.dumps(rec.catalogue_ref().model_dump(mode="json"), sort_keys=True),
    )
    for name in metric_names(k):
        row[name] = _num(rec.metrics.get(name))
        row[f"pretrained_metrics.{name}"] = _num(rec.pretrained_metrics.get(name))
    train_s = rec.timings.train_s
    row.update(
        val_accuracy=_num(rec.val_accuracy),
        test_accuracy=_num(rec.test_accuracy),
        train_hours=_num(train_s) * _HOURS if train_s is not None else math.nan,
        gpu_hours=_num(rec.timings.gpu_hours),
        timestamp=rec.started or rec.saved,
    )
    return row


def _latest_first(df: pd.DataFrame) -> pd.DataFrame:
    ts = pd.to_datetime(df["timestamp"], utc=True, errors="coerce", format="mixed")
    return df.assign(_ts=ts).sort_values("_ts", ascending=False, na_position="last")


# what makes a result its own cell (text_source: a text->image cell's class prompts or item texts)
CELL_KEY = ("task", "stage", "mode", "model", "dataset", "label", "protocol", "source_dataset",
            "tuned_on", "variant", "text_source")  # fmt: skip


def latest_only(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the most recent run of each cell (task, stage, mode, model, dataset, label, source...).

    Returns:
        The de-duplicated table and how many older runs were dropped.
    """
    if df.empty:
        return df, 0
    ordered = _latest_first(df)
    key = [c for c in CELL_KEY if c in ordered]
    dedup = ordered.drop_duplicates(subset=key, keep="first").drop(columns="_ts")
    return dedup.sort_index().reset_index(drop=True), len(df) - len(dedup)


def records_frame(records: Iterable[ResultRecord | Mapping[str, Any]], k: int) -> pd.DataFrame:
    """Analysis rows for every record of a known mode measured at cut-off ``k``.

    Records of other cut-offs are left out (their @k metrics do not compare); records without a
    mode tag (e.g. a tuner's trial runs) are not results and are skipped.
    """
    rows = []
    skipped_k = 0
    for raw in records:
        if not isinstance(raw, ResultRecord) and raw.get("mode") not in MODES:
            continue  # not a result (e.g. a tuner's trial run)
        rec = raw if isinstance(raw, ResultRecord) else parse_record(raw)
        if int(rec.k) != int(k):
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
    rows = [r for r in rows if r.get("task", IMAGE_TASK) == IMAGE_TASK]
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
        row = {
            c: r.get(c)
            for c in (
                *_ID_COLUMNS,
                "timestamp",
                "weights_fell_back",
                "weights_kind",
                "control",
                "git_sha",
            )
        }
        row.update(values)
        row.update(
            stage=BASELINE_STAGE,
            mode="pretrained",
            task=IMAGE_TASK,
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


def _entry(row: Mapping[str, Any]) -> str:
    """A short unique label of one result: model, deployment variant, mode, where tuned.

    A deployment variant reads ``efficientnet_lite0 · IVF_SQ8 nprobe=16``, never the plain
    model's name alone.
    """
    mode = row.get("mode")
    label = str(row.get("model"))
    variant = _text(row.get("variant"))
    if variant:
        label += f" · {variant}"
    if mode and mode != "pretrained":
        label += f" [{mode}"
        src = _text(row.get("source_dataset")) or _text(row.get("tuned_on"))
        if mode in CROSS_MODES and src:
            label += f" from {src}"
        label += "]"
    return label


def mlflow_records(tracking_uri: str = "", experiment: str = "embbench") -> list[ResultRecord]:
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
    out: list[ResultRecord] = []
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
            metric_name(key): value for key, value in metrics.items() if _RETRIEVAL_KEY.match(key)
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
    scored = {r.details.get("train_mlflow_run_id") for r in out}
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


def _with_run(record: Mapping[str, Any], run: Any, others: Mapping[str, float]) -> ResultRecord:
    """The typed record of an MLflow run, with the run's id, start time and other metrics."""
    rec = parse_record(record, f"MLflow run {run.info.run_id}")
    return rec.model_copy(
        update={
            "mlflow_run_id": run.info.run_id,
            "started": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC").isoformat(),
            "details": {**rec.details, "run_metrics": dict(others)},
        }
    )


def load_results(
    cfg: ResultsQuery, store: ResultStore | None = None, *, all_tasks: bool = False
) -> pd.DataFrame:
    """One table of every tracked result (the latest run of each cell), metrics as columns.

    Args:
        cfg: Where to read (``source``, ``tracking_uri``, ``experiment``), which ``k``, and
            optional ``models`` / ``datasets`` filters.
        store: Result records on disk (``source="records"``; default ``runs/results``).
        all_tasks: Keep every task; by default image->image only (no text or baseline rows).

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
    if not df.empty and not all_tasks:
        df = df[df["task"] == IMAGE_TASK]
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
    """The runs behind the analysis, one per row: model, dataset, mode, provenance, run id.

    ``provenance`` is the lineage in words (``fine-tuned on demo (A2, from random init)``);
    ``weights_kind`` is what the lineage started from.
    """
    df = df.rename(columns={"lineage": "provenance"})
    cols = [
        c
        for c in (
            "dataset",
            "model",
            "mode",
            "entry",
            "provenance",
            "weights_kind",
            "mlflow_run_id",
            "git_sha",
        )
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
