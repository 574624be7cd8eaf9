"""The package's one Milvus client: Milvus Lite (a local ``.db`` file) or a server, same class.

:class:`MilvusCollection` connects, builds collections (schema, inserts under the gRPC message
budget, flush, index, load), reuses or drops them (an unreadable one is dropped, or the Lite file
moved aside), searches them raw (split and padded under the server's caps) and closes (releasing
Milvus Lite's file lock). Two callers drive it: :class:`~embbench.retrieval.MilvusBackend`, which
re-scores the raw candidates canonically, and the deployment study
(:func:`embbench.deploy.evaluate_indexes`), which measures the raw results of an index spec.

Measured on milvus-lite 3.2.2: it builds FLAT, IVF_FLAT, IVF_SQ8, HNSW (and HNSW_SQ); it rejects
IVF_PQ ("reserved for a future phase"), SCANN, DISKANN and IVF_RABITQ ("unknown index_type"),
and BINARY_VECTOR fields ("MilvusLite does not support BinaryVector"). It reads an index's build
parameters only from a ``params`` JSON key, while pymilvus 3 sends each as a key of its own: Lite
ignored them all (an IVF ``nlist=1`` became its default 128, cut to the row count, so a 32-row
IVF with ``nprobe=1`` returned one hit per query). :meth:`MilvusCollection.build` sends both
forms to Lite (file or ``milvus-lite server``) and checks, on any Milvus, that the built index
reports the parameters asked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from embbench.paths import runs_dir
from embbench.services import (
    MILVUS_CALL_TIMEOUT,
    MILVUS_INDEX_TIMEOUT,
    connection_failure,
    lite_lock_holder,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GRPC_INSERT_BUDGET",
    "INSERT_BATCH",
    "LITE_GRPC_OPTIONS",
    "MAX_NQ",
    "MAX_TOPK",
    "MilvusCollection",
    "error_text",
    "is_unsupported",
    "quiet_milvus",
]

MAX_NQ = 16_384  # a Milvus server caps the queries (nq) of one search call at 16,384
MAX_TOPK = 16_384  # ... and the results (topk / limit) per query at 16,384
GRPC_INSERT_BUDGET = 192 * 2**20  # bytes per insert call, well under the 256 MiB gRPC cap
INSERT_BATCH = 8192  # default rows per insert call (fewer when the budget says so)
# gRPC keepalive a ``milvus-lite server`` permits: grpc's default server policy wants pings at
# least 5 min (300 s) apart and none while no call runs (:meth:`MilvusCollection._open`)
LITE_GRPC_OPTIONS = {
    "grpc.keepalive_time_ms": 360_000,
    "grpc.keepalive_permit_without_calls": 0,
}


@contextlib.contextmanager
def quiet_milvus() -> Iterator[None]:
    """Silence pymilvus' and Lite's tracebacks for an error handled by the caller."""
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
    """The first line of a Milvus error, without pymilvus' wrapper."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    match = re.search(r"message=(.*?)\)>?$", text)
    return (match.group(1) if match else text)[:300]


def is_unsupported(err: Exception) -> bool:
    """Whether a build error says the engine does not offer the index type."""
    text = str(err).lower()
    return any(s in text for s in ("unknown index_type", "reserved for a future", "not support"))


