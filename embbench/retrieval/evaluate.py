"""Search an index with queries through a backend and score the rankings (mMP@k etc.)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from embbench.metrics import RetrievalResult, evaluate_rankings
from embbench.retrieval.base import SearchBackend, create_backend, l2_normalize

__all__ = ["RetrievalTask", "search_and_evaluate"]


@dataclass(frozen=True)
class RetrievalTask:
    """Queries ranked against an index, scored by label: what every retrieval study searches.

    The float32 search (:meth:`search`), the compressions and the index variants of the
    deployment study all read one task, so its protocol is resolved in one place.

    Attributes:
        query_vectors: ``(nq, d)`` query embeddings (normalised where searched).
        query_labels: ``(nq,)`` query labels.
        index_vectors: ``(n, d)`` index embeddings; under ``within`` may be ``None`` (= queries).
        index_labels: ``(n,)`` index labels; under ``within`` may be ``None`` (= query labels).
        protocol: ``within``: the queries are index items (by default the whole index, in
            order), each removed from its own list by id; ``cross``: separate sets, nothing
            excluded.
        query_ids: Under ``within``, the index position of each query (default ``0..nq-1``,
            which requires queries = index).
    """

    query_vectors: np.ndarray
    query_labels: np.ndarray
    index_vectors: np.ndarray | None = None
    index_labels: np.ndarray | None = None
    protocol: Literal["within", "cross"] = "within"
    query_ids: np.ndarray | None = None

    @property
    def within(self) -> bool:
        """Whether each query is an index item, removed from its own ranking."""
        return self.protocol == "within"

    def with_vectors(
        self, query_vectors: np.ndarray, index_vectors: np.ndarray | None
    ) -> RetrievalTask:
        """The same task on other vectors of the same items (e.g. decoded compressions)."""
        return replace(self, query_vectors=query_vectors, index_vectors=index_vectors)

    def relevance(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Query labels, index labels and the queries' index positions (``None``: ``cross``).

        Raises:
            ValueError: An unknown protocol, or labels, ids and vectors that do not fit it.
        """
        if self.protocol not in ("within", "cross"):
            raise ValueError(
                f"search_and_evaluate: protocol must be 'within' or 'cross', got {self.protocol!r}"
            )
        nq = len(self.query_vectors)
        n = nq if self.index_vectors is None else len(self.index_vectors)
        q_lab = np.asarray(self.query_labels)
        if q_lab.shape != (nq,):
            raise ValueError(
                f"search_and_evaluate: {nq} query vectors but query_labels has shape {q_lab.shape}"
            )
        if not self.within:
            if self.index_vectors is None or self.index_labels is None:
                raise ValueError(
                    "search_and_evaluate: protocol 'cross' needs index_vectors and index_labels"
                )
            if self.query_ids is not None:
                raise ValueError("search_and_evaluate: query_ids only applies to protocol 'within'")
            x_lab, qids = np.asarray(self.index_labels), None
        else:
            x_lab = q_lab if self.index_labels is None else np.asarray(self.index_labels)
            if self.query_ids is None:
                if n != nq:
                    raise ValueError(
                        "search_and_evaluate: protocol 'within' with a query set smaller than "
                        "the index needs query_ids (the index position of each query)."
                    )
                qids = np.arange(nq, dtype=np.int64)
            else:
                qids = np.asarray(self.query_ids, dtype=np.int64)
        if x_lab.shape != (n,):
            raise ValueError(
                f"search_and_evaluate: {n} index vectors but index_labels has shape {x_lab.shape}"
            )
        return q_lab, x_lab, qids

    def unit_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """The L2-normalised queries and index (the queries themselves when no index is given)."""
        q = l2_normalize(self.query_vectors, "query_vectors")
        x = q if self.index_vectors is None else l2_normalize(self.index_vectors, "index_vectors")
        return q, x

    def search(self, *, k: int = 5, backend: SearchBackend | str = "exact") -> RetrievalResult:
        """Search the index with the queries through ``backend`` and compute the metrics.

        Args:
            k: The cut-off.
            backend: A backend instance or a registered name (created and closed here).

        Returns:
            The metrics (lone queries excluded and counted).
        """
        q_lab, x_lab, qids = self.relevance()
        q, x = self.unit_vectors()
        owned = isinstance(backend, str)
        be = create_backend(backend) if isinstance(backend, str) else backend
        try:
            ids, _ = be.search(x, q, k, query_ids=qids)
        finally:
            if owned:
                be.close()
        return evaluate_rankings(ids, q_lab, x_lab, k, exclude_self=self.within, query_ids=qids)


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

    The arguments are those of :class:`RetrievalTask` (see there), ``k`` and ``backend`` those
    of :meth:`RetrievalTask.search`.

    Returns:
        The metrics (lone queries excluded and counted).
    """
    task = RetrievalTask(
        query_vectors, query_labels, index_vectors, index_labels, protocol, query_ids
    )
    return task.search(k=k, backend=backend)
