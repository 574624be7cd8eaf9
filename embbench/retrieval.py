"""Nearest-neighbour search backends (exact, Milvus) and retrieval evaluation.

Every backend returns, for each query, the positions of its ``k`` nearest index vectors and their
SQUARED L2 distances on unit vectors (``2 - 2 * dot``), so numbers compare across backends.

**Deterministic ties.** Fast kernels do not give reproducible float32 scores: the same query
scored alone (gemv) or inside a block (gemm) differed by up to 2.4e-7 in our measurements, and
Milvus batches and computes its own scores. So the backends only *retrieve candidates* with
their fast kernels; every candidate is then re-scored canonically (float64 accumulation of the
float32 vectors, rounded to float32) and ranked by (score descending, index id ascending).
Identical vectors therefore tie exactly and resolve by id, and ids and distances are identical
bit for bit whatever the block size, thread count or backend. Ties at the k-th boundary are
handled with a proven bound: a fast float32 score differs from the canonical one by at most
``dim * 2**-24`` on unit vectors, so when the last fetched candidate's fast score is within that
bound of the k-th canonical score the row is widened until no unfetched item can tie or win.

**Protocol ``within``.** When ``query_ids`` is given (query ``i`` IS index item
``query_ids[i]``), that item is removed from its own list by id (``k + 1`` are ranked and the
query's own id dropped), never by dropping rank 1: with duplicates, rank 1 is often a duplicate
with a lower id.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from embbench._registry import Registry
from embbench.metrics import RetrievalResult, evaluate_rankings

logger = logging.getLogger(__name__)

__all__ = [
    "ExactBackend",
    "MilvusBackend",
    "SearchBackend",
    "create_backend",
    "list_backends",
    "l2_normalize",
    "register_backend",
    "search_and_evaluate",
]

_BACKENDS: Registry[type[SearchBackend]] = Registry("search backend")

_UNIT_NORM_TOL = 1e-3  # max |norm - 1| accepted as "L2-normalised"
_PAIR_CHUNK = 16_384  # candidate pairs re-scored at once (2 x 16k x d float64)
_MILVUS_MAX_NQ = 16_384  # a Milvus server caps nq and topk per search call at 16,384
_MILVUS_MAX_TOPK = 16_384
_GRPC_BUDGET_BYTES = 192 * 2**20  # stay well under the 256 MiB gRPC message limit
_COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


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
        name: The registered name; unknown names raise with close matches.
        **kwargs: Constructor arguments; ``None`` values are dropped so defaults apply.

    Returns:
        The backend instance.
    """
    cls = _BACKENDS.get(name)
    return cls(**{key: value for key, value in kwargs.items() if value is not None})


# ---------------------------------------------------------------------------------------------
# Validation and shared ranking helpers
# ---------------------------------------------------------------------------------------------


def l2_normalize(vectors: np.ndarray, what: str = "vectors") -> np.ndarray:
    """Row-wise L2 normalisation to float32, idempotent.

    Rows whose norm is already 1 within ``2**-20`` are returned unchanged (bit for bit), so
    normalising normalised vectors changes nothing.

    Args:
        vectors: ``(n, d)`` array.
        what: Name used in error messages.

    Returns:
        A C-contiguous float32 array of unit rows.

    Raises:
        ValueError: On a non-2-D array, NaN/inf values, or an all-zero row.
    """
    arr = _as_matrix(vectors, what)
    norms = np.sqrt(np.einsum("ij,ij->i", arr, arr, dtype=np.float64))
    zero = norms == 0
    if zero.any():
        raise ValueError(
            f"{what}: {int(zero.sum())} rows are all zeros (first at row "
            f"{int(np.flatnonzero(zero)[0])}) and cannot be L2-normalised; check the embeddings."
        )
    scale = np.where(np.abs(norms - 1.0) <= 2.0**-20, 1.0, 1.0 / np.where(zero, 1.0, norms))
    if (scale == 1.0).all():
        return arr
    return np.ascontiguousarray((arr * scale[:, None]).astype(np.float32))


