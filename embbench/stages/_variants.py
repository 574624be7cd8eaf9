"""Stage 01's deployment variants: what compression and which Milvus index cost in quality.

Each variant of a (model, dataset) cell is a cell of its own (``Cell.variant``), run by the same
engine, hashed with the variant's parameters and recorded with them in its lineage
(``lineage.variant``):

- **compressions** (``float16``, ``int8``, ``binary``, ``pca<dims>``; fitted on the train split
  only): the encoded-then-decoded vectors are scored by the engine's own backend, exactly as the
  float32 vectors are. Binary codes decode to +-1 vectors, whose inner-product ranking equals
  the Hamming ranking, ties by id;
- **indexes** (``FLAT``, ``IVF_FLAT``, ``IVF_SQ8``, ``IVF_PQ``, ``HNSW``, ``SCANN``,
  ``IVF_RABITQ``, ``DISKANN`` with their search parameter swept): built and searched in Milvus
  (Lite, or the server at ``milvus_uri``), or, for a type Milvus Lite cannot build, in the same
  faiss family (labelled). The index's own ranking is scored with the same metric code
  (:func:`embbench.metrics.evaluate_rankings`); the record adds recall@k against exact search,
  the labelled latency (p50/p99 at batch 1, throughput at batch 1,000), memory per vector and
  build time (:func:`embbench.deploy.evaluate_indexes`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from embbench.cache import EmbeddingSet
from embbench.cells import CellInputs, Produced
from embbench.deploy import (
    INDEX_TYPES,
    MEASUREMENT,
    CompressionSpec,
    IndexSpec,
    default_index_grid,
    evaluate_indexes,
    fit_compression,
)
from embbench.retrieval import RetrievalTask

logger = logging.getLogger(__name__)

COMPRESSIONS = ("float16", "int8", "binary", "pca_half", "pca_quarter", "pca_eighth", "pca128",
                "pca64")  # fmt: skip
DEFAULT = "default"


def compression_specs(
    names: list[str], dim: int, whiten: bool, n_train: int | None = None
) -> list[CompressionSpec]:
    """The compression variants named (``default`` = all) for embeddings of ``dim`` dims.

    A PCA to ``m`` dims needs at least ``m`` train vectors; larger ones are left out (logged).

    Raises:
        ValueError: An unknown name, with the known ones.
    """
    wanted = list(COMPRESSIONS) if DEFAULT in names else names
    out = []
    for name in wanted:
        if name in ("float16", "int8", "binary"):
            out.append(CompressionSpec(name))
            continue
        fractions = {"pca_half": 2, "pca_quarter": 4, "pca_eighth": 8}
        if name in fractions:
            target = max(1, dim // fractions[name])
        elif name.startswith("pca") and name[3:].isdigit():
            target = int(name[3:])
        else:
            raise ValueError(
                f"compression {name!r} is unknown; choose from {list(COMPRESSIONS)} or "
                f"'{DEFAULT}' (pca<N> for any N)"
            )
        if target >= dim:  # a "reduction" to >= d dims is no variant
            continue
        if n_train is not None and target > n_train:
            logger.info(
                "compression pca%d left out: it needs at least %d train vectors, the "
                "train split has %d",
                target,
                target,
                n_train,
            )
            continue
        out.append(CompressionSpec("pca", dim=target, whiten=whiten))
    return list(dict.fromkeys(out))


def index_specs(types: list[str], n: int, dim: int, k: int) -> list[IndexSpec]:
    """The index variants of ``types`` (``default`` = every type) with their sweeps.

    Raises:
        ValueError: An unknown index type, with the known ones.
    """
    wanted = tuple(INDEX_TYPES) if DEFAULT in types else tuple(types)
    bad = [t for t in wanted if t not in INDEX_TYPES]
    if bad:
        raise ValueError(f"index type(s) {bad} unknown; choose from {list(INDEX_TYPES)}")
    return default_index_grid(n, dim, k=k, index_types=wanted)


def variant_identity(spec: CompressionSpec | IndexSpec) -> dict[str, Any]:
    """What a variant adds to its cell's hash.

    Its parameters; an index variant also how the study measures it
    (:data:`embbench.deploy.MEASUREMENT`), so records measured the old way are recomputed.
    """
    measured = {"index_measurement": MEASUREMENT} if isinstance(spec, IndexSpec) else {}
    return {"variant": spec.params(), **measured}


def _decoded(es: EmbeddingSet, vectors: np.ndarray, spec: CompressionSpec) -> EmbeddingSet:
    """An in-memory embedding set holding ``vectors`` for the items of ``es``."""
    meta = {**es.meta, "variant": spec.params()}
    return EmbeddingSet(
        vectors=vectors, item_ids=es.item_ids, meta=meta, failed=list(es.failed), path=es.path
    )


def produce_compressed(
    spec: CompressionSpec, sets: Mapping[str, EmbeddingSet], inputs: CellInputs, base: Produced
) -> Produced:
    """The compression variant of a pretrained cell: fit on train, encode, decode, score."""
    t0 = time.perf_counter()
    fitted = fit_compression(spec, np.asarray(sets["train"].vectors))
    plan = inputs.plan
    decoded = {
        s: _decoded(sets[s], fitted.decode(fitted.encode(np.asarray(sets[s].vectors))), spec)
        for s in plan.splits
    }
    d = int(sets["train"].vectors.shape[1])
    return Produced(
        query=decoded[plan.query_split],
        index=decoded[plan.index_split],
        lineage=base.lineage.model_copy(update={"variant": {"name": spec.name, **spec.params()}}),
        spec=base.spec,
        timings={**base.timings, "train_s": round(time.perf_counter() - t0, 3)},
        details={
            "variant_kind": "compression",
            "variant": spec.name,
            "bytes_per_vector": spec.bytes_per_vector(d),
            "float32_bytes_per_vector": 4 * d,
            "search": "hamming (as +-1 inner product)" if spec.kind == "binary" else "exact",
        },
        baseline=(base.query, base.index),
    )


def produce_index(
    spec: IndexSpec,
    inputs: CellInputs,
    base: Produced,
    *,
    milvus_uri: str,
    token: str,
    timings: bool,
    k: int,
) -> Produced:
    """The index variant of a pretrained cell: build, search, score the index's own ranking."""
    plan = inputs.plan
    items = inputs.catalogue.items
    q, x = base.query, base.index
    within = plan.protocol == "within"
    qids = None
    if within and x is not q:
        pos = {item: i for i, item in enumerate(x.item_ids)}
        qids = np.array([pos[item] for item in q.item_ids], dtype=np.int64)
    one_set = within and x is q
    task = RetrievalTask(
        np.asarray(q.vectors),
        q.labels(items, plan.label),
        None if one_set else np.asarray(x.vectors),
        None if one_set else x.labels(items, plan.label),
        plan.protocol,
        qids,
    )
    (res,) = evaluate_indexes(
        [spec],
        task,
        k=k,
        uri=milvus_uri or None,
        token=token,
        timings=timings,
    )
    if res.status != "ok" or res.retrieval is None:
        raise VariantError(
            f"index {spec.name} could not be built or searched ({res.engine}: {res.error}); "
            "DISKANN needs a Milvus server (milvus_uri: http://host:19530)"
        )
    return Produced(
        query=q,
        index=x,
        lineage=base.lineage.model_copy(update={"variant": {"name": spec.name, **spec.params()}}),
        spec=base.spec,
        timings=base.timings,
        details={"variant_kind": "index", "variant": spec.name, **_index_details(res)},
        result=res.retrieval,
        searched_with=res.engine,
        baseline=(q, x),
    )


def _index_details(res: Any) -> dict[str, Any]:
    """The index result's facts, with the preferred timing (server, faiss, Lite) flattened."""
    out = res.to_dict()
    out.pop("metrics", None)
    out.pop("delta", None)
    timing = next(
        (t for s in ("milvus-server", "faiss", "milvus-lite") if (t := res.timing(s))), None
    )
    if timing is not None:
        out.update(
            p50_ms=timing.p50_ms,
            p99_ms=timing.p99_ms,
            qps_batch=timing.qps_batch,
            timing_source=timing.source,
            build_s=timing.build_s,
        )
    return out


class VariantError(RuntimeError):
    """A deployment variant cannot run here; the message names it and the fix."""


__all__ = [
    "COMPRESSIONS",
    "VariantError",
    "compression_specs",
    "index_specs",
    "produce_compressed",
    "produce_index",
]
