"""Scale: index variants at growing sizes on vectors with a real embedding's class structure.

A real catalogue has a few thousand items; a deployment has millions. :func:`fit_class_structure`
takes a real embedding's class centroids and per-dimension spreads (between classes and within a
class), and :func:`sample_like` draws any number of new classes and items with those statistics
(L2-normalised), so recall and the task metrics at scale keep the real class geometry (to first
order: Gaussian clusters, not the real tails). :func:`measure_scale` builds each index family in
faiss at each size and measures recall against exact search, mMP@k, memory per vector, build time,
and latency p50/p99 at batch 1 and throughput at batch 1,000 (labelled ``faiss``; a Milvus server
builds on these families). :func:`project` extrapolates memory (measured bytes per vector times
items) and latency (a power law fitted on the measured p50s, exponent at most 1, times the p99/p50
ratio at the largest size) to 10M and 100M items; its rows are labelled ``projection``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embbench.deploy.ann import rank_candidates, snap_scores, tie_aware_recall
from embbench.deploy.compress import hamming_search
from embbench.deploy.indexes import (
    IndexSpec,
    Timing,
    TimingBudget,
    build_faiss,
    default_index_grid,
    faiss_search,
    latency_stats,
    time_faiss,
)
from embbench.metrics import evaluate_rankings
from embbench.retrieval import ExactBackend, l2_normalize

logger = logging.getLogger(__name__)

__all__ = [
    "ClassStructure",
    "Projection",
    "ScalePoint",
    "fit_class_structure",
    "measure_scale",
    "project",
    "sample_like",
    "scale_grid",
]


@dataclass
class ClassStructure:
    """Class geometry of an embedding (all statistics on L2-normalised vectors).

    Attributes:
        centroids: ``(c, d)`` class means.
        between_std: ``(d,)`` spread of the centroids around their mean.
        within_std: ``(d,)`` spread of items around their class mean.
        items_per_class: Mean number of items per class.
    """

    centroids: np.ndarray
    between_std: np.ndarray
    within_std: np.ndarray
    items_per_class: float

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.centroids.shape[1])


def fit_class_structure(vectors: np.ndarray, labels: np.ndarray) -> ClassStructure:
    """Fit centroids and per-dimension spreads of a labelled embedding.

    Args:
        vectors: ``(n, d)`` embeddings.
        labels: ``(n,)`` class labels.

    Returns:
        The class structure.
    """
    x = l2_normalize(vectors, "class structure vectors").astype(np.float64)
    uniq, codes = np.unique(np.asarray(labels), return_inverse=True)
    counts = np.bincount(codes, minlength=len(uniq)).astype(np.float64)
    sums = np.zeros((len(uniq), x.shape[1]))
    np.add.at(sums, codes, x)
    centroids = sums / counts[:, None]
    resid = x - centroids[codes]
    return ClassStructure(
        centroids=centroids.astype(np.float32),
        between_std=centroids.std(axis=0).astype(np.float32),
        within_std=resid.std(axis=0).astype(np.float32),
        items_per_class=float(counts.mean()),
    )


def sample_like(
    structure: ClassStructure, n: int, *, seed: int = 0, chunk: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` unit vectors in new classes that follow ``structure``.

    New class centroids are real centroids jittered by the between-class spread (so they are new
    classes, not copies); items are centroid plus within-class noise, then L2-normalised.

    Args:
        structure: From :func:`fit_class_structure`.
        n: Items to draw.
        seed: Random seed.
        chunk: Items generated at once (bounds the float64 temporaries).

    Returns:
        ``(vectors, labels)``: ``(n, d)`` float32 unit rows and ``(n,)`` int64 class ids.
    """
    rng = np.random.default_rng(seed)
    n_classes = max(1, round(n / max(structure.items_per_class, 1.0)))
    base = rng.integers(0, len(structure.centroids), n_classes)
    cents = structure.centroids[base] + 0.5 * structure.between_std * rng.standard_normal(
        (n_classes, structure.dim), dtype=np.float32
    )
    labels = rng.integers(0, n_classes, n).astype(np.int64)
    out = np.empty((n, structure.dim), dtype=np.float32)
    for s in range(0, n, chunk):
        lab = labels[s : s + chunk]
        noise = rng.standard_normal((len(lab), structure.dim), dtype=np.float32)
        out[s : s + chunk] = cents[lab] + noise * structure.within_std
    return l2_normalize(out, "synthetic vectors", zero_rows="keep"), labels


