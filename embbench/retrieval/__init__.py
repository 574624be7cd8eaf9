"""Nearest-neighbour search backends (exact, Milvus) and retrieval evaluation.

Layout: :mod:`~embbench.retrieval.base` (the :class:`SearchBackend` contract, the backend registry,
validation, shared ranking helpers), :mod:`~embbench.retrieval.exact` (blocked matrix product on the
machine's fastest float32 path), :mod:`~embbench.retrieval.milvus` (Milvus Lite or a server) and
:mod:`~embbench.retrieval.evaluate` (search + metrics). A new backend is one module with a
``@register_backend("name")`` class, imported here.

Every backend returns, for each query, the positions of its ``k`` nearest index vectors and their
SQUARED L2 distances on unit vectors (``2 - 2 * dot``), so numbers compare across backends.

**Deterministic ties.** Fast kernels do not give reproducible float32 scores: the same query
scored alone (gemv) or inside a block (gemm) differed by up to 2.4e-7 in our measurements, BLAS
libraries differ from each other, and Milvus batches and computes its own scores. So the backends
only *retrieve candidates* with their fast kernels; every candidate is then re-scored canonically
(float64 accumulation of the float32 vectors, rounded to float32) and ranked by (score
descending, index id ascending). Identical vectors therefore tie exactly and resolve by id, and
ids and distances are identical bit for bit whatever the block size, thread count, BLAS or
backend. Ties at the k-th boundary are handled with a proven bound: a fast float32 score differs
from the canonical one by at most ``dim * 2**-24`` on unit vectors, so when the last fetched
candidate's fast score is within that bound of the k-th canonical score the row is widened until
no unfetched item can tie or win.

**Protocol ``within``.** When ``query_ids`` is given (query ``i`` IS index item
``query_ids[i]``), that item is removed from its own list by id (``k + 1`` are ranked and the
query's own id dropped), never by dropping rank 1: with duplicates, rank 1 is often a duplicate
with a lower id.
"""

from __future__ import annotations

from embbench.retrieval.base import (
    SearchBackend,
    create_backend,
    l2_normalize,
    list_backends,
    register_backend,
)
from embbench.retrieval.evaluate import RetrievalTask, search_and_evaluate
from embbench.retrieval.exact import ExactBackend
from embbench.retrieval.milvus import MilvusBackend
from embbench.retrieval.milvus_collection import MilvusCollection

__all__ = [
    "ExactBackend",
    "MilvusBackend",
    "MilvusCollection",
    "RetrievalTask",
    "SearchBackend",
    "create_backend",
    "l2_normalize",
    "list_backends",
    "register_backend",
    "search_and_evaluate",
]
