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

from embbench._errors import UserError
from embbench._utils import StorageError, storage_fault, writable_problem
from embbench.paths import cache_dir, reports_dir, runs_dir

__all__ = [
    "MLFLOW_HTTP_DEFAULTS",
    "MILVUS_CALL_TIMEOUT",
    "MILVUS_INDEX_TIMEOUT",
    "ServiceUnreachableError",
    "check_milvus",
    "check_storage",
    "check_tracking",
    "connection_failure",
    "explain_mid_run",
    "lite_lock_holder",
    "storage_fault_mid_run",
    "unreachable_mid_run",
]

DEFAULT_TIMEOUT = 3.0
# MLflow's HTTP client (mlflow 3.x reads these at each request; the user's environment wins):
# by default it waits 120 s per request and retries 7 times with backoff, so a tracking server
# that died mid-grid hung the run for many minutes. Here: about 10 s per request, 2 retries.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
}
# Seconds each pymilvus call may take, its retries included (pymilvus retries an unavailable
# server up to 75 times otherwise); override with EMBBENCH_MILVUS_TIMEOUT. Building an index
# and loading a collection get MILVUS_INDEX_TIMEOUT (an HNSW build of millions of rows).
MILVUS_CALL_TIMEOUT = 30.0
MILVUS_INDEX_TIMEOUT = 600.0

# What a dead or hung service looks like, wrapped by requests/urllib3/grpc/pymilvus.
_CONNECTION_NAMES = frozenset(
    {
        "ConnectionError",
        "ConnectTimeout",
        "ReadTimeout",
        "Timeout",
        "MaxRetryError",
        "NewConnectionError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "RemoteDisconnected",
        "ProtocolError",
        "_InactiveRpcError",
        "MilvusUnavailableException",
    }
)
_CONNECTION_TEXT = (
    "Max retries exceeded",
    "Connection refused",
    "timed out",
    "Connection aborted",
    "Connection reset",
    "RemoteDisconnected",
    "StatusCode.UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "Retry timeout",
    "server unavailable",
    "Fail connecting to server",
)


class ServiceUnreachableError(UserError, ConnectionError):
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
        _local_folder_check(Path(uri[len("sqlite:///") :]), "MLflow store", uri)
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


def connection_failure(err: BaseException) -> tuple[str, str] | None:
    """``(service, reason)`` when ``err`` (or what it wraps) is a lost connection, else ``None``.

    ``service`` is ``"milvus"`` when pymilvus/grpc raised it, else ``"mlflow"`` (requests or
    urllib3 under MLflow's client); ``reason`` is a short first line of the underlying error.
    """
    seen: set[int] = set()
    chain: list[BaseException] = []
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    service = (
        "milvus"
        if any(type(e).__module__.split(".")[0] in ("pymilvus", "grpc") for e in chain)
        else "mlflow"
    )
    for e in chain:
        text = str(e)
        if type(e).__name__ in _CONNECTION_NAMES or any(t in text for t in _CONNECTION_TEXT):
            first = (text.strip().splitlines() or [type(e).__name__])[0]
            return service, first[:200]
    return None


def unreachable_mid_run(err: BaseException, tracking_uri: str, milvus_uri: str) -> None:
    """Raise :class:`ServiceUnreachableError` naming the URI when ``err`` is a lost service.

    Called by the cell engine on an error raised while cells run; returns (so the caller
    re-raises ``err`` unchanged) when ``err`` is not a lost connection.
    """
    if isinstance(err, ServiceUnreachableError):
        return
    found = connection_failure(err)
    if found is None:
        return
    service, reason = found
    if service == "mlflow" and not tracking_uri.startswith(("http://", "https://")):
        return  # a local store has no connection to lose
    if service == "milvus":
        raise ServiceUnreachableError(
            f"Milvus at {milvus_uri} stopped answering mid-run ({reason}); finished cells' "
            "records are kept: start the server again (or fix milvus_uri) and rerun"
        ) from err
    raise ServiceUnreachableError(
        f"MLflow tracking server {tracking_uri} stopped answering mid-run ({reason}); finished "
        "cells' records are kept: start it again (or fix tracking_uri / MLFLOW_TRACKING_URI) "
        "and rerun"
    ) from err


def _storage_roots() -> dict[Path, str]:
    return {
        cache_dir(): "EMBBENCH_CACHE",
        runs_dir(): "EMBBENCH_RUNS",
        reports_dir(): "EMBBENCH_REPORTS",
    }


def check_storage() -> None:
    """Check that the cache, runs and reports folders (and their subfolders) can be written.

    Each is probed by writing a small file (:func:`embbench._utils.writable_problem`), so a
    read-only mount or a full disk is reported before any work instead of as a traceback
    halfway through a grid.

    Raises:
        StorageError: One line per folder that cannot be written, naming it and the fix.
    """
    problems = []
    for root, var in _storage_roots().items():
        problem = writable_problem(root, var)
        if problem is None and root.is_dir():
            # a read-only or full mount may sit one level down (cache/embeddings, runs/results)
            for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.is_mount()):
                problem = problem or writable_problem(sub, var)
        if problem:
            problems.append(problem)
    if problems:
        raise StorageError("\n".join(problems))


def storage_fault_mid_run(err: BaseException, tracking_uri: str) -> None:
    """Raise one line naming the path and the fix when ``err`` is a full or read-only disk.

    Returns (the caller re-raises ``err``) for any other error.
    """
    db = Path(tracking_uri[len("sqlite:///") :]) if tracking_uri.startswith("sqlite:///") else None
    fault = storage_fault(err, _storage_roots(), db)
    if fault is not None and fault is not err:
        raise fault from err


def explain_mid_run(err: BaseException, tracking_uri: str, milvus_uri: str) -> None:
    """Raise one line for a service lost or a disk full/read-only while a grid runs.

    Returns (the caller re-raises ``err`` unchanged) for any other error.
    """
    unreachable_mid_run(err, tracking_uri, milvus_uri)
    storage_fault_mid_run(err, tracking_uri)
