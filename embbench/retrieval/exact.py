"""Exact search: float32 matrix product per block, exact top-k candidates, canonical re-scoring.

Queries are split into blocks; each block is searched start to finish by ONE worker thread
(``threads`` of them, :func:`embbench.retrieval._matmul.run_blocks`) with BLAS and torch limited
to one thread: the block's product in one call, then an exact top-k by levels of group maxima
(:func:`~embbench.retrieval._matmul.block_candidates`; numpy, or compiled by numba once a
process has searched enough to pay for loading it) fetches ``k (+1) + margin`` candidates per
query, then the ``k`` best of them by fast score (the query itself aside, and any others within
the tolerance of the ``k``-th) are re-scored canonically and ranked by (score desc, id asc), so
ids and distances are identical whatever the path, block or threads. The only large
temporaries are one ``(block, n)`` float32 score buffer per worker.

Why one BLAS thread per block rather than a multi-threaded BLAS call per block: after a
threaded OpenBLAS call its worker threads keep spinning (``THREAD_TIMEOUT``), so whatever runs
next on the same cores (selection, re-scoring) is slowed by them, by how much depending on the
CPU, the library build and its kernel choice; single-threaded calls leave no such threads, and
the selection of each block overlaps the other workers' products. Nothing here depends on which
kernels a library picks (``OPENBLAS_CORETYPE`` and the like): the benchmark prints them.
"""

from __future__ import annotations

import logging
import queue

import numpy as np

from embbench.retrieval._matmul import (
    MATMUL_PATHS,
    SELECT_PATHS,
    block_candidates,
    choose_matmul,
    choose_select,
    run_blocks,
    score_buffer,
    search_workers,
)
from embbench.retrieval.base import (
    SearchBackend,
    candidate_scores,
    kth_score,
    pair_scores,
    rank_rows,
    register_backend,
    select_top,
    to_sq_l2,
)

logger = logging.getLogger(__name__)

__all__ = ["ExactBackend"]

DEFAULT_BLOCK_BYTES = 64 * 2**20  # one block's score matrix; 64 MiB keeps GEMMs efficient
MIN_BLOCK_ROWS = 64  # below this the product loses efficiency (packing overhead per call)
MAX_BLOCK_ROWS = 4096


