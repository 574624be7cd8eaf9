"""A result's stored material for the galleries: cached vectors, labels, images, rankings.

:func:`load_source` reads what a result row names (``cache_query`` / ``cache_index`` from the
record's ``caches``, the catalogue from the record's ``catalogue`` reference: its root, loader
options, label and subsample, checked against ``dataset_fingerprint`` before any image is used);
:func:`rank` ranks queries exactly as the metrics did (stored ``topk_ids`` / ``topk_scores``
when the per-query file has them, else :class:`~embbench.retrieval.ExactBackend`: same
normalisation, canonical scores, ties by index id, the query excluded from its own list by id);
relevance is the metrics' rule (the result's label equals the query's).
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

from embbench._errors import UserError
from embbench._registry import UnknownNameError
from embbench.analysis._common import text as _text
from embbench.cache import CacheError, EmbeddingCache, EmbeddingSet
from embbench.catalogue import Catalogue, CatalogueError
from embbench.datasets.prepare import load_catalogue
from embbench.records import CatalogueRef
from embbench.retrieval import ExactBackend, l2_normalize

logger = logging.getLogger(__name__)


PerQueryLoader = Callable[[Mapping[str, Any]], dict[str, np.ndarray] | None]


class GalleryError(UserError, RuntimeError):
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
        text_columns: The catalogue's text columns (titles: never a category).
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
    text_columns: tuple[str, ...] = ()

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
    """The run's own top-k of ``pos`` (``topk_ids``), when its per-query file holds them.

    Scores come from ``topk_scores`` when saved, else they are the cosine similarities of the
    cached vectors (for a compression variant: of the float32 vectors it was compressed from).
    """
    pq = source.per_query
    if "topk_ids" not in pq:
        return None
    ids = np.asarray(pq["topk_ids"])
    qi = np.asarray(pq.get("query_index", np.arange(len(ids))), dtype=np.int64)
    row = pd.Series(np.arange(len(qi)), index=qi)
    if ids.ndim != 2 or ids.shape[1] < k or not np.isin(pos, qi).all():
        return None
    take = row.loc[pos].to_numpy()
    ids = ids[take, :k].astype(np.int64)
    if "topk_scores" in pq:
        return ids, np.asarray(pq["topk_scores"])[take, :k].astype(np.float64)
    q = source.query_unit[pos].astype(np.float64)
    x = source.index_unit[np.clip(ids, 0, None)].astype(np.float64)
    scores = np.einsum("qd,qkd->qk", q, x)
    return ids, np.where(ids >= 0, scores, np.nan)


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


def category_column(source: GallerySource) -> str:
    """The label column with the fewest distinct values (more than one): the category.

    Text columns (product titles) are not labels, however few their distinct values.
    """
    skip = {"item_id", "path", "split", *source.text_columns}
    cols = [c for c in source.items.columns if c not in skip]
    counts = {c: source.items[c].nunique() for c in cols}
    many = {c: n for c, n in counts.items() if n > 1} or counts
    return min(many, key=lambda c: (many[c], c)) if many else source.label


# ------------------------------------------------------------------------------- loading


def _catalogue(
    row: Mapping[str, Any], catalogues: Mapping[str, Catalogue] | None, memo: dict
) -> Catalogue:
    """The catalogue ``row`` scored, proven by the record's fingerprint before any use.

    A given catalogue wins (tests); otherwise it is read again exactly as the run read it: the
    record's root (where the loader read it), loader options, label and subsample. Nothing is
    generated or looked up elsewhere: a root that is not on this machine, a record without a
    fingerprint, or a catalogue whose fingerprint differs is one clear :class:`GalleryError`.
    """
    dataset = str(row.get("dataset_id") or row.get("dataset"))
    expected = _text(row.get("dataset_fingerprint"))
    if catalogues and dataset in catalogues:
        key: Any = ("given", dataset)
        if key not in memo:
            memo[key] = (catalogues[dataset], None)
        if expected is None:
            return memo[key][0]  # the caller vouches for it and the row cannot be checked
    else:
        ref = _ref(row, dataset)
        key = json.dumps(ref.model_dump(mode="json"), sort_keys=True, default=str)
        if key not in memo:
            memo[key] = (_reload(ref), None)
        if expected is None:
            raise GalleryError(
                f"catalogue {dataset!r}: the run recorded no dataset_fingerprint to check the "
                "images against, so none are shown; rerun its cell to draw its gallery"
            )
    cat, fingerprint = memo[key]
    if isinstance(cat, str):
        raise GalleryError(cat)
    if fingerprint is None:
        fingerprint = cat.fingerprint()
        memo[key] = (cat, fingerprint)
    if fingerprint != expected:
        raise GalleryError(
            f"catalogue {dataset!r} at {cat.root or 'in memory'} is not the one the run embedded "
            f"(fingerprint {fingerprint}, the record says {expected}); no image of it is shown: "
            "restore the run's catalogue or rerun its cell"
        )
    return cat


def _ref(row: Mapping[str, Any], dataset: str) -> CatalogueRef:
    """The row's :class:`~embbench.records.CatalogueRef` (older rows: name and root only)."""
    raw = _text(row.get("catalogue_ref"))
    if raw:
        return CatalogueRef.model_validate(json.loads(raw))
    return CatalogueRef(name=dataset, root=_text(row.get("data_root")))


def _reload(ref: CatalogueRef) -> Catalogue | str:
    """The catalogue ``ref`` names, read from its recorded root; else why not, in one line."""
    if not ref.root:
        return (
            f"catalogue {ref.name!r}: the run recorded no folder or manifest it was read "
            "from, so its images cannot be found; rerun its cell to draw its gallery"
        )
    if not Path(ref.root).exists():
        return (
            f"catalogue {ref.name!r}: {ref.root} (where the run read it) is not on this "
            "machine; copy it there to see the gallery"
        )
    try:
        return load_catalogue(
            ref.name,
            {ref.name: ref.root},
            label=ref.label,
            max_images=ref.max_images,
            seed=ref.seed,
            options=ref.options,
            progress=False,
        )
    except (CatalogueError, UnknownNameError, OSError, ValueError, TypeError) as exc:
        return f"catalogue {ref.name!r} at {ref.root} not readable ({exc})"


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
        text_columns=tuple(cat.text_columns),
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
            note = f"{row.get('dataset')}: {exc}"
            if note not in notes:  # one line per reason, not one per result of the catalogue
                notes.append(note)
                logger.warning("gallery: %s", exc)
    return out, notes
