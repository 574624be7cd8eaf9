"""The paper's figures (2-7) drawn with seaborn from :mod:`embbench.analysis`'s tables.

Each function takes the table its figure needs and returns a matplotlib ``Figure`` (closed
from pyplot, so notebooks show it once, through :func:`embbench.report.show`), or ``None`` when
the table holds nothing to draw. Missing values are left out of the drawing (and shown as grey
cells in heatmaps), never drawn as zero.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from embbench.analysis._common import FAMILY_LABELS, MODE_LABELS
from embbench.analysis._plotkit import (
    CONTROL_COLOUR,
    FAMILY_PALETTE,
    MISSING_COLOUR,
    _done,
    _family_legend,
    _is_control,
    _palette,
    _plt,
    _sns,
    _spread,
)
from embbench.vocab import MODES

logger = logging.getLogger(__name__)


def model_facts_figure(facts: pd.DataFrame):
    """Figure 2: parameters (M) vs GMACs per model, marker size = embedding size.

    Falls back to a bar chart of embedding sizes when no parameter/FLOP counts are known.
    """
    if facts.empty:
        return None
    plt, sns = _plt(), _sns()
    known = facts.dropna(subset=["params_m", "gmacs"])
    if known.empty:
        data = facts.dropna(subset=["embed_dim"])
        if data.empty:
            return None
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(data) + 1.5))
        sns.barplot(
            data=data,
            y="paper_name",
            x="embed_dim",
            hue="family",
            palette=_palette(data["family"].unique()),
            dodge=False,
            ax=ax,
        )
        ax.set(xlabel="embedding size", ylabel="", title="Embedding size (no FLOP counts)")
        return _done(fig)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    dims = known["embed_dim"].fillna(known["embed_dim"].median())
    size = 40 + 260 * (dims / max(dims.max(), 1))
    for fam, grp in known.groupby("family"):
        ax.scatter(
            grp["params_m"],
            grp["gmacs"],
            s=size.loc[grp.index],
            alpha=0.7,
            color=FAMILY_PALETTE.get(fam, FAMILY_PALETTE["unknown"]),
            label=FAMILY_LABELS.get(fam, fam),
            edgecolor="black",
            linewidth=0.5,
        )
    for r in known.itertuples():
        dim = "?" if pd.isna(r.embed_dim) else int(r.embed_dim)
        ax.annotate(
            f"{r.paper_name} ({dim})",
            (r.params_m, r.gmacs),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set(
        xlabel="parameters of the image encoder (M)",
        ylabel="GMACs per image (timm's 'GFLOPs')",
        title="Models: parameters, compute and embedding size (marker and label)",
    )
    ax.legend(title="type", fontsize="small")
    return _done(fig)


def correlation_figure(corr: pd.DataFrame):
    """Figure 3: correlation between the retrieval metrics (and accuracy when recorded)."""
    if corr.empty or corr.isna().all().all():
        return None
    plt, sns = _plt(), _sns()
    n = len(corr)
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.5, 0.9 * n + 1.8))
    mask = corr.isna()
    ax.set_facecolor(MISSING_COLOUR)
    sns.heatmap(
        corr.astype(float),
        mask=mask,
        annot=True,
        fmt=".2f",
        vmin=-1,
        vmax=1,
        cmap="vlag",
        square=True,
        cbar_kws={"label": "correlation"},
        ax=ax,
    )
    ax.set_title("Correlation between metrics over all results")
    return _done(fig)


def all_models_figure(long: pd.DataFrame, metric: str):
    """Figure 4a: every model's ``metric`` per dataset, one panel per mode.

    Each dot is labelled with its model (and deployment variant); a random-init control is a
    grey cross labelled ``(control)``, so it never reads as one more model.
    """
    if long.empty:
        return None
    plt = _plt()
    _sns()
    modes = [m for m in MODES if m in set(long["mode"])]
    order = sorted(long["dataset"].unique())
    ncols = min(3, len(modes))
    nrows = math.ceil(len(modes) / ncols)
    width = max(5.0, 1.5 * len(order) + 1.5)  # room for the labels right of the dots
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, 4.8 * nrows), sharey=True, squeeze=False
    )
    families = sorted(long["family"].fillna("unknown").unique())
    lo, hi = float(long[metric].min()), float(long[metric].max())
    gap = max(hi - lo, 0.05) * 0.045
    top = hi
    for ax, mode in zip(axes.flat, modes, strict=False):
        data = long[long["mode"] == mode]
        for i, ds in enumerate(order):
            rows = data[data["dataset"] == ds].sort_values(metric).to_dict("records")
            heights = _spread([float(r[metric]) for r in rows], gap)
            top = max([top, *heights])
            for r, y_text in zip(rows, heights, strict=True):
                control = _is_control(r.get("control"))
                y = float(r[metric])
                if control:
                    ax.scatter(
                        i,
                        y,
                        marker="X",
                        s=70,
                        color=CONTROL_COLOUR,
                        edgecolor="black",
                        linewidth=0.6,
                        zorder=3,
                    )
                else:
                    colour = FAMILY_PALETTE.get(r.get("family"), FAMILY_PALETTE["unknown"])
                    ax.scatter(i, y, s=45, color=colour, edgecolor="white", linewidth=0.5, zorder=3)
                label = str(r["model"])
                variant = r.get("variant")
                if isinstance(variant, str) and variant:
                    label += f" · {variant}"
                if control:
                    label += " (control)"
                ax.annotate(
                    label,
                    (i, y),
                    xytext=(i + 0.08, y_text),
                    textcoords="data",
                    fontsize=7,
                    va="center",
                    color=CONTROL_COLOUR if control else "#24292f",
                    style="italic" if control else "normal",
                    arrowprops={"arrowstyle": "-", "color": "#b0b0b0", "lw": 0.5}
                    if abs(y_text - y) > gap / 4
                    else None,
                )
        ax.set_xticks(range(len(order)), order, rotation=30)
        ax.set_xlim(-0.4, len(order) - 0.1)
        ax.set(title=MODE_LABELS.get(mode, mode), xlabel="", ylabel=metric)
    axes.flat[0].set_ylim(lo - 2 * gap, top + 2 * gap)  # shared: labels stay inside
    for ax in list(axes.flat)[len(modes) :]:
        fig.delaxes(ax)
    controls = "control" in long and any(_is_control(v) for v in long["control"])
    _family_legend(axes.flat[0], families, control=controls)
    fig.suptitle(f"All models: {metric} per dataset and mode")
    fig.tight_layout()
    return _done(fig)


def best_per_type_figure(best: pd.DataFrame, metric: str):
    """Figure 4b: the best model of each type (mode x family) per dataset, named on its bar."""
    if best.empty:
        return None
    plt, sns = _plt(), _sns()
    types = list(dict.fromkeys(best.sort_values(["mode", "family"])["type"]))
    n_ds = best["dataset"].nunique()
    fig, ax = plt.subplots(figsize=(max(7, 1.0 * n_ds * len(types) * 0.45 + 3), 5))
    order = sorted(best["dataset"].unique())
    sns.barplot(data=best, x="dataset", y=metric, hue="type", order=order, hue_order=types, ax=ax)
    names = {(r.dataset, r.type): str(r.paper_name) for r in best.itertuples()}
    for container, typ in zip(ax.containers, types, strict=False):
        for bar in container:
            x = bar.get_x() + bar.get_width() / 2
            ds = order[int(round(x))] if 0 <= round(x) < len(order) else None
            label = names.get((ds, typ), "")
            if label and not math.isnan(bar.get_height()):
                ax.annotate(  # inside the bar from its base: labels never push the axis up
                    label,
                    (x, 0),
                    xytext=(0, 3),
                    textcoords="offset points",
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
    top = best[metric].max()
    # Retrieval metrics are bounded by 1: the axis shows that range, nothing beyond it.
    ax.set_ylim(0, 1.0 if top <= 1.0 else top * 1.05)
    ax.set(xlabel="", ylabel=metric, title=f"Best model of each type per dataset ({metric})")
    ax.legend(title="type", fontsize="small", ncol=2)
    return _done(fig)


def zscore_figure(z: pd.DataFrame, metric: str):
    """Figure 4c: mean z-scored ``metric`` (within dataset) vs embedding size."""
    data = z.dropna(subset=["z", "embed_dim"])
    if data.empty:
        return None
    plt, _ = _plt(), _sns()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for fam, grp in data.groupby("family"):
        ax.scatter(
            grp["embed_dim"],
            grp["z"],
            s=60,
            color=FAMILY_PALETTE.get(fam, FAMILY_PALETTE["unknown"]),
            label=FAMILY_LABELS.get(fam, fam),
        )
    ax.legend(title="type", fontsize="small")
    for r in data.itertuples():
        ax.annotate(
            r.paper_name, (r.embed_dim, r.z), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    ax.set_xscale("log", base=2)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(
        xlabel="embedding size",
        ylabel=f"mean z-score of {metric}",
        title="Performance (z-scored within each dataset) vs embedding size",
    )
    return _done(fig)


def pretrained_figure(long: pd.DataFrame, metric: str):
    """Figure 5: every pretrained model per dataset, sorted, with its bootstrap CI."""
    data = long[long["mode"] == "pretrained"]
    if data.empty:
        return None
    plt, _ = _plt(), _sns()
    datasets = sorted(data["dataset"].unique())
    ncols = min(3, len(datasets))
    nrows = math.ceil(len(datasets) / ncols)
    n_models = data["model"].nunique()
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5 * ncols, 0.32 * n_models * nrows + 1.8 * nrows), squeeze=False
    )
    low, high = f"{metric} low", f"{metric} high"
    for ax, ds in zip(axes.flat, datasets, strict=False):
        d = data[data["dataset"] == ds].sort_values(metric)
        colours = [FAMILY_PALETTE.get(f, FAMILY_PALETTE["unknown"]) for f in d["family"]]
        ax.barh(d["paper_name"].astype(str), d[metric], color=colours)
        has_ci = d[low].notna() & d[high].notna()
        if has_ci.any():
            dd = d[has_ci]
            ax.errorbar(
                dd[metric],
                dd["paper_name"].astype(str),
                xerr=[dd[metric] - dd[low], dd[high] - dd[metric]],
                fmt="none",
                ecolor="black",
                capsize=2,
                linewidth=0.8,
            )
        ax.set(title=ds, xlabel=metric, xlim=(0, 1))
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(datasets) :]:
        fig.delaxes(ax)
    _family_legend(axes.flat[0], sorted(data["family"].unique()))
    fig.suptitle(f"Pretrained models per dataset ({metric}, 95% bootstrap CI)")
    fig.tight_layout()
    return _done(fig)


def tuning_figure(tuning: pd.DataFrame, metric: str, what: str = "top-tuning"):
    """Figure 6: change in ``metric`` from tuning, per model and dataset (grey = not run).

    Cells are annotated with the difference, and ``*`` when a paired bootstrap test finds it
    significant.
    """
    if tuning.empty:
        return None
    plt, sns = _plt(), _sns()
    delta = tuning.pivot_table(index="paper_name", columns="dataset", values="delta")
    sig = tuning.pivot_table(
        index="paper_name", columns="dataset", values="significant", aggfunc="first"
    ).reindex_like(delta)
    labels = np.empty(delta.shape, dtype=object)
    for i in range(delta.shape[0]):
        for j in range(delta.shape[1]):
            v = delta.iat[i, j]
            s = sig.iat[i, j] if sig is not None else None
            labels[i, j] = "" if pd.isna(v) else f"{v:+.3f}" + ("*" if s is True else "")
    lim = float(np.nanmax(np.abs(delta.to_numpy()))) if delta.notna().any().any() else 1.0
    fig, ax = plt.subplots(figsize=(1.3 * delta.shape[1] + 3.5, 0.45 * delta.shape[0] + 1.8))
    ax.set_facecolor(MISSING_COLOUR)
    sns.heatmap(
        delta,
        mask=delta.isna(),
        annot=labels,
        fmt="",
        cmap="RdYlGn",
        center=0,
        vmin=-lim,
        vmax=lim,
        cbar_kws={"label": f"Δ {metric}"},
        ax=ax,
    )
    ax.set(xlabel="", ylabel="")
    ax.set_title(
        f"Effect of {what}: Δ {metric} vs pretrained (* significant; grey = not run)",
        fontsize=10,
    )
    return _done(fig)


def cross_figure(cross: pd.DataFrame, metric: str):
    """Figure 7: cross-tuning Δ ``metric`` vs the same backbone's pretrained embeddings.

    x = the target dataset (evaluated on), colour = the source dataset the backbone was
    fine-tuned on (cross-tuned) or its MLP top-tuned on (cross-top-tuned); bars are the mean
    over backbones, dots the backbones. One panel per cross mode.
    """
    data = cross.dropna(subset=["delta"])
    if data.empty:
        return None
    plt, sns = _plt(), _sns()
    modes = [m for m in MODES if m in set(data["mode"])]
    fig, axes = plt.subplots(
        1, len(modes), figsize=(6 * len(modes) + 1, 4.6), sharey=True, squeeze=False
    )
    order = sorted(data["target"].unique())
    sources = sorted(data["source"].dropna().unique())
    for ax, mode in zip(axes[0], modes, strict=True):
        d = data[data["mode"] == mode]
        shared = dict(data=d, x="target", y="delta", hue="source", order=order, hue_order=sources)
        sns.barplot(
            **shared,
            errorbar=None,
            alpha=0.8,
            ax=ax,
        )
        sns.stripplot(
            **shared,
            dodge=True,
            palette="dark:black",
            size=3,
            legend=False,
            ax=ax,
        )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(
            title=MODE_LABELS.get(mode, mode),
            xlabel="target dataset (evaluated on)",
            ylabel=f"Δ {metric} vs pretrained",
        )
        if ax.get_legend() is not None:
            title = "MLP top-tuned on" if mode == "cross-top-tuned" else "fine-tuned on"
            ax.legend(title=title, fontsize="small")
    fig.suptitle(f"Cross-tuning: Δ {metric} against the same backbone's pretrained embeddings")
    fig.tight_layout()
    return _done(fig)


def category_figure(breakdown: pd.DataFrame, metric: str):
    """Per-category ``metric`` of each result with its bootstrap CI, weakest category on top.

    One panel per dataset; categories in the table's order (weakest first).
    """
    data = breakdown[breakdown["metric"] == metric]
    if data.empty:
        return None
    plt, _ = _plt(), _sns()
    datasets = list(dict.fromkeys(data["dataset"]))
    entries = list(dict.fromkeys(data["entry"]))
    n_cat = max(data.groupby("dataset")["category"].nunique())
    fig, axes = plt.subplots(
        1,
        len(datasets),
        figsize=(5.5 * len(datasets) + 1, 0.42 * n_cat * len(entries) ** 0.5 + 2),
        squeeze=False,
    )
    colours = plt.get_cmap("tab10")
    for ax, ds in zip(axes[0], datasets, strict=True):
        d = data[data["dataset"] == ds]
        cats = list(dict.fromkeys(d["category"]))
        step = 0.8 / max(1, len(entries))
        for j, entry in enumerate(entries):
            e = d[d["entry"] == entry].set_index("category").reindex(cats)
            y = np.arange(len(cats)) - 0.4 + step * (j + 0.5)
            err = np.vstack([e["value"] - e["low"], e["high"] - e["value"]])
            ax.errorbar(
                e["value"],
                y,
                xerr=np.where(np.isnan(err), 0, err),
                fmt="o",
                ms=4,
                capsize=2,
                color=colours(j % 10),
                label=entry,
            )
        ax.set_yticks(np.arange(len(cats)), [str(c) for c in cats])
        ax.invert_yaxis()
        ax.set(title=str(ds), xlabel=metric, xlim=(0, 1.02))
    axes[0][-1].legend(fontsize="small", loc="lower right")
    fig.suptitle(f"{metric} per category (95% bootstrap CI), weakest first")
    fig.tight_layout()
    return _done(fig)


def confusion_figure(confusions: Mapping[str, pd.DataFrame]):
    """Heatmaps: for wrong top-1 results, the query's category (rows) vs the result's."""
    items = [(name, c) for name, c in confusions.items() if not c.empty and c.to_numpy().sum()]
    if not items:
        return None
    plt, sns = _plt(), _sns()
    n = max(len(c) for _, c in items)
    fig, axes = plt.subplots(
        1, len(items), figsize=((0.55 * n + 2.5) * len(items), 0.5 * n + 2), squeeze=False
    )
    for ax, (name, c) in zip(axes[0], items, strict=True):
        sns.heatmap(c, annot=True, fmt="d", cmap="Reds", cbar=False, square=True, ax=ax)
        ax.set(
            title=f"{name}\n{c.attrs.get('n_wrong', '?')} wrong top-1 of "
            f"{c.attrs.get('n_queries', '?')} queries",
            xlabel="category of the wrong top-1 result",
            ylabel="category of the query",
        )
    fig.suptitle("Where wrong top-1 results come from (diagonal: right category, wrong item)")
    fig.tight_layout()
    return _done(fig)


FIGURES: Mapping[str, str] = {
    "2": "model_facts_figure",
    "3": "correlation_figure",
    "4a": "all_models_figure",
    "4b": "best_per_type_figure",
    "4c": "zscore_figure",
    "5": "pretrained_figure",
    "6": "tuning_figure",
    "7": "cross_figure",
}

__all__ = [
    "FAMILY_PALETTE",
    "FIGURES",
    "all_models_figure",
    "best_per_type_figure",
    "category_figure",
    "confusion_figure",
    "correlation_figure",
    "cross_figure",
    "model_facts_figure",
    "pretrained_figure",
    "tuning_figure",
    "zscore_figure",
]
