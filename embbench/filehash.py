"""Content hashes of image files, read once and then remembered by each file's stat signature.

A catalogue's fingerprint (:meth:`embbench.catalogue.Catalogue.fingerprint`) includes the xxh3-128
hash of every image's bytes, so a copy whose images were replaced under the same names is never
taken for the old one. Reading every image of a large dataset on every run would be slow, so each
hash is stored with the file's stat signature (size, mtime in ns, inode, ctime in ns) in a small
index, one per image folder::

    <cache_dir>/file_hashes/<hash of the folder>.json   # {"version", "base", "files":
                                                         #   {relative path: [size, mtime_ns,
                                                         #    inode, ctime_ns, xxh3-128]}}

A later run stats each file and reads only those whose signature changed: the warm path reads no
image (60k files: see ``benchmarks/bench_fingerprint.py``). The inode and ctime catch a file
replaced by another of the same size with its mtime restored (``cp -p``, ``rsync -t``,
``touch -d``): the kernel sets ctime on every write and rename and it cannot be set back. The index
is written atomically (merged with the copy on disk, so two runs that hash at once keep both
sets of entries) and saved every :data:`FLUSH_S` seconds during a long first pass, so a killed
run keeps what it hashed; a folder that cannot be written only costs hashing again next time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from embbench import paths
from embbench._utils import atomic_write_bytes, stable_hash
from embbench.progress import progress_bar

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
HASH_NAME = "xxh3_128"
MISSING = "missing"  # the hash given to a path that is not a readable file
URL = "url"  # the hash given to an http(s) row that was not fetched yet
PROGRESS_MIN = 1000  # files to hash from which the first pass shows a progress bar
FLUSH_S = 60.0  # seconds between index saves during a long first pass
_CHUNK = 1 << 20
_BATCH = 4096  # files handed to the reading threads at a time

__all__ = ["HASH_NAME", "MISSING", "URL", "file_hashes", "hash_file", "index_dir"]


def index_dir() -> Path:
    """Where the hash indexes live: ``<cache_dir>/file_hashes``."""
    return paths.cache_dir() / "file_hashes"


def hash_file(path: str | os.PathLike) -> str:
    """The xxh3-128 hex digest of a file's bytes (read in 1 MiB chunks)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


class _Index:
    """One folder's index: relative path -> [size, mtime_ns, inode, ctime_ns, hash]."""

    def __init__(self, base: str, root: Path) -> None:
        self.base = base
        self.path = root / f"{stable_hash(base, 16)}.json"
        self.files = self._read()
        self.new: dict[str, list] = {}

    def _read(self) -> dict[str, list]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            logger.warning(
                "file hash index %s is unreadable (%s); hashing its files again", self.path, err
            )
            return {}
        if (
            not isinstance(data, dict)
            or data.get("version") != INDEX_VERSION
            or data.get("base") != self.base
            or data.get("hash") != HASH_NAME
            or not isinstance(data.get("files"), dict)
        ):
            return {}
        return data["files"]

    def save(self) -> None:
        """Merge the new entries into the index on disk (another run may have added some)."""
        if not self.new:
            return
        merged = {**self._read(), **self.new}
        blob = json.dumps(
            {"version": INDEX_VERSION, "hash": HASH_NAME, "base": self.base, "files": merged},
            separators=(",", ":"),
        ).encode()
        try:
            atomic_write_bytes(self.path, blob)
        except OSError as err:
            logger.warning(
                "cannot save file hashes to %s (%s); they are computed again next run",
                self.path,
                err,
            )
            return
        self.files.update(self.new)
        self.new = {}