def _as_matrix(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D (n, dim) array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{what}: expected numeric vectors, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        raise ValueError(
            f"{what}: {len(bad)} rows contain NaN or inf (first at row {int(bad[0])}); "
            "re-compute or drop those embeddings."
        )
    return arr


def _check_unit(arr: np.ndarray, what: str) -> float:
    """Raise unless rows are L2-normalised; return the largest row norm."""
    if arr.shape[0] == 0:
        return 1.0
    norms = np.linalg.norm(arr, axis=1)
    worst = float(np.abs(norms - 1.0).max())
    if worst > _UNIT_NORM_TOL:
        raise ValueError(
            f"{what}: rows must be L2-normalised (max |norm - 1| = {worst:.3g}); call "
            "embbench.retrieval.l2_normalize first (search_and_evaluate does it for you)."
        )
    return float(norms.max())


def _check_search_args(
    index: Any, queries: Any, k: int, query_ids: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """Validate a search call; return float32 index, queries, int64 query ids and the tolerance."""
    if int(k) != k or k < 1:
        raise ValueError(f"search: k must be a positive integer, got {k!r}")
    idx = _as_matrix(index, "search index")
    qry = _as_matrix(queries, "search queries")
    if idx.shape[1] != qry.shape[1]:
        raise ValueError(
            f"search: index vectors have dim {idx.shape[1]} but queries have dim "
            f"{qry.shape[1]}; embed both with the same model."
        )
    norm_x = _check_unit(idx, "search index")
    norm_q = _check_unit(qry, "search queries")
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
        if qids.size and np.abs(idx[qids] - qry).max() > 1e-5:
            raise ValueError(
                "search: query_ids say query i is index item query_ids[i], but their vectors "
                "differ; pass query_ids only for protocol 'within' (queries taken from the index)."
            )
    tol = idx.shape[1] * 2.0**-24 * 1.01 * norm_x * norm_q + 2.0**-22
    return idx, qry, qids, tol


def _pair_scores(
    queries: np.ndarray, index: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """Canonical inner products ``queries[rows] . index[cols]``.

    float64 accumulation of the float32 vectors, rounded to float32: identical vectors get
    identical scores whatever kernel or backend found them.
    """
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), _PAIR_CHUNK):
        stop = min(len(rows), start + _PAIR_CHUNK)
        q = queries[rows[start:stop]]
        x = index[cols[start:stop]]
        # einsum casts to float64 in its buffered loop: exact products, float64 sums.
        out[start:stop] = np.einsum("ij,ij->i", q, x, dtype=np.float64, casting="safe")
    return out


def _select_top(
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
        self_ids: Optional per-row id to drop (the query itself).

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


def _kth_score(scores: np.ndarray, kk: int) -> np.ndarray:
    """Per row, the kk-th largest value (rows hold at least kk finite values)."""
    return -np.partition(-scores, kk - 1, axis=1)[:, kk - 1]


def _to_sq_l2(scores: np.ndarray) -> np.ndarray:
    """Squared L2 distance on unit vectors from inner products; padding (-inf) becomes inf."""
    dist = np.maximum(np.float32(0.0), np.float32(2.0) - np.float32(2.0) * scores)
    return np.where(np.isfinite(scores), dist, np.float32(np.inf)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


class SearchBackend(abc.ABC):
    """Exact or approximate k-nearest-neighbour search over L2-normalised vectors.

    Subclasses implement :meth:`search`; use them as context managers (or call :meth:`close`)
    when they hold external resources.
    """

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def search(
        self,
        index: np.ndarray,
        queries: np.ndarray,
        k: int,
        *,
        query_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest index vectors of each query.

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

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release external resources (no-op by default)."""

    def __enter__(self) -> SearchBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@register_backend("exact")
class ExactBackend(SearchBackend):
    """Exact search by blocked matrix product (torch, CPU) and top-k.

    Queries are processed in blocks; each block's score matrix ``(block, n)`` is the only large
    temporary, so peak memory is about ``block_size * n * 4`` bytes beyond the inputs. The
    fast float32 scores select ``k (+1) + margin`` candidates per query, which are re-scored
    canonically and ranked with ties by id (see the module docstring).

    Args:
        block_size: Queries per block; ``None`` sizes blocks to ``max_block_bytes``.
        threads: torch intra-op threads during search; ``None`` keeps torch's setting.
        margin: Extra candidates fetched beyond ``k`` so boundary ties rarely need widening.
        max_block_bytes: Budget for one block's score matrix when ``block_size`` is ``None``.
    """

    def __init__(
        self,
        block_size: int | None = None,
        threads: int | None = None,
        margin: int = 8,
        max_block_bytes: int = 256 * 2**20,
    ) -> None:
        if block_size is not None and block_size < 1:
            raise ValueError(f"ExactBackend: block_size must be >= 1, got {block_size}")
        if threads is not None and threads < 1:
            raise ValueError(f"ExactBackend: threads must be >= 1, got {threads}")
        if margin < 0:
            raise ValueError(f"ExactBackend: margin must be >= 0, got {margin}")
        self.block_size = block_size
        self.threads = threads
        self.margin = int(margin)
        self.max_block_bytes = int(max_block_bytes)
        self.n_widened = 0  # rows whose candidate set had to be widened (last search)

    def __repr__(self) -> str:
        return (
            f"ExactBackend(block_size={self.block_size}, threads={self.threads}, "
            f"margin={self.margin})"
        )

    def _rows_per_block(self, n: int) -> int:
        if self.block_size is not None:
            return self.block_size
        return int(max(1, min(4096, self.max_block_bytes // max(1, 4 * n))))

    def search(
        self,
        index: np.ndarray,
        queries: np.ndarray,
        k: int,
        *,
        query_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`SearchBackend.search`."""
        import torch

        idx, qry, qids, tol = _check_search_args(index, queries, k, query_ids)
        k = int(k)
        n, nq = idx.shape[0], qry.shape[0]
        out_ids = np.full((nq, k), -1, dtype=np.int64)
        out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
        self.n_widened = 0
        if n == 0 or nq == 0:
            return out_ids, _to_sq_l2(out_scores)
        kk = k + (1 if qids is not None else 0)
        n_cand = min(n, kk + self.margin)
        block = self._rows_per_block(n)
        old_threads = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            xt = torch.from_numpy(idx)
            buf = torch.empty((min(block, nq), n), dtype=torch.float32)
            for start in range(0, nq, block):
                stop = min(nq, start + block)
                qb = qry[start:stop]
                s = buf[: stop - start]
                torch.mm(torch.from_numpy(qb), xt.T, out=s)
                vals, cand = torch.topk(s, n_cand, dim=1, sorted=False)
                cand_np = cand.numpy()
                b = stop - start
                rows = np.repeat(np.arange(b), n_cand)
                cols = cand_np.reshape(-1)
                canon = _pair_scores(qb, idx, rows, cols)
                if n_cand < n:
                    kth = _kth_score(canon.reshape(b, n_cand), min(kk, n_cand))
                    last = vals.min(dim=1).values.numpy()
                    widen = np.flatnonzero(last + tol >= kth)
                    if widen.size:
                        rows, cols, canon = self._widen(
                            s, qb, idx, widen, kth, tol, rows, cols, canon, n_cand
                        )
                sids = qids[start:stop] if qids is not None else None
                ids_b, sc_b = _select_top(rows, cols, canon, b, k, sids)
                out_ids[start:stop] = ids_b
                out_scores[start:stop] = sc_b
        finally:
            if self.threads is not None:
                torch.set_num_threads(old_threads)
        if self.n_widened:
            logger.debug(
                "exact search: %d of %d rows widened for boundary ties", self.n_widened, nq
            )
        return out_ids, _to_sq_l2(out_scores)

    def _widen(
        self,
        s: Any,
        qb: np.ndarray,
        idx: np.ndarray,
        widen: np.ndarray,
        kth: np.ndarray,
        tol: float,
        rows: np.ndarray,
        cols: np.ndarray,
        canon: np.ndarray,
        n_cand: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Replace the candidates of rows ``widen`` by every item that could tie or beat kth."""
        import torch

        self.n_widened += int(widen.size)
        w = torch.from_numpy(widen)
        thr = torch.from_numpy((kth[widen] - np.float32(tol)).astype(np.float32))
        mask = s.index_select(0, w) >= thr[:, None]
        wr, wc = (t.numpy() for t in torch.nonzero(mask, as_tuple=True))
        w_rows = widen[wr]
        w_canon = _pair_scores(qb, idx, w_rows, wc.astype(np.int64))
        keep = np.ones(len(rows), dtype=bool)
        keep.reshape(-1, n_cand)[widen] = False
        return (
            np.concatenate([rows[keep], w_rows]),
            np.concatenate([cols[keep], wc.astype(np.int64)]),
            np.concatenate([canon[keep], w_canon]),
        )


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
    limit (up to Milvus' topk cap of 16,384, beyond which a warning is logged).

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
            ``batch x rows`` at once) and never above Milvus' cap of 16,384.
        insert_batch: Rows per insert call (also kept under the 256 MiB gRPC message limit).
        margin: Extra candidates fetched per query for tie handling. Kept small: Milvus Lite
            materialises every hit as a Python record (~40-70 us each), which dominated its
            search time at limit 16; rows with boundary ties are re-searched anyway.
        index_params: Extra index build parameters (e.g. ``{"M": 16}`` for HNSW).
        search_params: Extra search parameters (e.g. ``{"ef": 64}``).
    """

    def __init__(
        self,
        uri: str | None = None,
        token: str | None = None,
        collection_prefix: str = "embbench",
        index_type: str = "FLAT",
        metric: Literal["IP", "COSINE"] = "IP",
        batch: int | None = None,
        insert_batch: int = 8192,
        margin: int = 2,
        index_params: dict[str, Any] | None = None,
        search_params: dict[str, Any] | None = None,
    ) -> None:
        if uri is None:
            from embbench.paths import runs_dir

            uri = str(runs_dir() / "milvus.db")
        self.uri = str(uri)
        self._token = token if token is not None else os.environ.get("MILVUS_TOKEN", "")
        if not _COLLECTION_NAME.match(collection_prefix) or len(collection_prefix) > 200:
            raise ValueError(
                f"MilvusBackend: collection_prefix {collection_prefix!r} is not a valid Milvus "
                "name part; use letters, digits and underscores, starting with a letter."
            )
        metric = metric.upper()  # type: ignore[assignment]
        if metric not in ("IP", "COSINE"):
            raise ValueError(
                f"MilvusBackend: metric {metric!r} is not supported; use 'IP' (default) or "
                "'COSINE'. On unit vectors both rank exactly as L2, and Milvus Lite's exact L2 "
                "search materialises (queries x rows x dim) floats and runs out of memory."
            )
        if batch is not None and not 1 <= batch <= _MILVUS_MAX_NQ:
            raise ValueError(f"MilvusBackend: batch must be in [1, {_MILVUS_MAX_NQ}], got {batch}")
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
        self._client: Any = None
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
    def is_local(self) -> bool:
        """Whether ``uri`` is a Milvus Lite file (not a server address)."""
        return not re.match(r"^[a-z]+://", self.uri)

    # -- connection ----------------------------------------------------------------------------

    def _get_client(self) -> Any:
        if self._client is not None:
            return self._client
        from pymilvus import MilvusClient

        if self.is_local:
            path = Path(self.uri).expanduser().resolve()
            if path.suffix != ".db":
                raise ValueError(
                    f"MilvusBackend: local uri {self.uri!r} must end in '.db' (Milvus Lite file); "
                    "for a server pass 'http://host:19530'."
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            self.uri = str(path)
        try:
            self._client = MilvusClient(uri=self.uri, token=self._token)
        except Exception as err:
            hint = (
                " Milvus Lite allows one process per file: close the other process, or run "
                f"`milvus-lite server --data-dir {self.uri} --host 127.0.0.1 --port 19530` and "
                "pass uri='http://127.0.0.1:19530'."
                if self.is_local
                else " Check the address and that MILVUS_TOKEN is set if the server needs one."
            )
            raise RuntimeError(f"MilvusBackend: cannot open {self.uri!r}: {err}.{hint}") from err
        return self._client

    def close(self) -> None:
        """Close the client and, for Milvus Lite, stop its server so the file lock is released."""
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None
                self._collection = None
        if self.is_local:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(str(Path(self.uri).expanduser().resolve()))

    # -- building ------------------------------------------------------------------------------

    def collection_name(self, vectors: np.ndarray) -> str:
        """The content-addressed collection name for ``vectors`` under this configuration."""
        arr = np.ascontiguousarray(vectors, dtype=np.float32)
        h = hashlib.blake2b(digest_size=10)
        h.update(f"{arr.shape}|{self.index_type}|{self.metric}|{self.index_params}".encode())
        h.update(memoryview(arr).cast("B"))
        return f"{self.collection_prefix}_{h.hexdigest()}"

    def build(self, name: str, vectors: np.ndarray, ids: np.ndarray | None = None) -> None:
        """(Re)create collection ``name`` holding ``vectors`` under primary keys ``ids``.

        Args:
            name: Collection name (letters, digits, underscore; starts with a letter or _).
            vectors: ``(n, d)`` float32 vectors.
            ids: ``(n,)`` unique int64 primary keys; default ``0..n-1`` (positions).
        """
        import time

        from pymilvus import DataType

        if not _COLLECTION_NAME.match(name):
            raise ValueError(
                f"MilvusBackend.build: {name!r} is not a valid Milvus collection name; use "
                "letters, digits and underscores, starting with a letter, at most 255 chars."
            )
        arr = _as_matrix(vectors, "MilvusBackend.build vectors")
        n, d = arr.shape
        keys = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if keys.shape != (n,) or len(np.unique(keys)) != n:
            raise ValueError(f"MilvusBackend.build: ids must be {n} unique integers")
        t0 = time.perf_counter()
        client = self._get_client()
        if client.has_collection(name):
            client.drop_collection(name)
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=d)
        client.create_collection(name, schema=schema)
        rows_per_call = max(1, min(self.insert_batch, _GRPC_BUDGET_BYTES // (4 * d + 32)))
        for start in range(0, n, rows_per_call):
            stop = min(n, start + rows_per_call)
            rows = [
                {"id": key, "vector": vec}
                for key, vec in zip(keys[start:stop].tolist(), arr[start:stop], strict=True)
            ]
            client.insert(name, rows)
        client.flush(name)  # unflushed rows are re-stacked from the memtable on every search
        index_params = client.prepare_index_params()
        index_params.add_index(
            "vector", index_type=self.index_type, metric_type=self.metric, params=self.index_params
        )
        # Lite lacks AllocTimestamp, which the synchronous wait for the index uses (it logs a
        # server error and sleeps); Lite builds the index before returning anyway.
        client.create_index(name, index_params, sync=not self.is_local)
        client.load_collection(name)
        self._collection = name
        self._collection_rows = n
        self.last_build_s = time.perf_counter() - t0
        logger.info(
            "milvus: built collection %s (%d x %d) in %.1f s", name, n, d, self.last_build_s
        )

    def ensure_collection(self, index: np.ndarray) -> str:
        """Build the collection for ``index`` unless an identical one exists; return its name."""
        name = self.collection_name(index)
        if self._collection == name:
            return name
        client = self._get_client()
        if client.has_collection(name):
            rows = int(client.get_collection_stats(name).get("row_count", -1))
            if rows == index.shape[0]:
                client.load_collection(name)
                self._collection = name
                self._collection_rows = rows
                self.last_build_s = 0.0
                logger.info("milvus: reusing collection %s (%d rows)", name, rows)
                return name
        self.build(name, index)
        return name

    # -- searching -----------------------------------------------------------------------------

    def _batch_size(self, n: int) -> int:
        if self.batch is not None:
            return self.batch
        if self.is_local:
            # Lite scores (batch x rows) float32 at once, plus a negated copy (~1 GiB here), and
            # pays ~0.2 s of per-row Python bookkeeping per call at 60k rows: few large calls.
            return int(max(1, min(_MILVUS_MAX_NQ, 2**30 // max(1, 8 * n))))
        return _MILVUS_MAX_NQ

    def _raw_search(
        self, name: str, queries: np.ndarray, limit: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """One Milvus search call; returns ``(ids, scores)`` padded with -1 / -inf."""
        params = {"metric_type": self.metric, "params": dict(self.search_params)}
        res = self._get_client().search(
            name,
            data=queries,
            limit=limit,
            output_fields=["id"],
            search_params=params,
        )
        ids = np.full((len(queries), limit), -1, dtype=np.int64)
        scores = np.full((len(queries), limit), -np.inf, dtype=np.float32)
        lengths = [len(hits.ids) for hits in res]
        if lengths and min(lengths) == max(lengths) == limit:
            ids[:] = np.asarray([hits.ids for hits in res], dtype=np.int64)
            scores[:] = np.asarray([hits.distances for hits in res], dtype=np.float32)
        else:  # fewer hits than limit for some queries (tiny collections)
            for i, hits in enumerate(res):
                ids[i, : len(hits.ids)] = hits.ids
                scores[i, : len(hits.distances)] = hits.distances
        return ids, scores

    def search(
        self,
        index: np.ndarray,
        queries: np.ndarray,
        k: int,
        *,
        query_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`SearchBackend.search`; builds or reuses the collection for ``index``."""
        idx, qry, qids, tol = _check_search_args(index, queries, k, query_ids)
        if self.metric == "COSINE":
            tol *= 2.0  # Milvus re-normalises: one more rounding step
        k = int(k)
        n, nq = idx.shape[0], qry.shape[0]
        out_ids = np.full((nq, k), -1, dtype=np.int64)
        out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
        self.n_widened = 0
        if n == 0 or nq == 0:
            return out_ids, _to_sq_l2(out_scores)
        name = self.ensure_collection(idx)
        kk = k + (1 if qids is not None else 0)
        if kk > _MILVUS_MAX_TOPK:
            raise ValueError(f"MilvusBackend: k={k} exceeds Milvus' topk cap of 16,384")
        limit = min(n, kk + self.margin, _MILVUS_MAX_TOPK)
        step = self._batch_size(n)
        for start in range(0, nq, step):
            stop = min(nq, start + step)
            qb = qry[start:stop]
            ids_b, raw_b = self._raw_search(name, qb, limit)
            rows, cols, canon = self._rescore(qb, idx, ids_b)
            pending = self._unresolved(canon, ids_b, raw_b, kk, tol, n)
            self.n_widened += int(pending.size)
            cur = limit
            while pending.size:
                if cur >= min(n, _MILVUS_MAX_TOPK):
                    if cur < n:
                        logger.warning(
                            "milvus: %d queries have ties crossing the topk cap of %d; their "
                            "tie order at rank %d may not follow ids",
                            pending.size,
                            cur,
                            kk,
                        )
                    break
                cur = min(n, _MILVUS_MAX_TOPK, cur * 4)
                ids_w, raw_w = self._raw_search(name, qb[pending], cur)
                r_w, c_w, s_w = self._rescore(qb[pending], idx, ids_w)
                keep = ~np.isin(rows, pending)
                rows = np.concatenate([rows[keep], pending[r_w]])
                cols = np.concatenate([cols[keep], c_w])
                canon = np.concatenate([canon[keep], s_w])
                sub = self._unresolved(s_w, ids_w, raw_w, kk, tol, n)
                pending = pending[sub]
            sids = qids[start:stop] if qids is not None else None
            ids_sel, sc_sel = _select_top(rows, cols, canon, stop - start, k, sids)
            out_ids[start:stop] = ids_sel
            out_scores[start:stop] = sc_sel
        return out_ids, _to_sq_l2(out_scores)

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
        return rows, cols, _pair_scores(qb, idx, rows, cols)

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
        kth = _kth_score(grid, min(kk, limit))
        last = np.where(valid, raw, np.inf).min(axis=1)
        full = valid.all(axis=1)  # a row with fewer hits than limit has seen every item
        return np.flatnonzero(full & (last + tol >= kth))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


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
