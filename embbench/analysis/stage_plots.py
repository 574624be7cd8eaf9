"""The figures and tables that notebooks 01-04 show for their own run (thin cells call these).

Each takes the table its stage's ``run_*`` returned and returns a seaborn grid, a matplotlib
figure or a styled table; nothing here reads a file.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

__all__ = [
    "cross_delta_figure",
    "delta_matrix_style",
    "embed_figure",
    "finetune_table",
    "toptune_comparison_figure",
    "training_curves_figure",
    "trials_figure",
    "val_accuracy_vs_retrieval_figure",
    "variants_figure",
    "variants_table",
]

PLAIN = "plain (float32, exact)"  # how the model without a deployment variant is labelled


def _sns() -> Any:
    import seaborn as sns  # plotting only when a figure is drawn

    return sns


def _is_variant(results: pd.DataFrame) -> pd.Series:
    if "variant" not in results:
        return pd.Series(False, index=results.index)
    return results["variant"].fillna("").astype(str) != ""


def embed_figure(results: pd.DataFrame, metric: str) -> Any:
    """Stage 01's bars: ``metric`` per dataset and plain model, one run each, no averaging.

    Deployment variants (compressions, index settings) are left out here: averaged into their
    model's bar they would hide its plain score (:func:`variants_figure` shows them).
    """
    plain = results[~_is_variant(results)]
    if plain.empty:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 * plain["dataset"].nunique() + 3), 3.5))
    _sns().barplot(data=plain, x="dataset", y=metric, hue="model", errorbar=None, ax=ax)
    ax.set_ylim(0, 1)
    weights = ", ".join(sorted(plain["weights"].astype(str).unique())) if "weights" in plain else ""
    ax.set_title(f"Pretrained retrieval, {metric}" + (f" (weights: {weights})" if weights else ""))
    return fig


def variants_table(results: pd.DataFrame, metric: str) -> pd.DataFrame | None:
    """Each deployment variant's ``metric`` beside its plain model's, labelled by variant.

    Returns:
        Rows ``model, dataset, variant, metric, delta vs plain`` (the plain model first, as
        :data:`PLAIN`), or ``None`` when the run has no variants.
    """
    is_var = _is_variant(results)
    if not is_var.any():
        return None
    plain = results[~is_var].set_index(["model", "dataset"])[metric]
    var = results[is_var]
    pairs = var[["model", "dataset"]].drop_duplicates()
    base = results[~is_var].merge(pairs, on=["model", "dataset"]).assign(variant=PLAIN)
    table = pd.concat([base, var])[["model", "dataset", "variant", metric]].copy()
    ref = [
        plain.get((m, d), float("nan"))
        for m, d in zip(table["model"], table["dataset"], strict=True)
    ]
    table[f"delta {metric} vs plain"] = table[metric] - ref
    return table.sort_values(["dataset", "model"], kind="stable").reset_index(drop=True)


def variants_figure(results: pd.DataFrame, metric: str) -> Any:
    """Horizontal bars: each deployment variant of a model, by name, below its plain score."""
    table = variants_table(results, metric)
    if table is None:
        return None
    grid = _sns().catplot(
        data=table,
        kind="bar",
        y="variant",
        x=metric,
        col="model",
        row="dataset",
        errorbar=None,
        sharey=False,
        height=3,
        aspect=1.6,
    )
    grid.set(xlim=(0, 1))
    grid.set_titles("{col_name} on {row_name}")
    return grid


def finetune_table(results: pd.DataFrame, k: int) -> pd.DataFrame:
    """Stage 02's table 2: retrieval, accuracy and cost per fine-tuned cell, best first."""
    cols = [
        "model",
        "dataset",
        "recipe",
        "mR@1",
        f"mMP@{k}",
        "val_accuracy",
        "test_accuracy",
        "test_f1_macro",
        "train_s",
        "gpu_hours",
        "global_batch",
        "lr_scaled",
    ]
    table = results[[c for c in cols if c in results]].copy()
    if "train_s" in table:
        table["training_hours"] = table.pop("train_s") / 3600
    return table.sort_values("val_accuracy", ascending=False) if len(table) else table


def training_curves_figure(history: pd.DataFrame) -> Any:
    """Loss, learning rate, validation accuracy and retrieval per epoch (stage 02's curves).

    The validation mMP@k and mR@1 are there when the recipe selects on them (``transfer``).
    """
    wanted = ("train_loss", "lr", "val_accuracy")
    retrieval = [c for c in history if c.startswith("val_mMP@") or c == "val_mR@1"]
    quantities = [c for c in (*wanted, *retrieval) if c in history]
    if history.empty or not quantities:
        return None
    curves = history.melt(
        id_vars=["model", "dataset", "epoch"], value_vars=quantities, var_name="quantity"
    ).dropna()
    return _sns().relplot(
        data=curves,
        x="epoch",
        y="value",
        hue="model",
        style="dataset",
        col="quantity",
        kind="line",
        marker="o",
        facet_kws={"sharey": False},
    )


def val_accuracy_vs_retrieval_figure(results: pd.DataFrame, metric: str, recipe: str) -> Any:
    """Validation accuracy against the retrieval metric, one point per fine-tuned cell."""
    if results.empty:
        return None
    ax = _sns().scatterplot(
        data=results, x="val_accuracy", y=metric, hue="model", style="dataset", s=80
    )
    ax.set_title(f"Fine-tuned ({recipe}): validation accuracy vs {metric}")
    ax.set_ylim(0, 1)
    return ax.figure


def trials_figure(trials: pd.DataFrame) -> Any:
    """Each search trial's validation accuracy, with the best so far as a line (stage 03)."""
    if trials.empty:
        return None
    grid = _sns().relplot(
        data=trials, x="trial", y="val_accuracy", hue="model", col="dataset", kind="scatter"
    )
    for ax, (_, part) in zip(grid.axes.flat, trials.groupby("dataset", sort=False), strict=False):
        _sns().lineplot(data=part, x="trial", y="best_so_far", hue="model", ax=ax, legend=False)
    grid.set(ylim=(0, 1))
    return grid


def toptune_comparison_figure(comparison: pd.DataFrame, metric: str) -> Any:
    """Pretrained against top-tuned ``metric`` per model and dataset (stage 03)."""
    if comparison.empty:
        return None
    grid = _sns().catplot(
        data=comparison, x="model", y=metric, hue="mode", col="dataset", kind="bar"
    )
    grid.set(ylim=(0, 1))
    return grid


def cross_delta_figure(done: pd.DataFrame, metric: str) -> Any:
    """Change of ``metric`` against pretrained per target, source and mode (stage 04)."""
    col = f"delta_{metric}"
    if done.empty or col not in done:
        return None
    grid = _sns().catplot(
        data=done, kind="bar", x="dataset", y=col, hue="source", col="mode", errorbar=None
    )
    grid.refline(y=0, color="grey")
    grid.set_axis_labels("target dataset", f"delta {metric} vs pretrained")
    return grid


def delta_matrix_style(matrix: pd.DataFrame, mode: str, metric: str) -> Any:
    """A source x target delta matrix, coloured from -0.5 (red) to +0.5 (blue)."""
    return (
        matrix.style.background_gradient(cmap="RdBu", vmin=-0.5, vmax=0.5)
        .format("{:+.3f}")
        .set_caption(f"{mode}: delta {metric} (rows: source)")
    )
