"""Small utilities shared by every layer: atomic writes, stable hashes, safe names.

This module sits at the bottom of the package (it imports nothing from embbench), so any
building block, the cell engine or a stage may use it. Device, precision and distributed helpers
that need torch live in :mod:`embbench._torch_utils`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from embbench._errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "DiskFullError",
    "StorageError",
    "storage_fault",
    "writable_problem",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_npy",
    "describe_holder",
    "hold_lock",
    "holder_path",
    "lock_holder",
    "stable_hash",
    "sha256_file",
    "safe_name",
    "collection_name",
    "metric_key",
    "metric_name",
    "jsonable",
]


class DiskFullError(UserError, OSError):
    """A write failed because the file system holding ``path`` is full (or over quota)."""


def _is_disk_full(err: OSError) -> bool:
    # numpy's tofile reports a short write as "N requested and M written", without an errno.
    text = str(err)
    return err.errno in (errno.ENOSPC, errno.EDQUOT) or (
        "requested and" in text and "written" in text
    )


def _disk_full_error(path: Path, err: OSError) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:,.1f} MB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        errno.ENOSPC,
        f"disk full while writing {path} ({free}; {err}); free space on that file system "
        "or point EMBBENCH_CACHE / EMBBENCH_RUNS at a larger one, then rerun (finished work "
        "is kept)",
    )


class StorageError(UserError, OSError):
    """A folder embbench writes to is read-only or not writable; the message names it, the fix."""


def _owner_var(path: Path, roots: Mapping[Path, str]) -> str:
    """The environment variable of the project folder holding ``path`` (for the fix)."""
    for root, var in roots.items():
        if path == root or root in path.parents:
            return var
    return " / ".join(roots.values()) or "the folder setting"


def _storage_text(path: Path, err: OSError, var: str) -> str | None:
    """One line naming ``path``, what is wrong and the fix, or ``None`` for other errors."""
    if _is_disk_full(err):
        try:
            free = f"{shutil.disk_usage(path if path.is_dir() else path.parent).free / 1e6:,.1f} MB"
        except OSError:
            free = "unknown"
        return (
            f"disk full while writing {path} ({free} free); free space on that file system or "
            f"point {var} at a larger one, then rerun (finished work is kept)"
        )
    if err.errno == errno.EROFS:
        return (
            f"{path} is on a read-only file system; remount it read-write or point {var} at "
            "a writable folder, then rerun (finished work is kept)"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return (
            f"{path} is not writable by this user ({err.strerror}); fix its permissions or "
            f"point {var} at a writable folder, then rerun (finished work is kept)"
        )
    return None


def writable_problem(folder: Path, var: str) -> str | None:
    """Whether embbench can write under ``folder``: ``None``, or one line naming it and the fix.

    Creates the folder if missing, then writes, fsyncs and removes a 4 KiB probe file, so a
    read-only mount, a folder without write permission or a full file system is found before
    any work (``os.access`` alone misses read-only mounts and full disks).
    """
    folder = Path(folder)
    probe = folder / f".embbench-write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with open(probe, "wb") as fh:
                fh.write(b"\0" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
    except OSError as err:
        path = Path(err.filename) if err.filename and Path(err.filename) != probe else folder
        return _storage_text(path, err, var) or (
            f"cannot write under {folder} ({err}); point {var} at a writable folder"
        )
    return None


def storage_fault(
    err: BaseException, roots: Mapping[Path, str], sqlite_db: Path | None = None
) -> OSError | None:
    """A one-line :class:`DiskFullError`/:class:`StorageError` for a write that failed, or None.

    Looks through ``err``'s chain for an ``OSError`` that says "full", "read-only" or
    "permission denied" (naming its file), or SQLite's "database or disk is full" / "attempt to
    write a readonly database" (naming ``sqlite_db``, the MLflow store).

    Args:
        err: The error raised while a run wrote its files.
        roots: Project folders -> their environment variable (``EMBBENCH_CACHE``...).
        sqlite_db: The local MLflow store, when the tracking URI is one.
    """
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, DiskFullError | StorageError):
            return cur
        text = str(cur)
        if sqlite_db is not None and (
            "database or disk is full" in text or "readonly database" in text
        ):
            code = errno.ENOSPC if "full" in text else errno.EROFS
            fake = OSError(code, "database or disk is full" if "full" in text else text)
            line = _storage_text(sqlite_db, fake, _owner_var(sqlite_db, roots))
            kind = DiskFullError if code == errno.ENOSPC else StorageError
            return kind(code, f"MLflow store: {line}")
        if isinstance(cur, OSError) and cur.filename:
            path = Path(cur.filename)
            line = _storage_text(path, cur, _owner_var(path, roots))
            if line is not None:
                return (DiskFullError if _is_disk_full(cur) else StorageError)(cur.errno, line)
        cur = cur.__cause__ or cur.__context__
    return None


def _replace_from_temp(path: Path, write) -> None:
    """Create ``path`` by writing a temporary sibling with ``write(fh)``, fsync, then rename.

    The temporary file is created with the user's umask (``tempfile.mkstemp`` would force 0600,
    which makes a team's shared cache unreadable to the others).

    Raises:
        DiskFullError: The file system is full (``ENOSPC``/``EDQUOT`` or a short write); the
            message names ``path`` and says "disk full". The temporary file is removed.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        if _is_disk_full(err):
            raise _disk_full_error(path, err) from err
        raise
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(err) and not isinstance(err, DiskFullError):
            raise _disk_full_error(path, err) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    _replace_from_temp(Path(path), lambda fh: fh.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (sorted keys), atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save ``array`` in .npy format (no pickles), atomically."""
    _replace_from_temp(Path(path), lambda fh: np.save(fh, array, allow_pickle=False))


def stable_hash(data: Any, length: int = 12) -> str:
    """SHA-256 of the canonical JSON of ``data`` (sorted keys), truncated to ``length``."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_name(name: Any) -> str:
    """A file-name-safe version of ``name``: letters, digits, ``-``, ``_`` and ``.`` are kept."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def collection_name(*parts: str) -> str:
    """A valid Milvus collection name (ASCII letters, digits, underscores; starts with a letter).

    Milvus allows at most 255 characters; longer names keep a readable head and a hash of the
    whole, so two long names never collide.
    """
    name = re.sub(r"[^A-Za-z0-9_]", "_", "_".join(str(p) for p in parts))
    if not name[:1].isalpha():
        name = f"c_{name}"
    if len(name) > 255:
        name = f"{name[:240]}_{stable_hash(name, 12)}"
    return name


# The one mapping between the report's metric names and MLflow's: MLflow 3.17 refuses ``@`` in a
# metric key (client and tracking store both allow only letters, digits, ``_ - . : /`` and
# spaces; tests/test_tracking_readable.py checks it), so ``mMP@5`` is logged as ``mMP_at_5``.
METRIC_AT = "_at_"


def metric_key(name: str) -> str:
    """The MLflow key of the report's metric ``name``: ``mMP@5`` -> ``mMP_at_5``."""
    return name.replace("@", METRIC_AT)


def metric_name(key: str) -> str:
    """The report's name of the MLflow metric ``key`` (inverse of :func:`metric_key`)."""
    return key.replace(METRIC_AT, "@")


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: tuples become lists, numpy scalars numbers, the rest ``str``."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)


def holder_path(lock: Path) -> Path:
    """The file beside ``lock`` that names its holder (JSON, see :func:`lock_holder`)."""
    return lock.with_name(lock.name + ".holder.json")


def lock_holder(lock: Path) -> dict[str, Any]:
    """Who holds (or last held) ``lock``: ``{"pid", "host", "command", "since"}``, or ``{}``."""
    try:
        found = json.loads(holder_path(lock).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def describe_holder(holder: Mapping[str, Any]) -> str:
    """``pid 123 on host h (embbench run-notebook ..., since 2026-01-01T00:00:00+00:00)``."""
    if not holder:
        return "an unknown process"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"({holder.get('command') or '?'}, since {holder.get('since', '?')})"
    )


@contextmanager
def hold_lock(
    path: Path,
    what: str,
    *,
    timeout: float | None = None,
    notify_after: float = 0.0,
    busy: Callable[[str], Exception] | None = None,
) -> Iterator[None]:
    """Hold the file lock ``path`` for ``what``; when busy, say who holds it and wait.

    The holder (pid, host, command line, start time) is written beside the lock
    (:func:`holder_path`) while it is held, so a waiting run names it: a WARNING after
    ``notify_after`` seconds, then every minute. The operating system releases the lock of a
    killed process, so waiting never outlives the holder.

    Args:
        path: The lock file.
        what: What the lock protects, for the messages (``embedding <folder>``...).
        timeout: Give up after this many seconds (``None``: wait as long as the holder runs).
        notify_after: Seconds of waiting before the first WARNING.
        busy: Builds the error raised on ``timeout`` from the holder's description (default:
            :class:`TimeoutError`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    start = time.monotonic()
    step = notify_after
    while True:
        left = None if timeout is None else timeout - (time.monotonic() - start)
        try:
            lock.acquire(timeout=step if left is None else max(0.0, min(step, left)))
            break
        except Timeout:
            who = describe_holder(lock_holder(path))
            waited = time.monotonic() - start
            if timeout is not None and waited >= timeout:
                make = busy or (lambda who: TimeoutError(f"{what}: {path} is held by {who}"))
                raise make(who) from None
            logger.warning("waiting %.0f s for %s, held by %s", waited, what, who)
            step = 60.0
    try:
        atomic_write_json(
            holder_path(path),
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": shlex.join(sys.argv) if sys.argv else "",
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        yield
    finally:
        holder_path(path).unlink(missing_ok=True)
        lock.release()
