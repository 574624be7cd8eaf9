"""The one Milvus client: who talks to pymilvus, the server limits, batching and padding."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import embbench
from embbench.retrieval import milvus_collection as mc
from embbench.retrieval.milvus_collection import MilvusCollection

PACKAGE = Path(embbench.__file__).parent


class _FakeClient:
    """Records the calls a MilvusCollection makes; search answers ``hits`` ids per query."""

    def __init__(self, hits: int, fail_index: bool = False) -> None:
        self.hits, self.fail_index = hits, fail_index
        self.calls: list[tuple[str, Any]] = []
        self.inserted: list[list[int]] = []
        self.present: set[str] = set()

    def has_collection(self, name, timeout=None):
        return name in self.present

    def drop_collection(self, name, timeout=None):
        self.calls.append(("drop", name))
        self.present.discard(name)

    def create_schema(self, **kw):
        return SimpleNamespace(add_field=lambda *a, **k: None)

    def create_collection(self, name, schema=None, timeout=None):
        self.present.add(name)

    def insert(self, name, rows, timeout=None):
        self.inserted.append([r["id"] for r in rows])

    def flush(self, name, timeout=None):
        self.calls.append(("flush", name))

    def prepare_index_params(self):
        return SimpleNamespace(add_index=lambda *a, **k: None)

    def create_index(self, name, params, sync=True, timeout=None):
        if self.fail_index:
            raise RuntimeError("unknown index_type")
        self.calls.append(("index", sync))

    def load_collection(self, name, timeout=None):
        self.calls.append(("load", name))

    def search(self, name, data, limit, output_fields, search_params, timeout):
        self.calls.append(("search", len(data)))
        n = min(limit, self.hits)
        return [
            SimpleNamespace(ids=list(range(n)), distances=[1.0 - 0.1 * j for j in range(n)])
            for _ in range(len(data))
        ]


def _collection(client: _FakeClient) -> MilvusCollection:
    col = MilvusCollection("http://127.0.0.1:1", token="", timeout=5)
    col._client = client  # connected
    return col


def test_only_the_collection_module_talks_to_pymilvus_and_names_the_caps():
    """One client: MilvusClient is opened in one module, and 16,384 is defined there only."""
    clients, caps = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "MilvusClient(" in text:
            clients.append(path.name)
        for line in text.splitlines():
            if re.search(r"\b16_?384\b", line) and not line.startswith("PAIR_CHUNK"):
                caps.append(f"{path.name}: {line.strip()}")
    assert clients == ["milvus_collection.py"]
    assert all(c.startswith("milvus_collection.py") for c in caps), caps
    assert len(caps) == 2  # MAX_NQ and MAX_TOPK, once each


def test_search_splits_at_the_nq_cap_and_pads_short_hits(monkeypatch):
    monkeypatch.setattr(mc, "MAX_NQ", 2)
    client = _FakeClient(hits=3)
    ids, scores = _collection(client).search("c", np.zeros((5, 4), np.float32), 4, "IP", {})
    assert [c for c in client.calls if c[0] == "search"] == [("search", 2)] * 2 + [("search", 1)]
    assert ids.shape == scores.shape == (5, 4)
    assert (ids[:, :3] == [0, 1, 2]).all() and (ids[:, 3] == -1).all()
    assert np.isneginf(scores[:, 3]).all() and scores[0, 0] == np.float32(1.0)
    with pytest.raises(ValueError, match="topk cap"):
        _collection(client).search("c", np.zeros((1, 4), np.float32), mc.MAX_TOPK + 1, "IP", {})


def test_build_inserts_under_the_grpc_budget_then_flushes_indexes_and_loads(monkeypatch):
    d = 4
    monkeypatch.setattr(mc, "GRPC_INSERT_BUDGET", 3 * (4 * d + 32))  # 3 rows per insert call
    client = _FakeClient(hits=0)
    keys = np.arange(10, 17, dtype=np.int64)
    build_s = _collection(client).build("c", np.ones((7, d), np.float32), keys, "FLAT", "IP", {})
    assert build_s >= 0
    assert client.inserted == [[10, 11, 12], [13, 14, 15], [16]]
    assert [c[0] for c in client.calls] == ["flush", "index", "load"]
    assert ("index", True) in client.calls  # a server waits for its index


def test_a_failed_build_drops_the_collection_only_when_asked():
    for drop in (False, True):
        client = _FakeClient(hits=0, fail_index=True)
        with pytest.raises(RuntimeError, match="unknown index_type"):
            _collection(client).build(
                "c",
                np.ones((2, 4), np.float32),
                np.arange(2),
                "IVF_PQ",
                "IP",
                {},
                drop_on_failure=drop,
            )
        assert ("c" in client.present) is not drop


HOLD = """
import sys, time
from pymilvus import MilvusClient
client = MilvusClient(uri=sys.argv[1])
print("holding", flush=True)
time.sleep(300)
"""


def test_a_lite_file_held_elsewhere_names_its_holder(tmp_path):
    db = tmp_path / "held.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(db)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        col = MilvusCollection(str(db), owner="MilvusBackend")
        with pytest.raises(RuntimeError, match=f"cannot open .*held by pid {holder.pid}: "):
            col.connect()
    finally:
        holder.kill()
        holder.wait()


def test_lite_builds_the_index_with_the_parameters_asked_and_the_check_catches_it(
    tmp_path, monkeypatch
):
    """Milvus Lite 3.2 reads build params only from a ``params`` JSON key; pymilvus 3 sends them
    flat, so Lite built a 32-row IVF with 32 lists instead of 1 (nprobe=1: one hit per query)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    col = MilvusCollection(str(tmp_path / "m.db"))
    try:
        col.build("c", x, np.arange(32), "IVF_FLAT", "IP", {"nlist": 1})
        assert col.reuse("c", 32, {"nlist": 1})
        ids, _ = col.search("c", x[:4], 8, "IP", {"nprobe": 1})
        assert (ids >= 0).all()  # one list holds everything: nprobe=1 finds every candidate
        monkeypatch.setattr(MilvusCollection, "is_lite", lambda self: False)  # the flat form
        with pytest.raises(RuntimeError, match=r"without the build parameters asked: asked "):
            col.build("c", x, np.arange(32), "IVF_FLAT", "IP", {"nlist": 1})
        assert not col.reuse("c", 32, {"nlist": 1})  # a collection built so is not reused
    finally:
        col.close()