def scale_grid(n: int, d: int, k: int = 5, ef_construction: int = 40) -> list[IndexSpec]:
    """Default variants at size ``n``: FLAT, IVF_FLAT/IVF_SQ8/IVF_PQ at nprobe 16, HNSW ef 64.

    HNSW is built with ``efConstruction=40`` (faiss' default) rather than the sweep's 200: at
    200 its build took about 1.5 CPU-minutes at 10k x 512 on this machine, growing with ``n``.
    """
    specs = default_index_grid(
        n,
        d,
        k=k,
        index_types=("FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW"),
        nprobes=(16,),
        efs=(64,),
    )
    return [
        IndexSpec.of("HNSW", {"M": 16, "efConstruction": ef_construction}, s.search_params)
        if s.index_type == "HNSW"
        else s
        for s in specs
    ]


@dataclass
class ScalePoint:
    """Measures of one variant at one index size (faiss family, labelled).

    Attributes:
        n: Index size.
        variant: Size-independent label (index type + search parameters, or ``BIN_FLAT``).
        spec: The full spec (``None`` for binary).
        recall: Tie-aware recall@k against exact search.
        metrics: Task metrics on the synthetic labels.
        timing: Latency/throughput/memory, source ``faiss``.
        bytes_per_vector: Index memory over ``n``.
    """

    n: int
    variant: str
    spec: IndexSpec | None
    recall: float
    metrics: dict[str, float]
    timing: Timing
    bytes_per_vector: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able row."""
        return {
            "n": self.n, "variant": self.variant, "recall": self.recall,
            "metrics": dict(self.metrics), "bytes_per_vector": self.bytes_per_vector,
            **{f"{key}": value for key, value in self.timing.to_dict().items()},
        }  # fmt: skip


def _variant_label(spec: IndexSpec) -> str:
    s = " ".join(f"{k}={v}" for k, v in spec.search)
    return f"{spec.index_type}{f' {s}' if s else ''}"


def _binary_point(
    x: np.ndarray,
    labels: np.ndarray,
    qids: np.ndarray,
    exact_ids: np.ndarray,
    k: int,
    budget: TimingBudget,
) -> ScalePoint:
    import faiss  # optional (dev extra): binary timings through IndexBinaryFlat

    codes = np.packbits(x > 0, axis=1)
    q = x[qids]
    ids, _ = hamming_search(codes, codes[qids], k, query_ids=qids)
    res = evaluate_rankings(ids, labels[qids], labels, k, exclude_self=True, query_ids=qids)
    t0 = time.perf_counter()
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    build_s = time.perf_counter() - t0
    n_single, batch, threads = budget.n_single, budget.batch, budget.threads
    old = faiss.omp_get_max_threads()
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    try:
        qc = codes[qids]
        p50, p99, qps = latency_stats(
            lambda b: index.search(b, k),
            lambda b: index.search(b, k),
            qc,
            n_single=n_single,
            batch=batch,
        )
    finally:
        faiss.omp_set_num_threads(old)
    mem = int(faiss.serialize_index_binary(index).size)
    timing = Timing("faiss", p50, p99, qps, batch, mem, build_s, threads)
    recall = tie_aware_recall(ids, exact_ids, x, q)
    return ScalePoint(len(x), "BIN_FLAT hamming", None, recall, res.summary, timing, mem / len(x))


def measure_scale(
    structure: ClassStructure,
    sizes: Sequence[int],
    *,
    grid: Callable[[int, int], list[IndexSpec]] | None = None,
    k: int = 5,
    n_queries: int = 1000,
    binary: bool = True,
    seed: int = 0,
    threads: int | None = None,
    n_single: int = 200,
    batch: int = 1000,
) -> list[ScalePoint]:
    """Measure the variants at each index size on vectors drawn by :func:`sample_like`.

    Queries are ``n_queries`` index items (protocol ``within``: each removed by id).

    Args:
        structure: Class structure of the real embedding.
        sizes: Index sizes, ascending.
        grid: ``(n, d) -> specs`` (default :func:`scale_grid`).
        k: The cut-off.
        n_queries: Queries per size.
        binary: Also measure sign codes through faiss ``IndexBinaryFlat`` (Hamming).
        seed: Random seed.
        threads: faiss threads during timing.
        n_single: Single-query searches timed for p50/p99.
        batch: Throughput batch size.

    Returns:
        One point per (size, variant).
    """
    grid = grid or (lambda n, d: scale_grid(n, d, k))
    budget = TimingBudget(n_single, batch, threads)
    points: list[ScalePoint] = []
    for n in sizes:
        x, labels = sample_like(structure, int(n), seed=seed)
        rng = np.random.default_rng(seed + 1)
        qids = np.sort(rng.choice(len(x), min(n_queries, len(x)), replace=False))
        q = x[qids]
        exact_ids, _ = ExactBackend().search(x, q, k, query_ids=qids)
        for spec in grid(len(x), x.shape[1]):
            index, build_s = build_faiss(spec, x)
            raw_ids, raw_sc = faiss_search(index, spec, q, k + 3)  # +2: ties by id
            ids = rank_candidates(raw_ids, snap_scores(raw_ids, raw_sc, x, q), k, qids)
            res = evaluate_rankings(ids, labels[qids], labels, k, exclude_self=True, query_ids=qids)
            t = time_faiss(spec, x, q, k, budget, index=index, build_s=build_s)
            point = ScalePoint(
                len(x),
                _variant_label(spec),
                spec,
                tie_aware_recall(ids, exact_ids, x, q),
                res.summary,
                t,
                (t.index_bytes or 0) / len(x),
            )
            points.append(point)
            logger.info(
                "scale n=%d %s: recall %.3f p99 %.3f ms", n, point.variant, point.recall, t.p99_ms
            )
            del index
        if binary:
            points.append(_binary_point(x, labels, qids, exact_ids, k, budget))
    return points


@dataclass
class Projection:
    """Memory and latency of a variant projected to ``n`` items (a projection, not a measure).

    Attributes:
        n: Projected index size.
        variant: Variant label.
        memory_bytes: Measured bytes per vector (at the largest size) times ``n``.
        p50_ms: Fitted ``p50 = a * n ** b`` at ``n`` (``b`` in ``[0, 1]``).
        p99_ms: ``p50_ms`` times the p99/p50 ratio measured at the largest size.
        exponent: The fitted ``b`` (1 = linear in ``n``, a scan).
        fitted_on: Sizes the fit used.
        label: Always ``projection``.
    """

    n: int
    variant: str
    memory_bytes: float
    p50_ms: float
    p99_ms: float
    exponent: float
    fitted_on: list[int] = field(default_factory=list)
    label: str = "projection"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able row."""
        return dict(self.__dict__)


