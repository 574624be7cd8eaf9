"""Index variants through Milvus: recall against FLAT, task metrics against exact, timings.

:func:`evaluate_indexes` builds each index of a sweep in Milvus (Milvus Lite by default, a server
when ``uri`` is ``http(s)://...``), searches it with each search parameter value, and reports per
variant: recall@k against the exact reference, the task's metrics and their change against
exact search (the protocol's exact backend), and labelled costs:

- ``milvus-lite``: Lite's own build time and search throughput (Lite 3.x is pure Python; these
  say nothing about a server), also when Lite runs as ``milvus-lite server`` at an ``http`` uri;
- ``milvus-server``: latency p50/p99 at batch 1 and throughput at batch ``batch`` measured on the
  server (when ``uri`` is one);
- ``faiss``: the same measures plus index memory from the faiss family a server builds on
  (:func:`embbench.deploy.indexes.faiss_factory`), on this machine.

Milvus Lite 3.2.2 (measured) builds FLAT, IVF_FLAT, IVF_SQ8, HNSW (and HNSW_SQ) and rejects
IVF_PQ ("reserved for a future phase"), SCANN, DISKANN and IVF_RABITQ ("unknown index_type"):
for those the quality is measured on the faiss family and labelled ``engine="faiss"``; DISKANN
has none and is reported ``unsupported``.

Rankings follow the protocol: the index's own scores order the results, ties by index id
ascending (``margin`` extra candidates are fetched so boundary ties resolve by id), and under
``within`` the query is removed from its own list by id (``k + 1`` fetched).
Recall@k is tie-aware (as in ann-benchmarks): a result counts when its exact score reaches the
exact k-th score (within ``1e-6``), so exact duplicates at the boundary never count as misses.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embbench._utils import collection_name, stable_hash
from embbench.deploy.indexes import (
    IndexSpec,
    Timing,
    TimingBudget,
    build_faiss,
    faiss_factory,
    faiss_search,
    latency_stats,
    time_faiss,
    variant_row,
)
from embbench.metrics import RetrievalResult, evaluate_rankings
from embbench.paths import runs_dir
from embbench.retrieval import ExactBackend, RetrievalTask
from embbench.retrieval.milvus_collection import (
    MAX_NQ,
    MAX_TOPK,
    MilvusCollection,
    error_text,
    is_unsupported,
    quiet_milvus,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MEASUREMENT",
    "IndexResult",
    "evaluate_indexes",
    "rank_candidates",
    "snap_scores",
    "tie_aware_recall",
]

_RECALL_EPS = 1e-6
# Enters the hash of stage 01's index cells: bumped when this study measures differently, so
# records measured the old way are recomputed. 2: Milvus Lite builds the index with the build
# parameters asked (under 1 it used its defaults: nlist 128 cut to the row count, HNSW's M).
MEASUREMENT = 2


def snap_scores(
    ids: np.ndarray, scores: np.ndarray, index: np.ndarray, queries: np.ndarray
) -> np.ndarray:
    """The index's scores, each replaced by the exact one when they agree to float32 rounding.

    Engines score in float32 with kernels whose rounding depends on alignment and batching:
    Milvus Lite's FLAT gave two identical index vectors scores 1 ulp apart, so "ties by id"
    would not hold. An index score within ``d * 2**-24`` (+ slack) of the exact float64 inner
    product is that product computed by a float32 kernel, and is replaced by it, so exact
    duplicates tie exactly. A quantised index's scores (SQ8, PQ, RaBitQ) differ by far more
    and are kept: the index's own ranking is what is measured.

    Args:
        ids: ``(nq, limit)`` candidate ids (``-1`` padding).
        scores: ``(nq, limit)`` the index's inner products.
        index: Unit index vectors.
        queries: Unit queries.

    Returns:
        ``(nq, limit)`` float64 scores.
    """
    safe = np.where(ids < 0, 0, ids)
    exact = (
        np.einsum("qd,qkd->qk", queries.astype(np.float64), index[safe].astype(np.float64))
        .astype(np.float32)
        .astype(np.float64)
    )
    tol = index.shape[1] * 2.0**-24 * 1.01 + 2.0**-22
    raw = np.asarray(scores, dtype=np.float64)
    return np.where(np.abs(raw - exact) <= tol, exact, raw)


def rank_candidates(
    ids: np.ndarray, scores: np.ndarray, k: int, self_ids: np.ndarray | None = None
) -> np.ndarray:
    """Top ``k`` of candidate lists by (score descending, id ascending), self dropped by id.

    Args:
        ids: ``(nq, limit)`` candidate ids (``-1`` padding).
        scores: ``(nq, limit)`` the index's scores (higher is better; see :func:`snap_scores`).
        k: Results kept.
        self_ids: Protocol ``within``: each query's own id, removed from its list.

    Returns:
        ``(nq, k)`` int64 ids, ``-1`` padding.
    """
    ids = np.asarray(ids, dtype=np.int64)
    sc = np.where(ids < 0, -np.inf, np.asarray(scores, dtype=np.float64))
    if self_ids is not None:
        sc = np.where(ids == np.asarray(self_ids)[:, None], -np.inf, sc)
    big = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = _lexsort_rows(big, -sc)
    top = np.take_along_axis(ids, order, axis=1)
    top_sc = np.take_along_axis(sc, order, axis=1)
    top = np.where(np.isfinite(top_sc), top, -1)[:, :k]
    if top.shape[1] < k:
        top = np.concatenate([top, np.full((len(top), k - top.shape[1]), -1)], axis=1)
    return top


def _lexsort_rows(secondary: np.ndarray, primary: np.ndarray) -> np.ndarray:
    """Per-row argsort by ``primary`` then ``secondary`` (both ascending)."""
    o1 = np.argsort(secondary, axis=1, kind="stable")
    p = np.take_along_axis(primary, o1, axis=1)
    o2 = np.argsort(p, axis=1, kind="stable")
    return np.take_along_axis(o1, o2, axis=1)


def tie_aware_recall(
    ann_ids: np.ndarray, exact_ids: np.ndarray, index: np.ndarray, queries: np.ndarray
) -> float:
    """Mean recall@k: ANN results whose exact score reaches the exact k-th score.

    Args:
        ann_ids: ``(nq, k)`` ids from the approximate index (``-1`` padding).
        exact_ids: ``(nq, k)`` ids from exact search (``-1`` padding).
        index: Unit index vectors.
        queries: Unit queries.

    Returns:
        Recall in ``[0, 1]`` (1.0 for an exact index whatever its tie order).
    """

    def score(ids: np.ndarray) -> np.ndarray:
        safe = np.where(ids < 0, 0, ids)
        s = np.einsum("qd,qkd->qk", queries.astype(np.float64), index[safe].astype(np.float64))
        return np.where(ids < 0, -np.inf, s)

    ex = score(exact_ids)
    n_true = (exact_ids >= 0).sum(axis=1)
    kth = np.where(n_true > 0, np.min(np.where(exact_ids >= 0, ex, np.inf), axis=1), np.inf)
    hits = ((score(ann_ids) >= kth[:, None] - _RECALL_EPS) & (ann_ids >= 0)).sum(axis=1)
    ok = n_true > 0
    return float(np.mean(np.minimum(hits[ok], n_true[ok]) / n_true[ok])) if ok.any() else 1.0


@dataclass
class IndexResult:
    """Quality and costs of one index variant.

    Attributes:
        spec: The variant.
        engine: Where the quality was measured: ``milvus-lite``, ``milvus-server`` or ``faiss``
            (the index type is not built by the Milvus at hand).
        status: ``ok``, ``unsupported`` (no engine builds it here) or ``failed``.
        error: Why a variant is not ``ok``.
        recall: Tie-aware recall@k against exact search.
        retrieval: The task metrics (``None`` unless ``ok``).
        delta: Change of each summary metric against exact search.
        timings: Labelled costs (``milvus-lite``, ``milvus-server``, ``faiss``).
        bytes_per_vector: Index memory per vector from the ``faiss`` timing (``None`` if absent).
        short_queries: Queries the index answered with fewer candidates than asked (an IVF whose
            probed lists hold fewer vectors, say): their missing results score as misses, and
            a warning names the index and the collection size.
        min_hits: The fewest candidates any query got (``-1`` before the search).
    """

    spec: IndexSpec
    engine: str
    status: str = "ok"
    error: str | None = None
    recall: float = float("nan")
    retrieval: RetrievalResult | None = None
    delta: dict[str, float] = field(default_factory=dict)
    timings: list[Timing] = field(default_factory=list)
    bytes_per_vector: float | None = None
    short_queries: int = 0
    min_hits: int = -1

    @property
    def metrics(self) -> dict[str, float]:
        """The summary metrics (empty unless ``ok``)."""
        return dict(self.retrieval.summary) if self.retrieval else {}

    def timing(self, source: str) -> Timing | None:
        """The timing labelled ``source``, if measured."""
        return next((t for t in self.timings if t.source == source), None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able row for records and tables."""
        fields = ("engine", "status", "error", "recall", "metrics", "delta", "bytes_per_vector",
                  "short_queries", "min_hits")  # fmt: skip
        return {**variant_row(self, fields), "timings": [t.to_dict() for t in self.timings]}


