"""The practical guide's three questions, answered from the user's own results.

- **search box** (text->image): the best text->image model by the retrieval metric;
- **visual search** (image->image): the best image->image result (any strategy);
- **categorisation**: the best linear probe or top-tuned classifier by test accuracy, whichever
  the results favour.

Each answer names the winner with its 95% CI and the runner-up; when their CIs overlap the
answer is "no clear winner" (the CIs decide, not the point estimates). A question without
results says so and how to get them, never a guess. Random-init controls are never recommended.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from embbench.analysis._common import num as _num
from embbench.analysis.task_rows import IMAGE_TASK
from embbench.analysis.tasks import fmt_ci

TASK_GUIDE_COLUMNS = [
    "question", "dataset", "task", "winner", "score_name", "score", "low", "high",
    "runner_up", "runner_score", "runner_low", "runner_high", "verdict",
]  # fmt: skip
NO_RESULTS = {
    "search box": (
        "no text->image results: run stage 01 with tasks: [text-image] on a text-image model "
        "(e.g. a CLIP or SigLIP model of the zoo)"
    ),
    "visual search": "no image->image results: run stage 01 (embed) on your data",
    "categorisation": (
        "no probe or top-tuned results: run stage 03 (toptune) with baselines: [probe] "
        "(the probe, kNN and top-tuning rows come from it)"
    ),
}


def _candidates(
    df: pd.DataFrame, question: str, metric: str, *, controls: bool = False
) -> tuple[pd.DataFrame, str]:
    """The scored rows competing for ``question`` and their score column.

    Real models only; with ``controls=True`` the random-init controls only (never a pick, but
    worth naming when they alone have results).
    """
    if df.empty or "task" not in df:
        return df.iloc[0:0], metric
    control = df["control"].fillna(False).astype(bool) if "control" in df else False
    df = df[pd.Series(control, index=df.index) == controls]
    score = metric
    if question == "search box":
        rows = df[df["task"] == "text-image"]
    elif question == "visual search":
        rows = df[df["task"] == IMAGE_TASK]
    else:
        probe = df["task"] == "probe"
        toptuned = (df["task"] == IMAGE_TASK) & (df["mode"] == "top-tuned")
        rows, score = df[probe | toptuned], "accuracy"
    if score not in rows:
        return rows.iloc[0:0], score
    return rows[rows[score].map(_num).notna()], score


def _controls_only(df: pd.DataFrame, question: str, metric: str) -> list[str]:
    """The controls that have results for ``question`` (when no real model has any)."""
    cand, _ = _candidates(df, question, metric, controls=True)
    return sorted(set(cand["model"].astype(str)))


def _bounds(row: dict[str, Any], score: str) -> tuple[float, float]:
    return _num(row.get(f"{score} low")), _num(row.get(f"{score} high"))


def _label(row: dict[str, Any]) -> str:
    if row.get("task") == "probe":
        return f"{row.get('model')} [probe]"
    return str(row.get("entry") or row.get("model"))


def task_guide(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The three questions per dataset: winner, its CI, runner-up and the verdict.

    Args:
        df: The analysis frame of every task, with CI columns (``<metric> low``/``high`` from
            :func:`~embbench.analysis.stats.add_confidence_intervals`; ``accuracy low``/``high``
            from the records' bootstrap CIs).
        metric: The retrieval metric that ranks text->image and image->image models.

    Returns:
        One row per (question, dataset) with results, plus one row per question without any
        (``dataset`` empty, ``verdict`` the message saying how to get them); columns
        :data:`TASK_GUIDE_COLUMNS`. ``verdict``: ``clear winner`` (the CIs do not overlap),
        ``no clear winner`` (they do), ``no CI`` (a bound is missing) or ``only one result``.
    """
    rows: list[dict[str, Any]] = []
    for question in ("search box", "visual search", "categorisation"):
        cand, score = _candidates(df, question, metric)
        if cand.empty:
            controls = _controls_only(df, question, metric)
            verdict = NO_RESULTS[question]
            if controls:  # results exist, but only a random-init control's: a floor, no pick
                how = verdict.split(": ", 1)[1]
                verdict = (
                    f"only the random-init control(s) {', '.join(controls)} have results (a "
                    f"floor, never a pick): {how}"
                )
            rows.append({"question": question, "dataset": "", "verdict": verdict})
            continue
        for dataset, group in cand.groupby("dataset", sort=True):
            ranked = group.sort_values(score, ascending=False).to_dict("records")
            win = ranked[0]
            lo, hi = _bounds(win, score)
            row = {
                "question": question,
                "dataset": dataset,
                "task": win.get("task"),
                "winner": _label(win),
                "score_name": "test accuracy" if score == "accuracy" else score,
                "score": _num(win[score]),
                "low": lo,
                "high": hi,
            }
            if len(ranked) == 1:
                row["verdict"] = "only one result"
            else:
                run = ranked[1]
                rlo, rhi = _bounds(run, score)
                row.update(
                    runner_up=_label(run),
                    runner_score=_num(run[score]),
                    runner_low=rlo,
                    runner_high=rhi,
                )
                if any(math.isnan(v) for v in (lo, hi, rlo, rhi)):
                    row["verdict"] = "no CI"
                else:
                    row["verdict"] = "no clear winner" if lo <= rhi else "clear winner"
            rows.append(row)
    return pd.DataFrame(rows, columns=TASK_GUIDE_COLUMNS)


_ASK = {
    "search box": "Search box (text->image)",
    "visual search": "Visual search (image->image)",
    "categorisation": "Categorisation (probe / top-tuned)",
}


def task_guide_sentences(guide: pd.DataFrame) -> list[str]:
    """The three answers in words, one sentence per (question, dataset) row."""
    out = []
    for r in guide.to_dict("records"):
        ask = _ASK[r["question"]]
        if not r.get("dataset"):
            out.append(f"{ask}: {r['verdict']}.")
            continue
        win = fmt_ci(r["score"], r["low"], r["high"])
        text = f"{ask} on {r['dataset']}: {r['winner']} ({r['score_name']} {win})"
        verdict = r["verdict"]
        if verdict == "only one result":
            text += "; the only result, nothing to compare with."
        else:
            other = fmt_ci(r["runner_score"], r["runner_low"], r["runner_high"])
            if verdict == "clear winner":
                text += f" beats {r['runner_up']} ({other}): the 95% CIs do not overlap."
            elif verdict == "no clear winner":
                text += (
                    f"; no clear winner: {r['runner_up']} ({other}) is within the CIs, "
                    "so pick on cost or size."
                )
            else:
                text += (
                    f" leads {r['runner_up']} ({other}), but without both CIs the lead is unproven."
                )
        out.append(text)
    return out