def _power_fit(n: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares of ``log y = log a + b log n``, ``b`` clipped to ``[0, 1]``; ``(a, b)``.

    A search never costs more than a scan of every item, so ``b <= 1`` (timing noise on a shared
    machine fitted exponents of 3-4 on two sizes); ``a`` is refitted for the clipped ``b``.
    """
    logn, logy = np.log(n), np.log(np.maximum(y, 1e-9))
    b = 0.0
    if len(n) >= 2 and len(set(n.tolist())) >= 2:
        b = float(np.clip(np.polyfit(logn, logy, 1)[0], 0.0, 1.0))
    return float(np.exp(np.mean(logy - b * logn))), b


def project(
    points: Sequence[ScalePoint], targets: Sequence[int] = (10_000_000, 100_000_000)
) -> list[Projection]:
    """Project each variant's memory and latency to ``targets`` items.

    Args:
        points: Measured points (two or more sizes per variant for a latency trend).
        targets: Index sizes to project to.

    Returns:
        One projection per (variant, target).
    """
    out: list[Projection] = []
    for variant in dict.fromkeys(p.variant for p in points):
        mine = sorted((p for p in points if p.variant == variant), key=lambda p: p.n)
        n = np.array([p.n for p in mine], dtype=np.float64)
        a50, b50 = _power_fit(n, np.array([p.timing.p50_ms for p in mine]))
        tail = mine[-1].timing.p99_ms / max(mine[-1].timing.p50_ms, 1e-9)  # p99/p50, largest n
        bpv = mine[-1].bytes_per_vector
        for t in targets:
            p50 = a50 * t**b50
            out.append(Projection(
                int(t), variant, bpv * t, p50, p50 * tail, b50, [p.n for p in mine],
            ))  # fmt: skip
    return out
