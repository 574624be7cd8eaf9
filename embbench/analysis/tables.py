"""The paper's tables and the data behind its figures, from the analysis frame.

- :func:`table3` (mMP@5 per model type, pretrained vs top-tuned, with the improvement) and
  :func:`table2` (fine-tuning: mR@1, validation accuracy, training time and GPU-hours).
- figure data: :func:`model_facts_table` (2), :func:`metric_correlation` (3),
  :func:`results_long`, :func:`best_per_type` and :func:`zscore_vs_size` (4),
  :func:`tuning_effect` (6), :func:`cross_deltas` (7).
- :func:`strategy_costs`: every result's gain over its pretrained base and what it cost.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd

from embbench.analysis._common import (
    FAMILIES,
    FAMILY_LABELS,
    IMPROVEMENT,
    MEAN,
    MODE_LABELS,
)
from embbench.analysis._common import num as _num
from embbench.analysis._common import text as _text
from embbench.analysis.stats import BootstrapCache, paired_test
from embbench.metrics import metric_names
from embbench.vocab import CROSS_MODES, TUNED_MODES

logger = logging.getLogger(__name__)


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
        # the model registry (timm) only when facts are computed: importing analysis stays light
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
        "variant",
        "control",
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


# Below this cost (0.01 h = 36 s, shown as "0.01 h") no gain per hour is quoted.
MIN_RATE_HOURS = 0.01


def strategy_costs(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Every result with its gain over the same base model's pretrained result and its cost.

    Returns:
        The rows of modes pretrained, top-tuned and fine-tuned with ``base``, ``score``
        (``metric``), ``gain`` (score minus the base's pretrained score), ``train_hours``,
        ``gpu_hours`` (0 for pretrained), ``gain_per_hour`` and ``gain_per_gpu_hour`` (missing
        when the cost is unknown or below :data:`MIN_RATE_HOURS`: a rate over seconds of
        tuning extrapolates a hundredfold and says nothing about an hour of it).
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
    hours = sub["train_hours"].where(sub["train_hours"] >= MIN_RATE_HOURS)
    gpu = sub["gpu_hours"].where(sub["gpu_hours"] >= MIN_RATE_HOURS)
    sub["gain_per_hour"] = sub["gain"] / hours
    sub["gain_per_gpu_hour"] = sub["gain"] / gpu
    return sub.reset_index(drop=True)
