"""Index variants: typed specs, the default sweep, and their faiss families with timings.

An :class:`IndexSpec` names a Milvus index type with its build parameters and ONE value of its
search parameters; :func:`default_index_grid` sweeps the search parameter (``nprobe``, ``ef``,
``search_list``). The same spec maps to the faiss index family a Milvus server builds on
(:func:`faiss_factory`), which gives labelled latency, throughput and memory on machines without
a server (Milvus Lite 3.x is pure Python: its timings say nothing about a server).

faiss is a dev/optional dependency, imported inside the functions that need it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "INDEX_TYPES",
    "IndexSpec",
    "Timing",
    "TimingBudget",
    "variant_row",
    "build_faiss",
    "default_index_grid",
    "faiss_factory",
    "faiss_search",
    "time_faiss",
]

INDEX_TYPES = (
    "FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW", "SCANN", "DISKANN", "IVF_RABITQ",
)  # fmt: skip


def variant_row(result: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """The JSON-able row of a deployment variant's result (an index or a compression variant).

    Args:
        result: The result; its ``spec`` has a ``name`` and ``params()``.
        fields: The result's attributes to add after the spec's parameters, in order (dicts
            are copied).

    Returns:
        ``{"variant": name, **params, field: value...}``.
    """
    row = {"variant": result.spec.name, **result.spec.params()}
    for name in fields:
        value = getattr(result, name)
        row[name] = dict(value) if isinstance(value, dict) else value
    return row


def _frozen(params: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((params or {}).items()))


@dataclass(frozen=True)
class IndexSpec:
    """One index variant (hashable; :meth:`params` enters the cell hash).

    Attributes:
        index_type: Milvus index type (one of :data:`INDEX_TYPES`).
        build: Build parameters as sorted ``(key, value)`` pairs (``nlist``, ``M``, ...).
        search: Search parameters as sorted pairs (``nprobe``, ``ef``, ...).
    """

    index_type: str
    build: tuple[tuple[str, Any], ...] = ()
    search: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(
        cls,
        index_type: str,
        build: dict[str, Any] | None = None,
        search: dict[str, Any] | None = None,
    ) -> IndexSpec:
        """Build a spec from dicts."""
        kind = index_type.upper()
        if kind not in INDEX_TYPES:
            raise ValueError(f"IndexSpec: index_type {index_type!r} is not one of {INDEX_TYPES}")
        return cls(kind, _frozen(build), _frozen(search))

    @property
    def build_params(self) -> dict[str, Any]:
        """Build parameters as a dict."""
        return dict(self.build)

    @property
    def search_params(self) -> dict[str, Any]:
        """Search parameters as a dict."""
        return dict(self.search)

    @property
    def name(self) -> str:
        """Label such as ``IVF_SQ8(nlist=64) nprobe=16``."""
        b = ",".join(f"{k}={v}" for k, v in self.build)
        s = " ".join(f"{k}={v}" for k, v in self.search)
        return f"{self.index_type}{f'({b})' if b else ''}{f' {s}' if s else ''}"

    @property
    def build_key(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        """Specs with the same key share one built index."""
        return (self.index_type, self.build)

    def params(self) -> dict[str, Any]:
        """The JSON-able lineage: index type, build and search parameters."""
        return {
            "index_type": self.index_type,
            "index_params": self.build_params,
            "search_params": self.search_params,
        }


def _pq_m(d: int, target: int) -> int:
    """The largest divisor of ``d`` not above ``target`` (PQ sub-quantisers must divide d)."""
    return max(m for m in range(1, max(1, target) + 1) if d % m == 0)


def default_index_grid(
    n: int,
    d: int,
    *,
    k: int = 5,
    index_types: tuple[str, ...] = INDEX_TYPES,
    nprobes: tuple[int, ...] = (1, 4, 16, 64),
    efs: tuple[int, ...] = (16, 32, 64, 128),
) -> list[IndexSpec]:
    """The default sweep for ``n`` index vectors of dimension ``d``.

    ``nlist`` is about ``4 sqrt(n)`` (kept to at least 39 training points per list, faiss'
    minimum); PQ uses ``d/8`` sub-quantisers (one code per 8 dims) of 8 bits (4 bits under 10k
    vectors, which cannot train 256 centroids; ``log2(n)`` bits under 16 vectors); HNSW ``M=16,
    efConstruction=200``; search parameters are swept over ``nprobes`` (capped at ``nlist``) and
    ``efs`` (at least ``k + 1``).

    Args:
        n: Index size.
        d: Dimension.
        k: The cut-off (``ef`` and ``search_list`` are at least ``k + 1``).
        index_types: Which families to include.
        nprobes: ``nprobe`` values for IVF-style indexes.
        efs: ``ef`` / ``search_list`` values for graph indexes.

    Returns:
        The specs, ``FLAT`` first.
    """
    nlist = int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // 39 or 1)))
    probes = sorted({min(p, nlist) for p in nprobes})
    graph = sorted({max(e, k + 1) for e in efs})
    nbits = 8 if n >= 10_000 else max(1, min(4, int(math.log2(max(n, 2)))))  # 2**nbits <= n
    out: list[IndexSpec] = []
    for kind in index_types:
        if kind == "FLAT":
            out.append(IndexSpec.of("FLAT"))
        elif kind in ("IVF_FLAT", "IVF_SQ8", "IVF_RABITQ"):
            out += [IndexSpec.of(kind, {"nlist": nlist}, {"nprobe": p}) for p in probes]
        elif kind == "IVF_PQ":
            build = {"nlist": nlist, "m": _pq_m(d, max(1, d // 8)), "nbits": nbits}
            out += [IndexSpec.of(kind, build, {"nprobe": p}) for p in probes]
        elif kind == "SCANN":
            build = {"nlist": nlist, "with_raw_data": True}
            out += [
                IndexSpec.of(kind, build, {"nprobe": p, "reorder_k": 4 * (k + 1)}) for p in probes
            ]
        elif kind == "HNSW":
            build = {"M": 16, "efConstruction": 200}
            out += [IndexSpec.of(kind, build, {"ef": e}) for e in graph]
        elif kind == "DISKANN":
            out += [IndexSpec.of(kind, {}, {"search_list": e}) for e in graph]
        else:
            raise ValueError(f"default_index_grid: unknown index type {kind!r}")
    return out


# ---------------------------------------------------------------------------------------------
# faiss families
# ---------------------------------------------------------------------------------------------


def faiss_factory(spec: IndexSpec, d: int) -> str | None:
    """The faiss ``index_factory`` string of the family a Milvus server builds ``spec`` on.

    IVF_PQ skips faiss' polysemous training (``np``; Milvus does not do it, and it took minutes
    at 10k x 512); ``SCANN`` in Milvus is faiss' 4-bit fast-scan IVF-PQ with a raw-data refine step;
    ``DISKANN`` (Vamana) has no faiss family and returns ``None``.
    """
    b = spec.build_params
    nlist = b.get("nlist", 1)
    return {
        "FLAT": "Flat",
        "IVF_FLAT": f"IVF{nlist},Flat",
        "IVF_SQ8": f"IVF{nlist},SQ8",
        "IVF_PQ": f"IVF{nlist},PQ{b.get('m', _pq_m(d, max(1, d // 8)))}x{b.get('nbits', 8)}np",
        "HNSW": f"HNSW{b.get('M', 16)},Flat",
        "SCANN": f"IVF{nlist},PQ{_pq_m(d, d // 2)}x4fs,RFlat",
        "IVF_RABITQ": f"IVF{nlist},RaBitQ",
    }.get(spec.index_type)


def build_faiss(spec: IndexSpec, vectors: np.ndarray) -> tuple[Any, float]:
    """Build the faiss family of ``spec`` (inner product) on unit ``vectors``.

    Returns:
        ``(index, build_seconds)``.

    Raises:
        ValueError: When the spec has no faiss family (``DISKANN``).
    """
    import faiss  # optional (dev extra): only the faiss timings need it

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    desc = faiss_factory(spec, x.shape[1])
    if desc is None:
        raise ValueError(f"{spec.index_type} has no faiss family (Vamana is not in faiss)")
    t0 = time.perf_counter()
    index = faiss.index_factory(x.shape[1], desc, faiss.METRIC_INNER_PRODUCT)
    if spec.index_type == "HNSW":
        index.hnsw.efConstruction = int(spec.build_params.get("efConstruction", 40))
    if not index.is_trained:
        index.train(x)
    index.add(x)
    return index, time.perf_counter() - t0


def _apply_search_params(index: Any, spec: IndexSpec, limit: int) -> None:
    import faiss  # optional (dev extra)

    s = spec.search_params
    if "nprobe" in s:
        faiss.extract_index_ivf(index).nprobe = int(s["nprobe"])
    if "ef" in s:
        faiss.downcast_index(index).hnsw.efSearch = int(s["ef"])
    if "reorder_k" in s and hasattr(faiss.downcast_index(index), "k_factor"):
        faiss.downcast_index(index).k_factor = max(1.0, float(s["reorder_k"]) / max(1, limit))


def faiss_search(
    index: Any, spec: IndexSpec, queries: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Search a faiss index built by :func:`build_faiss` with ``spec``'s search parameters.

    Returns:
        ``(ids, scores)`` of shape ``(nq, limit)`` (ids ``-1`` / scores ``-inf`` padding).
    """
    _apply_search_params(index, spec, limit)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), int(limit))
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    return ids.astype(np.int64), scores


