"""Pareto figures (quality vs memory, quality vs latency) and the deployment sentence.

The functions take the typed results of :mod:`embbench.deploy.compress` and
:mod:`embbench.deploy.ann` and return matplotlib figures or plain text; saving and placing them
in the report is the report's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embbench.deploy.ann import IndexResult
from embbench.deploy.compress import CompressionResult

__all__ = [
    "VariantPoint",
    "deployment_sentence",
    "pareto_mask",
    "quality_latency_figure",
    "quality_memory_figure",
    "variant_points",
]


@dataclass(frozen=True)
class VariantPoint:
    """One variant on the Pareto plane.

    Attributes:
        label: Variant name.
        family: ``compression`` or the index type.
        quality: The metric's value.
        quality_ratio: Quality over exact float32's.
        bytes_per_vector: Memory per vector (compressed codes, or faiss index memory).
        memory_ratio: ``bytes_per_vector`` over float32 FLAT's.
        p50_ms: Latency p50 at batch 1 (``nan`` if not measured).
        p99_ms: Latency p99 at batch 1 (``nan`` if not measured).
        timing_source: Where the latency comes from (``faiss``, ``milvus-server``, ...).
        engine: Where the quality comes from.
        setting: Search parameters in words (``nprobe 16``), empty for compressions.
    """

    label: str
    family: str
    quality: float
    quality_ratio: float
    bytes_per_vector: float
    memory_ratio: float
    p50_ms: float
    p99_ms: float
    timing_source: str
    engine: str
    setting: str = ""


def variant_points(
    compressions: Sequence[CompressionResult] = (),
    indexes: Sequence[IndexResult] = (),
    *,
    metric: str = "mMP@5",
    latency_source: Sequence[str] = ("milvus-server", "faiss"),
) -> list[VariantPoint]:
    """Flatten results into points; quality and memory relative to exact float32.

    The reference quality is the float32 compression (else FLAT); the reference memory is
    ``4 * d`` (float32), taken from the float32 compression or the FLAT index.

    Args:
        compressions: Compression results (float32 among them for the reference).
        indexes: Index results (only ``ok`` ones are used).
        metric: The quality metric.
        latency_source: Timing sources in order of preference.

    Returns:
        The points.
    """
    ref_q = next((c.metrics[metric] for c in compressions if c.spec.kind == "float32"), None)
    ref_m = next(
        (float(c.bytes_per_vector) for c in compressions if c.spec.kind == "float32"), None
    )
    flat = next((r for r in indexes if r.spec.index_type == "FLAT" and r.status == "ok"), None)
    if ref_q is None and flat is not None:
        ref_q = flat.metrics.get(metric, float("nan")) - flat.delta.get(metric, 0.0)
    if ref_m is None and flat is not None:
        ref_m = flat.bytes_per_vector
    ref_q = ref_q or float("nan")
    ref_m = ref_m or float("nan")
    out = []
    for c in compressions:
        q = c.metrics[metric]
        out.append(VariantPoint(
            c.spec.name, "compression", q, q / ref_q, float(c.bytes_per_vector),
            c.bytes_per_vector / ref_m, float("nan"), float("nan"), "", c.search,
        ))  # fmt: skip
    for r in indexes:
        if r.status != "ok" or metric not in r.metrics:
            continue
        t = next((r.timing(s) for s in latency_source if r.timing(s)), None)
        bpv = r.bytes_per_vector if r.bytes_per_vector is not None else float("nan")
        q = r.metrics[metric]
        out.append(VariantPoint(
            r.spec.name, r.spec.index_type, q, q / ref_q, bpv, bpv / ref_m,
            t.p50_ms if t else float("nan"), t.p99_ms if t else float("nan"),
            t.source if t else "", r.engine,
            " ".join(f"{key} {value}" for key, value in r.spec.search),
        ))  # fmt: skip
    return out


def pareto_mask(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Points no other point beats (lower or equal cost and higher or equal quality, one strictly).

    Args:
        cost: Costs (lower is better); NaN points are never on the front.
        quality: Qualities (higher is better).

    Returns:
        A boolean mask of the front.
    """
    cost = np.asarray(cost, dtype=float)
    quality = np.asarray(quality, dtype=float)
    ok = np.isfinite(cost) & np.isfinite(quality)
    mask = ok.copy()
    for i in np.flatnonzero(ok):
        better = (
            ok
            & (cost <= cost[i])
            & (quality >= quality[i])
            & ((cost < cost[i]) | (quality > quality[i]))
        )
        mask[i] = not better.any()
    return mask


