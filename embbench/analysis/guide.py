"""The practical guide: which model and strategy to pick for the data at hand, and its cost.

:func:`practical_guide` tabulates the best result per (dataset, task, strategy);
:func:`guide_sentences` turns it into plain-language recommendations (nothing hard-coded).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from embbench.analysis._common import (
    FAMILY_LABELS,
    IMPROVEMENT,
    MEAN,
    MODE_LABELS,
)
from embbench.analysis.stats import resolvable
from embbench.analysis.tables import strategy_costs
from embbench.vocab import MODES, TUNED_MODES

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
    "weights_kind",
]

RANDOM_CAVEAT = (
    " (Random weights: this measures the pipeline, not the model; rerun with pretrained weights "
    "before acting on it.)"
)


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
                        "weights_kind": best.get("weights_kind"),
                        "_entry": best["entry"],
                        "_order": MODES.index(mode),
                    }
                )
            if block:
                recommend(block)["recommended"] = True
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


def recommend(block: list[dict[str, Any]]) -> dict[str, Any]:
    """The strategy to recommend among one (dataset, task)'s best results.

    Strategies are taken from the cheapest (pretrained, then top-tuned, then fine-tuned); a
    costlier one replaces the current pick only when it scores higher and, where both have a
    95% CI, its interval lies wholly above the pick's: a tuning whose gain the CIs do not show
    is not worth its cost. Without CIs (accuracy) the higher score wins; a tie goes to the
    cheaper strategy.
    """
    ordered = sorted(block, key=lambda b: b["_order"])
    pick = ordered[0]
    for cand in ordered[1:]:
        if cand["score"] <= pick["score"] + 1e-12:
            continue
        lows = (cand.get("low", math.nan), pick.get("high", math.nan))
        if all(isinstance(v, float) and not math.isnan(v) for v in lows) and lows[0] <= lows[1]:
            continue  # higher, but within the CIs of the cheaper pick
        pick = cand
    return pick


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _cost(r: Mapping[str, Any]) -> str:
    hours, gpu = r.get("train_hours"), r.get("gpu_hours")
    parts = []
    if isinstance(hours, float) and not math.isnan(hours):
        if hours == 0:
            parts.append("no training")
        elif hours < 0.01:  # "0.00 h" would read as free
            parts.append(f"{hours * 3600:.0f} s of training")
        else:
            parts.append(f"{hours:.2f} h of training")
    if isinstance(gpu, float) and not math.isnan(gpu):
        parts.append(f"{gpu:.2f} GPU-hours" if gpu > 0 else "no GPU")
    return ", ".join(parts) if parts else "cost not recorded"


def _gap(win: Mapping[str, Any], other: Mapping[str, Any]) -> str:
    """How far ``other`` is from the recommendation, in words: ``0.179 lower``."""
    diff = float(other["score"]) - float(win["score"])
    if math.isnan(diff):
        return "not comparable"
    if abs(diff) < 5e-4:
        return "the same score"
    return f"{abs(diff):.3f} {'lower' if diff < 0 else 'higher'}"


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
            s += (
                f" Best {r['strategy']}: {r['model']} at {_fmt(r['score'])} "
                f"({_gap(win, r)}; {_cost(r)})."
            )
            if r["score"] > win["score"] and not math.isnan(r["low"]):
                s += (
                    f" Its 95% CI ({_fmt(r['low'])}-{_fmt(r['high'])}) overlaps the "
                    f"recommendation's, so its gain is not shown to pay for {r['strategy']}."
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
        if any(r.get("weights_kind") == "random" for r in recs):
            s += RANDOM_CAVEAT
        out.append(s)
    any_random = "weights_kind" in guide and bool((guide["weights_kind"] == "random").any())
    n_block = len(out)
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
    if any_random:  # the cross-dataset sentences draw on the same random-weight results
        out[n_block:] = [s + RANDOM_CAVEAT for s in out[n_block:]]
    return out
