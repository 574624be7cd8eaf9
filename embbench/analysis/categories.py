"""Per-category views: scores per category with CIs, wrong top-1 confusion, disagreements.

All from the per-query arrays and the catalogue's labels (:class:`~embbench.analysis.gallery.
GallerySource`); rankings only where the confusion needs the wrong top-1 results.

- :func:`category_breakdown`: mMP@k and R@1 per category value per result, bootstrap CIs,
  weakest categories first.
- :func:`category_confusion`: for wrong top-1 results, which category they come from.
- :func:`disagreements`: queries where result A's top-1 is right and B's wrong, and the
  reverse, with the paired test's verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from embbench.analysis.sources import GallerySource, category_column, rank, top1_correct
from embbench.bootstrap import bootstrap_ci

BREAKDOWN_COLUMNS = ["dataset", "category", "entry", "metric", "n", "value", "low", "high"]
DISAGREE_COLUMNS = [
    "dataset",
    "a",
    "b",
    "n_common",
    "a right, b wrong",
    "b right, a wrong",
    "paired diff",
    "p_holm",
    "significant",
]


def category_breakdown(
    sources: Sequence[GallerySource],
    metrics: Sequence[str],
    *,
    group_label: str = "",
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Each metric per category value per result, with percentile bootstrap CIs over queries.

    Args:
        sources: The results (their per-query arrays and catalogue labels).
        metrics: Per-query metrics to break down (e.g. ``["mMP@5", "mR@1"]``).
        group_label: Category column; "" = each catalogue's coarsest label.
        n_boot: Bootstrap resamples (0: no CI).
        seed: Bootstrap seed.
        confidence: CI coverage.

    Returns:
        Long table (:data:`BREAKDOWN_COLUMNS`) sorted per dataset with the weakest category
        first (lowest mean of the first metric over the results); ``attrs["group_label"]``.
    """
    rows: list[dict[str, Any]] = []
    used = set()
    for s in sources:
        col = group_label or category_column(s)
        used.add(col)
        for m in metrics:
            values = s.values(m)
            if not len(values):
                continue
            groups = s.group_of(values.index.to_numpy(), col)
            for g, vals in values.groupby(groups, sort=True):
                arr = vals.to_numpy()
                lo = hi = np.nan
                if n_boot > 0 and len(arr) > 1:
                    lo, hi = bootstrap_ci(arr, n_boot=n_boot, seed=seed, alpha=1.0 - confidence)
                rows.append(
                    {
                        "dataset": s.dataset,
                        "category": g,
                        "entry": s.entry,
                        "metric": m,
                        "n": len(arr),
                        "value": float(arr.mean()),
                        "low": lo,
                        "high": hi,
                    }
                )
    out = pd.DataFrame(rows, columns=BREAKDOWN_COLUMNS)
    if not out.empty:
        first = out[out["metric"] == metrics[0]]
        weakness = first.groupby(["dataset", "category"])["value"].mean().rename("_w")
        out = out.join(weakness, on=["dataset", "category"])
        out = out.sort_values(["dataset", "_w", "category", "metric", "entry"]).drop(columns="_w")
        out = out.reset_index(drop=True)
    out.attrs["group_label"] = ", ".join(sorted(used))
    return out


