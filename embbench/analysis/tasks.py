"""The tables of the tasks beyond image->image: text queries, zero-shot and the baselines.

Reads the analysis frame of every task (:func:`embbench.analysis.load.load_results` with
``all_tasks=True``), whose ``task`` column says what each row measured:

- :func:`retrieval_task_table`: text->image or image->text retrieval, the five metrics with their
  CIs per model and dataset, the text source and templates named;
- :func:`zero_shot_table`: zero-shot top-1 (with its CI), top-5 and balanced accuracy;
- :func:`classification_ladder`: per model, zero-shot -> kNN -> probe -> top-tuned -> fine-tuned
  test accuracy (missing steps are absent rows, never zero).

The image->image tables (table 3, the guide) never see these rows: they read image->image only.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from embbench.analysis._common import num as _num
from embbench.analysis.load import latest_only, records_frame
from embbench.analysis.task_rows import IMAGE_TASK
from embbench.metrics import metric_names
from embbench.records import ResultStore

TASK_LABELS = {
    "image-image": "image->image",
    "text-image": "text->image",
    "image-text": "image->text",
    "zero-shot": "zero-shot",
    "probe": "linear probe",
    "knn": "kNN",
}
# the ladder's steps, in order, and how each is found in the frame: (task, mode)
LADDER = (
    ("zero-shot", "zero-shot", None),
    ("kNN", "knn", None),
    ("probe", "probe", None),
    ("top-tuned", IMAGE_TASK, "top-tuned"),
    ("fine-tuned", IMAGE_TASK, "fine-tuned"),
)
LADDER_STEPS = tuple(step for step, _, _ in LADDER)
LADDER_COLUMNS = ["dataset", "model", "paper_name", "step", "accuracy", "low", "high", "control"]


def _col(df: pd.DataFrame, name: str, default: Any = None) -> pd.Series:
    return df[name] if name in df else pd.Series(default, index=df.index, dtype=object)


def _control(df: pd.DataFrame) -> pd.Series:
    return _col(df, "control", False).fillna(False).astype(bool)


def _of_task(df: pd.DataFrame, task: str) -> pd.DataFrame:
    if df.empty or "task" not in df:
        return df.iloc[0:0]
    return df[df["task"] == task]


def retrieval_task_table(df: pd.DataFrame, task: str, k: int) -> pd.DataFrame:
    """One row per (dataset, model) of a retrieval task: the five metrics and their CIs.

    Args:
        df: The analysis frame of every task (CIs added by
            :func:`~embbench.analysis.stats.add_confidence_intervals` when available: a metric's
            ``<metric> low`` / ``<metric> high`` columns; absent ones read as missing).
        task: ``text-image`` or ``image-text`` (``image-image`` works too).
        k: The metric cut-off.

    Returns:
        Columns ``dataset``, ``model``, ``paper_name``, ``control``, ``text_source``,
        ``templates``, ``n_queries``, ``n_lone``, then per metric the value, ``low`` and ``high``;
        sorted by dataset then the first metric, best first. Empty when the task has no rows.
    """
    names = metric_names(k)
    sub = _of_task(df, task)
    cols = ["dataset", "model", "paper_name", "control", "text_source", "templates"]
    cols += ["n_queries", "n_lone"]
    metric_cols = [c for m in names for c in (m, f"{m} low", f"{m} high")]
    if sub.empty:
        return pd.DataFrame(columns=[*cols, *metric_cols])
    out = pd.DataFrame(
        {
            "dataset": sub["dataset"],
            "model": sub["model"],
            "paper_name": _col(sub, "paper_name"),
            "control": _control(sub),
            "text_source": _col(sub, "text_source", ""),
            "templates": _col(sub, "templates", ""),
            "n_queries": _col(sub, "n_queries"),
            "n_lone": _col(sub, "n_lone"),
        }
    )
    for m in names:
        out[m] = [_num(v) for v in _col(sub, m)]
        out[f"{m} low"] = [_num(v) for v in _col(sub, f"{m} low")]
        out[f"{m} high"] = [_num(v) for v in _col(sub, f"{m} high")]
    out = out.sort_values(["dataset", names[0]], ascending=[True, False], na_position="last")
    return out.reset_index(drop=True)


def zero_shot_table(df: pd.DataFrame) -> pd.DataFrame:
    """Zero-shot classification per (dataset, model): top-1 (with its CI), top-5, balanced.

    Returns:
        Columns ``dataset``, ``model``, ``paper_name``, ``control``, ``top1``, ``low``,
        ``high``, ``top5``, ``balanced_accuracy``, ``n_classes``, ``templates``; best top-1 first
        per dataset. Empty when there are no zero-shot results.
    """
    cols = ["dataset", "model", "paper_name", "control", "top1", "low", "high", "top5"]
    cols += ["balanced_accuracy", "n_classes", "templates"]
    sub = _of_task(df, "zero-shot")
    if sub.empty:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(
        {
            "dataset": sub["dataset"],
            "model": sub["model"],
            "paper_name": _col(sub, "paper_name"),
            "control": _control(sub),
            "top1": [_num(v) for v in _col(sub, "accuracy")],
            "low": [_num(v) for v in _col(sub, "accuracy low")],
            "high": [_num(v) for v in _col(sub, "accuracy high")],
            "top5": [_num(v) for v in _col(sub, "top5_accuracy")],
            "balanced_accuracy": [_num(v) for v in _col(sub, "balanced_accuracy")],
            "n_classes": _col(sub, "n_classes"),
            "templates": _col(sub, "templates", ""),
        }
    )
    out = out.sort_values(["dataset", "top1"], ascending=[True, False], na_position="last")
    return out[cols].reset_index(drop=True)


def classification_ladder(df: pd.DataFrame) -> pd.DataFrame:
    """Per model and dataset: zero-shot -> kNN -> probe -> top-tuned -> fine-tuned accuracy.

    Each step's test accuracy (``classification["accuracy"]`` of the zero-shot, kNN and probe
    records, and of the top- and fine-tuned image->image records); its bootstrap CI when the
    record stored one. A step a model did not run is absent (no row), never zero. A fine-tuned
    model counts under the base model it was tuned from (the record's ``model``).

    Returns:
        Long table with :data:`LADDER_COLUMNS`, steps in :data:`LADDER_STEPS` order.
    """
    if df.empty or "task" not in df:
        return pd.DataFrame(columns=LADDER_COLUMNS)
    acc = _col(df, "accuracy").map(_num)
    rows: list[dict[str, Any]] = []
    for step, task, mode in LADDER:
        mask = (df["task"] == task) & acc.notna()
        if mode is not None:
            mask &= df["mode"] == mode
        for r in df[mask].to_dict("records"):
            rows.append(
                {
                    "dataset": r["dataset"],
                    "model": r["model"],
                    "paper_name": r.get("paper_name") or r["model"],
                    "step": step,
                    "accuracy": _num(r.get("accuracy")),
                    "low": _num(r.get("accuracy low")),
                    "high": _num(r.get("accuracy high")),
                    "control": bool(r.get("control") is True),
                }
            )
    out = pd.DataFrame(rows, columns=LADDER_COLUMNS)
    if out.empty:
        return out
    # one value per (dataset, model, step): the best when a model has several (e.g. recipes)
    out = out.sort_values("accuracy", ascending=False).drop_duplicates(
        ["dataset", "model", "step"], keep="first"
    )
    order = {s: i for i, s in enumerate(LADDER_STEPS)}
    out = out.assign(_o=out["step"].map(order)).sort_values(["dataset", "model", "_o"])
    return out.drop(columns="_o").reset_index(drop=True)


def ladder_wide(ladder: pd.DataFrame) -> pd.DataFrame:
    """:func:`classification_ladder` as a table: (dataset, model) rows, one column per step."""
    if ladder.empty:
        return pd.DataFrame(columns=["dataset", "model", *LADDER_STEPS])
    wide = ladder.pivot_table(
        index=["dataset", "model"], columns="step", values="accuracy", aggfunc="first"
    )
    steps = [s for s in LADDER_STEPS if s in wide.columns]
    return wide[steps].reset_index().rename_axis(columns=None)


def has_task(df: pd.DataFrame, task: str) -> bool:
    """Whether the frame holds any result of ``task``."""
    return not _of_task(df, task).empty


def fmt_ci(value: float, low: float, high: float, digits: int = 3) -> str:
    """``0.512 [0.47, 0.55]``; the bounds left out when missing; ``—`` when the value is."""
    if math.isnan(_num(value)):
        return "—"
    text = f"{value:.{digits}f}"
    if not (math.isnan(_num(low)) or math.isnan(_num(high))):
        text += f" [{low:.{digits - 1}f}, {high:.{digits - 1}f}]"
    return text


def ladder_for_cells(
    cells: pd.DataFrame, *, store: ResultStore | None = None, k: int = 5
) -> pd.DataFrame:
    """:func:`classification_ladder` of the (model, dataset) pairs of a stage's results.

    Notebook 03 shows the kNN and probe rows beside top-tuning: every stored result of those
    models on those datasets (the latest run of each cell, any task) is read from the store.

    Args:
        cells: A stage's results table (``model`` and ``dataset`` columns).
        store: The result records (default ``runs/results``).
        k: The metric cut-off the records were scored at.
    """
    if cells.empty:
        return classification_ladder(pd.DataFrame())
    pairs = set(zip(cells["model"].astype(str), cells["dataset"].astype(str), strict=True))
    store = store or ResultStore()
    records = [r for r in store.records() if (r.model, r.dataset) in pairs]
    frame, _ = latest_only(records_frame(records, k))
    return classification_ladder(frame)