def _figure(points: Sequence[VariantPoint], attr: str, xlabel: str, metric: str, title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [p for p in points if np.isfinite(getattr(p, attr)) and np.isfinite(p.quality)]
    if not pts:
        ax.text(0.5, 0.5, "no measured points", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        return fig
    xs = np.array([getattr(p, attr) for p in pts])
    ys = np.array([p.quality for p in pts])
    for fam in dict.fromkeys(p.family for p in pts):
        sel = [i for i, p in enumerate(pts) if p.family == fam]
        ax.scatter(xs[sel], ys[sel], label=fam, s=28, alpha=0.8)
    front = pareto_mask(xs, ys)
    order = np.argsort(xs[front])
    ax.step(
        xs[front][order], ys[front][order], where="post", color="black", lw=1, label="Pareto front"
    )
    for i in np.flatnonzero(front):
        ax.annotate(
            pts[i].label, (xs[i], ys[i]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xscale("log")
    _log_ticks(ax, xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _plain(value: float, _pos: Any = None) -> str:
    """A tick label in plain digits (``5,120``, ``0.25``), never ``3x10^2``."""
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _log_ticks(ax: Any, values: np.ndarray) -> None:
    """Plain-number ticks on a log axis that never overlap.

    matplotlib labels minor ticks when the data span less than a decade or so, in scientific
    notation (``3x10^2 4x10^2 6x10^2``), and those labels run into each other. Here only major
    ticks are labelled: 1, 2 and 5 per decade over at most 2.5 decades, else 1 per decade; when
    fewer than two of them fall in the data's range, the smallest and largest values are the
    ticks.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if not len(values):
        return
    lo, hi = float(values.min()), float(values.max())
    subs = (1.0, 2.0, 5.0) if np.log10(hi / lo) <= 2.5 else (1.0,)
    locator = LogLocator(base=10, subs=subs)
    inside = [t for t in locator.tick_values(lo, hi) if lo <= t <= hi]
    ax.xaxis.set_major_locator(locator if len(inside) >= 2 else FixedLocator(sorted({lo, hi})))
    ax.xaxis.set_major_formatter(FuncFormatter(_plain))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _title(model: str, dataset: str, what: str) -> str:
    where = " on ".join(part for part in (model, dataset) if part)
    return f"{where}: {what}" if where else what


def quality_memory_figure(
    points: Sequence[VariantPoint], *, metric: str = "mMP@5", model: str = "", dataset: str = ""
) -> Any:
    """Quality against memory per vector (log scale), with the Pareto front.

    Returns:
        A matplotlib figure.
    """
    title = _title(model, dataset, f"{metric} vs memory")
    return _figure(points, "bytes_per_vector", "bytes per vector (log)", metric, title)


def quality_latency_figure(
    points: Sequence[VariantPoint], *, metric: str = "mMP@5", model: str = "", dataset: str = ""
) -> Any:
    """Quality against p99 latency at batch 1 (log scale), with the Pareto front.

    The x label names the timing source of the points (``faiss`` families or a server).

    Returns:
        A matplotlib figure.
    """
    sources = sorted({p.timing_source for p in points if p.timing_source})
    title = _title(model, dataset, f"{metric} vs p99 latency")
    xlabel = f"p99 latency at batch 1, ms (log; {', '.join(sources) or 'not measured'})"
    return _figure(points, "p99_ms", xlabel, metric, title)


def _memory_words(ratio: float) -> str:
    for frac, words in (
        (1.0, "the same memory"),
        (0.5, "half the memory"),
        (0.25, "a quarter of the memory"),
        (0.125, "an eighth of the memory"),
    ):
        if abs(ratio - frac) <= 0.02 * frac:
            return words
    return f"{ratio:.0%} of the memory"


def deployment_sentence(
    points: Sequence[VariantPoint],
    *,
    model: str,
    dataset: str,
    n_items: int,
    metric: str = "mMP@5",
    keep: float = 0.99,
) -> str:
    """One sentence naming the cheapest index and compression that keep ``keep`` of exact quality.

    The cheapest is the least memory per vector, then the lowest p99; index variants need a
    measured latency. Example: "For model M on dataset D at 5,000 items, IVF_SQ8 with nprobe 16
    keeps 99.4% of mMP@5 at 31% of the memory, p99 0.21 ms (faiss, batch 1); int8 vectors (exact
    search) keep 100.0% at a quarter of the memory."

    Args:
        points: From :func:`variant_points`.
        model: Model name.
        dataset: Dataset name.
        n_items: Index size the numbers were measured at.
        metric: The quality metric.
        keep: Fraction of exact quality to keep.

    Returns:
        The sentence (says so when no variant qualifies).
    """
    head = f"For model {model} on dataset {dataset} at {n_items:,} items"

    def fits(p: VariantPoint) -> bool:
        return (
            np.isfinite(p.quality_ratio)
            and p.quality_ratio >= keep
            and np.isfinite(p.memory_ratio)
            and p.label != "float32"
        )

    def cheapest(pts: list[VariantPoint]) -> VariantPoint | None:
        pts = [p for p in pts if fits(p)]
        return min(pts, key=lambda p: (p.memory_ratio, p.p99_ms)) if pts else None

    index = cheapest([p for p in points if p.family != "compression" and np.isfinite(p.p99_ms)])
    comp = cheapest([p for p in points if p.family == "compression"])
    parts = []
    if index is not None:
        with_ = f" with {index.setting}" if index.setting else ""
        parts.append(
            f"{index.family}{with_} keeps {index.quality_ratio:.1%} of {metric} at "
            f"{_memory_words(index.memory_ratio)}, p99 {index.p99_ms:.2g} ms "
            f"({index.timing_source}, batch 1)"
        )
    if comp is not None:
        parts.append(
            f"{comp.label} vectors ({comp.engine} search) keep {comp.quality_ratio:.1%} at "
            f"{_memory_words(comp.memory_ratio)}"
        )
    if not parts:
        return f"{head}, no variant measured keeps {keep:.0%} of {metric} of exact float32 search."
    return f"{head}, {'; '.join(parts)}."
