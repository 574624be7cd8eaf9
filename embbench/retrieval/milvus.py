"""Search through Milvus: Milvus Lite (a local ``.db`` file, the default) or a server/cluster.

Milvus Lite 3.x is pure Python (its FLAT search is a numpy brute force with a per-query Python
loop): fine for the paper's datasets, slow past a few hundred thousand vectors; see the README
("When to start a Milvus server"). A server is reached with the same class: ``uri="http://..."``.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Literal

import numpy as np

from embbench._utils import collection_name as valid_collection_name
from embbench.retrieval.base import (
    SearchBackend,
    as_matrix,
    kth_score,
    pair_scores,
    register_backend,
    select_top,
    to_sq_l2,
)
from embbench.retrieval.milvus_collection import (
    INSERT_BATCH,
    MAX_NQ,
    MAX_TOPK,
    MilvusCollection,
    quiet_milvus,
)
from embbench.services import connection_failure

logger = logging.getLogger(__name__)

__all__ = ["MilvusBackend"]


@register_backend("milvus")
class MilvusBackend(SearchBackend):
    """Search through Milvus: Milvus Lite (a local file, the default) or a server/cluster.

    Milvus is a *derived* index: :meth:`search` builds (or reuses) a collection named after a
    fingerprint of the index vectors, so the cached embeddings stay the source of truth.

    Metric choice: the default is ``IP`` (inner product). On L2-normalised vectors IP ranks
    exactly as L2 (``||a - b||^2 = 2 - 2 a.b``), and Milvus Lite's exact L2 search materialises
    an ``(nq, rows, dim)`` array (1,000 queries x 70k rows tried to allocate 134 GiB), while exact
    IP does not. Scores are converted to squared L2 (``2 - 2 ip``) and, like every backend here,
    candidates are re-scored canonically and re-sorted by (distance, id); a few extra candidates
    (``margin``) are fetched, and rows whose ties cross the boundary are re-searched with a larger
    limit (up to Milvus' topk cap, :data:`~embbench.retrieval.milvus_collection.MAX_TOPK`,
    beyond which a warning is logged).

    Measured on 60k x 768 vectors with Milvus Lite, where the time went and what fixed it: the
    default output returned every hit's 768-float vector through gRPC (search 2x slower; fixed by
    ``output_fields=[primary key]``); unflushed rows are re-stacked from the memtable on every
    search (fixed by ``flush`` after inserting); queries are sent as one float32 array per batch
    (not Python lists). Lite validates each inserted float in Python (~2-4k rows/s at d=768),
    so building dominates; a built collection is reused while the vectors are unchanged.

    Args:
        uri: ``path/to/file.db`` for Milvus Lite (default ``runs_dir()/milvus.db``) or
            ``http://host:19530`` for a server. Milvus Lite holds a process lock on its file:
            for several processes run ``milvus-lite server --data-dir x.db --port N`` and pass
            ``http://127.0.0.1:N``.
        token: Server token; defaults to the ``MILVUS_TOKEN`` environment variable. Never logged.
        collection_prefix: Prefix of collection names (letters, digits, underscore).
        index_type: Milvus index type; ``FLAT`` is exact.
        metric: ``IP`` (default) or ``COSINE``; both rank like L2 on unit vectors.
        batch: Queries per search call; ``None`` sizes it to the index (Lite scores
            ``batch x rows`` at once) and never above Milvus' cap
            (:data:`~embbench.retrieval.milvus_collection.MAX_NQ`).
        insert_batch: Rows per insert call (also kept under the 256 MiB gRPC message limit).
        margin: Extra candidates fetched per query for tie handling. Kept small: Milvus Lite
            materialises every hit as a Python record (~40-70 us each), which dominated its
            search time at limit 16; rows with boundary ties are re-searched anyway.
        index_params: Extra index build parameters (e.g. ``{"M": 16}`` for HNSW).
        search_params: Extra search parameters (e.g. ``{"ef": 64}``).
        timeout: Seconds each Milvus call may take, pymilvus' retries included (default
            ``EMBBENCH_MILVUS_TIMEOUT`` or 30; building an index and
            loading a collection may take 600 s): a server that dies mid-grid fails the call in
            seconds instead of pymilvus retrying for minutes.
    """

    def __init__(
        self,
        uri: str | None = None,
        token: str | None = None,
        collection_prefix: str = "embbench",
        index_type: str = "FLAT",
        metric: Literal["IP", "COSINE"] = "IP",
        batch: int | None = None,
        insert_batch: int = INSERT_BATCH,
        margin: int = 2,
        index_params: dict[str, Any] | None = None,
        search_params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        if (
            valid_collection_name(collection_prefix) != collection_prefix
            or len(collection_prefix) > 200
        ):
            raise ValueError(
                f"MilvusBackend: collection_prefix {collection_prefix!r} is not a valid Milvus "
                "name part; use letters, digits and underscores, starting with a letter (e.g. "
                f"{valid_collection_name(collection_prefix)[:200]!r})."
            )
        metric = metric.upper()  # type: ignore[assignment]
        if metric not in ("IP", "COSINE"):
            raise ValueError(
                f"MilvusBackend: metric {metric!r} is not supported; use 'IP' (default) or "
                "'COSINE'. On unit vectors both rank exactly as L2, and Milvus Lite's exact L2 "
                "search materialises (queries x rows x dim) floats and runs out of memory."
            )
        if batch is not None and not 1 <= batch <= MAX_NQ:
            raise ValueError(f"MilvusBackend: batch must be in [1, {MAX_NQ}], got {batch}")
        if insert_batch < 1 or margin < 0:
            raise ValueError("MilvusBackend: insert_batch must be >= 1 and margin >= 0")
        self.collection_prefix = collection_prefix
        self.index_type = index_type.upper()
        self.metric = metric
        self.batch = batch
        self.insert_batch = int(insert_batch)
        self.margin = int(margin)
        self.index_params = dict(index_params or {})
        self.search_params = dict(search_params or {})
        self._milvus = MilvusCollection(uri, token, timeout, self.insert_batch, "MilvusBackend")
        self._collection: str | None = None
        self._collection_rows = 0
        self.n_widened = 0
        self.last_build_s = 0.0

    def __repr__(self) -> str:  # the token is deliberately left out
        return (
            f"MilvusBackend(uri={self.uri!r}, index_type={self.index_type!r}, "
            f"metric={self.metric!r}, collection_prefix={self.collection_prefix!r})"
        )

    @property
    def uri(self) -> str:
        """The Milvus Lite file (resolved once opened) or the server address."""
        return self._milvus.uri

    @property
    def is_local(self) -> bool:
        """Whether ``uri`` is a Milvus Lite file (not a server address)."""
        return self._milvus.is_local

    @property
    def timeout(self) -> float:
        """Seconds each Milvus call may take (see ``timeout`` above)."""
        return self._milvus.timeout

    def close(self) -> None:
        """Close the client and, for Milvus Lite, stop its server so the file lock is released."""
        self._collection = None
        self._milvus.close()

    # -- building ------------------------------------------------------------------------------

    def collection_name(self, vectors: np.ndarray) -> str:
        """The content-addressed collection name for ``vectors`` under this configuration."""
        arr = np.ascontiguousarray(vectors, dtype=np.float32)
        h = hashlib.blake2b(digest_size=10)
        h.update(f"{arr.shape}|{self.index_type}|{self.metric}|{self.index_params}".encode())
        h.update(memoryview(arr).cast("B"))
        return valid_collection_name(self.collection_prefix, h.hexdigest())

    def build(self, name: str, vectors: np.ndarray, ids: np.ndarray | None = None) -> None:
        """(Re)create collection ``name`` holding ``vectors`` under primary keys ``ids``.

        Args:
            name: Collection name (letters, digits, underscore; starts with a letter or _).
            vectors: ``(n, d)`` float32 vectors.
            ids: ``(n,)`` unique int64 primary keys; default ``0..n-1`` (positions).
        """
        if valid_collection_name(name) != name:
            raise ValueError(
                f"MilvusBackend.build: {name!r} is not a valid Milvus collection name; use "
                "letters, digits and underscores, starting with a letter, at most 255 chars "
                f"(e.g. {valid_collection_name(name)!r})."
            )
        arr = as_matrix(vectors, "MilvusBackend.build vectors")
        n, d = arr.shape
        keys = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if keys.shape != (n,) or len(np.unique(keys)) != n:
            raise ValueError(f"MilvusBackend.build: ids must be {n} unique integers")
        self.last_build_s = self._milvus.build(
            name, arr, keys, self.index_type, self.metric, self.index_params
        )
        self._collection = name
        self._collection_rows = n
        logger.info(
            "milvus: built collection %s (%d x %d) in %.1f s", name, n, d, self.last_build_s
        )

    def ensure_collection(self, index: np.ndarray) -> str:
        """Build the collection for ``index`` unless an identical one exists; return its name.

        A collection that exists but cannot be read (e.g. a corrupted Milvus Lite file: ``'utf-8'
        codec can't decode byte ...``) is dropped and rebuilt from ``index`` with one warning:
        Milvus is a derived index, the embedding cache is the source of truth.
        """
        name = self.collection_name(index)
        if self._collection == name:
            return name
        self._milvus.connect()  # opening it (re)configures pymilvus' logging: before quieting it
        try:
            with quiet_milvus():
                reused = self._milvus.reuse(name, index.shape[0], self.index_params)
        except Exception as err:
            if connection_failure(err) is not None:
                raise
            self._drop_unreadable(name, err)
            reused = False
        if reused:
            self._collection = name
            self._collection_rows = index.shape[0]
            self.last_build_s = 0.0
            logger.info("milvus: reusing collection %s (%d rows)", name, index.shape[0])
        else:
            self.build(name, index)
        return name

    def _drop_unreadable(self, name: str, err: Exception) -> None:
        """Forget the current collection and drop the unreadable one (see ``ensure_collection``)."""
        self._collection = None
        self._milvus.drop_unreadable(name, err)

    # -- searching -----------------------------------------------------------------------------

    def _batch_size(self, n: int) -> int:
        if self.batch is not None:
            return self.batch
        if self.is_local:
            # Lite scores (batch x rows) float32 at once, plus a negated copy (~1 GiB here), and
            # pays ~0.2 s of per-row Python bookkeeping per call at 60k rows: few large calls.
            return int(max(1, min(MAX_NQ, 2**30 // max(1, 8 * n))))
        return MAX_NQ

    def _raw_search(
        self, name: str, queries: np.ndarray, limit: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """One Milvus search call; returns ``(ids, scores)`` padded with -1 / -inf."""
        return self._milvus.search(name, queries, limit, self.metric, self.search_params)

    def _search(
        self, idx: np.ndarray, qry: np.ndarray, k: int, qids: np.ndarray | None, tol: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`SearchBackend.search`; builds or reuses the collection for ``index``."""
        if self.metric == "COSINE":
            tol *= 2.0  # Milvus re-normalises: one more rounding step
        n, nq = idx.shape[0], qry.shape[0]
        out_ids = np.full((nq, k), -1, dtype=np.int64)
        out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
        name = self.ensure_collection(idx)
        kk = k + (1 if qids is not None else 0)
        if kk > MAX_TOPK:
            raise ValueError(f"MilvusBackend: k={k} exceeds Milvus' topk cap of {MAX_TOPK:,}")
        limit = min(n, kk + self.margin, MAX_TOPK)
        step = self._batch_size(n)
        short = 0  # queries answered with fewer than `limit` candidates (an approximate index)
        for start in range(0, nq, step):
            stop = min(nq, start + step)
            qb = qry[start:stop]
            try:
                with quiet_milvus():
                    ids_b, raw_b = self._raw_search(name, qb, limit)
            except Exception as err:  # a reused collection whose data cannot be read
                if connection_failure(err) is not None or self.last_build_s > 0:
                    raise
                self._drop_unreadable(name, err)
                name = self.ensure_collection(idx)
                ids_b, raw_b = self._raw_search(name, qb, limit)
            short += int(((ids_b >= 0).sum(axis=1) < limit).sum())
            rows, cols, canon = self._rescore(qb, idx, ids_b)
            pending = self._unresolved(canon, ids_b, raw_b, kk, tol, n)
            self.n_widened += int(pending.size)
            cur = limit
            while pending.size:
                if cur >= min(n, MAX_TOPK):
                    if cur < n:
                        logger.warning(
                            "milvus: %d queries have ties crossing the topk cap of %d; their "
                            "tie order at rank %d may not follow ids",
                            pending.size,
                            cur,
                            kk,
                        )
                    break
                cur = min(n, MAX_TOPK, cur * 4)
                ids_w, raw_w = self._raw_search(name, qb[pending], cur)
                r_w, c_w, s_w = self._rescore(qb[pending], idx, ids_w)
                keep = ~np.isin(rows, pending)
                rows = np.concatenate([rows[keep], pending[r_w]])
                cols = np.concatenate([cols[keep], c_w])
                canon = np.concatenate([canon[keep], s_w])
                sub = self._unresolved(s_w, ids_w, raw_w, kk, tol, n)
                pending = pending[sub]
            sids = qids[start:stop] if qids is not None else None
            ids_sel, sc_sel = select_top(rows, cols, canon, stop - start, k, sids)
            out_ids[start:stop] = ids_sel
            out_scores[start:stop] = sc_sel
        if short:
            logger.warning(
                "milvus: the %s index of collection %s (%d vectors, search params %s) returned "
                "fewer than the %d candidates asked for %d of %d queries; their missing results "
                "score as misses",
                self.index_type,
                name,
                n,
                self.search_params,
                limit,
                short,
                nq,
            )
        return out_ids, to_sq_l2(out_scores)

    def _rescore(
        self, qb: np.ndarray, idx: np.ndarray, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        valid = ids >= 0
        rows = np.nonzero(valid)[0].astype(np.int64)
        cols = ids[valid]
        if cols.size and cols.max() >= idx.shape[0]:
            raise RuntimeError(
                "MilvusBackend: the collection returned ids beyond the index; it does not hold "
                "these vectors (rebuild it with build())."
            )
        return rows, cols, pair_scores(qb, idx, rows, cols)

    @staticmethod
    def _unresolved(
        canon: np.ndarray, ids: np.ndarray, raw: np.ndarray, kk: int, tol: float, n: int
    ) -> np.ndarray:
        """Rows whose unfetched items could still tie with or beat their kk-th candidate."""
        n_rows, limit = ids.shape
        if limit >= n:
            return np.zeros(0, dtype=np.int64)
        valid = ids >= 0
        grid = np.full((n_rows, limit), -np.inf, dtype=np.float32)
        grid[valid] = canon  # canon is in row-major order of the valid slots
        kth = kth_score(grid, min(kk, limit))
        last = np.where(valid, raw, np.inf).min(axis=1)
        full = valid.all(axis=1)  # a row with fewer hits than limit has seen every item
        return np.flatnonzero(full & (last + tol >= kth))
