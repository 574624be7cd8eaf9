"""Probes of the external services a run needs, with a short timeout, before any work.

:func:`check_tracking` asks an MLflow tracking server for ``/health``; :func:`check_milvus` opens
a TCP connection to a Milvus server (a Milvus Lite file needs a writable folder instead). Each
raises :class:`ServiceUnreachableError` naming the URI and the fix within seconds, instead of
minutes of retries once the work is done.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = ["ServiceUnreachableError", "check_milvus", "check_tracking"]

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

    A local Milvus Lite path (``x.db``) needs a writable folder; ``http(s)://host:port`` and
    ``tcp://`` servers must accept a TCP connection (default port 19530). The token is not sent
    by this probe (it never appears in messages); a wrong token is reported by the client.

    Raises:
        ServiceUnreachableError: Naming the URI, what failed and the fix.
    """
    del token  # authentication is the client's to check; the probe is anonymous
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https", "tcp", "grpc"):
        _local_folder_check(Path(uri), "Milvus Lite file", uri)
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
