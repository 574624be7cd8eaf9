"""Fault injection through the public entry points: corrupt, truncated, busy, full, hostile.

Each case asserts the message names the file/URI and the fix, that no wrong number comes back,
and how much finished work was redone (images embedded again).
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import sqlite3
import stat
import threading

import numpy as np
import pandas as pd
import pytest
import torch

from embbench import _utils
from embbench.cache import CacheBusyError, CacheError, CorruptCacheError
from embbench.catalogue import CatalogueError
from embbench.datasets import fetch_urls
from embbench.embed import embed_split, embedding_cache
from embbench.manifest import from_manifest
from embbench.services import ServiceUnreachableError, check_milvus, check_tracking
from embbench.tracking import TrackingStoreError, ensure_sqlite_store
from tests.test_embed import TinyEmbedder

KW = {"batch_size": 4, "num_workers": 0, "progress": False, "shard_size": 4}


def _counting(emb):
    seen = []
    forward = emb.model.forward

    def counting(x):
        seen.append(len(x))
        return forward(x)

    emb.model.forward = counting
    return seen


@pytest.fixture
def emb():
    torch.manual_seed(0)
    return TinyEmbedder()


def _flip(path, offset=-64, n=16):
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[offset + i] ^= 0x80
    path.write_bytes(bytes(data))


def test_corrupt_consolidated_vectors_are_reembedded(small_demo, emb, caplog):
    good = np.array(embed_split(emb, small_demo, "test", **KW).vectors)
    cache = embedding_cache(emb, small_demo, "test")
    _flip(cache.path / "vectors.npy")
    with pytest.raises(CorruptCacheError, match=r"vectors\.npy fails its checksum"):
        cache.load()
    seen = _counting(emb)
    with caplog.at_level(logging.WARNING):
        es = embed_split(emb, small_demo, "test", **KW)
    assert np.array_equal(np.array(es.vectors), good)  # no wrong number
    assert "vectors.npy fails its checksum" in caplog.text
    assert any((cache.path / "corrupt").iterdir())
    assert sum(seen) == len(good)  # shards were not kept: the split is embedded once more


def test_corrupt_consolidated_rebuilt_from_kept_shards(small_demo, emb):
    good = np.array(embed_split(emb, small_demo, "test", keep_shards=True, **KW).vectors)
    cache = embedding_cache(emb, small_demo, "test")
    (cache.path / "vectors.npy").write_bytes((cache.path / "vectors.npy").read_bytes()[:100])
    with pytest.raises(CorruptCacheError, match="truncated"):
        cache.load()
    seen = _counting(emb)
    es = embed_split(emb, small_demo, "test", keep_shards=True, **KW)
    assert sum(seen) == 0 and np.array_equal(np.array(es.vectors), good)


@pytest.mark.parametrize("fault", ["flip", "truncate"])
def test_corrupt_shard_is_moved_aside_and_only_it_redone(
    small_demo, emb, monkeypatch, fault, caplog
):
    cache = embedding_cache(emb, small_demo, "test")
    real = cache.__class__.consolidate
    monkeypatch.setattr(
        cache.__class__, "consolidate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
    )
    with pytest.raises(KeyboardInterrupt):  # killed after every shard, before consolidation
        embed_split(emb, small_demo, "test", **KW)
    monkeypatch.setattr(cache.__class__, "consolidate", real)
    shard = cache.path / "shard-00001.npy"
    if fault == "flip":
        _flip(shard)
    else:
        shard.write_bytes(shard.read_bytes()[:150])
    seen = _counting(emb)
    with caplog.at_level(logging.WARNING):
        es = embed_split(emb, small_demo, "test", **KW)
    assert "shard-00001.npy" in caplog.text and "Failed to read all data" not in caplog.text
    assert sum(seen) == 4  # one shard of 4 images redone, the others kept
    assert (cache.path / "corrupt").is_dir()
    assert es.vectors.shape[0] == len(small_demo.split("test"))
    assert np.isfinite(np.array(es.vectors)).all()
    assert not list(cache.path.glob("shard-*"))


def test_non_finite_vectors_are_refused_naming_the_file(small_demo, emb):
    emb.model.append(torch.nn.Threshold(1e9, float("nan")))  # every output NaN
    with pytest.raises(CacheError, match=r"refusing to write .*shard-00000\.npy: \d+ NaN"):
        embed_split(emb, small_demo, "test", **KW)


def test_busy_split_names_the_holder(small_demo, emb):
    cache = embedding_cache(emb, small_demo, "test")
    held, release = threading.Event(), threading.Event()

    def hold():
        with cache.lock():
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        with pytest.raises(CacheBusyError, match=rf"pid \d+ on host {socket.gethostname()}"):
            embed_split(emb, small_demo, "test", lock_timeout=0.2, **KW)
    finally:
        release.set()
        t.join()


def test_two_identical_runs_at_once_embed_once(small_demo, emb):
    seen = _counting(emb)
    out, errors = [], []

    def run():
        try:
            out.append(embed_split(emb, small_demo, "test", **KW))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    n = len(small_demo.split("test"))
    assert sum(seen) == n  # the second run waited and reused the first one's vectors
    cache = embedding_cache(emb, small_demo, "test")
    assert sorted(p.name for p in cache.path.iterdir()) == [
        "failed.json",
        "ids.npy",
        "meta.json",
        "vectors.npy",
    ]


def test_disk_full_is_named(small_demo, emb, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_utils.os, "fsync", full)
    with pytest.raises(_utils.DiskFullError, match=r"disk full while writing .*/embeddings/"):
        embed_split(emb, small_demo, "test", **KW)
    monkeypatch.undo()
    cache = embedding_cache(emb, small_demo, "test")
    assert not list(cache.path.glob(".*.tmp"))


def test_cache_files_follow_the_umask(small_demo, emb):
    es = embed_split(emb, small_demo, "test", **KW)
    for p in es.path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, p  # group/other can read


def test_half_made_mlflow_store(tmp_path):
    empty = tmp_path / "a.db"
    con = sqlite3.connect(empty)
    con.execute("CREATE TABLE webhooks (x)")
    con.commit()
    con.close()
    ensure_sqlite_store(empty)  # repaired: moved aside and rebuilt
    assert list(tmp_path.glob("a.db.half-made-*"))
    tables = {
        r[0]
        for r in sqlite3.connect(empty).execute("SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert {"runs", "experiments", "alembic_version"} <= tables
    used = tmp_path / "b.db"
    con = sqlite3.connect(used)
    con.execute("CREATE TABLE runs (run_uuid TEXT)")
    con.execute("INSERT INTO runs VALUES ('r1')")
    con.commit()
    con.close()
    with pytest.raises(TrackingStoreError, match=rf"1 run\(s\)\. Move it aside \(mv {used} "):
        ensure_sqlite_store(used)


def test_unreachable_services_fail_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(ServiceUnreachableError, match=rf"{uri} is unreachable.*runs/mlflow\.db"):
        check_tracking(uri, timeout=1)
    with pytest.raises(ServiceUnreachableError, match=rf"Milvus at {uri} is unreachable"):
        check_milvus(uri, "secret-token", timeout=1)
    check_milvus("relative/milvus.db")  # a local Lite file only needs a writable folder


def test_manifest_confinement(tmp_path):
    root = tmp_path / "shop"
    root.mkdir()
    manifest = root / "m.csv"
    for path, pattern in (
        ("../../../../etc/passwd", r"row 3 .*outside the manifest's folder"),
        ("/etc/hosts", "allow_outside_root=True"),
        ("file:///etc/passwd", "only local paths and http"),
    ):
        pd.DataFrame({"path": ["a.jpg", path], "label": ["x", "y"]}).to_csv(manifest, index=False)
        with pytest.raises(CatalogueError, match=pattern):
            from_manifest(manifest)
    pd.DataFrame({"path": ["a.jpg", "/etc/hosts"], "label": ["x", "y"]}).to_csv(
        manifest, index=False
    )
    cat = from_manifest(manifest, allow_outside_root=True)
    assert cat.items["path"].tolist() == [str(root / "a.jpg"), "/etc/hosts"]


def test_fetch_refuses_private_hosts(tmp_path):
    from embbench.catalogue import Catalogue

    items = pd.DataFrame(
        {
            "item_id": ["a", "b"],
            "split": "test",
            "label": "x",
            "path": ["http://127.0.0.1:9/x.png", "http://169.254.169.254/latest"],
        }
    )
    cat = Catalogue("shop", items, ("label",), "label")
    with pytest.raises(Exception, match="loopback address; pass allow_private=True") as err:
        fetch_urls(cat, tmp_path, progress=False, retries=0)
    reasons = {f.url: f.reason for f in err.value.report.failed}
    assert "link-local" in reasons["http://169.254.169.254/latest"]
    assert "loopback" in reasons["http://127.0.0.1:9/x.png"]
    assert not json.loads((tmp_path / "images" / "index.json").read_text())["urls"]
