"""Faults of the services and folders a grid needs, with real processes and real file systems.

- An MLflow server killed mid-grid: the run stops within seconds with one line naming the URI,
  the finished cells' records are complete, and the rerun after the server returns completes.
- A Milvus Lite file corrupted after a run: the collection is rebuilt from the embedding cache
  with one warning line, and the metrics are those of the first run.
- A read-only or full cache/runs/reports folder: one line naming the path and the fix, exit 2,
  before any work (real tmpfs mounts; skipped where this process may not mount).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import embbench.cells as cells
from embbench.records import ResultStore
from embbench.services import ServiceUnreachableError
from embbench.stages.embed import EmbedConfig, EmbedSteps, run_embed

BIN = Path(sys.executable).parent
BASE = dict(models=["test_resnet"], datasets=["demo"], weights="random", batch_size=8,
            num_workers=0, backend="exact")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlflow(home: Path, port: int) -> subprocess.Popen:
    log = (home / "mlflow.log").open("a")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", str(home / "mlartifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    _kill(proc)
    raise RuntimeError(f"mlflow server did not come up; see {home / 'mlflow.log'}")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_server_killed_mid_grid_fails_in_seconds_and_the_rerun_completes(
        small_demo, monkeypatch, tmp_path):
    monkeypatch.setattr(cells, "load_catalogue", lambda *a, **k: small_demo)
    for var in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"):
        monkeypatch.delenv(var, raising=False)  # embbench's defaults, not a user's
    home = tmp_path / "server"
    home.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = EmbedConfig(**{**BASE, "models": ["test_resnet", "test_clip"], "tracking_uri": uri})
    server = _start_mlflow(home, port)
    produce = EmbedSteps.produce
    calls = []

    def dies_at_the_second_cell(self, cell, inputs):
        calls.append(cell.model)
        if len(calls) == 2:
            _kill(server)  # the server dies while the grid is running
        return produce(self, cell, inputs)

    monkeypatch.setattr(EmbedSteps, "produce", dies_at_the_second_cell)
    try:
        t0 = time.perf_counter()
        with pytest.raises(ServiceUnreachableError) as err:
            run_embed(cfg)
        elapsed = time.perf_counter() - t0
        assert calls == ["test_resnet", "test_clip"]
        message = str(err.value)
        assert len(message.splitlines()) == 1 and uri in message and "rerun" in message
        assert elapsed < 60, elapsed  # seconds, not minutes of retries (generous bound)
        (first,) = ResultStore().records()  # the finished cell's record, complete
        assert first.model == "test_resnet" and first.metrics and first.mlflow_run_id

        server = _start_mlflow(home, port)  # the server is back: the rerun completes
        table = run_embed(cfg)
        assert table["model"].tolist() == ["test_resnet", "test_clip"]
        assert table["mMP@5"].iloc[0] == first.metrics["mMP@5"]
        assert calls == ["test_resnet", "test_clip", "test_clip"]  # the first was kept
        assert len(ResultStore().records()) == 2
    finally:
        _kill(server)


@pytest.mark.slow
def test_corrupted_milvus_lite_collection_is_rebuilt_with_equal_metrics(
        small_demo, monkeypatch, caplog, capfd):
    from embbench.paths import runs_dir

    monkeypatch.setattr(cells, "load_catalogue", lambda *a, **k: small_demo)
    first = run_embed(EmbedConfig(**{**BASE, "backend": "milvus"}))
    files = [p for p in (runs_dir() / "milvus.db").rglob("*.json*") if "collections" in p.parts]
    assert files  # the collection's schema and manifest
    for path in files:  # garbage where Milvus Lite expects UTF-8 JSON
        path.write_bytes(b"\xff\xfe\x80" * 50)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        again = run_embed(EmbedConfig(**{**BASE, "backend": "milvus", "overwrite": "always"}))
    metrics = [c for c in first.columns if "@" in c]
    assert metrics and again[metrics].equals(first[metrics])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "cannot be read" in warnings[0] and "rebuilding it from the embedding cache" in \
        warnings[0] and str(runs_dir() / "milvus.db") in warnings[0]
    assert "Traceback" not in capfd.readouterr().err  # pymilvus' own handler stayed quiet