@dataclass(frozen=True)
class TimingBudget:
    """How a variant's costs are timed.

    Attributes:
        n_single: Single-query searches timed for latency p50/p99.
        batch: Throughput batch size.
        threads: faiss (OpenMP) threads during timing (``None``: faiss' default).
    """

    n_single: int = 200
    batch: int = 1000
    threads: int | None = None


@dataclass
class Timing:
    """Latency, throughput and memory of one index variant, labelled by where they come from.

    Attributes:
        source: ``faiss`` (the same index family on this machine), ``milvus-server`` or
            ``milvus-lite`` (pure Python: not a server's numbers).
        p50_ms: Median latency of single-query searches, in milliseconds.
        p99_ms: 99th percentile latency of single-query searches.
        qps_batch: Queries per second at batch ``batch``.
        batch: The throughput batch size.
        index_bytes: Index memory (faiss: the serialised index size), ``None`` when unknown.
        build_s: Build time in seconds.
        threads: Threads of the throughput batch (``None``: the library default); faiss single
            queries run on one thread.
    """

    source: str
    p50_ms: float
    p99_ms: float
    qps_batch: float
    batch: int
    index_bytes: int | None
    build_s: float
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        return dict(self.__dict__)


def latency_stats(
    search_one: Any,
    search_batch: Any,
    queries: np.ndarray,
    *,
    n_single: int,
    batch: int,
    set_threads: Any = None,
    threads: int | None = None,
) -> tuple[float, float, float]:
    """p50/p99 (ms) of ``n_single`` single-query calls and QPS of one ``batch``-query call.

    With ``set_threads``, single queries run on one thread (a server answers concurrent single
    queries one thread each; OpenMP threads spinning on a shared machine made the p99 of a
    two-thread single query 10-100x its p50 in our runs) and the batch on ``threads``.
    """
    n_single = min(n_single, len(queries))
    lat = np.empty(n_single)
    if set_threads is not None:
        set_threads(1)
    search_one(queries[:1])  # warm-up
    for i in range(n_single):
        t0 = time.perf_counter()
        search_one(queries[i : i + 1])
        lat[i] = time.perf_counter() - t0
    if set_threads is not None and threads is not None:
        set_threads(threads)
    reps = max(1, -(-batch // len(queries)))
    big = np.concatenate([queries] * reps)[:batch]
    search_batch(big[: min(len(big), 16)])  # warm-up
    t0 = time.perf_counter()
    search_batch(big)
    qps = len(big) / max(time.perf_counter() - t0, 1e-9)
    return float(np.percentile(lat, 50) * 1e3), float(np.percentile(lat, 99) * 1e3), qps


def time_faiss(
    spec: IndexSpec,
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    budget: TimingBudget | None = None,
    *,
    index: Any = None,
    build_s: float | None = None,
) -> Timing:
    """Latency p50/p99 at batch 1, throughput at ``budget.batch`` and memory of the faiss family.

    Args:
        spec: The variant.
        vectors: Unit index vectors (used to build when ``index`` is not given).
        queries: Unit queries (repeated to fill the batch).
        k: Results per query.
        budget: Single queries timed, throughput batch, and the OpenMP threads of the
            throughput batch (single queries run on one thread); default :class:`TimingBudget`.
        index: A prebuilt index of ``spec`` (with its ``build_s``) to reuse.
        build_s: Build seconds of ``index``.

    Returns:
        The timing labelled ``faiss``.
    """
    import faiss  # optional (dev extra)

    budget = budget or TimingBudget()
    n_single, batch, threads = budget.n_single, budget.batch, budget.threads
    old = faiss.omp_get_max_threads()
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    try:
        if index is None:
            index, build_s = build_faiss(spec, vectors)
        _apply_search_params(index, spec, k)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        p50, p99, qps = latency_stats(
            lambda x: index.search(x, k),
            lambda x: index.search(x, k),
            q,
            n_single=n_single,
            batch=batch,
            set_threads=faiss.omp_set_num_threads,
            threads=threads if threads is not None else old,
        )
        mem = int(faiss.serialize_index(index).size)
    finally:
        faiss.omp_set_num_threads(old)
    return Timing("faiss", p50, p99, qps, batch, mem, float(build_s or 0.0), threads)