def _groups(paths_: Sequence[str], base: str | None) -> dict[str, list[tuple[int, str]]]:
    """Rows by index folder: ``{folder: [(row, path relative to folder)]}``.

    Files under ``base`` share its index; the others (fetched images, images outside the
    catalogue's folder) share one index at their common folder.
    """
    groups: dict[str, list[tuple[int, str]]] = {}
    prefix = base.rstrip(os.sep) + os.sep if base else None
    rest: list[tuple[int, str]] = []
    for i, p in enumerate(paths_):
        if p.startswith(("http://", "https://")):
            continue
        full = p if p.startswith(os.sep) else str(Path(p).resolve())
        if prefix and full.startswith(prefix):
            groups.setdefault(prefix[:-1] or os.sep, []).append((i, full[len(prefix) :]))
        else:
            rest.append((i, full))
    if rest:
        common = os.path.commonpath([f.rpartition(os.sep)[0] or os.sep for _, f in rest])
        cut = len(common.rstrip(os.sep)) + 1
        groups.setdefault(common, []).extend((i, f[cut:]) for i, f in rest)
    return groups


def file_hashes(
    paths_: Sequence[str],
    *,
    base: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> list[str]:
    """The content hash of each path, reading only files not seen with the same signature.

    Args:
        paths_: Absolute (or working-directory relative) file paths; http(s) URLs get
            :data:`URL`, paths that are not readable files get :data:`MISSING`.
        base: The catalogue's folder: files under it share one index (keyed by relative path,
            so the index stays small).
        root: Index folder (default :func:`index_dir`).
        progress: Show a progress bar when at least :data:`PROGRESS_MIN` files are read.
        workers: Threads reading files on a first pass (default: twice the cores, at most 16).

    Returns:
        One hex digest (or marker) per path, in order.
    """
    out = [URL if p.startswith(("http://", "https://")) else MISSING for p in paths_]
    root = Path(root) if root is not None else index_dir()
    base_s = os.path.normpath(Path(base).expanduser().absolute()) if base else None
    for folder, rows in _groups(paths_, base_s).items():
        index = _Index(folder, root)
        todo: list[tuple[int, str, str, list[int]]] = []
        files = index.files
        prefix = folder.rstrip(os.sep) + os.sep
        for i, rel in rows:
            # str paths and os.stat: the warm path stats every image, and a pathlib object per
            # file would cost more than the stat itself (benchmarks/bench_fingerprint.py)
            full = prefix + rel
            try:
                sig = _signature(os.stat(full))  # noqa: PTH116
            except OSError:
                continue  # MISSING: the embedding step names it as a failed image
            entry = files.get(rel)
            if entry is not None and entry[:4] == sig:
                out[i] = entry[4]
            else:
                todo.append((i, rel, full, sig))
        if todo:
            _hash_todo(todo, index, out, progress=progress, workers=workers)
    return out


def _hash_todo(
    todo: list[tuple[int, str, str, list[int]]],
    index: _Index,
    out: list[str],
    *,
    progress: bool,
    workers: int | None,
) -> None:
    """Read and hash the files of ``todo`` (stat taken before the read), record them in ``index``.

    Stat before read is the safe order: a file changed after its stat is hashed with its old
    signature, which no longer matches on the next run, so it is read again then.
    """
    logger.info(
        "hashing the content of %d image file(s) under %s (once: remembered in %s)",
        len(todo),
        index.base,
        index.path,
    )
    bar = progress_bar(
        total=len(todo),
        desc="hashing images",
        unit="img",
        disable=not progress or len(todo) < PROGRESS_MIN,
    )

    def one(item: tuple[int, str, str, list[int]]) -> tuple[int, str, list[int], str | None]:
        i, rel, full, sig = item
        try:
            return i, rel, sig, hash_file(full)
        except OSError:
            return i, rel, sig, None

    n_workers = workers or min(16, 2 * (os.cpu_count() or 1))
    last_save = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
            for start in range(0, len(todo), _BATCH):  # bounded: no million futures at once
                for i, rel, sig, digest in pool.map(one, todo[start : start + _BATCH]):
                    bar.update(1)
                    if digest is not None:
                        out[i] = digest
                        index.new[rel] = [*sig, digest]
                if time.monotonic() - last_save > FLUSH_S:
                    index.save()
                    last_save = time.monotonic()
    finally:
        bar.close()
        index.save()
