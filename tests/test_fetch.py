"""fetch_urls against a local HTTP server that also serves failures."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from embbench.catalogue import Catalogue
from embbench.datasets import FetchError, fetch_urls


def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(buf, format="JPEG")
    return buf.getvalue()


IMAGES = {f"/img/{i}.png": _png((i * 40, 255 - i * 40, 7)) for i in range(4)}
IMAGES["/dup.png"] = IMAGES["/img/0.png"]  # same content under another URL
IMAGES["/photo"] = _jpeg((200, 10, 10))  # no suffix: the extension comes from the content


class _Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()
    stop = threading.Event()

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _send(
        self, code: int, body: bytes, length: int | None = None, ctype: str = "image/png"
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        path = self.path
        self.hits[path] += 1
        if path in IMAGES:
            self._send(200, IMAGES[path])
        elif path == "/flaky.png":  # 503 first, then the image
            if self.hits[path] == 1:
                self._send(503, b"busy", ctype="text/plain")
            else:
                self._send(200, _png((1, 2, 3)))
        elif path == "/slow.png":  # never answers within the client's timeout
            self.stop.wait(3)
            if not self.stop.is_set():
                self._send(200, _png((9, 9, 9)))
        elif path == "/trunc.jpg":  # promises 5,000 bytes, sends 100, closes
            self._send(200, IMAGES["/photo"][:100], length=5000, ctype="image/jpeg")
            self.close_connection = True
        elif path == "/page.png":  # an HTML page where an image was expected
            self._send(200, b"<html><body>Sorry</body></html>", ctype="text/html")
        elif path == "/big.png":
            self._send(200, b"\0" * 4096)
        else:
            self._send(404, b"not found", ctype="text/plain")


@pytest.fixture
def server():
    _Handler.hits = Counter()
    _Handler.stop = threading.Event()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # a free port
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler.hits
    finally:
        _Handler.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _catalogue(base: str, paths: list[str], local: Path | None = None) -> Catalogue:
    rows = [(f"item{i}", base + p, "test", f"c{i % 2}") for i, p in enumerate(paths)]
    if local is not None:
        rows.append(("local", str(local), "train", "c0"))
    items = pd.DataFrame(rows, columns=["item_id", "path", "split", "label"])
    return Catalogue(name="shop", items=items, label_columns=("label",), default_label="label")


OPTS = {
    "retries": 2,
    "backoff": 0.01,
    "timeout": 0.3,
    "concurrency": 4,
    "progress": False,
    "allow_private": True,
}  # the test server listens on 127.0.0.1


def test_fetch_report_and_rerun(server, tmp_path):
    base, hits = server
    local = tmp_path / "local.png"
    local.write_bytes(_png((5, 5, 5)))
    good = ["/img/0.png", "/img/1.png", "/img/2.png", "/dup.png", "/photo", "/flaky.png"]
    bad = ["/missing.png", "/slow.png", "/trunc.jpg", "/page.png"]
    paths = [*good, "/img/1.png", *bad]  # /img/1.png listed twice
    cache = tmp_path / "cache"
    start = time.perf_counter()
    cat, report = fetch_urls(_catalogue(base, paths, local), cache, **OPTS)
    assert time.perf_counter() - start < 6
    assert report.n_urls == len(good) + len(bad) and report.n_downloaded == len(good)
    assert report.n_cached == 0 and not report.ok
    reasons = {f.url.removeprefix(base): f for f in report.failed}
    assert set(reasons) == set(bad)
    assert reasons["/missing.png"].reason == "HTTP 404 Not Found"
    assert reasons["/missing.png"].attempts == 1 and hits["/missing.png"] == 1  # no retry
    assert "timed out" in reasons["/slow.png"].reason and reasons["/slow.png"].attempts == 3
    assert "truncated: received 100 of 5,000 bytes" in reasons["/trunc.jpg"].reason
    assert reasons["/trunc.jpg"].attempts == 3  # a dropped connection is retried
    assert reasons["/page.png"].reason.startswith("not a decodable image: not an image")
    assert reasons["/page.png"].attempts == 1
    assert reasons["/missing.png"].item_ids == (f"item{paths.index('/missing.png')}",)
    assert hits["/flaky.png"] == 2  # 503 then success
    assert hits["/img/1.png"] == 1  # a URL listed twice is downloaded once
    assert "/missing.png" in report.format() and "HTTP 404" in report.format()

    items = cat.items.set_index("item_id")
    assert len(items) == len(paths) + 1 - len(bad)
    assert items.loc["local", "path"] == str(local)  # local rows untouched
    for item_id, path in items["path"].items():
        p = Path(path)
        assert p.is_file(), item_id
        if item_id != "local":
            assert p.parent.parent == cache / "images" and p.parent.name == p.name[:2]
    assert items.loc["item0", "path"] == items.loc["item3", "path"]  # same content, one file
    assert items.loc["item4", "path"].endswith(".jpg")  # /photo: extension from the content
    index = json.loads((cache / "images" / "index.json").read_text())["urls"]
    assert set(index) == {base + p for p in good}

    before = hits.copy()
    cat2, report2 = fetch_urls(_catalogue(base, paths, local), cache, **OPTS)
    assert report2.n_cached == len(good) and report2.n_downloaded == 0
    for p in good:
        assert hits[p] == before[p]  # nothing fetched again
    assert hits["/missing.png"] == before["/missing.png"] + 1  # failures are retried on rerun
    assert cat2.items["path"].tolist() == cat.items["path"].tolist()


def test_fetch_size_limit_and_all_failed(server, tmp_path):
    base, hits = server
    with pytest.raises(FetchError, match="none of its 2 URLs") as err:
        fetch_urls(_catalogue(base, ["/big.png", "/nope.png"]), tmp_path, max_bytes=1000, **OPTS)
    reasons = {f.url.removeprefix(base): f.reason for f in err.value.report.failed}
    assert reasons["/big.png"] == "too large: 4,096 bytes > max_bytes 1,000"
    assert hits["/big.png"] == 1


def test_no_urls_is_a_no_op(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(_png((1, 1, 1)))
    cat = _catalogue("", [], p)
    out, report = fetch_urls(cat, tmp_path / "cache", progress=False)
    assert out is cat and report.n_urls == 0 and report.ok
    assert not (tmp_path / "cache").exists()


def test_a_manifest_of_urls_is_fetched_by_the_cell_engine(server, tmp_path):
    # stage 01 used to treat http(s) rows as file paths; the engine fetches them first
    from embbench.cells import load_catalogue

    base, hits = server
    csv = tmp_path / "shop" / "catalogue.csv"
    csv.parent.mkdir()
    csv.write_text(
        "path,label,split\n"
        + "".join(
            f"{base}{p},{lab},test\n" for p, lab in (("/img/1.png", "a"), ("/img/2.png", "b"))
        )
    )
    with pytest.raises(Exception, match="private|loopback"):
        load_catalogue("manifest", {"manifest": str(csv)}, progress=False)  # 127.0.0.1 refused
    assert not hits
    cat = load_catalogue(
        "manifest", {"manifest": str(csv)}, progress=False, options={"allow_private": True}
    )
    assert len(cat.items) == 2 and all(Path(p).is_file() for p in cat.items["path"])
    assert hits["/img/1.png"] == 1 and hits["/img/2.png"] == 1
