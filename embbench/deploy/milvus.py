"""A thin Milvus collection wrapper for index studies (Milvus Lite or a server, same client).

Unlike :class:`embbench.retrieval.MilvusBackend` (which re-scores candidates exactly so that its
rankings equal the exact backend's), this returns the index's own raw results: the point of an
index study is to measure what the index gives. It keeps to a Milvus server's limits: at most
16,384 queries and results per search call, inserts under the 256 MiB gRPC message cap.

Measured on milvus-lite 3.2.2: it builds FLAT, IVF_FLAT, IVF_SQ8, HNSW (and HNSW_SQ); it rejects
IVF_PQ ("reserved for a future phase"), SCANN, DISKANN and IVF_RABITQ ("unknown index_type"),
and BINARY_VECTOR fields ("MilvusLite does not support BinaryVector").
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from embbench.deploy.indexes import IndexSpec
from embbench.services import MILVUS_CALL_TIMEOUT, MILVUS_INDEX_TIMEOUT, connection_failure

logger = logging.getLogger(__name__)

__all__ = ["MAX_NQ", "MAX_TOPK", "MilvusIndex", "error_text", "is_unsupported", "quiet_milvus"]

MAX_NQ = 16_384  # a Milvus server caps nq and topk per search call
MAX_TOPK = 16_384
_INSERT_BUDGET = 192 * 2**20  # bytes per insert call, under the 256 MiB gRPC message cap


@contextlib.contextmanager
def quiet_milvus() -> Iterator[None]:
    """Silence pymilvus' and Lite's tracebacks for an index type the engine rejects.

    The rejection is expected and reported per variant (``IndexResult.error``).
    """
    loggers = [logging.getLogger(name) for name in ("pymilvus", "milvus_lite")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def error_text(err: Exception) -> str:
    """The first line of a Milvus error, without the exception wrapper."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    match = re.search(r"message=(.*?)\)>?$", text)
    return (match.group(1) if match else text)[:300]


def is_unsupported(err: Exception) -> bool:
    """Whether a build error says the engine does not offer the index type."""
    text = str(err).lower()
    return any(s in text for s in ("unknown index_type", "reserved for a future", "not support"))


class MilvusIndex:
    """One Milvus collection holding unit vectors under one index type (Lite or a server).

    Args:
        uri: A ``.db`` path (Milvus Lite) or ``http(s)://host:port`` (a server).
        token: Server token (never logged).
        timeout: Seconds each call may take, pymilvus' retries included (default
            ``EMBBENCH_MILVUS_TIMEOUT`` or 30; building an index and
            loading a collection may take 600 s): a dead server fails in seconds, not minutes.
    """

    def __init__(self, uri: str, token: str = "", timeout: float | None = None) -> None:
        from pymilvus import MilvusClient

        self.timeout = float(timeout or os.environ.get("EMBBENCH_MILVUS_TIMEOUT") or
                             MILVUS_CALL_TIMEOUT)
        self.uri = str(uri)
        self.is_server = bool(re.match(r"^[a-z]+://", self.uri))
        if not self.is_server:
            path = Path(self.uri).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            self.uri = str(path)
        self.client = MilvusClient(uri=self.uri, token=token, timeout=min(self.timeout, 10.0))

    def close(self) -> None:
        """Close the client; for Lite also release the file lock."""
        self.client.close()
        if not self.is_server:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.uri)

    def build(self, name: str, vectors: np.ndarray, spec: IndexSpec) -> float:
        """(Re)create collection ``name`` with ``vectors`` (ids = positions) and ``spec``'s index.

        Returns:
            Build seconds (insert + flush + index + load).
        """
        from pymilvus import DataType

        c = self.client
        n, d = vectors.shape
        t0 = time.perf_counter()
        self.drop(name)
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=d)
        c.create_collection(name, schema=schema, timeout=self.timeout)
        try:
            step = max(1, min(8192, _INSERT_BUDGET // (4 * d + 32)))
            for s in range(0, n, step):
                rows = [
                    {"id": i, "vector": v}
                    for i, v in zip(range(s, min(n, s + step)), vectors[s : s + step], strict=True)
                ]
                c.insert(name, rows, timeout=self.timeout)
            c.flush(name, timeout=self.timeout)
            params = c.prepare_index_params()
            params.add_index(
                "vector", index_type=spec.index_type, metric_type="IP", params=spec.build_params
            )
            # Lite lacks AllocTimestamp used by the synchronous wait; it indexes before returning.
            c.create_index(name, params, sync=self.is_server,
                           timeout=max(self.timeout, MILVUS_INDEX_TIMEOUT))
            c.load_collection(name, timeout=max(self.timeout, MILVUS_INDEX_TIMEOUT))
        except Exception:
            c.drop_collection(name, timeout=self.timeout)
            raise
        return time.perf_counter() - t0

    def search(
        self, name: str, spec: IndexSpec, queries: np.ndarray, limit: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw search in calls of at most 16,384 queries; ``(ids, scores)`` padded -1 / -inf."""
        if limit > MAX_TOPK:
            raise ValueError(f"MilvusIndex: limit {limit} exceeds Milvus' topk cap of {MAX_TOPK}")
        nq = len(queries)
        ids = np.full((nq, limit), -1, dtype=np.int64)
        scores = np.full((nq, limit), -np.inf, dtype=np.float32)
        sp = {"metric_type": "IP", "params": spec.search_params}
        for s in range(0, nq, MAX_NQ):
            res = self.client.search(
                name,
                data=queries[s : s + MAX_NQ],
                limit=limit,
                output_fields=["id"],
                search_params=sp,
                timeout=self.timeout,
            )
            for i, hits in enumerate(res):
                ids[s + i, : len(hits.ids)] = hits.ids
                scores[s + i, : len(hits.distances)] = hits.distances
        return ids, scores

    def drop(self, name: str) -> None:
        """Drop a collection if present, or if it cannot be read (e.g. a corrupted Lite file)."""
        try:
            with quiet_milvus():
                present = self.client.has_collection(name, timeout=self.timeout)
        except Exception as err:
            if connection_failure(err) is not None:
                raise
            logger.warning("milvus: collection %s in %s cannot be read (%s); dropping it and "
                           "rebuilding it", name, self.uri, error_text(err))
            present = True
        if present:
            self.client.drop_collection(name, timeout=self.timeout)
