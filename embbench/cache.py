"""The on-disk embedding cache: the source of truth for vectors.

Layout, one folder per (dataset, model, split, key)::

    <cache_dir>/embeddings/<dataset>/<model>/
        <split>-<key>.lock           # held while a run embeds this split (filelock)
        <split>-<key>.lock.holder.json   # pid, host, command and start of the run holding it
        <split>-<key>/
            meta.json            # identity, status, provenance, checksums of the files below
            shard-00000.npy      # float32 (n_i, dim) while a run is in progress
            shard-00000.ids.npy  # the item_ids of those rows
            shard-00000.json     # checksums of the two files + the images that failed (written
                                 # last: it marks the shard done)
            vectors.npy / ids.npy / failed.json   # consolidated once every shard is done
            corrupt/             # files that failed verification, moved aside (never read)

The key is a hash of the identity: model name and identifier, the weights actually used (tag,
checkpoint sha256 or random seed), the preprocessing fingerprint, the dataset name and
fingerprint, the split, the normalisation flag and the extraction code's version. Every file is
written to a temporary name and renamed, so a killed run leaves only whole shards, and a rerun
resumes from them. ``meta.json`` is checked on read: a folder whose identity does not match is
never returned. Milvus indexes and top-tuning read from here; nothing else is authoritative.

Integrity: every shard and consolidated file carries its size and an xxh3-64 checksum of its
bytes, taken when it was written, together with its stat signature (inode, size, mtime, ctime).
Every read checks the size (a truncated file is named, never reported as numpy's "Failed to read
all data"); the bytes are hashed again whenever the file's stat signature differs from the one
recorded (any write, truncation, ``touch``, copy or restore changes ctime), once per process per
file, or on every read with ``EMBBENCH_VERIFY=full``. Vectors are checked to be finite before
they are written. A corrupt shard is moved to ``corrupt/`` and embedded again by the same run; a
corrupt consolidated file is moved aside and rebuilt from kept shards or embedded again.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from embbench._utils import (
    atomic_save_npy,
    atomic_write_json,
    hold_lock,
    holder_path,
    lock_holder,
    safe_name,
    stable_hash,
)
from embbench.cache_integrity import (
    CacheBusyError,
    CacheError,
    CorruptCacheError,
    check_finite,
    file_record,
    forget_verified,
    load_npy,
    verify_file,
)
from embbench.paths import cache_dir

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # checksums were added without changing keys: older folders are stamped on read


@dataclass
class EmbeddingSet:
    """Cached vectors of one split, memory-mapped, with their item ids.

    Attributes:
        vectors: (n, dim) float32, memory-mapped read-only.
        item_ids: (n,) item ids aligned with ``vectors``.
        meta: The folder's ``meta.json``.
        failed: Images that could not be read: dicts with item_id, path, reason.
        path: The cache folder.
    """

    vectors: np.ndarray
    item_ids: np.ndarray
    meta: dict
    failed: list[dict] = field(default_factory=list)
    path: Path | None = None

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.vectors.shape[1])

    def labels(self, items: pd.DataFrame, column: str) -> np.ndarray:
        """The ``column`` label of each vector, looked up by item_id in a catalogue table."""
        if column not in items:
            raise CacheError(f"label column {column!r} not in catalogue columns {list(items)}")
        lookup = items.set_index("item_id")[column]
        missing = ~pd.Index(self.item_ids).isin(lookup.index)
        if missing.any():
            raise CacheError(
                f"{int(missing.sum())} cached item(s) of {self.path} are not in the catalogue "
                f"(e.g. {self.item_ids[missing][:3].tolist()}); the cache is stale for this data"
            )
        return lookup.loc[self.item_ids].to_numpy()


class EmbeddingCache:
    """Sharded, resumable, verified, atomically written embedding store keyed by identity.

    Args:
        dataset: Dataset name.
        model: Model name.
        split: Split name.
        identity: Everything that changes the vectors (see module docstring); hashed into the key.
        root: Cache root (default ``cache_dir()/"embeddings"``).
    """

    CONSOLIDATED = ("vectors.npy", "ids.npy", "failed.json")

    def __init__(
        self, dataset: str, model: str, split: str, identity: dict, root: Path | None = None
    ) -> None:
        self.identity = {
            **identity,
            "dataset": dataset,
            "model": model,
            "split": split,
            "cache_format": CACHE_FORMAT,
        }
        self.key = stable_hash(self.identity, 16)
        base = root if root is not None else cache_dir() / "embeddings"
        self.path = base / safe_name(dataset) / safe_name(model) / f"{safe_name(split)}-{self.key}"
        self.lock_path = self.path.parent / f"{self.path.name}.lock"
        self.holder_path = holder_path(self.lock_path)

    # ---- reading -------------------------------------------------------------------------
    def _read_meta(self) -> dict | None:
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptCacheError(meta_path, f"is not valid JSON ({exc})") from None
        if meta.get("key") != self.key or meta.get("identity") != json.loads(
            json.dumps(self.identity, default=str)
        ):
            raise CacheError(
                f"{meta_path} describes other vectors than asked for (key {meta.get('key')} != "
                f"{self.key}); delete {self.path} to rebuild it"
            )
        return meta

    def is_complete(self) -> bool:
        """Whether the consolidated vectors exist and match the identity (not yet verified)."""
        meta = self._read_meta()
        return bool(
            meta and meta.get("status") == "complete" and (self.path / "vectors.npy").is_file()
        )

    def load(self) -> EmbeddingSet:
        """Verify and memory-map the consolidated vectors.

        Raises:
            CorruptCacheError: A consolidated file is missing, truncated or fails its checksum
                (the message names it).
            CacheError: The cache is missing, incomplete or inconsistent.
        """
        meta = self._read_meta()
        if not meta or meta.get("status") != "complete":
            raise CacheError(f"no complete embeddings at {self.path}; run the embed stage first")
        files = meta.get("files")
        if files:
            for name in self.CONSOLIDATED:
                verify_file(self.path / name, files[name])
        vectors = load_npy(self.path / "vectors.npy", mmap=True)
        ids = load_npy(self.path / "ids.npy")
        if vectors.shape != (meta["n"], meta["dim"]) or len(ids) != meta["n"]:
            raise CorruptCacheError(
                self.path / "vectors.npy",
                f"holds vectors {vectors.shape} / ids {len(ids)}, but meta.json says "
                f"n={meta['n']}, dim={meta['dim']}",
            )
        failed = self._read_json(self.path / "failed.json")
        if not files:
            self._stamp_legacy(meta)
        return EmbeddingSet(vectors=vectors, item_ids=ids, meta=meta, failed=failed, path=self.path)

    @staticmethod
    def _read_json(path: Path):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise CorruptCacheError(path, "is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptCacheError(path, f"is not valid JSON ({exc})") from None

    def _stamp_legacy(self, meta: dict) -> None:
        """Add checksums to a folder written before they existed (when it is writable)."""
        meta = {**meta, "files": {n: file_record(self.path / n) for n in self.CONSOLIDATED}}
        try:
            atomic_write_json(self.path / "meta.json", meta)
            logger.info("added checksums to %s (written by an older embbench)", self.path)
        except OSError as err:
            logger.debug("cannot stamp checksums into %s: %s", self.path, err)

    # ---- repair --------------------------------------------------------------------------
    def quarantine(self, names: list[str] | tuple[str, ...], reason: str) -> Path:
        """Move files of the folder to ``corrupt/`` (named with a timestamp); return that folder."""
        dest = self.path / "corrupt"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        moved = []
        for name in names:
            src = self.path / name
            if src.exists():
                dest.mkdir(parents=True, exist_ok=True)
                src.replace(dest / f"{name}.{stamp}")
                forget_verified(src)
                moved.append(name)
        if moved:
            logger.warning("%s: moved %s to %s (%s)", self.path, ", ".join(moved), dest, reason)
        return dest

    def quarantine_consolidated(self, reason: str) -> None:
        """Move the consolidated files aside and mark the folder partial, keeping verified shards.

        The next run rebuilds the consolidated files from the shards that are kept and verify,
        and embeds the rest again.
        """
        try:
            meta = self._read_meta()
        except CorruptCacheError:
            meta = None
        self.quarantine([*self.CONSOLIDATED, *([] if meta else ["meta.json"])], reason)
        if meta:
            meta = {k: v for k, v in meta.items() if k not in ("files", "n", "dim", "n_failed")}
            meta["status"] = "partial"
            atomic_write_json(self.path / "meta.json", meta)

    # ---- locking -------------------------------------------------------------------------
    def holder(self) -> dict:
        """Who holds the lock: ``{"pid", "host", "command", "since"}`` (empty if unknown)."""
        return lock_holder(self.lock_path)

    @contextmanager
    def lock(self, timeout: float | None = None, notify_after: float = 5.0) -> Iterator[None]:
        """Hold this split's file lock (one run embeds a split at a time).

        A busy lock is waited for: after ``notify_after`` seconds, and every minute after that,
        a WARNING names the holder's pid and host. The operating system releases the lock of a
        killed run, so waiting never outlives the holder.

        Args:
            timeout: Give up after this many seconds with :class:`CacheBusyError` (``None``:
                wait as long as the holder runs; ``0``: fail at once).
            notify_after: Seconds before the first WARNING.

        Raises:
            CacheBusyError: Still busy after ``timeout`` seconds; the message names the holder.
        """
        with hold_lock(
            self.lock_path,
            f"embedding {self.path}",
            timeout=timeout,
            notify_after=notify_after,
            busy=lambda who: CacheBusyError(
                f"{self.path} is being embedded by {who}; lock {self.lock_path}. Wait "
                "for that run to finish (its vectors are then reused), or stop it"
            ),
        ):
            yield

    # ---- writing -------------------------------------------------------------------------
    def begin(
        self, expected_ids: list[str], shard_size: int, provenance: dict, overwrite: bool = False
    ) -> None:
        """Create (or reopen, to resume) the folder for a run over ``expected_ids``.

        A partial folder from an interrupted run is kept when it was started for the same items
        and shard size; otherwise (or with ``overwrite``) it is cleared. Hold :meth:`lock`.
        """
        ids_hash = stable_hash(list(expected_ids), 16)
        try:
            meta = None if overwrite else self._read_meta()
        except CorruptCacheError as err:
            logger.warning("%s; restarting this split", err)
            meta = None
        if meta and (meta.get("items_hash") != ids_hash or meta.get("shard_size") != shard_size):
            logger.info("cache %s was started for other items or shard size; restarting", self.path)
            meta = None
        if meta is None and self.path.exists():
            shutil.rmtree(self.path)
        if meta is None:
            meta = {
                "key": self.key,
                "identity": self.identity,
                "status": "partial",
                "items_hash": ids_hash,
                "n_expected": len(expected_ids),
                "shard_size": shard_size,
                "created": datetime.now(UTC).isoformat(),
                "provenance": provenance,
            }
            atomic_write_json(self.path / "meta.json", meta)

    def n_shards(self, n_items: int, shard_size: int) -> int:
        """How many shards ``n_items`` take."""
        return max(1, -(-n_items // shard_size))

    def _shard_names(self, index: int) -> tuple[str, str, str]:
        stem = f"shard-{index:05d}"
        return f"{stem}.npy", f"{stem}.ids.npy", f"{stem}.json"

    def shard_done(self, index: int) -> bool:
        """Whether shard ``index`` was written completely and verifies.

        A shard that fails verification (truncated, flipped bytes, missing file) is moved to
        ``corrupt/`` with a WARNING naming it, and reported as not done, so it is embedded again.
        """
        try:
            self.read_shard(index)
        except FileNotFoundError:
            return False
        except CorruptCacheError as err:
            self.quarantine(self._shard_names(index), str(err))
            return False
        return True

    def read_shard(self, index: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """A finished shard's ``(vectors, ids, failed)``, verified.

        Raises:
            FileNotFoundError: The shard was not finished (its ``.json`` is absent).
            CorruptCacheError: A file of the shard is missing, truncated or corrupt.
        """
        vec_name, ids_name, json_name = self._shard_names(index)
        if not (self.path / json_name).is_file():
            raise FileNotFoundError(self.path / json_name)
        info = self._read_json(self.path / json_name)
        try:
            verify_file(self.path / vec_name, info["files"][vec_name])
            verify_file(self.path / ids_name, info["files"][ids_name])
        except KeyError:
            raise CorruptCacheError(self.path / json_name, "lacks its checksums") from None
        vecs = load_npy(self.path / vec_name)
        ids = load_npy(self.path / ids_name)
        if len(vecs) != info["n"] or len(ids) != info["n"]:
            raise CorruptCacheError(self.path / vec_name, f"does not hold {info['n']} rows")
        return vecs, ids, info["failed"]

    def write_shard(
        self, index: int, vectors: np.ndarray, ids: list[str], failed: list[dict]
    ) -> None:
        """Write one shard's vectors, ids and checksums (the ``.json`` last: it marks it done).

        Raises:
            CacheError: The vectors hold NaN or inf (the message names the file), or their
                count differs from the ids'.
        """
        if len(vectors) != len(ids):
            raise CacheError(f"shard {index}: {len(vectors)} vectors for {len(ids)} ids")
        vec_name, ids_name, json_name = self._shard_names(index)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        check_finite(vectors, self.path / vec_name, list(ids))
        atomic_save_npy(self.path / vec_name, vectors)
        atomic_save_npy(self.path / ids_name, np.asarray(ids, dtype=str))
        info = {
            "n": len(vectors),
            "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
            "files": {n: file_record(self.path / n) for n in (vec_name, ids_name)},
            "failed": failed,
        }
        atomic_write_json(self.path / json_name, info)

    def consolidate(
        self, n_shards: int, extra_meta: dict | None = None, *, keep_shards: bool = False
    ) -> EmbeddingSet:
        """Join all shards into ``vectors.npy``/``ids.npy``, mark complete, drop the shards.

        Args:
            n_shards: How many shards the split has.
            extra_meta: More entries for ``meta.json``.
            keep_shards: Keep the shards (doubles the disk used), so that a corrupt
                consolidated file can be rebuilt without embedding again.
        """
        vecs, ids, failed = [], [], []
        for i in range(n_shards):
            if not self.shard_done(i):
                raise CacheError(
                    f"{self.path}: shard {i} is missing or was corrupt; rerun to embed it"
                )
            v, d, f = self.read_shard(i)
            vecs.append(v)
            ids.append(d)
            failed.extend(f)
        dims = {v.shape[1] for v in vecs if len(v)}
        if len(dims) > 1:
            raise CacheError(f"{self.path}: shards disagree on the dimension {sorted(dims)}")
        dim = dims.pop() if dims else 0
        vectors = (
            np.concatenate([v.reshape(-1, dim) for v in vecs])
            if dim
            else np.zeros((0, 0), np.float32)
        )
        all_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=str)
        if len(vectors) == 0:
            raise CacheError(
                f"{self.path}: no image of this split could be read "
                f"({len(failed)} failed); see the failures listed in the run output"
            )
        atomic_save_npy(self.path / "vectors.npy", vectors)
        atomic_save_npy(self.path / "ids.npy", all_ids)
        atomic_write_json(self.path / "failed.json", failed)
        meta = self._read_meta() or {}
        meta.update(
            {
                "status": "complete",
                "n": len(vectors),
                "dim": dim,
                "n_failed": len(failed),
                "completed": datetime.now(UTC).isoformat(),
                "files": {n: file_record(self.path / n) for n in self.CONSOLIDATED},
                "shards_kept": keep_shards,
                **(extra_meta or {}),
            }
        )
        atomic_write_json(self.path / "meta.json", meta)
        # under the lock no other run writes here: leftovers of killed runs go too
        strays = [*self.path.glob(".*.tmp"), *([] if keep_shards else self.path.glob("shard-*"))]
        for stray in strays:
            stray.unlink(missing_ok=True)
        return self.load()

    def save_complete(
        self,
        vectors: np.ndarray,
        ids: list[str] | np.ndarray,
        provenance: dict,
        failed: list[dict] | None = None,
    ) -> EmbeddingSet:
        """Write a whole split at once (derived embeddings, e.g. top-tuned ones), under the lock."""
        ids = [str(i) for i in ids]
        with self.lock():
            self.begin(ids, shard_size=max(1, len(ids)), provenance=provenance, overwrite=True)
            self.write_shard(0, vectors, ids, failed or [])
            return self.consolidate(1)
