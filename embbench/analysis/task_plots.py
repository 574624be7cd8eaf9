"""The figures of the tasks beyond image->image, from :mod:`embbench.analysis.tasks`' tables.

Each function returns a matplotlib ``Figure`` (closed from pyplot; notebooks show it through
:func:`embbench.report.show`) or ``None`` when there is nothing to draw. Missing values are left
out, never drawn as zero; a random-init control is grey, hatched or dashed, and labelled
``(control)``, as in the paper's figures.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from embbench.analysis._plotkit import _done, _plt, _sns
from embbench.analysis.tasks import LADDER_STEPS, TASK_LABELS

_TEXT_COLOUR = "#55A868"  # the text-image family's colour in the paper's figures
CONTROL_COLOUR = "#6e7781"  # the random-init control's grey in the paper's figures


def _err(values: pd.Series, low: pd.Series, high: pd.Series) -> np.ndarray:
    """Error bar lengths (2, n); 0 where a bound is missing (no bar drawn)."""
    v = values.to_numpy(float)
    lo = np.nan_to_num(v - low.to_numpy(float), nan=0.0)
    hi = np.nan_to_num(high.to_numpy(float) - v, nan=0.0)
    return np.vstack([np.clip(lo, 0, None), np.clip(hi, 0, None)])


def _bars(ax, sub: pd.DataFrame, value: str, low: str, high: str) -> None:
    sub = sub[sub[value].notna()].sort_values(value)
    names = [
        m + (" (control)" if c else "") for m, c in zip(sub["model"], sub["control"], strict=True)
    ]
    colours = [CONTROL_COLOUR if c else _TEXT_COLOUR for c in sub["control"]]
    y = np.arange(len(sub))
    bars = ax.barh(y, sub[value], color=colours, xerr=_err(sub[value], sub[low], sub[high]))
    for bar, control in zip(bars, sub["control"], strict=True):
        if control:
            bar.set_hatch("//")
    ax.set_yticks(y, names, fontsize="small")


def task_retrieval_figure(table: pd.DataFrame, metric: str, task: str = "text-image"):
    """Per dataset, each model's ``metric`` for a retrieval task, with its 95% CI.

    Args:
        table: :func:`~embbench.analysis.tasks.retrieval_task_table`'s output.
        metric: The metric drawn (``<metric> low`` / ``high`` give the bars).
        task: Names the task in the title.
    """
    if table.empty or metric not in table or table[metric].notna().sum() == 0:
        return None
    _sns()
    datasets = sorted(table.loc[table[metric].notna(), "dataset"].unique())
    plt = _plt()
    height = max(2.5, 0.45 * table.groupby("dataset").size().max() + 1.2)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), height), squeeze=False)
    for ax, ds in zip(axes.flat, datasets, strict=True):
        _bars(ax, table[table["dataset"] == ds], metric, f"{metric} low", f"{metric} high")
        source = table.loc[table["dataset"] == ds, "text_source"].dropna().astype(str)
        ax.set_title(f"{ds}" + (f" · {source.iloc[0]}" if len(source) else ""), fontsize="small")
        ax.set_xlabel(f"{metric} (95% CI)")
        ax.set_xlim(0, 1)
    fig.suptitle(f"{TASK_LABELS.get(task, task)} retrieval")
    fig.tight_layout()
    return _done(fig)


def zero_shot_figure(table: pd.DataFrame):
    """Per dataset, each model's zero-shot top-1 accuracy (95% CI bar) and top-5 (a tick)."""
    if table.empty or table["top1"].notna().sum() == 0:
        return None
    _sns()
    datasets = sorted(table.loc[table["top1"].notna(), "dataset"].unique())
    plt = _plt()
    height = max(2.5, 0.45 * table.groupby("dataset").size().max() + 1.2)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), height), squeeze=False)
    for ax, ds in zip(axes.flat, datasets, strict=True):
        sub = table[(table["dataset"] == ds) & table["top1"].notna()].sort_values("top1")
        _bars(ax, sub, "top1", "low", "high")
        y = np.arange(len(sub))
        has5 = sub["top5"].notna().to_numpy()
        ax.scatter(sub["top5"].to_numpy()[has5], y[has5], marker="|", s=200, color="black")
        ax.set_title(ds, fontsize="small")
        ax.set_xlabel("top-1 accuracy (95% CI); | = top-5")
        ax.set_xlim(0, 1)
    fig.suptitle("Zero-shot classification from class-name prompts")
    fig.tight_layout()
    return _done(fig)


def ladder_figure(ladder: pd.DataFrame, dataset: str):
    """One dataset: per model, zero-shot -> kNN -> probe -> top-tuned -> fine-tuned accuracy.

    Steps a model did not run are absent (its line joins the steps it has); CIs are error bars
    where the records stored them; a random-init control is a grey dashed line, ``(control)``.
    """
    sub = ladder[(ladder["dataset"] == dataset) & ladder["accuracy"].notna()]
    if sub.empty:
        return None
    sns = _sns()
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    order = {s: i for i, s in enumerate(LADDER_STEPS)}
    models = sorted(sub["model"].unique())
    palette = dict(zip(models, sns.color_palette("tab10", len(models)), strict=True))
    for model in models:
        m = sub[sub["model"] == model].assign(_x=lambda d: d["step"].map(order)).sort_values("_x")
        control = bool(m["control"].any())
        colour = CONTROL_COLOUR if control else palette[model]
        ax.errorbar(
            m["_x"],
            m["accuracy"],
            yerr=_err(m["accuracy"], m["low"], m["high"]),
            marker="X" if control else "o",
            linestyle="--" if control else "-",
            color=colour,
            capsize=3,
            label=model + (" (control)" if control else ""),
        )
    ax.set_xticks(range(len(LADDER_STEPS)), LADDER_STEPS)
    top = float(sub["high"].max()) if sub["high"].notna().any() else math.nan
    ax.set_ylim(0, max(1.0, top if not math.isnan(top) else 1.0))
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{dataset}: from zero-shot to fine-tuning")
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    return _done(fig)
