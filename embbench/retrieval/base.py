"""The search-backend contract, its registry, input validation and the shared ranking helpers.

Every backend returns, for each query, the positions of its ``k`` nearest index vectors and their
SQUARED L2 distances on unit vectors (``2 - 2 * dot``), ranked by (distance, id); see the package
docstring (:mod:`embbench.retrieval`) for why candidates are re-scored canonically.

Validation here never builds an ``(n, d)`` temporary: finiteness, unit norms and the
``query_ids`` consistency check run over row chunks of at most :data:`CHECK_CHUNK_BYTES`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from embbench._registry import Registry
from embbench.vectors import (  # noqa: F401 - the retrieval API re-exports them
    CHECK_CHUNK_BYTES,
    as_matrix,
    l2_normalize,
    row_chunks,
    row_norms,
)

__all__ = [
    "SearchBackend",
    "create_backend",
    "l2_normalize",
    "list_backends",
    "register_backend",
]

_BACKENDS: Registry[type[SearchBackend]] = Registry("search backend")

UNIT_NORM_TOL = 1e-3  # max |norm - 1| accepted as "L2-normalised"
PAIR_CHUNK = 16_384  # candidate pairs re-scored at once (a memory chunk, not a Milvus cap)
GATHER_BYTES = 2**20  # candidate vectors gathered at once by candidate_scores: cache-sized


def register_backend(name: str) -> Callable[[type[SearchBackend]], type[SearchBackend]]:
    """Class decorator adding a :class:`SearchBackend` subclass to the registry under ``name``."""

    def wrap(cls: type[SearchBackend]) -> type[SearchBackend]:
        _BACKENDS.register(name, cls)
        cls.name = name
        return cls

    return wrap


def list_backends() -> list[str]:
    """Registered backend names, sorted."""
    return _BACKENDS.names()


def create_backend(name: str, **kwargs: Any) -> SearchBackend:
    """Create a registered search backend (``exact`` or ``milvus``).

    Args:
        name: The registered name; unknown names raise with close matches ("did you mean").
        **kwargs: Constructor arguments; ``None`` values are dropped so defaults apply.

    Returns:
        The backend instance.
    """
    cls = _BACKENDS.get(name)
    return cls(**{key: value for key, value in kwargs.items() if value is not None})


class SearchBackend(abc.ABC):
    """Exact or approximate k-nearest-neighbour search over L2-normalised vectors.

    Subclasses implement :meth:`search`; use them as context managers (or call :meth:`close`)
    when they hold external resources.
    """

    name: ClassVar[str] = ""

    def search(
        self,
        index: np.ndarray,
        queries: np.ndarray,
        k: int,
        *,
        query_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest index vectors of each query.

        Checks the arguments once (:func:`check_search_args`) for every backend, then calls the
        backend's :meth:`_search`.

        Args:
            index: ``(n, d)`` L2-normalised index vectors.
            queries: ``(nq, d)`` L2-normalised query vectors.
            k: Results per query.
            query_ids: Protocol ``within``: query ``i`` is index item ``query_ids[i]``, which is
                removed from its own list by id.

        Returns:
            ``(ids, dists)``: ``(nq, k)`` int64 positions into ``index`` (best first, ties by id
            ascending, ``-1`` padding) and float32 squared L2 distances (``inf`` padding).
        """
        idx, qry, qids, tol = check_search_args(index, queries, k, query_ids)
        self.n_widened = 0  # rows whose candidate set had to be widened (this search)
        if idx.shape[0] == 0 or qry.shape[0] == 0:  # nothing to search: all padding
            nq = qry.shape[0]
            return (
                np.full((nq, int(k)), -1, dtype=np.int64),
                np.full((nq, int(k)), np.inf, dtype=np.float32),
            )
        return self._search(idx, qry, int(k), qids, tol)

    @abc.abstractmethod
    def _search(
        self, idx: np.ndarray, qry: np.ndarray, k: int, qids: np.ndarray | None, tol: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """The search itself, on checked, non-empty arguments (see :meth:`search`).

        Args:
            idx: Checked unit index vectors (float32, C-contiguous).
            qry: Checked unit queries.
            k: Results per query.
            qids: Each query's index position under ``within``, else ``None``.
            tol: The norm tolerance the vectors were checked with.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release external resources (no-op by default)."""

    def __enter__(self) -> SearchBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def check_unit(arr: np.ndarray, what: str) -> float:
    """Raise unless rows are L2-normalised; return the largest row norm.

    The squared norms accumulate in float32 (one pass, no temporary): a check to
    :data:`UNIT_NORM_TOL` and a bound that the search's tolerance takes with 1% slack need no
    more, and it is ~5x faster than :func:`row_norms`' float64 (2.9 against 15.4 ms at
    20k x 768, serial before every exact search).
    """
    if arr.shape[0] == 0:
        return 1.0
    norms = np.sqrt(np.einsum("ij,ij->i", arr, arr), dtype=np.float64)
    worst = float(np.abs(norms - 1.0).max())
    if worst > UNIT_NORM_TOL:
        raise ValueError(
            f"{what}: rows must be L2-normalised (max |norm - 1| = {worst:.3g}); call "
            "embbench.retrieval.l2_normalize first (search_and_evaluate does it for you)."
        )
    return float(norms.max())


def _same_rows(index: np.ndarray, queries: np.ndarray, qids: np.ndarray) -> bool:
    """Whether ``queries[i] == index[qids[i]]`` (within 1e-5) for every i, in row chunks.

    When the queries ARE the index (same buffer) and ``qids`` is ``0..n-1`` this is decided from
    the ids alone, without touching a vector.
    """
    n = index.shape[0]
    if (
        queries.shape == index.shape
        and queries.__array_interface__["data"][0] == index.__array_interface__["data"][0]
        and queries.strides == index.strides
        and np.array_equal(qids, np.arange(n))
    ):
        return True
    for sl in row_chunks(*queries.shape):
        if np.abs(index[qids[sl]] - queries[sl]).max() > 1e-5:
            return False
    return True


def check_search_args(
    index: Any, queries: Any, k: int, query_ids: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """Validate a search call; return float32 index, queries, int64 query ids and the tolerance.

    The tolerance bounds how far a fast float32 score may differ from the canonical one on unit
    vectors (``dim * 2**-24`` plus slack); candidate sets are widened when ties could cross it.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"search: k must be a positive integer, got {k!r}")
    idx = as_matrix(index, "search index")
    qry = as_matrix(queries, "search queries")
    if idx.shape[1] != qry.shape[1]:
        raise ValueError(
            f"search: index vectors have dim {idx.shape[1]} but queries have dim "
            f"{qry.shape[1]}; embed both with the same model."
        )
    norm_x = check_unit(idx, "search index")
    norm_q = norm_x if qry is idx else check_unit(qry, "search queries")
    qids = None
    if query_ids is not None:
        qids = np.asarray(query_ids)
        if qids.shape != (qry.shape[0],) or qids.dtype.kind not in "iu":
            raise ValueError(
                f"search: query_ids must be ({qry.shape[0]},) integers, got shape {qids.shape} "
                f"dtype {qids.dtype}"
            )
        qids = qids.astype(np.int64)
        if qids.size and (qids.min() < 0 or qids.max() >= idx.shape[0]):
            raise ValueError(
                f"search: query_ids must be positions in [0, {idx.shape[0] - 1}] of the index"
            )
        if qids.size and not _same_rows(idx, qry, qids):
            raise ValueError(
                "search: query_ids say query i is index item query_ids[i], but their vectors "
                "differ; pass query_ids only for protocol 'within' (queries taken from the index)."
            )
    tol = idx.shape[1] * 2.0**-24 * 1.01 * norm_x * norm_q + 2.0**-22
    return idx, qry, qids, tol


# ---------------------------------------------------------------------------------------------
# Ranking helpers shared by the backends
# ---------------------------------------------------------------------------------------------


def pair_scores(
    queries: np.ndarray, index: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """Canonical inner products ``queries[rows] . index[cols]``.

    float64 accumulation of the float32 vectors, rounded to float32: identical vectors get
    identical scores whatever kernel or backend found them. One pair per row of
    :func:`candidate_scores`, so both compute through the same kernel.
    """
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), PAIR_CHUNK):
        stop = min(len(rows), start + PAIR_CHUNK)
        out[start:stop] = candidate_scores(
            queries[rows[start:stop]], index, cols[start:stop, None]
        )[:, 0]
    return out


def candidate_scores(queries: np.ndarray, index: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Canonical inner products ``queries[i] . index[cand[i, j]]`` as an ``(m, c)`` array.

    The canonical kernel: einsum casts to float64 in its buffered loop (exact products, float64
    sums) and the same sum-of-products loop runs along each pair's ``d`` values whatever ``c``,
    so scores do not depend on how pairs are grouped (tested against flattened pairs). Each
    query is used ``c`` times without being copied: about 2x faster than gathering it per pair.
    """
    m, c = cand.shape
    out = np.empty((m, c), dtype=np.float32)
    # A cache-sized gather (~1 MiB at 768-d): the einsum reads it while it is hot; a 20 MB one
    # made re-scoring 20k x 8 candidates ~1.5x slower. The scores do not depend on the step.
    step = max(1, min(PAIR_CHUNK // max(1, c), GATHER_BYTES // max(1, c * index.strides[0])))
    for start in range(0, m, step):
        stop = min(m, start + step)
        out[start:stop] = np.einsum(
            "bd,bcd->bc",
            queries[start:stop],
            index[cand[start:stop]],
            dtype=np.float64,
            casting="safe",
        )
    return out


def select_top(
    rows: np.ndarray,
    cols: np.ndarray,
    scores: np.ndarray,
    n_rows: int,
    k: int,
    self_ids: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` best (score desc, id asc) of the given (row, col, score) triples.

    Args:
        rows: Row (query) of each triple, in ``[0, n_rows)``.
        cols: Index id of each triple.
        scores: Canonical score of each triple.
        n_rows: Number of rows.
        k: Results per row.
        self_ids: Optional per-row id to drop (the query itself), compared by id.

    Returns:
        ``(ids, scores)`` of shape ``(n_rows, k)``, padded with -1 and -inf.
    """
    if self_ids is not None:
        keep = cols != self_ids[rows]
        rows, cols, scores = rows[keep], cols[keep], scores[keep]
    order = np.lexsort((cols, -scores, rows))
    rows, cols, scores = rows[order], cols[order], scores[order]
    starts = np.searchsorted(rows, np.arange(n_rows))
    rank = np.arange(len(rows)) - starts[rows]
    take = rank < k
    out_ids = np.full((n_rows, k), -1, dtype=np.int64)
    out_scores = np.full((n_rows, k), -np.inf, dtype=np.float32)
    out_ids[rows[take], rank[take]] = cols[take]
    out_scores[rows[take], rank[take]] = scores[take]
    return out_ids, out_scores


def rank_rows(cols: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` best (score desc, id asc) of a ``(b, c)`` candidate matrix.

    The fixed-shape twin of :func:`select_top` (one sort along the rows instead of a flat
    lexsort of triples: ~0.04 against ~0.7 ms for 838 x 8 candidates). Entries scored ``-inf``
    are not candidates (not re-scored, or excluded) and come out as padding.

    Args:
        cols: ``(b, c)`` index ids, distinct within a row.
        scores: ``(b, c)`` canonical scores, ``-inf`` where not a candidate.
        k: Results per row.

    Returns:
        ``(ids, scores)`` of shape ``(b, k)``, padded with -1 and -inf.
    """
    b, c = cols.shape
    out_ids = np.full((b, k), -1, dtype=np.int64)
    out_scores = np.full((b, k), -np.inf, dtype=np.float32)
    t = min(k, c)
    order = np.lexsort((cols, -scores), axis=-1)[:, :t]
    top = np.take_along_axis(scores, order, 1)
    real = np.isfinite(top)
    out_ids[:, :t] = np.where(real, np.take_along_axis(cols, order, 1), -1)
    out_scores[:, :t] = np.where(real, top, -np.inf)
    return out_ids, out_scores


def kth_score(scores: np.ndarray, kk: int) -> np.ndarray:
    """Per row, the kk-th largest value (rows hold at least kk finite values)."""
    return -np.partition(-scores, kk - 1, axis=1)[:, kk - 1]


def to_sq_l2(scores: np.ndarray) -> np.ndarray:
    """Squared L2 distance on unit vectors from inner products; padding (-inf) becomes inf."""
    dist = np.maximum(np.float32(0.0), np.float32(2.0) - np.float32(2.0) * scores)
    return np.where(np.isfinite(scores), dist, np.float32(np.inf)).astype(np.float32)
