"""Integrity of cached files: checksums, stat signatures, verified reads, finite vectors.

Every shard and consolidated file of the embedding cache (:mod:`embbench.cache`) carries its
size and an xxh3-64 checksum of its bytes, taken when it was written, with its stat signature
(inode, size, mtime, ctime). :func:`verify_file` checks the size on every read and hashes the
bytes again when the signature changed (or always, with ``EMBBENCH_VERIFY=full``); a mismatch
raises :class:`CorruptCacheError` naming the file, so the cache can move it aside and rebuild.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import xxhash

from embbench._errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "CacheBusyError",
    "forget_verified",
    "CacheError",
    "CorruptCacheError",
    "check_finite",
    "file_checksum",
    "file_record",
    "load_npy",
    "verify_file",
]

_CHUNK = 1 << 20
_VERIFIED: dict[str, list[int]] = {}  # path -> stat signature whose bytes this process hashed


class CacheError(UserError, RuntimeError):
    """A cache folder is corrupt or does not match what was asked for."""


class CorruptCacheError(CacheError):
    """A cache file is missing, truncated or fails its checksum; ``path`` names it."""

    def __init__(self, path: Path, problem: str, fix: str = "") -> None:
        fix = fix or (
            "run the embed step again (stage 01 or any stage that embeds): it moves the file "
            "to corrupt/ and recomputes what is missing"
        )
        super().__init__(f"{path} {problem}; {fix}")
        self.path = Path(path)


class CacheBusyError(CacheError):
    """Another run holds the lock of a cache split."""


def file_checksum(path: Path) -> str:
    """The xxh3-64 hex digest of a file's bytes (read in 1 MiB chunks)."""
    digest = xxhash.xxh3_64()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with Path(path).open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_record(path: Path) -> dict:
    """Size, checksum and stat signature of a file just written (stored in the meta)."""
    st = Path(path).stat()
    record = {"bytes": st.st_size, "xxh3_64": file_checksum(path), "stat": _signature(st)}
    _VERIFIED[str(path)] = record["stat"]
    return record


def verify_file(path: Path, record: dict, *, full: bool | None = None) -> None:
    """Check ``path`` against the ``record`` taken when it was written.

    Args:
        path: The file.
        record: Its :func:`file_record`.
        full: Hash the bytes even when the stat signature is unchanged (default: the
            ``EMBBENCH_VERIFY=full`` environment variable).

    Raises:
        CorruptCacheError: The file is missing, has another size or fails its checksum.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CorruptCacheError(path, "is missing") from None
    if st.st_size != record["bytes"]:
        raise CorruptCacheError(
            path, f"is truncated or overwritten: {st.st_size:,} bytes, {record['bytes']:,} written"
        )
    if full is None:
        full = os.environ.get("EMBBENCH_VERIFY", "").lower() == "full"
    sig = _signature(st)
    if not full and (sig == record.get("stat") or _VERIFIED.get(str(path)) == sig):
        return
    if file_checksum(path) != record["xxh3_64"]:
        _VERIFIED.pop(str(path), None)
        raise CorruptCacheError(path, "fails its checksum (its bytes changed after it was written)")
    _VERIFIED[str(path)] = sig


def load_npy(path: Path, *, mmap: bool = False) -> np.ndarray:
    """``np.load`` that names the file instead of numpy's bare "Failed to read all data"."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise CorruptCacheError(path, "is missing") from None
    except (ValueError, OSError, EOFError) as err:
        raise CorruptCacheError(path, f"cannot be read as a .npy array ({err})") from None


def check_finite(vectors: np.ndarray, path: Path, ids: list[str]) -> None:
    """Refuse NaN or inf in ``vectors`` before they are written to ``path``, naming the items."""
    finite = np.isfinite(vectors)
    if finite.all():
        return
    rows = np.flatnonzero(~finite.all(axis=1))
    n_nan, n_inf = int(np.isnan(vectors).sum()), int(np.isinf(vectors).sum())
    raise CacheError(
        f"refusing to write {path}: {n_nan} NaN and {n_inf} inf value(s) in {len(rows)} row(s) "
        f"(first: item {ids[rows[0]]!r}); the model produced non-finite outputs: run it with "
        "precision='fp32' or check its weights"
    )


def forget_verified(path: Path) -> None:
    """Drop this process's memory of having verified ``path`` (it was moved or replaced)."""
    _VERIFIED.pop(str(path), None)