# ---- a long-lived client of a milvus-lite server ----------------------------------------------
_FAST_PINGS = {  # pymilvus' pings (every 10 s, also without calls), 20 times as often
    "grpc.keepalive_time_ms": 500,
    "grpc.http2.max_pings_without_data": 0,
}


@pytest.mark.parametrize("engine", ["server", "file"])
def test_a_lite_client_idles_without_being_sent_away(
    engine, services, tmp_path, monkeypatch, capfd
):
    """A Milvus Lite client that idles (a Ray worker training between cells) keeps its
    connection: pymilvus' pings, made frequent, got GOAWAY too_many_pings within seconds."""
    from pymilvus.client import grpc_handler

    create = grpc_handler.GrpcHandler._create_grpc_channel

    def fast_pings(self, address=None):
        self._grpc_options = {**_FAST_PINGS, **self._grpc_options}  # a caller's options win
        return create(self, address)

    monkeypatch.setattr(grpc_handler.GrpcHandler, "_create_grpc_channel", fast_pings)
    if engine == "server":
        port = services.free_port()
        services.start("milvus", tmp_path, port)
        col = MilvusCollection(f"http://127.0.0.1:{port}")
    else:
        col = MilvusCollection(str(tmp_path / "lite.db"))  # its server runs in this process
    assert col.is_lite()
    client = col.connect()
    states: list[str] = []
    client._handler._channel.subscribe(lambda state: states.append(state.name))
    time.sleep(4)  # idle: 8 pings at 0.5 s; the server's default policy sends away the third
    assert client.list_collections(timeout=10) == []
    col.close()
    err = capfd.readouterr().err
    assert "Received a GOAWAY" not in err, err[-2000:]
    assert states and set(states) == {"READY"}, states  # the connection was never dropped
