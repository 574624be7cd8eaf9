"""Retrieval galleries: what the search returns for a fixed, seeded sample of queries.

Everything comes from what the stages stored: the result rows name their cached vectors
(``cache_query`` / ``cache_index``, from the record's ``caches``) and their catalogue
(``dataset_id``, ``dataset_root``, ``data_root``); the per-query arrays give each query's
difficulty and whether its top-1 was right. Rankings are not recomputed when the per-query file
holds them (``topk_ids`` / ``topk_scores``, rows aligned with ``query_index``); otherwise they
are computed with :class:`~embbench.retrieval.ExactBackend`, the code the metrics were scored
with: the same L2 normalisation, canonical scores, ties by index id, and under protocol
``within`` the query removed from its own list by id. Relevance is the metrics' rule: the
result's label equals the query's.

- :func:`load_sources`: result rows -> :class:`GallerySource` (vectors, labels, images).
- :func:`sample_queries`: the hardest, the easiest and a category-stratified sample.
- :func:`build_gallery`: a :class:`Gallery` of rows (query + top-k of each result) per dataset.
- :func:`gallery_for_runs`: the gallery of a few runs of the result store (notebook 01).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embbench.analysis._common import text as _text
from embbench.analysis.load import records_frame
from embbench.analysis.stats import PerQuery
from embbench.cache import CacheError, EmbeddingCache, EmbeddingSet
from embbench.catalogue import Catalogue, CatalogueError
from embbench.datasets import create_catalogue
from embbench.results import ResultStore
from embbench.retrieval import ExactBackend, l2_normalize

logger = logging.getLogger(__name__)

PerQueryLoader = Callable[[Mapping[str, Any]], dict[str, np.ndarray] | None]
SECTIONS = {
    "hardest": "Hardest queries (lowest score over the results shown)",
    "easiest": "Easiest queries (highest score over the results shown)",
    "sample": "A seeded sample of queries, stratified by category",
}


class GalleryError(RuntimeError):
    """A result cannot be shown (cached vectors or catalogue missing); the message says which."""


def load_embedding_set(path: str | Path) -> EmbeddingSet:
    """The cached vectors of one split from their folder (validated by its ``meta.json``).

    Raises:
        GalleryError: The folder is missing or is not a complete embedding cache.
    """
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise GalleryError(f"no cached embeddings at {path} (the run's cache was deleted?)")
    identity = dict(json.loads(meta_path.read_text()).get("identity") or {})
    try:
        dataset, model, split = (identity.pop(key) for key in ("dataset", "model", "split"))
        identity.pop("cache_format", None)
        cache = EmbeddingCache(dataset, model, split, identity, root=path.parent.parent.parent)
        if cache.path != path:
            raise CacheError(f"{path}: its meta.json describes {cache.path}")
        return cache.load()
    except (KeyError, CacheError) as exc:
        raise GalleryError(f"cached embeddings at {path} unusable: {exc}") from None


@dataclass
class GallerySource:
    """One result's cached vectors, labels, images and per-query arrays.

    Attributes:
        entry: The result's label in the tables (e.g. ``resnet50 [top-tuned]``).
        dataset: The dataset as shown in the tables.
        row: The result's row of the analysis frame.
        query: Cached query vectors; ``index`` the index vectors (the same set under ``within``).
        query_labels: Relevance label of each query vector; ``index_labels`` of each index one.
        within: Protocol ``within`` (queries are index items, excluded from their own list).
        items: The catalogue table indexed by ``item_id`` (``path`` and label columns).
        label: The relevance label column.
        per_query: The per-query arrays (empty when the run saved none).
    """

    entry: str
    dataset: str
    row: dict[str, Any]
    query: EmbeddingSet
    index: EmbeddingSet
    query_labels: np.ndarray
    index_labels: np.ndarray
    within: bool
    items: pd.DataFrame
    label: str
    per_query: dict[str, np.ndarray] = field(default_factory=dict)

    @cached_property
    def index_unit(self) -> np.ndarray:
        """The index vectors L2-normalised exactly as the metrics normalised them."""
        return l2_normalize(np.array(self.index.vectors, dtype=np.float32), "index vectors")

    @cached_property
    def query_unit(self) -> np.ndarray:
        """The query vectors, normalised (the index itself under ``within``)."""
        if self.within:
            return self.index_unit
        return l2_normalize(np.array(self.query.vectors, dtype=np.float32), "query vectors")

    @cached_property
    def n_relevant(self) -> np.ndarray:
        """Relevant index items per query (itself excluded under ``within``); 0 = lone."""
        values, counts = np.unique(self.index_labels, return_counts=True)
        lookup = dict(zip(values.tolist(), counts.tolist(), strict=True))
        n = np.array([lookup.get(v, 0) for v in self.query_labels.tolist()], dtype=np.int64)
        return n - 1 if self.within else n

    def values(self, metric: str) -> pd.Series:
        """Per-query values of ``metric`` indexed by query position (empty when not saved)."""
        vals = self.per_query.get(metric)
        if vals is None:
            return pd.Series(dtype=float)
        qi = self.per_query.get("query_index", np.arange(len(vals)))
        return pd.Series(np.asarray(vals, dtype=float), index=np.asarray(qi, dtype=np.int64))

    def group_of(self, positions: np.ndarray, column: str, *, index: bool = False) -> np.ndarray:
        """The ``column`` value of query (or index) items at ``positions``."""
        ids = (self.index if index else self.query).item_ids[np.asarray(positions, dtype=np.int64)]
        return self.items.loc[ids, column].to_numpy()


@dataclass
class Ranking:
    """The top-k of some queries: index positions, cosine similarities and relevance."""

    positions: np.ndarray  # (n,) query positions
    ids: np.ndarray  # (n, k) index positions, -1 padding
    scores: np.ndarray  # (n, k) cosine similarity (1 - squared L2 / 2), NaN padding
    relevant: np.ndarray  # (n, k) bool, the metrics' rule


def rank(source: GallerySource, positions: Sequence[int] | np.ndarray, k: int) -> Ranking:
    """The top ``k`` of the queries at ``positions``, as the metrics ranked them.

    Uses the run's stored ``topk_ids`` / ``topk_scores`` when they cover these queries; else
    searches with :class:`~embbench.retrieval.ExactBackend` (ties by id, self excluded by id).
    """
    pos = np.asarray(positions, dtype=np.int64)
    stored = _stored_topk(source, pos, k)
    if stored is not None:
        ids, scores = stored
    else:
        qids = pos if source.within else None
        ids, dists = ExactBackend().search(
            source.index_unit, source.query_unit[pos], k, query_ids=qids
        )
        scores = np.where(ids >= 0, 1.0 - dists.astype(np.float64) / 2.0, np.nan)
    valid = ids >= 0
    hit = source.index_labels[np.where(valid, ids, 0)] == source.query_labels[pos][:, None]
    return Ranking(positions=pos, ids=ids, scores=scores, relevant=valid & hit)


def _stored_topk(
    source: GallerySource, pos: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray] | None:
    pq = source.per_query
    if "topk_ids" not in pq or "topk_scores" not in pq:
        return None
    ids, scores = np.asarray(pq["topk_ids"]), np.asarray(pq["topk_scores"])
    qi = np.asarray(pq.get("query_index", np.arange(len(ids))), dtype=np.int64)
    row = pd.Series(np.arange(len(qi)), index=qi)
    if ids.ndim != 2 or ids.shape[1] < k or not np.isin(pos, qi).all():
        return None
    take = row.loc[pos].to_numpy()
    return ids[take, :k].astype(np.int64), scores[take, :k].astype(np.float64)


def top1_correct(source: GallerySource) -> pd.Series:
    """Whether each evaluated query's top-1 is relevant, indexed by query position.

    From the per-query ``mR@1`` when saved, else ranked here (lone queries left out).
    """
    saved = source.values("mR@1")
    if len(saved):
        return saved.astype(bool)
    pos = np.flatnonzero(source.n_relevant > 0)
    if not len(pos):
        return pd.Series(dtype=bool)
    return pd.Series(rank(source, pos, 1).relevant[:, 0], index=pos)


# ------------------------------------------------------------------------------- loading


def _catalogue(
    row: Mapping[str, Any], catalogues: Mapping[str, Catalogue] | None, memo: dict
) -> Catalogue:
    """The catalogue of ``row``: given, else re-read as the stage read it."""
    dataset = row.get("dataset_id") or row.get("dataset")
    if catalogues and dataset in catalogues:
        return catalogues[dataset]
    errors = []
    for root in dict.fromkeys((_text(row.get("dataset_root")), _text(row.get("data_root")))):
        key = (dataset, root)
        if key not in memo:
            try:
                memo[key] = create_catalogue(dataset, root)
            except (CatalogueError, OSError, ValueError, TypeError) as exc:
                memo[key] = exc
        if isinstance(memo[key], Catalogue):
            return memo[key]
        errors.append(f"{root or 'default root'}: {memo[key]}")
    raise GalleryError(f"catalogue {dataset!r} not readable ({'; '.join(errors)})")


def load_source(
    row: Mapping[str, Any],
    loader: PerQueryLoader | None = None,
    catalogues: Mapping[str, Catalogue] | None = None,
    *,
    _memo: dict | None = None,
) -> GallerySource:
    """A result row's cached vectors, labels and catalogue images.

    Args:
        row: A row of the analysis frame (needs ``cache_query``, ``cache_index``, ``label``).
        loader: Row -> per-query arrays (:class:`~embbench.analysis.PerQuery`).
        catalogues: Dataset name -> catalogue, to skip re-reading it (tests, notebook 01).

    Raises:
        GalleryError: The vectors or the catalogue are not available, or do not match.
    """
    entry = str(row.get("entry") or row.get("model"))
    q_path, i_path = _text(row.get("cache_query")), _text(row.get("cache_index"))
    if not q_path or not i_path:
        raise GalleryError(f"{entry}: the result names no cached embeddings")
    query = load_embedding_set(q_path)
    index = query if i_path == q_path else load_embedding_set(i_path)
    cat = _catalogue(row, catalogues, {} if _memo is None else _memo)
    label = _text(row.get("label")) or cat.default_label
    try:
        q_labels, i_labels = query.labels(cat.items, label), index.labels(cat.items, label)
    except CacheError as exc:
        raise GalleryError(f"{entry}: {exc}") from None
    within = row.get("protocol") == "within" or i_path == q_path
    return GallerySource(
        entry=entry,
        dataset=str(row.get("dataset")),
        row=dict(row),
        query=query,
        index=index,
        query_labels=np.asarray(q_labels),
        index_labels=np.asarray(i_labels),
        within=bool(within),
        items=cat.items.set_index("item_id", drop=False),
        label=label,
        per_query=dict((loader(row) if loader else None) or {}),
    )


def load_sources(
    rows: pd.DataFrame | Iterable[Mapping[str, Any]],
    loader: PerQueryLoader | None = None,
    catalogues: Mapping[str, Catalogue] | None = None,
) -> tuple[list[GallerySource], list[str]]:
    """:func:`load_source` for every row; rows that cannot be shown become notes."""
    records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
    out, notes, memo = [], [], {}
    for row in records:
        try:
            out.append(load_source(row, loader, catalogues, _memo=memo))
        except GalleryError as exc:
            notes.append(f"{row.get('dataset')}: {exc}")
            logger.warning("gallery: %s", exc)
    return out, notes


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
    rows = []
    for section in ("hardest", "easiest", "sample"):
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
        sections={s: SECTIONS[s] for s in ("hardest", "easiest", "sample")},
    )


def category_column(source: GallerySource) -> str:
    """The label column with the fewest distinct values (more than one): the category."""
    cols = [c for c in source.items.columns if c not in ("item_id", "path", "split")]
    counts = {c: source.items[c].nunique() for c in cols}
    many = {c: n for c, n in counts.items() if n > 1} or counts
    return min(many, key=lambda c: (many[c], c)) if many else source.label


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
    """Galleries (one per dataset) of the runs ``run_ids`` of the result store (notebook 01)."""
    store = store or ResultStore()
    wanted = {r for r in run_ids if isinstance(r, str)}
    records = [r for r in store.records() if r.get("mlflow_run_id") in wanted]
    frame = records_frame(records, k)
    if frame.empty:
        return []
    sources, _ = load_sources(frame, PerQuery(store), catalogues)
    out = []
    for _, group in pd.Series(sources).groupby([s.dataset for s in sources], sort=True):
        out.append(
            build_gallery(
                list(group),
                k=k,
                n_sample=n_sample,
                n_extreme=n_extreme,
                seed=seed,
                metric=f"mMP@{k}",
            )
        )
    return out