def _wire_value(value: Any) -> Any:
    """A parameter value as Milvus carries it (strings holding JSON are decoded): ``"1"`` is 1."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class MilvusCollection:
    """A Milvus connection and the float-vector collections (``id`` + ``vector``) built through it.

    Args:
        uri: ``path/to/file.db`` for Milvus Lite (default ``runs_dir()/milvus.db``) or
            ``http://host:19530`` for a server. Milvus Lite holds a process lock on its file.
        token: Server token; defaults to the ``MILVUS_TOKEN`` environment variable. Never logged.
        timeout: Seconds each call may take, pymilvus' retries included (default
            ``EMBBENCH_MILVUS_TIMEOUT`` or ``services.MILVUS_CALL_TIMEOUT``; building an index
            and loading a collection may take ``services.MILVUS_INDEX_TIMEOUT``): a server that
            dies fails the call in seconds instead of pymilvus retrying for minutes.
        insert_batch: Rows per insert call (fewer when :data:`GRPC_INSERT_BUDGET` says so).
        owner: The name error messages start with (the class driving this one).
    """

    def __init__(
        self,
        uri: str | None = None,
        token: str | None = None,
        timeout: float | None = None,
        insert_batch: int = INSERT_BATCH,
        owner: str = "MilvusCollection",
    ) -> None:
        self.uri = str(runs_dir() / "milvus.db") if uri is None else str(uri)
        self._token = token if token is not None else os.environ.get("MILVUS_TOKEN", "")
        self.timeout = float(
            timeout or os.environ.get("EMBBENCH_MILVUS_TIMEOUT") or MILVUS_CALL_TIMEOUT
        )
        self.insert_batch = int(insert_batch)
        self.owner = owner
        self._client: Any = None
        self._lite: bool | None = None  # whether the engine is Milvus Lite (asked once)

    @property
    def is_local(self) -> bool:
        """Whether ``uri`` is a Milvus Lite file (not a server address)."""
        return not re.match(r"^[a-z]+://", self.uri)

    @property
    def is_server(self) -> bool:
        """Whether ``uri`` is a server address."""
        return not self.is_local

    def is_lite(self) -> bool:
        """Whether the engine is Milvus Lite: a ``.db`` file, or a ``milvus-lite server``."""
        if self.is_local:
            return True
        if self._lite is None:
            version = str(self.connect().get_server_version(timeout=self.timeout))
            self._lite = version.lower().startswith("milvus_lite")
        return self._lite

    @property
    def index_timeout(self) -> float:
        """Seconds building an index or loading a collection may take."""
        return max(self.timeout, MILVUS_INDEX_TIMEOUT)

    # -- connection ----------------------------------------------------------------------------

    def connect(self) -> Any:
        """The pymilvus client, opened on first use (a Lite path is resolved, its folder made).

        Raises:
            RuntimeError: It cannot be opened; for a Lite file held by another process the
                message names that process (:func:`embbench.services.lite_lock_holder`).
        """
        if self._client is not None:
            return self._client
        if self.is_local:
            path = Path(self.uri).expanduser().resolve()
            if path.suffix != ".db":
                raise ValueError(
                    f"{self.owner}: local uri {self.uri!r} must end in '.db' (Milvus Lite file); "
                    "for a server pass 'http://host:19530'."
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            self.uri = str(path)
        try:
            self._client = self._open()
        except Exception as err:
            holder = lite_lock_holder(Path(self.uri)) if self.is_local else None
            held = f" (held by pid {holder[0]}: {holder[1]})" if holder else ""
            hint = (
                f" Milvus Lite allows one process per file{held}: close the other process, or run "
                f"`milvus-lite server --data-dir {self.uri} --host 127.0.0.1 --port 19530` and "
                "pass uri='http://127.0.0.1:19530'."
                if self.is_local
                else " Check the address and that MILVUS_TOKEN is set if the server needs one."
            )
            raise RuntimeError(f"{self.owner}: cannot open {self.uri!r}: {err}.{hint}") from err
        return self._client

    def _open(self) -> Any:
        """A client with a connection of its own (``dedicated``), Lite with pings it permits.

        pymilvus pings every 10 s, with or without calls; Milvus Lite's gRPC server (a
        ``milvus-lite server``, or the one a ``.db`` file starts in this process) keeps gRPC's
        default policy (pings at least 5 min apart, none while no call runs): the third ping
        too early closes the connection with GOAWAY ``too_many_pings``. A server is asked its
        version on a dedicated connection first (closed at once, so no shared connection keeps
        pinging); Lite is opened with :data:`LITE_GRPC_OPTIONS`. Other servers keep pymilvus'
        pings (a dead peer is noticed in seconds).
        """
        from pymilvus import MilvusClient  # optional dependency, imported on use

        timeout = min(self.timeout, 10.0)
        lite_options = {"dedicated": True, "grpc_options": dict(LITE_GRPC_OPTIONS)}
        if self.is_local:
            return MilvusClient(uri=self.uri, token=self._token, timeout=timeout, **lite_options)
        probe = MilvusClient(uri=self.uri, token=self._token, timeout=timeout, dedicated=True)
        try:
            version = str(probe.get_server_version(timeout=self.timeout))
        finally:
            probe.close()
        self._lite = version.lower().startswith("milvus_lite")
        if not self._lite:
            return MilvusClient(uri=self.uri, token=self._token, timeout=timeout, dedicated=True)
        logger.info(
            "%s: %s is a Milvus Lite server (%s): keepalive pings every %d s during calls only "
            "(its gRPC server answers pymilvus' 10 s pings with GOAWAY too_many_pings)",
            self.owner,
            self.uri,
            version,
            LITE_GRPC_OPTIONS["grpc.keepalive_time_ms"] // 1000,
        )
        return MilvusClient(uri=self.uri, token=self._token, timeout=timeout, **lite_options)

    def close(self) -> None:
        """Close the client and, for Milvus Lite, stop its server so the file lock is released."""
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None
                self._lite = None
        if self.is_local:
            # optional dependency (Milvus Lite only), imported on use
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(str(Path(self.uri).expanduser().resolve()))

    # -- building ------------------------------------------------------------------------------

    def build(
        self,
        name: str,
        vectors: np.ndarray,
        ids: np.ndarray,
        index_type: str,
        metric: str,
        index_params: Mapping[str, Any],
        drop_on_failure: bool = False,
    ) -> float:
        """(Re)create collection ``name``: schema, inserts, flush, index, load.

        Args:
            name: A valid Milvus collection name.
            vectors: ``(n, d)`` float32 vectors.
            ids: ``(n,)`` int64 primary keys.
            index_type: Milvus index type (``FLAT`` is exact).
            metric: Milvus metric type (``IP``, ``COSINE``).
            index_params: Index build parameters (e.g. ``{"M": 16}`` for HNSW).
            drop_on_failure: Drop the half-built collection if a step fails (an index type the
                engine rejects leaves an empty collection behind).

        Returns:
            Build seconds (drop + insert + flush + index + load).
        """
        from pymilvus import DataType  # optional dependency, imported on use

        n, d = vectors.shape
        t0 = time.perf_counter()
        client = self.connect()
        self.drop(name)
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=d)
        client.create_collection(name, schema=schema, timeout=self.timeout)
        try:
            rows_per_call = max(1, min(self.insert_batch, GRPC_INSERT_BUDGET // (4 * d + 32)))
            for start in range(0, n, rows_per_call):
                stop = min(n, start + rows_per_call)
                rows = [
                    {"id": key, "vector": vec}
                    for key, vec in zip(ids[start:stop].tolist(), vectors[start:stop], strict=True)
                ]
                client.insert(name, rows, timeout=self.timeout)
            # unflushed rows are re-stacked from the memtable on every search
            client.flush(name, timeout=self.timeout)
            wire = dict(index_params)
            if wire and self.is_lite():
                wire["params"] = dict(index_params)  # the only form Lite reads (module doc)
            params = client.prepare_index_params()
            params.add_index("vector", index_type=index_type, metric_type=metric, params=wire)
            # Lite lacks AllocTimestamp, which the synchronous wait for the index uses (it logs a
            # server error and sleeps); Lite builds the index before returning anyway.
            client.create_index(name, params, sync=self.is_server, timeout=self.index_timeout)
            self._check_index_params(name, index_type, index_params)
            client.load_collection(name, timeout=self.index_timeout)
        except Exception:
            if drop_on_failure:
                client.drop_collection(name, timeout=self.timeout)
            raise
        return time.perf_counter() - t0

    def _check_index_params(
        self, name: str, index_type: str, index_params: Mapping[str, Any]
    ) -> None:
        """Raise unless collection ``name``'s index reports every build parameter asked.

        Raises:
            RuntimeError: A parameter is missing or differs; the message names the collection,
                the index type, what was asked and what the engine reports.
        """
        if not index_params:
            return
        client = self.connect()
        names = client.list_indexes(name, timeout=self.timeout)
        desc = client.describe_index(name, names[0], timeout=self.timeout) if names else {}
        nested = desc.get("params")  # Lite (and older servers) nest them as one JSON value
        got = {**desc, **(nested if isinstance(nested, dict) else {})}
        wrong = {
            key: got.get(key, "<missing>")
            for key, value in index_params.items()
            if _wire_value(got.get(key)) != _wire_value(value)
        }
        if wrong:
            raise RuntimeError(
                f"{self.owner}: Milvus at {self.uri} built the {index_type or 'vector'} index "
                f"of collection {name} without the build parameters asked: asked "
                f"{dict(index_params)}, it reports {wrong}; its results would be labelled with "
                "parameters it did not use."
            )

    def reuse(self, name: str, n: int, index_params: Mapping[str, Any] | None = None) -> bool:
        """Load collection ``name`` if it exists with ``n`` rows and ``index_params``.

        A collection whose index does not report ``index_params`` (one built while Lite ignored
        them) is not reused, so it is rebuilt.

        Returns:
            Whether it was loaded.
        """
        client = self.connect()
        if not client.has_collection(name, timeout=self.timeout):
            return False
        stats = client.get_collection_stats(name, timeout=self.timeout)
        if int(stats.get("row_count", -1)) != n:
            return False
        try:
            self._check_index_params(name, "", index_params or {})
        except RuntimeError as err:
            logger.warning("milvus: not reusing collection %s: %s", name, err)
            return False
        client.load_collection(name, timeout=self.index_timeout)
        return True

    def drop(self, name: str) -> None:
        """Drop a collection if present, or if it cannot be read (e.g. a corrupted Lite file)."""
        client = self.connect()
        try:
            with quiet_milvus():
                present = client.has_collection(name, timeout=self.timeout)
        except Exception as err:
            if connection_failure(err) is not None:
                raise
            logger.warning(
                "milvus: collection %s in %s cannot be read (%s); dropping it and rebuilding it",
                name,
                self.uri,
                error_text(err),
            )
            present = True
        if present:
            client.drop_collection(name, timeout=self.timeout)

    def drop_unreadable(self, name: str, err: Exception) -> None:
        """Drop an unreadable collection (one warning); for Lite, move the file aside if need be.

        Milvus is a derived index: the embedding cache is the source of truth.
        """
        logger.warning(
            "milvus: collection %s in %s cannot be read (%s); dropping it and rebuilding it "
            "from the embedding cache",
            name,
            self.uri,
            error_text(err),
        )
        try:
            with quiet_milvus():
                self.connect().drop_collection(name, timeout=self.timeout)
            return
        except Exception as drop_err:
            if not self.is_local or connection_failure(drop_err) is not None:
                raise
        aside = f"{self.uri}.unreadable-{int(time.time())}"
        logger.warning(
            "milvus: %s cannot drop it either; moved the Lite file to %s (derived "
            "collections are rebuilt on use)",
            self.uri,
            aside,
        )
        self.close()
        Path(self.uri).replace(aside)

    # -- searching -----------------------------------------------------------------------------

    def search(
        self,
        name: str,
        queries: np.ndarray,
        limit: int,
        metric: str,
        search_params: Mapping[str, Any],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw search in calls of at most :data:`MAX_NQ` queries.

        Returns:
            ``(ids, scores)`` of shape ``(len(queries), limit)``, padded with -1 / -inf where a
            query got fewer hits than ``limit`` (tiny collections).
        """
        if limit > MAX_TOPK:
            raise ValueError(f"{self.owner}: limit {limit} exceeds Milvus' topk cap of {MAX_TOPK}")
        nq = len(queries)
        ids = np.full((nq, limit), -1, dtype=np.int64)
        scores = np.full((nq, limit), -np.inf, dtype=np.float32)
        params = {"metric_type": metric, "params": dict(search_params)}
        client = self.connect()
        for s in range(0, nq, MAX_NQ):
            res = client.search(
                name,
                data=queries[s : s + MAX_NQ],
                limit=limit,
                output_fields=["id"],
                search_params=params,
                timeout=self.timeout,
            )
            lengths = [len(hits.ids) for hits in res]
            if lengths and min(lengths) == max(lengths) == limit:
                stop = s + len(res)
                ids[s:stop] = np.asarray([hits.ids for hits in res], dtype=np.int64)
                scores[s:stop] = np.asarray([hits.distances for hits in res], dtype=np.float32)
            else:  # fewer hits than limit for some queries
                for i, hits in enumerate(res):
                    ids[s + i, : len(hits.ids)] = hits.ids
                    scores[s + i, : len(hits.distances)] = hits.distances
        return ids, scores