def breakdown_table(breakdown: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One ``metric`` as a table: (dataset, category) rows, one column per result, text cells.

    Cells read ``0.612 [0.55, 0.67] (n=40)``; rows keep the weakest-first order.
    """
    sub = breakdown[breakdown["metric"] == metric]
    if sub.empty:
        return pd.DataFrame()
    cells = [
        f"{v:.3f}" + (f" [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) else "") + f" (n={n})"
        for v, lo, hi, n in zip(sub["value"], sub["low"], sub["high"], sub["n"], strict=True)
    ]
    order = list(dict.fromkeys(zip(sub["dataset"], sub["category"], strict=True)))
    table = sub.assign(cell=cells).pivot(
        index=["dataset", "category"], columns="entry", values="cell"
    )
    return table.reindex(pd.MultiIndex.from_tuples(order, names=["dataset", "category"]))


def category_confusion(source: GallerySource, *, group_label: str = "") -> pd.DataFrame:
    """For the queries whose top-1 result is wrong: the query's category vs the result's.

    Returns:
        Counts, indexed by the query's category, one column per result category (the diagonal:
        right category, wrong item). ``attrs["n_wrong"]`` and ``attrs["n_queries"]``.
    """
    col = group_label or category_column(source)
    correct = top1_correct(source)
    wrong = correct.index[~correct.to_numpy()].to_numpy()
    cats = sorted(pd.unique(source.items[col]).tolist(), key=str)
    out = pd.DataFrame(0, index=pd.Index(cats, name="query"), columns=pd.Index(cats, name="top-1"))
    if len(wrong):
        top = rank(source, wrong, 1).ids[:, 0]
        ok = top >= 0
        q = source.group_of(wrong[ok], col)
        r = source.group_of(top[ok], col, index=True)
        counts = pd.crosstab(pd.Series(q, name="query"), pd.Series(r, name="top-1"))
        out = out.add(counts, fill_value=0).astype(int).reindex(index=cats, columns=cats)
    out.attrs.update(n_wrong=len(wrong), n_queries=len(correct), group_label=col)
    return out


def disagreements(a: GallerySource, b: GallerySource) -> dict[str, np.ndarray]:
    """Queries (positions) where one result's top-1 is right and the other's wrong.

    Returns:
        ``{"a_only": ..., "b_only": ..., "common": ...}`` (positions evaluated by both).
    """
    ca, cb = top1_correct(a), top1_correct(b)
    common = np.intersect1d(ca.index.to_numpy(), cb.index.to_numpy())
    ra, rb = ca.loc[common].to_numpy(), cb.loc[common].to_numpy()
    return {"a_only": common[ra & ~rb], "b_only": common[rb & ~ra], "common": common}


def disagreement_table(
    pairs: Sequence[tuple[GallerySource, GallerySource]], paired: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Counts of top-1 disagreements per pair, with the paired bootstrap test's verdict.

    Args:
        pairs: ``(a, b)`` results on the same queries.
        paired: :func:`~embbench.analysis.paired_tests`' table (either order of a and b).

    Returns:
        One row per pair (:data:`DISAGREE_COLUMNS`); the test columns are missing when the
        pair was not tested.
    """
    rows = []
    for a, b in pairs:
        d = disagreements(a, b)
        test = _find_test(paired, a.dataset, a.entry, b.entry)
        rows.append(
            {
                "dataset": a.dataset,
                "a": a.entry,
                "b": b.entry,
                "n_common": len(d["common"]),
                "a right, b wrong": len(d["a_only"]),
                "b right, a wrong": len(d["b_only"]),
                **test,
            }
        )
    return pd.DataFrame(rows, columns=DISAGREE_COLUMNS)


def _find_test(paired: pd.DataFrame | None, dataset: str, a: str, b: str) -> dict[str, Any]:
    none = {"paired diff": np.nan, "p_holm": np.nan, "significant": None}
    if paired is None or paired.empty:
        return none
    same = paired[(paired["dataset"] == dataset) & (paired["a"] == a) & (paired["b"] == b)]
    flip = paired[(paired["dataset"] == dataset) & (paired["a"] == b) & (paired["b"] == a)]
    if len(same):
        r, sign = same.iloc[0], 1.0
    elif len(flip):
        r, sign = flip.iloc[0], -1.0
    else:
        return none
    return {"paired diff": sign * r["diff"], "p_holm": r["p_holm"], "significant": r["significant"]}


def best_pairs(
    sources: Sequence[GallerySource], scores: Mapping[str, float]
) -> list[tuple[GallerySource, GallerySource]]:
    """The best result (by ``scores[entry]``) paired with each other one sharing its queries."""
    ranked = sorted(sources, key=lambda s: -scores.get(s.entry, -np.inf))
    if len(ranked) < 2:
        return []
    best = ranked[0]
    same = [
        s
        for s in ranked[1:]
        if s.row.get("query_split") == best.row.get("query_split")
        and s.label == best.label
        and len(s.query.item_ids) == len(best.query.item_ids)
        and (s.query.item_ids == best.query.item_ids).all()
    ]
    return [(best, s) for s in same]
