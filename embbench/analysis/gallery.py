"""Retrieval galleries: what the search returns for a fixed, seeded sample of queries.

Everything comes from what the stages stored: the result rows name their cached vectors
(``cache_query`` / ``cache_index``, from the record's ``caches``) and their catalogue
(the record's ``catalogue`` reference, checked against its fingerprint); the per-query arrays
give each query's difficulty and whether its top-1 was right. Rankings are not recomputed when
the per-query file holds them (``topk_ids``, rows aligned with ``query_index``: the ranking the
metrics scored, a deployment variant's own included); otherwise they
are computed with :class:`~embbench.retrieval.ExactBackend`, the code the metrics were scored
with: the same L2 normalisation, canonical scores, ties by index id, and under protocol
``within`` the query removed from its own list by id. Relevance is the metrics' rule: the
result's label equals the query's.

- :func:`~embbench.analysis.sources.load_sources`: result rows -> sources (vectors, labels,
  images); :func:`~embbench.analysis.sources.rank`: their rankings.
- :func:`sample_queries`: the hardest, the easiest and a category-stratified sample.
- :func:`build_gallery`: a :class:`Gallery` of rows (query + top-k of each result) per dataset.
- :func:`gallery_for_runs`: the gallery of a few runs of the result store (notebook 01).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embbench.analysis.load import records_frame
from embbench.analysis.sources import (
    GalleryError,
    GallerySource,
    category_column,
    load_sources,
    rank,
)
from embbench.analysis.stats import PerQuery
from embbench.catalogue import Catalogue
from embbench.records import ResultStore

logger = logging.getLogger(__name__)


SECTIONS = {
    "hardest": "Hardest queries (lowest score over the results shown)",
    "easiest": "Easiest queries (highest score over the results shown)",
    "sample": "A seeded sample of queries, stratified by category",
}


# ------------------------------------------------------------------------------ sampling


def sample_queries(
    positions: np.ndarray,
    groups: np.ndarray,
    difficulty: np.ndarray | None,
    *,
    n_sample: int,
    n_extreme: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """The queries a gallery shows: hardest, easiest, and a category-stratified sample.

    Args:
        positions: Candidate query positions (the queries every result evaluated).
        groups: The category of each candidate (stratum of the sample).
        difficulty: A score per candidate (higher = easier), or ``None`` (no hard/easy rows).
        n_sample: Queries in the stratified sample (round-robin over the categories).
        n_extreme: Hardest and easiest queries, each.
        seed: Fixes the sample and breaks difficulty ties.

    Returns:
        ``{"hardest": ..., "easiest": ..., "sample": ...}``, disjoint, positions in order.
    """
    rng = np.random.default_rng(seed)
    positions = np.asarray(positions, dtype=np.int64)
    groups = np.asarray(groups)
    shuffle = rng.permutation(len(positions))
    out: dict[str, np.ndarray] = {}
    used = np.zeros(len(positions), dtype=bool)
    if difficulty is not None and n_extreme > 0:
        diff = np.asarray(difficulty, dtype=float)
        ok = ~np.isnan(diff)
        for name, sign in (("hardest", 1.0), ("easiest", -1.0)):
            order = np.lexsort((shuffle, sign * diff))
            take = [i for i in order if ok[i] and not used[i]][:n_extreme]
            used[take] = True
            out[name] = positions[take]
    strata: dict[Any, list[int]] = {}
    for i in shuffle:
        if not used[i]:
            strata.setdefault(groups[i], []).append(int(i))
    take = []
    keys = sorted(strata, key=str)
    while len(take) < n_sample and any(strata.values()):
        for key in keys:
            if strata[key] and len(take) < n_sample:
                take.append(strata[key].pop(0))
    out["sample"] = positions[take]
    return out


# ------------------------------------------------------------------------------- gallery


@dataclass
class GalleryCell:
    """One image of a gallery row: the query (rank 0) or a result."""

    item_id: str
    path: str
    label: Any
    rank: int
    score: float
    relevant: bool | None  # None for the query itself


@dataclass
class GalleryRow:
    """A query and the top-k of each result shown."""

    section: str
    query: GalleryCell
    group: Any
    results: dict[str, list[GalleryCell]]


@dataclass
class Gallery:
    """The gallery of one dataset: rows grouped in sections, one column block per result."""

    dataset: str
    label: str
    group_label: str
    entries: list[str]
    k: int
    rows: list[GalleryRow]
    sections: dict[str, str] = field(default_factory=dict)  # section -> heading
    same_as: dict[str, list[str]] = field(default_factory=dict)  # shown entry -> identical ones
    notes: list[str] = field(default_factory=list)  # results not shown, and why (one line each)


def gallery_rows(
    sources: Sequence[GallerySource],
    positions: np.ndarray,
    *,
    section: str,
    k: int,
    group_label: str,
) -> list[GalleryRow]:
    """One :class:`GalleryRow` per query position (the sources share the query split)."""
    positions = np.asarray(positions, dtype=np.int64)
    if not len(positions) or not sources:
        return []
    first = sources[0]
    rankings = {s.entry: rank(s, positions, k) for s in sources}
    rows = []
    for j, pos in enumerate(positions.tolist()):
        qid = first.query.item_ids[pos]
        q = GalleryCell(
            str(qid), str(first.items.at[qid, "path"]), first.query_labels[pos], 0, np.nan, None
        )
        results = {}
        for s in sources:
            r = rankings[s.entry]
            cells = []
            for c in range(k):
                idx = int(r.ids[j, c])
                if idx < 0:
                    continue
                iid = s.index.item_ids[idx]
                cells.append(
                    GalleryCell(
                        str(iid),
                        str(s.items.at[iid, "path"]),
                        s.index_labels[idx],
                        c + 1,
                        float(r.scores[j, c]),
                        bool(r.relevant[j, c]),
                    )
                )
            results[s.entry] = cells
        group = first.items.at[qid, group_label] if group_label in first.items else None
        rows.append(GalleryRow(section=section, query=q, group=group, results=results))
    return rows


def common_queries(sources: Sequence[GallerySource]) -> np.ndarray:
    """Query positions every source evaluated (non-lone, in every per-query file)."""
    keep = np.flatnonzero(sources[0].n_relevant > 0)
    for s in sources:
        qi = s.per_query.get("query_index")
        if qi is not None:
            keep = np.intersect1d(keep, np.asarray(qi, dtype=np.int64))
    return keep


def build_gallery(
    sources: Sequence[GallerySource],
    *,
    k: int = 5,
    n_sample: int = 6,
    n_extreme: int = 3,
    seed: int = 0,
    metric: str = "mMP@5",
    group_label: str = "",
) -> Gallery:
    """The gallery of one dataset for results that share its query split.

    A deployment variant whose own ranking is not stored (runs before ``topk_ids`` were saved)
    is left out with a note (its cached vectors are the plain model's, so re-ranking them would
    show the plain model's results under the variant's name); columns whose top-k are identical
    to another column's on every query shown are merged into it (``same_as``), the plain model
    kept.

    Args:
        sources: The results shown, in column order (same dataset, label and query split).
        k: Results shown per query and result.
        n_sample: Queries of the category-stratified sample.
        n_extreme: Hardest and easiest queries, each (by the mean per-query ``metric``).
        seed: Fixes the sample.
        metric: Per-query metric that orders queries by difficulty.
        group_label: Category column; "" = the coarsest label of the catalogue.
    """
    if not sources:
        raise GalleryError("no result to show")
    unknown = [s.entry for s in sources if _variant(s) and "topk_ids" not in s.per_query]
    notes = (
        [
            f"{', '.join(unknown)}: not shown, the variants' own rankings are not stored (their "
            "cached vectors are the plain model's); their scores are in the variants' table"
        ]
        if unknown
        else []
    )
    sources = [s for s in sources if s.entry not in unknown]
    if not sources:
        raise GalleryError("; ".join(notes))
    first = sources[0]
    group_label = group_label or category_column(first)
    cand = common_queries(sources)
    values = [s.values(metric) for s in sources]
    difficulty = None
    if all(len(v) for v in values):
        difficulty = np.nanmean(np.vstack([v.reindex(cand).to_numpy() for v in values]), axis=0)
    groups = (
        first.group_of(cand, group_label) if group_label in first.items else np.zeros(len(cand))
    )
    picked = sample_queries(
        cand, groups, difficulty, n_sample=n_sample, n_extreme=n_extreme, seed=seed
    )
    sections = ("hardest", "easiest", "sample")
    shown = np.concatenate([np.asarray(picked.get(x, []), dtype=np.int64) for x in sections])
    sources, same_as = distinct_rankings(sources, shown, k)
    rows = []
    for section in sections:
        rows += gallery_rows(
            sources, picked.get(section, []), section=section, k=k, group_label=group_label
        )
    return Gallery(
        dataset=first.dataset,
        label=first.label,
        group_label=group_label,
        entries=[s.entry for s in sources],
        k=k,
        rows=rows,
        sections={s: SECTIONS[s] for s in sections},
        same_as=same_as,
        notes=notes,
    )


def _variant(source: GallerySource) -> str:
    value = source.row.get("variant")
    return value if isinstance(value, str) else ""


def distinct_rankings(
    sources: Sequence[GallerySource], positions: np.ndarray, k: int
) -> tuple[list[GallerySource], dict[str, list[str]]]:
    """The sources whose top-k differ on ``positions``; the others merged into the first equal.

    Plain models come first (they are kept over an identical variant), then the variants;
    column order is otherwise kept.

    Returns:
        ``(kept, same_as)``: ``same_as[kept entry]`` lists the entries with identical top-k.
    """
    positions = np.asarray(positions, dtype=np.int64)
    keepers: list[tuple[GallerySource, bytes]] = []
    same_as: dict[str, list[str]] = {}
    for s in sorted(sources, key=lambda s: bool(_variant(s))):
        ids = rank(s, positions, k).ids
        items = np.where(ids >= 0, s.index.item_ids[np.clip(ids, 0, None)], "")
        sig = "\x1f".join(map(str, items.ravel().tolist())).encode()
        twin = next((kept for kept, other in keepers if other == sig), None)
        if twin is None:
            keepers.append((s, sig))
        else:
            same_as.setdefault(twin.entry, []).append(s.entry)
    return [s for s, _ in keepers], same_as


def gallery_for_runs(
    run_ids: Iterable[str],
    *,
    store: ResultStore | None = None,
    k: int = 5,
    n_sample: int = 4,
    n_extreme: int = 2,
    seed: int = 0,
    catalogues: Mapping[str, Catalogue] | None = None,
) -> list[Gallery]:
    """Galleries (one per dataset) of the runs ``run_ids`` of the result store (notebook 01).

    A result that cannot be shown (its catalogue is not the one it embedded, or is not on this
    machine) is one line in its gallery's ``notes``, never a picture.
    """
    store = store or ResultStore()
    wanted = {r for r in run_ids if isinstance(r, str)}
    records = [r for r in store.records() if r.mlflow_run_id in wanted]
    frame = records_frame(records, k)
    if not frame.empty:  # image queries only (text queries: text_gallery.text_gallery_for_runs)
        frame = frame[frame["task"] == "image-image"]
    if frame.empty:
        return []
    sources, notes = load_sources(frame, PerQuery(store), catalogues)
    out = []
    for dataset in sorted(frame["dataset"].astype(str).unique()):
        group = [s for s in sources if s.dataset == dataset]
        lines = list(
            dict.fromkeys(n.split(": ", 1)[1] for n in notes if n.startswith(f"{dataset}: "))
        )
        if not group:  # nothing can be shown: the reasons, one line each, never a picture
            out.append(Gallery(dataset, "", "", [], k, [], notes=lines))
            continue
        try:
            gallery = build_gallery(
                group, k=k, n_sample=n_sample, n_extreme=n_extreme, seed=seed, metric=f"mMP@{k}"
            )
        except GalleryError as exc:
            out.append(Gallery(dataset, "", "", [], k, [], notes=[*lines, str(exc)]))
            continue
        gallery.notes[:0] = lines
        out.append(gallery)
    return out
