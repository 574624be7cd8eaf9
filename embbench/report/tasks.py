"""The report's sections for the tasks beyond image->image: tables in display form.

Notebook 05 shows, per task, a table (these functions) and a figure
(:mod:`embbench.analysis.task_plots`); notebook 03 shows the probe and kNN rows beside
top-tuning (:func:`ladder_display`). Values read ``0.512 [0.47, 0.55]`` (the 95% CI) and a
missing value is a dash, never zero.
"""

from __future__ import annotations

import pandas as pd

from embbench.analysis.task_guide import TASK_GUIDE_COLUMNS
from embbench.analysis.tasks import LADDER_STEPS, fmt_ci
from embbench.metrics import metric_names

NO_TEXT_IMAGE = (
    "No text->image results: run 01_embed with tasks: [text-image] on a text-image model."
)
NO_IMAGE_TEXT = (
    "No image->text results: run 01_embed with tasks: [image-text] and a text_column "
    "(item texts) on a text-image model."
)
NO_ZERO_SHOT = "No zero-shot results: run 01_embed with tasks: [zero-shot] on a text-image model."
NO_LADDER = "No classification results: run 03_toptune (probe, kNN and top-tuning rows)."


def _name(model: str, control: object) -> str:
    return f"{model} (control)" if control is True else str(model)


def task_retrieval_display(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """A retrieval task's table: each metric with its CI, the text source and templates."""
    names = metric_names(k)
    cols = ["dataset", "model", *names, "n_queries", "text source", "templates"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(
        {
            "dataset": table["dataset"],
            "model": [_name(m, c) for m, c in zip(table["model"], table["control"], strict=True)],
        }
    )
    for m in names:
        out[m] = [
            fmt_ci(v, lo, hi)
            for v, lo, hi in zip(table[m], table[f"{m} low"], table[f"{m} high"], strict=True)
        ]
    out["n_queries"] = table["n_queries"]
    out["text source"] = table["text_source"].fillna("").astype(str)
    out["templates"] = table["templates"].fillna("").astype(str)
    return out[cols]


def zero_shot_display(table: pd.DataFrame) -> pd.DataFrame:
    """Zero-shot: top-1 with its CI, top-5, balanced accuracy, classes and templates."""
    cols = ["dataset", "model", "top-1", "top-5", "balanced accuracy", "classes", "templates"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame(
        {
            "dataset": table["dataset"],
            "model": [_name(m, c) for m, c in zip(table["model"], table["control"], strict=True)],
            "top-1": [
                fmt_ci(v, lo, hi)
                for v, lo, hi in zip(table["top1"], table["low"], table["high"], strict=True)
            ],
            "top-5": [fmt_ci(v, float("nan"), float("nan")) for v in table["top5"]],
            "balanced accuracy": [
                fmt_ci(v, float("nan"), float("nan")) for v in table["balanced_accuracy"]
            ],
            "classes": table["n_classes"],
            "templates": table["templates"].fillna("").astype(str),
        }
    )[cols]


def ladder_display(ladder: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, model): each step's test accuracy with its CI; absent steps are a dash."""
    if ladder.empty:
        return pd.DataFrame(columns=["dataset", "model", *LADDER_STEPS])
    rows = []
    for (dataset, model), group in ladder.groupby(["dataset", "model"], sort=True):
        row = {"dataset": dataset, "model": _name(model, bool(group["control"].any()) or None)}
        for step in LADDER_STEPS:
            hit = group[group["step"] == step]
            row[step] = (
                fmt_ci(hit["accuracy"].iloc[0], hit["low"].iloc[0], hit["high"].iloc[0])
                if len(hit)
                else "—"
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=["dataset", "model", *LADDER_STEPS])


def task_guide_display(guide: pd.DataFrame) -> pd.DataFrame:
    """The three questions' table: winner and runner-up with their CIs, and the verdict."""
    cols = ["question", "dataset", "winner", "score", "runner-up", "verdict"]
    if guide.empty:
        return pd.DataFrame(columns=cols)
    g = guide.reindex(columns=TASK_GUIDE_COLUMNS)
    return pd.DataFrame(
        {
            "question": g["question"],
            "dataset": g["dataset"].fillna(""),
            "winner": g["winner"].fillna("—"),
            "score": [
                (f"{n}: " if isinstance(n, str) else "") + fmt_ci(v, lo, hi)
                for n, v, lo, hi in zip(
                    g["score_name"], g["score"], g["low"], g["high"], strict=True
                )
            ],
            "runner-up": [
                f"{r} ({fmt_ci(v, lo, hi)})" if isinstance(r, str) else "—"
                for r, v, lo, hi in zip(
                    g["runner_up"],
                    g["runner_score"],
                    g["runner_low"],
                    g["runner_high"],
                    strict=True,
                )
            ],
            "verdict": g["verdict"],
        }
    )[cols]