def _count_hits(res: IndexResult, raw_ids: np.ndarray, limit: int, n: int) -> None:
    """Record (and warn about) queries the index answered with fewer than ``limit`` candidates."""
    hits = (np.asarray(raw_ids) >= 0).sum(axis=1)
    res.min_hits = int(hits.min()) if hits.size else limit
    res.short_queries = int((hits < limit).sum())
    if res.short_queries:
        logger.warning(
            "index %s [%s] on a collection of %d vectors returned fewer than the %d candidates "
            "asked for %d of %d queries (as few as %d); the missing ones score as misses",
            res.spec.name,
            res.engine,
            n,
            limit,
            res.short_queries,
            len(hits),
            res.min_hits,
        )


def _fingerprint(x: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(str(x.shape).encode())
    h.update(memoryview(np.ascontiguousarray(x)).cast("B"))
    return h.hexdigest()


def evaluate_indexes(
    specs: list[IndexSpec],
    task: RetrievalTask,
    *,
    k: int = 5,
    uri: str | None = None,
    token: str = "",
    timings: bool = True,
    n_single: int = 200,
    batch: int = 1000,
    threads: int | None = None,
    lite_timing_queries: int = 20,
    margin: int = 2,
) -> list[IndexResult]:
    """Build and search every index variant; score it against exact search.

    Args:
        specs: The variants (e.g. :func:`embbench.deploy.indexes.default_index_grid`).
        task: The queries, the index and the protocol (vectors L2-normalised here).
        k: The cut-off.
        uri: Milvus Lite file (default ``runs_dir()/milvus_deploy.db``) or a server address.
        token: Server token.
        timings: Measure the labelled latency/throughput/memory (off for quality-only runs).
        n_single: Single-query searches timed for p50/p99 (faiss and server).
        batch: Throughput batch size (on a server at most
            :data:`~embbench.retrieval.milvus_collection.MAX_NQ`).
        threads: faiss threads during timing (``None``: faiss' default).
        lite_timing_queries: Single-query searches timed on Milvus Lite (slow, pure Python).
        margin: Extra candidates fetched so that ties at the k-th place resolve by id (the
            index's own scores still rank them; nothing is re-scored exactly).

    Returns:
        One result per spec, in order.
    """
    q_lab, x_lab, qids = task.relevance()
    q, x = task.unit_vectors()
    kk = k + (1 if qids is not None else 0)
    exact_ids, _ = ExactBackend().search(x, q, k, query_ids=qids)
    within = task.within
    exact = evaluate_rankings(exact_ids, q_lab, x_lab, k, exclude_self=within, query_ids=qids)
    batch = min(batch, MAX_NQ)
    budget = TimingBudget(n_single, batch, threads)

    if uri is None:
        uri = str(runs_dir() / "milvus_deploy.db")
    mil = MilvusCollection(uri, token, owner="evaluate_indexes")
    mil.connect()  # a Milvus that cannot be opened fails the study, not each variant
    lite = mil.is_lite()  # a `milvus-lite server` is Lite too: pure Python, no server timings
    engine_name = "milvus-lite" if lite else "milvus-server"
    fp = _fingerprint(x)
    results: list[IndexResult] = []
    built: dict[
        Any, tuple[str, Any, float, str]
    ] = {}  # build_key -> (engine, handle, build_s, err)
    faiss_built: dict[Any, tuple[Any, float]] = {}
    faiss_failed: dict[Any, str] = {}  # build_key -> why faiss could not build it
    try:
        for spec in specs:
            key = spec.build_key
            if key not in built:
                name = collection_name(
                    "deploy", spec.index_type.lower(), stable_hash([fp, spec.build], 10)
                )
                try:
                    with quiet_milvus():
                        build_s = mil.build(
                            name,
                            x,
                            np.arange(len(x), dtype=np.int64),
                            spec.index_type,
                            "IP",
                            spec.build_params,
                            drop_on_failure=True,
                        )
                        built[key] = (engine_name, name, build_s, "")
                except Exception as err:  # noqa: BLE001 - reported per variant, others go on
                    msg = f"{engine_name}: {error_text(err)}"
                    logger.warning("index %s not built by %s: %s", spec.name, engine_name, msg)
                    if is_unsupported(err) and faiss_factory(spec, x.shape[1]) is not None:
                        built[key] = ("faiss", None, 0.0, msg)
                    else:
                        built[key] = ("none", None, 0.0, msg)
            engine, name, build_s, note = built[key]
            res = IndexResult(spec=spec, engine=engine, error=note or None)
            results.append(res)
            if engine == "none":
                res.status = "unsupported" if is_unsupported(Exception(note)) else "failed"
                continue
            limit = min(len(x), kk + margin, MAX_TOPK)
            has_family = faiss_factory(spec, x.shape[1]) is not None
            wants_faiss = (engine == "faiss" or timings) and has_family
            if wants_faiss and key not in faiss_built and key not in faiss_failed:
                try:
                    faiss_built[key] = build_faiss(spec, x)
                except RuntimeError as err:  # e.g. too few vectors to train 2**nbits centroids
                    faiss_failed[key] = f"faiss: {error_text(err)} ({len(x)} vectors)"
                    logger.warning("index %s not built: %s", spec.name, faiss_failed[key])
            if wants_faiss and key in faiss_failed:
                if engine == "faiss":
                    res.status, res.error = "failed", f"{note}; {faiss_failed[key]}"
                    continue
                res.error = faiss_failed[key]  # the Milvus quality stands, without faiss timings
            t0 = time.perf_counter()
            if engine == "faiss":
                raw_ids, raw_sc = faiss_search(faiss_built[key][0], spec, q, limit)
            else:
                raw_ids, raw_sc = mil.search(name, q, limit, "IP", spec.search_params)
            search_s = time.perf_counter() - t0
            _count_hits(res, raw_ids, limit, len(x))
            ids = rank_candidates(raw_ids, snap_scores(raw_ids, raw_sc, x, q), k, qids)
            res.retrieval = evaluate_rankings(
                ids, q_lab, x_lab, k, exclude_self=within, query_ids=qids
            )
            res.recall = tie_aware_recall(ids, exact_ids, x, q)
            res.delta = {m: v - exact.summary[m] for m, v in res.retrieval.summary.items()}
            if not timings:
                continue
            if engine != "faiss":

                def one(b: np.ndarray, _n: str = name, _s: IndexSpec = spec) -> Any:
                    return mil.search(_n, b, k, "IP", _s.search_params)

                if not lite:
                    p50, p99, qps = latency_stats(one, one, q, n_single=n_single, batch=batch)
                    res.timings.append(Timing("milvus-server", p50, p99, qps, batch, None, build_s))
                else:
                    p50, p99, _ = latency_stats(
                        one, lambda b: None, q, n_single=lite_timing_queries, batch=1
                    )
                    res.timings.append(
                        Timing("milvus-lite", p50, p99, len(q) / search_s, len(q), None, build_s)
                    )
            if key in faiss_built:
                index, fbuild = faiss_built[key]
                t = time_faiss(spec, x, q, k, budget, index=index, build_s=fbuild)
                res.timings.append(t)
                res.bytes_per_vector = (t.index_bytes or 0) / len(x)
            logger.info("index %s [%s]: recall %.3f %s", spec.name, engine, res.recall, res.metrics)
    finally:
        for engine, name, _, _ in built.values():
            if engine != "faiss" and name is not None:
                mil.drop(name)
        mil.close()
    return results