@register_backend("exact")
class ExactBackend(SearchBackend):
    """Exact search by blocked matrix product and top-k, with ties resolved by id.

    Args:
        block_size: Queries per block; ``None`` sizes blocks to ``max_block_bytes``.
        threads: Worker threads (blocks searched at once, each on single-threaded BLAS and
            torch); ``None`` uses torch's current thread count.
        margin: Extra candidates fetched beyond ``k`` so boundary ties rarely need widening.
            Kept small: rows whose ties cross the boundary are widened anyway, and only the
            candidates within ``2 tol`` of a row's ``k (+1)``-th fast score are re-scored.
        max_block_bytes: Budget for one block's ``(block, n)`` float32 score buffer (one per
            worker) when ``block_size`` is ``None`` (clamped to 64..4096 rows).
        matmul: Product path: ``auto`` (fastest here, measured once and cached per machine),
            ``numpy`` (OpenBLAS) or ``torch`` (MKL). Results are identical across paths.
        select: Candidate selection: ``auto`` (the compiled kernel once this process has
            searched enough scores to pay for loading it, see
            :func:`~embbench.retrieval._matmul.choose_select`), ``numpy`` or ``numba``.
            Results are identical across paths.
    """

    def __init__(
        self,
        block_size: int | None = None,
        threads: int | None = None,
        margin: int = 2,
        max_block_bytes: int = DEFAULT_BLOCK_BYTES,
        matmul: str = "auto",
        select: str = "auto",
    ) -> None:
        if block_size is not None and block_size < 1:
            raise ValueError(f"ExactBackend: block_size must be >= 1, got {block_size}")
        if threads is not None and threads < 1:
            raise ValueError(f"ExactBackend: threads must be >= 1, got {threads}")
        if margin < 0:
            raise ValueError(f"ExactBackend: margin must be >= 0, got {margin}")
        if matmul != "auto" and matmul not in MATMUL_PATHS:
            raise ValueError(
                f"ExactBackend: matmul must be 'auto' or one of {MATMUL_PATHS}, got {matmul!r}"
            )
        if select != "auto" and select not in SELECT_PATHS:
            raise ValueError(
                f"ExactBackend: select must be 'auto' or one of {SELECT_PATHS}, got {select!r}"
            )
        self.block_size = block_size
        self.threads = threads
        self.margin = int(margin)
        self.max_block_bytes = int(max_block_bytes)
        self.matmul = matmul
        self.select = select
        self.n_widened = 0  # rows whose candidate set had to be widened (last search)
        self.last_matmul = ""  # the product path the last search used
        self.last_select = ""  # the selection path the last search used

    def __repr__(self) -> str:
        return (
            f"ExactBackend(block_size={self.block_size}, threads={self.threads}, "
            f"margin={self.margin}, matmul={self.matmul!r}, select={self.select!r})"
        )

    def rows_per_block(self, n: int) -> int:
        """Queries per block against an index of ``n`` rows."""
        if self.block_size is not None:
            return self.block_size
        rows = self.max_block_bytes // max(1, 4 * n)
        return int(max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, rows)))

    def _search(
        self, idx: np.ndarray, qry: np.ndarray, k: int, qids: np.ndarray | None, tol: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`SearchBackend.search` (arguments checked there)."""
        n, nq = idx.shape[0], qry.shape[0]
        out_ids = np.full((nq, k), -1, dtype=np.int64)
        out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
        kk = k + (1 if qids is not None else 0)
        n_cand = min(n, kk + self.margin)
        block = min(nq, self.rows_per_block(n))
        path = self.matmul
        if path == "auto":
            path = choose_matmul(idx.shape[1], self.threads, 2.0 * n * nq * idx.shape[1])
        self.last_matmul = path
        select = choose_select(self.select, n, float(n) * nq, n_cand)
        self.last_select = select
        workers = search_workers(self.threads)
        bufs: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()  # one score buffer per worker
        for _ in range(min(workers, -(-nq // block))):
            bufs.put(score_buffer(block, n))

        def one_block(start: int) -> int:
            stop = min(nq, start + block)
            qb = qry[start:stop]
            buf = bufs.get()
            try:
                vals, cand = block_candidates(path, qb, idx, n_cand, buf, select)
                fast = buf[: qb.shape[0] * n].reshape(qb.shape[0], n)  # the block's scores
                ids_b, sc_b, widened = self._rank(fast, qb, idx, vals, cand, kk, tol, start, qids)
            finally:
                bufs.put(buf)
            out_ids[start:stop] = ids_b
            out_scores[start:stop] = sc_b
            return widened

        self.n_widened = sum(run_blocks(one_block, range(0, nq, block), workers))
        if self.n_widened:
            logger.debug(
                "exact search: %d of %d rows widened for boundary ties", self.n_widened, nq
            )
        return out_ids, to_sq_l2(out_scores)

    def _rank(
        self,
        fast: np.ndarray,
        qb: np.ndarray,
        idx: np.ndarray,
        vals: np.ndarray,
        cand: np.ndarray,
        kk: int,
        tol: float,
        start: int,
        qids: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Re-score one block's candidates canonically and rank them; widen boundary ties.

        ``fast`` is the block's ``(b, n)`` fast score matrix, still in the worker's buffer.
        Under ``within`` the query itself is masked out of its candidates first (it is never a
        result, so it is neither re-scored nor ranked), and the ``k`` best others are
        re-scored. Rows are ranked in place, (score desc, id asc) over the ``(b, c)``
        candidate matrix; only widened rows go through the flat :func:`select_top`.
        """
        b, n_cand = cand.shape
        sids = qids[start : start + b] if qids is not None else None
        k = kk - (1 if sids is not None else 0)
        v_min = vals.min(axis=1)  # no unfetched item scores higher (the query's own counts)
        own = None
        if sids is not None:
            own = cand == sids[:, None]
            vals = np.where(own, np.float32(-np.inf), vals)
        m = min(k, n_cand)
        canon = self._rescore(qb, idx, vals, cand, m, tol)
        if own is not None:
            canon[own] = -np.inf  # scored where every candidate was (a tiny index)
        ids_b, sc_b = rank_rows(cand, canon, k)
        widened = 0
        if n_cand < idx.shape[0]:
            kth = kth_score(canon, m)  # the k-th best re-scored score, the query's own aside
            widen = np.flatnonzero(v_min + tol >= kth)
            if widen.size:
                widened = int(widen.size)
                rows, cols, w_canon = self._widen(fast, qb, idx, widen, kth, tol)
                w_sids = sids[widen] if sids is not None else None
                ids_b[widen], sc_b[widen] = select_top(rows, cols, w_canon, widen.size, k, w_sids)
        return ids_b, sc_b, widened

    @staticmethod
    def _rescore(
        qb: np.ndarray, idx: np.ndarray, vals: np.ndarray, cand: np.ndarray, m: int, tol: float
    ) -> np.ndarray:
        """Canonical scores of the candidates that can be among a row's ``m`` best.

        A candidate whose fast score is more than ``2 tol`` below the row's ``m``-th best fast
        score is canonically below ``m`` others (each fast score is within ``tol`` of its
        canonical one), so it can be neither among the results nor a tie with them: it is not
        re-scored (at 20k x 768, k = 5, ``within``: ~5 of 8 candidates are). The ``m`` best by
        fast score of every row are re-scored together (:func:`candidate_scores`), the few
        others that qualify pair by pair (:func:`pair_scores`, the same kernel).

        Returns:
            ``(b, c)`` canonical scores, ``-inf`` where not re-scored (``vals`` of ``-inf``,
            candidates masked out, are re-scored only when every candidate is).
        """
        b, c = cand.shape
        canon = np.full((b, c), -np.inf, dtype=np.float32)
        if m >= c:
            canon[:] = candidate_scores(qb, idx, cand)
            return canon
        order = np.argsort(-vals, axis=1, kind="stable")
        head = order[:, :m]  # the m best fast scores of each row
        np.put_along_axis(
            canon, head, candidate_scores(qb, idx, np.take_along_axis(cand, head, 1)), 1
        )
        floor = np.take_along_axis(vals, order[:, m - 1 : m], 1) - np.float32(2 * tol)
        need = vals >= floor
        er, ec = np.nonzero(need & np.isneginf(canon))
        if er.size:
            canon[er, ec] = pair_scores(qb, idx, er, cand[er, ec])
        return canon

    def _widen(
        self,
        fast: np.ndarray,
        qb: np.ndarray,
        idx: np.ndarray,
        widen: np.ndarray,
        kth: np.ndarray,
        tol: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every item that could tie or beat ``kth`` in rows ``widen``, re-scored canonically.

        Their fast scores are read from the block's score matrix ``fast`` (still in the
        worker's buffer): any float32 product is within ``tol`` of the
        canonical score. Computing them again instead (a product of a few queries against the
        whole index) streamed the index from memory once per block that had a widened row:
        ~17 ms per 838-query block at 20k x 768, ~7% of the block's product.

        Returns:
            ``(rows, cols, canon)``: positions in ``widen``, index ids and canonical scores.
        """
        thr = (kth[widen] - np.float32(tol)).astype(np.float32)
        r, c = np.nonzero(fast[widen] >= thr[:, None])
        cols = c.astype(np.int64)
        return r, cols, pair_scores(qb, idx, widen[r], cols)
