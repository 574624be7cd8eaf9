"""Search an index with queries through a backend and score the rankings (mMP@k etc.)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from embbench.metrics import RetrievalResult, evaluate_rankings
from embbench.retrieval.base import SearchBackend, create_backend, l2_normalize

__all__ = ["search_and_evaluate"]


def search_and_evaluate(
    query_vectors: np.ndarray,
    query_labels: np.ndarray,
    index_vectors: np.ndarray | None = None,
    index_labels: np.ndarray | None = None,
    *,
    k: int = 5,
    protocol: Literal["within", "cross"] = "within",
    backend: SearchBackend | str = "exact",
    query_ids: np.ndarray | None = None,
) -> RetrievalResult:
    """Search the index with the queries and compute the retrieval metrics.

    Args:
        query_vectors: ``(nq, d)`` query embeddings (normalised here).
        query_labels: ``(nq,)`` query labels.
        index_vectors: ``(n, d)`` index embeddings; under ``within`` may be ``None`` (= queries).
        index_labels: ``(n,)`` index labels; under ``within`` may be ``None`` (= query labels).
        k: The cut-off.
        protocol: ``within``: the queries are index items (by default the whole index, in
            order), each removed from its own list by id; ``cross``: separate sets, nothing
            excluded.
        backend: A backend instance or a registered name (created and closed here).
        query_ids: Under ``within``, the index position of each query (default ``0..nq-1``,
            which requires queries = index).

    Returns:
        The metrics (lone queries excluded and counted).
    """
    if protocol not in ("within", "cross"):
        raise ValueError(
            f"search_and_evaluate: protocol must be 'within' or 'cross', got {protocol!r}"
        )
    q = l2_normalize(query_vectors, "query_vectors")
    q_lab = np.asarray(query_labels)
    if q_lab.shape != (q.shape[0],):
        raise ValueError(
            f"search_and_evaluate: {q.shape[0]} query vectors but query_labels has shape "
            f"{q_lab.shape}"
        )
    if protocol == "within":
        x = q if index_vectors is None else l2_normalize(index_vectors, "index_vectors")
        x_lab = q_lab if index_labels is None else np.asarray(index_labels)
        if query_ids is None:
            if x.shape[0] != q.shape[0]:
                raise ValueError(
                    "search_and_evaluate: protocol 'within' with a query set smaller than the "
                    "index needs query_ids (the index position of each query)."
                )
            qids = np.arange(q.shape[0], dtype=np.int64)
        else:
            qids = np.asarray(query_ids, dtype=np.int64)
    else:
        if index_vectors is None or index_labels is None:
            raise ValueError(
                "search_and_evaluate: protocol 'cross' needs index_vectors and index_labels"
            )
        if query_ids is not None:
            raise ValueError("search_and_evaluate: query_ids only applies to protocol 'within'")
        x = l2_normalize(index_vectors, "index_vectors")
        x_lab = np.asarray(index_labels)
        qids = None
    if x_lab.shape != (x.shape[0],):
        raise ValueError(
            f"search_and_evaluate: {x.shape[0]} index vectors but index_labels has shape "
            f"{x_lab.shape}"
        )
    owned = isinstance(backend, str)
    be = create_backend(backend) if isinstance(backend, str) else backend
    try:
        ids, _ = be.search(x, q, k, query_ids=qids)
    finally:
        if owned:
            be.close()
    return evaluate_rankings(
        ids, q_lab, x_lab, k, exclude_self=protocol == "within", query_ids=qids
    )
