"""Download catalogues whose paths are image URLs into a local content-addressed cache.

Marketplace exports list image URLs, not files. :func:`fetch_urls` downloads each distinct URL
once into ``<cache>/images/<sha256[:2]>/<sha256>.<ext>`` (identical images share one file) and
records ``url -> sha256`` in ``<cache>/images/index.json`` (written atomically), so a rerun
downloads only what is missing. Downloads run on a bounded thread pool with retries and
exponential backoff on 5xx, 429, timeouts and dropped connections (never on 404 or other 4xx),
a size limit, and a check that the bytes decode as an image. Rows that fail are removed from the
returned catalogue and listed in the :class:`FetchReport` with the URL and the reason.

Only public hosts are fetched: a URL whose host resolves to a loopback, link-local, private,
multicast, reserved or unspecified address is refused (``allow_private=True`` lifts this, e.g.
for an intranet image server or a test server on 127.0.0.1), and each redirect hop is checked
the same way. (A DNS answer that changes between the check and the connection is not caught.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from embbench import paths
from embbench._utils import atomic_write_json
from embbench.catalogue import Catalogue, CatalogueError
from embbench.images import BadImageError, load_rgb
from embbench.progress import progress_bar

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
USER_AGENT = "embbench/0.1 (+https://github.com; python-urllib)"
_EXT = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
    "MPO": "jpg",
}
_CHUNK = 1 << 16


class FetchError(CatalogueError):
    """No URL of a catalogue could be fetched; ``report`` lists why for each."""

    def __init__(self, message: str, report: FetchReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class FetchFailure:
    """One URL that could not be fetched.

    Attributes:
        url: The URL.
        reason: Why (HTTP status, timeout, too large, truncated, not an image...).
        item_ids: The catalogue rows that point at it (removed from the result).
        attempts: Download attempts made.
    """

    url: str
    reason: str
    item_ids: tuple[str, ...]
    attempts: int = 1


@dataclass
class FetchReport:
    """What :func:`fetch_urls` did.

    Attributes:
        n_urls: Distinct URLs in the catalogue.
        n_downloaded: URLs downloaded by this call.
        n_cached: URLs already in the cache (nothing downloaded).
        bytes_downloaded: Bytes received by this call.
        failed: The URLs that could not be fetched, with reasons.
        seconds: Wall time.
        cache_dir: The image cache folder.
    """

    n_urls: int = 0
    n_downloaded: int = 0
    n_cached: int = 0
    bytes_downloaded: int = 0
    failed: list[FetchFailure] = field(default_factory=list)
    seconds: float = 0.0
    cache_dir: str = ""

    @property
    def ok(self) -> bool:
        """Every URL is available locally."""
        return not self.failed

    def format(self) -> str:
        """The report as text: totals, then every failure with its reason."""
        lines = [
            f"{self.n_urls:,} URLs: {self.n_downloaded:,} downloaded "
            f"({self.bytes_downloaded / 1e6:.1f} MB), {self.n_cached:,} already cached, "
            f"{len(self.failed):,} failed, in {self.seconds:.1f} s (cache {self.cache_dir})"
        ]
        for f in self.failed:
            lines.append(f"  - {f.url}: {f.reason} ({len(f.item_ids)} rows removed)")
        return "\n".join(lines)


class _Retryable(Exception):
    """A failure worth retrying (5xx, 429, timeout, connection dropped, truncated body)."""


class _Fatal(Exception):
    """A failure not worth retrying (404 and other 4xx, too large, not an image)."""

    def __init__(self, reason: str, attempts: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts


def is_url(path: str) -> bool:
    """Whether ``path`` is an http(s) URL."""
    return isinstance(path, str) and path.startswith(("http://", "https://"))


def _read_index(index_path: Path) -> dict[str, dict]:
    if not index_path.is_file():
        return {}
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        logger.warning(
            "fetch index %s is unreadable (%s); starting a new one (the images "
            "already cached are kept and re-found by content)",
            index_path,
            err,
        )
        return {}
    return data.get("urls", {}) if isinstance(data, dict) else {}


def _write_index(index_path: Path, urls: dict[str, dict]) -> None:
    atomic_write_json(index_path, {"version": 1, "urls": urls})  # with the user's umask


def check_public_url(url: str, *, allow_private: bool = False) -> None:
    """Refuse ``url`` unless it is http(s) and its host resolves only to public addresses.

    Raises:
        _Fatal: With the reason (not http(s), unresolvable, or a non-public address).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Fatal(f"refused: {url!r} is not an http(s) URL")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as err:
        raise _Retryable(f"connection failed: cannot resolve {parts.hostname} ({err})") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if not addr.is_global or addr.is_multicast:
            kind = next(
                (
                    k
                    for k in (
                        "loopback",
                        "link_local",
                        "private",
                        "multicast",
                        "reserved",
                        "unspecified",
                    )
                    if getattr(addr, f"is_{k}")
                ),
                "non-public",
            )
            raise _Fatal(
                f"refused: host {parts.hostname} resolves to {addr}, a {kind.replace('_', '-')} "
                "address; pass allow_private=True to fetch from private networks"
            )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Check every redirect hop's host like the first URL's."""

    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        self.allow_private = allow_private

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        check_public_url(newurl, allow_private=self.allow_private)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, *, timeout: float, max_bytes: int, allow_private: bool = False) -> bytes:
    check_public_url(url, allow_private=allow_private)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    opener = urllib.request.build_opener(_CheckedRedirects(allow_private))
    try:
        with opener.open(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            if expected is not None and expected > max_bytes:
                raise _Fatal(f"too large: {expected:,} bytes > max_bytes {max_bytes:,}")
            chunks, got = [], 0
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                got += len(chunk)
                if got > max_bytes:
                    raise _Fatal(f"too large: more than max_bytes {max_bytes:,} bytes")
                chunks.append(chunk)
    except urllib.error.HTTPError as err:
        if err.code >= 500 or err.code == 429:
            raise _Retryable(f"HTTP {err.code} {err.reason}") from None
        raise _Fatal(f"HTTP {err.code} {err.reason}") from None
    except TimeoutError:
        raise _Retryable(f"timed out after {timeout:g} s") from None
    except http.client.IncompleteRead as err:
        raise _Retryable(f"truncated: connection closed after {len(err.partial):,} bytes") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise _Retryable(f"timed out after {timeout:g} s") from None
        raise _Retryable(f"connection failed: {err.reason}") from None
    except (ConnectionError, http.client.HTTPException, OSError) as err:
        raise _Retryable(f"connection failed: {type(err).__name__}: {err}") from None
    if expected is not None and got < expected:
        raise _Retryable(f"truncated: received {got:,} of {expected:,} bytes")
    return b"".join(chunks)


def _store(data: bytes, images_dir: Path) -> tuple[str, str]:
    """Check ``data`` decodes and move it into the cache; return ``(sha256, relative path)``."""
    sha = hashlib.sha256(data).hexdigest()
    shard = images_dir / sha[:2]
    shard.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{sha[:8]}-", suffix=".part", dir=shard)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared cache from the team
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    try:
        load_rgb(tmp)  # every pixel decodes, and it is not a decompression bomb
        with Image.open(tmp) as im:
            ext = _EXT.get(im.format or "", "img")
    except BadImageError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _Fatal(f"not a decodable image: {err.reason}") from None
    final = shard / f"{sha}.{ext}"
    if final.exists():
        Path(tmp).unlink(missing_ok=True)
    else:
        Path(tmp).replace(final)
    return sha, final.relative_to(images_dir).as_posix()


def _fetch_one(
    url: str,
    images_dir: Path,
    *,
    retries: int,
    backoff: float,
    timeout: float,
    max_bytes: int,
    stop: threading.Event,
    allow_private: bool = False,
) -> tuple[str, str, int, int]:
    """Download, check and store one URL; return ``(sha, rel_path, bytes, attempts)``."""
    attempt = 0
    while True:
        attempt += 1
        try:
            data = _download(url, timeout=timeout, max_bytes=max_bytes, allow_private=allow_private)
            sha, rel = _store(data, images_dir)
            return sha, rel, len(data), attempt
        except _Retryable as err:
            if attempt > retries or stop.is_set():
                raise _Fatal(f"{err} (after {attempt} attempts)", attempt) from None
            delay = backoff * (2 ** (attempt - 1))
            logger.debug("%s: %s; retry %d in %.2f s", url, err, attempt, delay)
            if stop.wait(delay):
                raise _Fatal(f"{err} (interrupted)", attempt) from None
        except _Fatal as err:
            suffix = f" (after {attempt} attempts)" if attempt > 1 else ""
            raise _Fatal(f"{err.reason}{suffix}", attempt) from None


def fetch_urls(
    catalogue: Catalogue,
    cache_dir: str | Path | None = None,
    *,
    concurrency: int = 8,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 20,
    max_bytes: int = 20_000_000,
    progress: bool = True,
    allow_private: bool = False,
) -> tuple[Catalogue, FetchReport]:
    """Download the rows whose path is an http(s) URL; return a catalogue of local files.

    Args:
        catalogue: A catalogue (rows with local paths are kept as they are).
        cache_dir: Cache root (default :func:`embbench.paths.cache_dir`); images go to
            ``<cache_dir>/images/``.
        concurrency: Parallel downloads.
        retries: Extra attempts after a retryable failure (5xx, 429, timeout, dropped
            connection, truncated body).
        backoff: First retry delay in seconds; doubles at each retry.
        timeout: Seconds to wait for the connection and for each read.
        max_bytes: Largest accepted download.
        progress: Show a progress bar.
        allow_private: Also fetch from loopback, link-local and private addresses (refused by
            default, for the first URL and every redirect).

    Returns:
        ``(catalogue, report)``: the catalogue with local paths and without the rows that
        failed, and the report listing each failure with its URL and reason.

    Raises:
        FetchError: Every row failed (the report is attached as ``err.report``).
    """
    start = time.perf_counter()
    images_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir()
    images_dir = images_dir / "images"
    index_path = images_dir / INDEX_NAME
    items = catalogue.items
    url_mask = items["path"].map(is_url)
    report = FetchReport(cache_dir=str(images_dir))
    if not url_mask.any():
        report.seconds = time.perf_counter() - start
        return catalogue, report
    ids_by_url: dict[str, list[str]] = {}
    for url, item_id in zip(
        items.loc[url_mask, "path"], items.loc[url_mask, "item_id"], strict=True
    ):
        ids_by_url.setdefault(url, []).append(str(item_id))
    report.n_urls = len(ids_by_url)
    index = _read_index(index_path)
    local: dict[str, str] = {}
    todo = []
    for url in ids_by_url:
        entry = index.get(url)
        if entry and (images_dir / entry["path"]).is_file():
            local[url] = str(images_dir / entry["path"])
        else:
            todo.append(url)
    report.n_cached = len(local)
    failures: dict[str, tuple[str, int]] = {}
    stop = threading.Event()
    if todo:
        images_dir.mkdir(parents=True, exist_ok=True)
        logger.info(
            "fetching %d URLs (%d already cached) into %s", len(todo), len(local), images_dir
        )
        bar = progress_bar(
            total=len(todo), desc="fetching images", unit="img", disable=not progress
        )
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
        try:
            futures = {
                pool.submit(
                    _fetch_one,
                    url,
                    images_dir,
                    retries=retries,
                    backoff=backoff,
                    timeout=timeout,
                    max_bytes=max_bytes,
                    stop=stop,
                    allow_private=allow_private,
                ): url
                for url in todo
            }
            since_flush = 0
            for fut in as_completed(futures):
                url = futures[fut]
                try:
                    sha, rel, size, _ = fut.result()
                except _Fatal as err:
                    failures[url] = (err.reason, err.attempts)
                else:
                    index[url] = {"sha256": sha, "path": rel, "bytes": size}
                    local[url] = str(images_dir / rel)
                    report.n_downloaded += 1
                    report.bytes_downloaded += size
                    since_flush += 1
                    if since_flush >= 500:  # keep progress if the run is interrupted
                        _write_index(index_path, index)
                        since_flush = 0
                bar.update(1)
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            _write_index(index_path, index)
    report.failed = [
        FetchFailure(url=u, reason=r, item_ids=tuple(ids_by_url[u]), attempts=a)
        for u, (r, a) in sorted(failures.items())
    ]
    report.seconds = time.perf_counter() - start
    for f in report.failed:
        logger.warning("could not fetch %s: %s", f.url, f.reason)
    new_paths = [local.get(p) if is_url(p) else p for p in items["path"]]
    keep = [p is not None for p in new_paths]
    new_items = items[keep].reset_index(drop=True)
    new_items["path"] = [p for p in new_paths if p is not None]
    if new_items.empty:
        raise FetchError(
            f"catalogue {catalogue.name!r}: none of its {report.n_urls} URLs could be fetched; "
            f"first failure: {report.failed[0].url}: {report.failed[0].reason}",
            report,
        )
    source = {
        **catalogue.source,
        "fetched": {"cache": str(images_dir), "failed": len(report.failed)},
    }
    fetched = dataclasses.replace(catalogue, items=new_items, source=source)
    return fetched, report
