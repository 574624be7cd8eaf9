"""The on-disk embedding cache: the source of truth for vectors.

Layout, one folder per (dataset, model, split, key)::

    <cache_dir>/embeddings/<dataset>/<model>/<split>-<key>/
        meta.json            # identity (everything that changes the vectors), status, provenance
        shard-00000.npy      # float32 (n_i, dim) while a run is in progress
        shard-00000.ids.npy  # the item_ids of those rows
        shard-00000.failed.json  # images of that shard that could not be read, with reasons
        vectors.npy / ids.npy / failed.json   # consolidated once every shard is done

The key is a hash of the identity: model name and identifier, the weights actually used (tag,
checkpoint sha256 or random seed), the preprocessing fingerprint, the dataset name and
fingerprint, the split, the normalisation flag and the extraction code's version. Every file is
written to a temporary name and renamed, so a killed run leaves only whole shards, and a rerun
resumes from them. ``meta.json`` is checked on read: a folder whose identity does not match is
never returned. Milvus indexes and top-tuning read from here; nothing else is authoritative.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from embbench._utils import (
    atomic_save_npy,
    atomic_write_json,
    safe_name,
    stable_hash,
)
from embbench.paths import cache_dir

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


class CacheError(RuntimeError):
    """A cache folder is corrupt or does not match what was asked for."""


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
    """Sharded, resumable, atomically written embedding store keyed by identity.

    Args:
        dataset: Dataset name.
        model: Model name.
        split: Split name.
        identity: Everything that changes the vectors (see module docstring); hashed into the key.
        root: Cache root (default ``cache_dir()/"embeddings"``).
    """

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

    # ---- reading -------------------------------------------------------------------------
    def _read_meta(self) -> dict | None:
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise CacheError(f"{meta_path} is not valid JSON ({exc}); delete the folder") from None
        if meta.get("key") != self.key or meta.get("identity") != json.loads(
            json.dumps(self.identity, default=str)
        ):
            raise CacheError(
                f"{meta_path} describes other vectors than asked for (key {meta.get('key')} != "
                f"{self.key}); delete {self.path} to rebuild it"
            )
        return meta

    def is_complete(self) -> bool:
        """Whether the consolidated vectors exist and match the identity."""
        meta = self._read_meta()
        return bool(
            meta and meta.get("status") == "complete" and (self.path / "vectors.npy").is_file()
        )

    def load(self) -> EmbeddingSet:
        """Memory-map the consolidated vectors.

        Raises:
            CacheError: The cache is missing, incomplete or inconsistent.
        """
        meta = self._read_meta()
        if not meta or meta.get("status") != "complete":
            raise CacheError(f"no complete embeddings at {self.path}; run the embed stage first")
        vectors = np.load(self.path / "vectors.npy", mmap_mode="r")
        ids = np.load(self.path / "ids.npy", allow_pickle=False)
        if vectors.shape != (meta["n"], meta["dim"]) or len(ids) != meta["n"]:
            raise CacheError(
                f"{self.path}: vectors {vectors.shape} / ids {len(ids)} disagree with "
                f"meta.json (n={meta['n']}, dim={meta['dim']}); delete the folder"
            )
        failed = json.loads((self.path / "failed.json").read_text())
        return EmbeddingSet(vectors=vectors, item_ids=ids, meta=meta, failed=failed, path=self.path)

    # ---- writing -------------------------------------------------------------------------
    def begin(
        self, expected_ids: list[str], shard_size: int, provenance: dict, overwrite: bool = False
    ) -> None:
        """Create (or reopen, to resume) the folder for a run over ``expected_ids``.

        A partial folder from an interrupted run is kept when it was started for the same items
        and shard size; otherwise (or with ``overwrite``) it is cleared.
        """
        ids_hash = stable_hash(list(expected_ids), 16)
        meta = None if overwrite else self._read_meta()
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

    def shard_done(self, index: int) -> bool:
        """Whether shard ``index`` was written completely (its three files exist)."""
        stem = self.path / f"shard-{index:05d}"
        return all(Path(f"{stem}{s}").is_file() for s in (".npy", ".ids.npy", ".failed.json"))

    def write_shard(
        self, index: int, vectors: np.ndarray, ids: list[str], failed: list[dict]
    ) -> None:
        """Write one shard's vectors, ids and failures (failures last: they mark it done)."""
        if len(vectors) != len(ids):
            raise CacheError(f"shard {index}: {len(vectors)} vectors for {len(ids)} ids")
        stem = self.path / f"shard-{index:05d}"
        atomic_save_npy(Path(f"{stem}.npy"), np.ascontiguousarray(vectors, dtype=np.float32))
        atomic_save_npy(Path(f"{stem}.ids.npy"), np.asarray(ids, dtype=str))
        atomic_write_json(Path(f"{stem}.failed.json"), failed)

    def consolidate(self, n_shards: int, extra_meta: dict | None = None) -> EmbeddingSet:
        """Join all shards into ``vectors.npy``/``ids.npy``, mark complete and drop the shards."""
        vecs, ids, failed = [], [], []
        for i in range(n_shards):
            if not self.shard_done(i):
                raise CacheError(f"{self.path}: shard {i} is missing; rerun to resume")
            stem = self.path / f"shard-{i:05d}"
            vecs.append(np.load(f"{stem}.npy"))
            ids.append(np.load(f"{stem}.ids.npy"))
            failed.extend(json.loads(Path(f"{stem}.failed.json").read_text()))
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
                **(extra_meta or {}),
            }
        )
        atomic_write_json(self.path / "meta.json", meta)
        for i in range(n_shards):
            for suffix in (".npy", ".ids.npy", ".failed.json"):
                Path(f"{self.path / f'shard-{i:05d}'}{suffix}").unlink(missing_ok=True)
        return self.load()

    def save_complete(
        self,
        vectors: np.ndarray,
        ids: list[str] | np.ndarray,
        provenance: dict,
        failed: list[dict] | None = None,
    ) -> EmbeddingSet:
        """Write a whole split at once (derived embeddings, e.g. top-tuned ones)."""
        ids = [str(i) for i in ids]
        self.begin(ids, shard_size=max(1, len(ids)), provenance=provenance, overwrite=True)
        self.write_shard(0, vectors, ids, failed or [])
        return self.consolidate(1)
