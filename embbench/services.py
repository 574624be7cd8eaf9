"""Probes of the external services a run needs, with a short timeout, before any work.

:func:`check_tracking` asks an MLflow tracking server for ``/health``; :func:`check_milvus` opens
a TCP connection to a Milvus server (a Milvus Lite file needs a writable folder instead, and no
other process holding it: :func:`lite_lock_holder` names the one that does). Each raises
:class:`ServiceUnreachableError` naming the URI and the fix within seconds, instead of minutes of
retries once the work is done.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from embbench.paths import runs_dir

__all__ = ["ServiceUnreachableError", "check_milvus", "check_tracking", "lite_lock_holder"]

DEFAULT_TIMEOUT = 3.0


class ServiceUnreachableError(ConnectionError):
    """A tracking server or Milvus cannot be reached; the message names the URI and the fix."""


def _local_folder_check(path: Path, what: str, uri: str) -> None:
    folder = path.expanduser().resolve().parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not _writable(existing):
        raise ServiceUnreachableError(
            f"{what} {uri!r}: folder {folder} cannot be created or written; choose a writable "
            "location"
        )


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK | os.X_OK)


def check_tracking(uri: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Check that the MLflow tracking URI ``uri`` answers, within ``timeout`` seconds.

    ``http(s)://`` servers must answer ``GET <uri>/health``; ``sqlite:///`` and ``file:`` stores
    need a writable folder; other schemes (``databricks``...) are left to MLflow.

    Raises:
        ServiceUnreachableError: Naming the URI, what failed and the fix.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
                if resp.status != 200:
                    raise ServiceUnreachableError(
                        f"MLflow tracking server {uri} answered {url} with HTTP {resp.status}"
                    )
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ServiceUnreachableError(
                f"MLflow tracking server {uri} is unreachable ({reason}, {timeout:g} s "
                "timeout); start it, fix tracking_uri / MLFLOW_TRACKING_URI, or leave both "
                "empty to use the local store runs/mlflow.db"
            ) from None
    elif parsed.scheme == "sqlite":
        _local_folder_check(Path(uri[len("sqlite:///"):]), "MLflow store", uri)
    elif parsed.scheme in ("file", ""):
        _local_folder_check(Path(parsed.path or uri) / "x", "MLflow store", uri)


def check_milvus(uri: str, token: str = "", timeout: float = DEFAULT_TIMEOUT) -> None:
    """Check that Milvus at ``uri`` accepts connections, within ``timeout`` seconds.

    A local Milvus Lite path (``x.db``; ``""`` = ``<runs_dir>/milvus.db``) needs a writable
    folder and no other process holding it (:func:`lite_lock_holder`); ``http(s)://host:port`` and
    ``tcp://`` servers must accept a TCP connection (default port 19530). The token is not sent
    by this probe (it never appears in messages); a wrong token is reported by the client.

    Raises:
        ServiceUnreachableError: Naming the URI, what failed and the fix.
    """
    del token  # authentication is the client's to check; the probe is anonymous
    uri = uri or str(runs_dir() / "milvus.db")
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https", "tcp", "grpc"):
        _local_folder_check(Path(uri), "Milvus Lite file", uri)
        holder = lite_lock_holder(Path(uri))
        if holder is not None:
            pid, command = holder
            raise ServiceUnreachableError(
                f"Milvus Lite file {uri} is held by another process: pid {pid} ({command}); "
                f"stop it (a notebook kernel: shut it down in JupyterLab; else kill {pid}), or "
                f"serve the file to both (milvus-lite server --data-dir {uri} --port 19530, "
                "then milvus_uri: http://127.0.0.1:19530), or use backend: exact"
            )
        return
    host = parsed.hostname or "localhost"
    port = parsed.port or (443 if parsed.scheme == "https" else 19530)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise ServiceUnreachableError(
            f"Milvus at {uri} is unreachable ({err}, {timeout:g} s timeout); start the server, "
            "fix milvus_uri, or leave it empty to use Milvus Lite (a local file)"
        ) from None


# /proc/locks: "12: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF" (hex device)
_PROC_LOCK = re.compile(
    r"^\d+:\s+(?:->\s+)?FLOCK\s+\S+\s+WRITE\s+(\d+)\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s"
)


def lite_lock_holder(path: Path) -> tuple[int, str] | None:
    """The other process holding Milvus Lite's lock on ``path``: ``(pid, command line)``.

    Milvus Lite (3.x) keeps an exclusive ``flock`` on ``<path>/LOCK`` while a process has the
    database open (a JupyterLab kernel that ran a stage keeps it until the kernel stops). The
    lock is probed without waiting; its holder is read from ``/proc/locks`` (Linux), else from
    the open files under ``/proc/*/fd``. ``None`` when the file is free, held by this process
    (which reuses its own server), or on a system without ``fcntl``.
    """
    lock = Path(path).expanduser().resolve() / "LOCK"
    try:
        import fcntl

        fd = os.open(lock, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError:
        pass  # held: by whom?
    finally:
        os.close(fd)
    pids = _flock_pids(lock) or _open_by(lock)
    if os.getpid() in pids:
        return None
    if not pids:
        return -1, "a process this user cannot see"
    pid = pids[0]
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        command = " ".join(raw.decode(errors="replace").replace("\0", " ").split())
    except OSError:
        command = "command line unreadable"
    return pid, (command[:160] + "...") if len(command) > 160 else command


def _flock_pids(lock: Path) -> list[int]:
    """Pids of the ``flock`` write locks on ``lock`` listed in ``/proc/locks``."""
    try:
        st = lock.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    out = []
    for line in lines:
        m = _PROC_LOCK.match(line)
        if m and int(m[4]) == st.st_ino and (int(m[2], 16), int(m[3], 16)) == dev:
            out.append(int(m[1]))
    return out


def _open_by(lock: Path) -> list[int]:
    """Pids of the processes (of this user) with ``lock`` open, from ``/proc/*/fd``."""
    out = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(str(f.readlink()) == str(lock) for f in fd_dir.iterdir()):
                out.append(int(fd_dir.parent.name))
        except OSError:
            continue
    return out
