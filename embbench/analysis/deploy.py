"""Deployment variants in the analysis: quality against memory and latency, per model and dataset.

Stage 01 records each compression and index variant as a cell of its own (``variant`` in the
lineage). This module turns those rows of the analysis frame into the Pareto points of
:mod:`embbench.deploy.plots` (quality relative to exact float32 search on the same data,
memory relative to float32 vectors) and the deployment sentence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from embbench.analysis._common import num as _f
from embbench.analysis._common import text as _text
from embbench.deploy.plots import VariantPoint, deployment_sentence

__all__ = ["deployment_points", "deployment_sentences", "deployment_table"]


def _s(value: object) -> str:
    """A text cell of the analysis frame; missing (None or NaN, where rows lack the key) is ""."""
    return _text(value) or ""


def deployment_table(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per variant: quality and its ratio to exact float32, memory, latency, source.

    Args:
        results: The analysis frame (variant rows have a non-empty ``variant``).
        metric: The quality metric.

    Returns:
        Columns model, dataset, variant, kind, quality, quality_ratio, bytes_per_vector,
        memory_ratio, recall, p50_ms, p99_ms, timing_source, engine; empty when no variants.
    """
    if "variant" not in results:
        return pd.DataFrame()
    rows = []
    plain = results[results["variant"].fillna("") == ""]
    full_dim = (
        {
            (r["model"], r["dataset"]): _f(r.get("embed_dim"))
            for r in plain[plain["mode"] == "pretrained"].to_dict("records")
        }
        if "mode" in plain
        else {}
    )
    for r in results[results["variant"].fillna("") != ""].to_dict("records"):
        exact = _f(r.get(f"pretrained_metrics.{metric}"))
        quality = _f(r.get(metric))
        ref_bytes = _float32_bytes(r, full_dim.get((r["model"], r["dataset"]), math.nan))
        bpv = _f(r.get("bytes_per_vector"))
        rows.append({
            "model": r["model"], "dataset": r["dataset"], "variant": r["variant"],
            "kind": _s(r.get("variant_kind")), "quality": quality,
            "quality_ratio": quality / exact if exact else math.nan,
            "bytes_per_vector": bpv, "memory_ratio": bpv / ref_bytes if ref_bytes else math.nan,
            "recall": _f(r.get("recall")), "p50_ms": _f(r.get("p50_ms")),
            "p99_ms": _f(r.get("p99_ms")), "timing_source": _s(r.get("timing_source")),
            "engine": _s(r.get("engine")) or _s(r.get("search")), "n_index": _f(r.get("n_index")),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _float32_bytes(row: Mapping, plain_dim: float) -> float:
    """Bytes of the model's full float32 vector: what every variant's memory is measured against.

    A PCA variant's record holds its reduced ``embed_dim`` (64 for pca64), so ``4 * embed_dim``
    would make every PCA variant cost 100% of the memory. The variant's own
    ``float32_bytes_per_vector`` comes first, then the plain pretrained row's dimension.
    """
    for value in (
        _f(row.get("float32_bytes_per_vector")),
        4.0 * plain_dim,
        4.0 * _f(row.get("embed_dim")),
    ):
        if math.isfinite(value) and value > 0:
            return value
    return math.nan


def deployment_points(table: pd.DataFrame) -> dict[tuple[str, str], list[VariantPoint]]:
    """The Pareto points of each (model, dataset) from :func:`deployment_table`."""
    out: dict[tuple[str, str], list[VariantPoint]] = {}
    if table.empty:
        return out
    for (model, dataset), part in table.groupby(["model", "dataset"], sort=False):
        pts = []
        for r in part.to_dict("records"):
            family = "compression" if r["kind"] == "compression" else r["variant"].split()[0]
            setting = " ".join(r["variant"].split()[1:])
            pts.append(VariantPoint(
                r["variant"], family, r["quality"], r["quality_ratio"], r["bytes_per_vector"],
                r["memory_ratio"], r["p50_ms"], r["p99_ms"], r["timing_source"], r["engine"],
                setting,
            ))  # fmt: skip
        out[(str(model), str(dataset))] = pts
    return out


def deployment_sentences(table: pd.DataFrame, metric: str, keep: float = 0.99) -> list[str]:
    """One deployment sentence per (model, dataset) with variants (see the deploy package)."""
    points: Mapping[tuple[str, str], list[VariantPoint]] = deployment_points(table)
    sentences = []
    for (model, dataset), pts in points.items():
        sizes = table[(table["model"] == model) & (table["dataset"] == dataset)]["n_index"]
        n = int(np.nanmax(sizes)) if len(sizes) and np.isfinite(sizes).any() else 0
        sentences.append(
            deployment_sentence(
                pts, model=model, dataset=dataset, n_items=n, metric=metric, keep=keep
            )
        )
    return sentences
