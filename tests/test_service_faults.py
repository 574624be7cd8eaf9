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
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
import yaml

from embbench.records import ResultRecord, ResultStore
from embbench.services import ServiceUnreachableError
from embbench.stages.embed import EmbedConfig, EmbedSteps, run_embed


def _wait_for_milvus(uri: str, timeout: float = 60.0) -> None:
    """Until a pymilvus client of this process answers (its gRPC channel is up again)."""
    from pymilvus import MilvusClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            client = MilvusClient(uri=uri, timeout=5)
            client.list_collections()
            client.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


class Outage(NamedTuple):
    """What a grid did when its server died at the second cell, and when it was rerun."""

    uri: str  # the server's address
    message: str  # the error's message
    elapsed: float  # seconds to the error
    first: ResultRecord  # the finished cell's record
    rerun: pd.DataFrame  # the rerun's table (the server back on the same port)
    calls: list[str]  # the models produced over both runs


def _server_dies_at_the_second_cell(
    services, monkeypatch, kind: str, home: Path, options: Callable[[str], dict]
) -> Outage:
    """Run a two-model grid (``options(uri)``) whose ``kind`` server is killed as the second
    cell starts; then start the server again and rerun the grid."""
    port = services.free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = EmbedConfig(**{**options(uri), "models": ["test_resnet", "test_clip"]})
    server = services.start(kind, home, port)
    produce = EmbedSteps.produce
    calls = []

    def dies_at_the_second_cell(self, cell, inputs):
        calls.append(cell.model)
        if len(calls) == 2:
            services.kill(server)  # the server dies while the grid is running
        return produce(self, cell, inputs)

    monkeypatch.setattr(EmbedSteps, "produce", dies_at_the_second_cell)
    t0 = time.perf_counter()
    with pytest.raises(ServiceUnreachableError) as err:
        run_embed(cfg)
    elapsed = time.perf_counter() - t0
    (first,) = ResultStore().records()
    services.start(kind, home, port)
    if kind == "milvus":
        _wait_for_milvus(uri)
    return Outage(uri, str(err.value), elapsed, first, run_embed(cfg), calls)


@pytest.mark.slow
def test_mlflow_server_killed_mid_grid_fails_in_seconds_and_the_rerun_completes(
    demo_cells, embed_options, services, monkeypatch, tmp_path
):
    for var in (
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    ):
        monkeypatch.delenv(var, raising=False)  # embbench's defaults, not a user's
    out = _server_dies_at_the_second_cell(
        services, monkeypatch, "mlflow", tmp_path / "server",
        lambda uri: {**embed_options, "tracking_uri": uri},
    )  # fmt: skip
    assert len(out.message.splitlines()) == 1 and out.uri in out.message
    assert "rerun" in out.message
    assert out.elapsed < 60, out.elapsed  # seconds, not minutes of retries (generous bound)
    first = out.first  # the finished cell's record, complete
    assert first.model == "test_resnet" and first.metrics and first.mlflow_run_id
    assert out.rerun["model"].tolist() == ["test_resnet", "test_clip"]  # the server is back
    assert out.rerun["mMP@5"].iloc[0] == first.metrics["mMP@5"]
    assert out.calls == ["test_resnet", "test_clip", "test_clip"]  # the first was kept
    assert len(ResultStore().records()) == 2


@pytest.mark.slow
def test_milvus_server_killed_mid_grid_fails_in_seconds_naming_the_uri(
    demo_cells, embed_options, services, monkeypatch, tmp_path
):
    monkeypatch.delenv("EMBBENCH_MILVUS_TIMEOUT", raising=False)
    out = _server_dies_at_the_second_cell(
        services, monkeypatch, "milvus", tmp_path / "milvus",
        lambda uri: {**embed_options, "backend": "milvus", "milvus_uri": uri},
    )  # fmt: skip
    assert len(out.message.splitlines()) == 1 and f"Milvus at {out.uri}" in out.message
    assert out.elapsed < 60, out.elapsed  # pymilvus alone retries for minutes (generous bound)
    assert out.first.model == "test_resnet" and out.first.metrics
    assert out.rerun["model"].tolist() == ["test_resnet", "test_clip"]  # back: the rerun completes
    assert out.calls == ["test_resnet", "test_clip", "test_clip"]  # the first cell kept


@pytest.mark.slow
def test_corrupted_milvus_lite_collection_is_rebuilt_with_equal_metrics(
    demo_cells, embed_options, caplog, capfd
):
    from embbench.paths import runs_dir

    first = run_embed(EmbedConfig(**{**embed_options, "backend": "milvus"}))
    files = [p for p in (runs_dir() / "milvus.db").rglob("*.json*") if "collections" in p.parts]
    assert files  # the collection's schema and manifest
    for path in files:  # garbage where Milvus Lite expects UTF-8 JSON
        path.write_bytes(b"\xff\xfe\x80" * 50)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        again = run_embed(
            EmbedConfig(**{**embed_options, "backend": "milvus", "overwrite": "always"})
        )
    metrics = [c for c in first.columns if "@" in c]
    assert metrics and again[metrics].equals(first[metrics])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert (
        "cannot be read" in warnings[0]
        and "rebuilding it from the embedding cache" in warnings[0]
        and str(runs_dir() / "milvus.db") in warnings[0]
    )
    assert "Traceback" not in capfd.readouterr().err  # pymilvus' own handler stayed quiet


# ---- read-only and full folders, through the CLI ---------------------------------------------
@pytest.fixture
def mounts():
    """Mount small tmpfs file systems (real EROFS/ENOSPC); skipped where mounting is refused."""
    done: list[Path] = []

    def mount(target: Path, options: str) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {res.stderr}")
        done.append(target)
        return target

    yield mount
    for target in reversed(done):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _remount(target: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(target)], check=True)


def _cli_embed(tmp_path: Path, capsys, options: dict) -> tuple[int, list[str]]:
    """``embbench embed -f tiny.yaml`` of ``options``; its status and its stderr lines."""
    from embbench.cli import main

    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump(options))
    capsys.readouterr()
    status = main(["embed", "-f", str(params)])
    return status, capsys.readouterr().err.splitlines()


def _one_error_line(lines: list[str]) -> str:
    errors = [ln for ln in lines if ln.startswith("embbench embed: error:")]
    assert len(errors) == 1 and not any("Traceback" in ln for ln in lines), lines
    return errors[0]


@pytest.mark.slow
def test_read_only_cache_folder_is_one_line_before_any_work(
    demo_cells, embed_options, tmp_path, capsys, mounts
):
    from embbench.paths import cache_dir

    cache = mounts(cache_dir(), "size=8m")
    (cache / "embeddings").mkdir()
    _remount(cache, "ro")
    status, lines = _cli_embed(tmp_path, capsys, embed_options)
    line = _one_error_line(lines)
    assert status == 2
    assert line.startswith(f"embbench embed: error: {cache}") and "EMBBENCH_CACHE" in line
    assert "read-only" in line
    assert ResultStore().records() == []  # nothing ran, nothing recorded
    _remount(cache, "rw")  # fixed: the rerun completes
    status, lines = _cli_embed(tmp_path, capsys, embed_options)
    assert status == 0, lines
    assert len(ResultStore().records()) == 1


@pytest.mark.slow
def test_full_runs_folder_is_one_line_before_any_work(
    demo_cells, embed_options, tmp_path, capsys, mounts
):
    from embbench.paths import runs_dir

    runs = mounts(runs_dir(), "size=256k")
    with (runs / "filler").open("wb") as fh, pytest.raises(OSError):  # fill it up
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    status, lines = _cli_embed(tmp_path, capsys, embed_options)
    line = _one_error_line(lines)
    assert status == 2 and f"disk full while writing {runs} " in line and "EMBBENCH_RUNS" in line
    assert not list((runs_dir()).glob("results/**/*.json"))


@pytest.mark.slow
def test_runs_folder_filling_up_mid_run_is_one_line_and_nothing_half_made(
    demo_cells, embed_options, monkeypatch, tmp_path, capsys, mounts
):
    from embbench.paths import runs_dir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = mounts(runs_dir(), "size=256k")  # room for the probe, not for the MLflow store (~1 MB)
    status, lines = _cli_embed(tmp_path, capsys, embed_options)
    line = _one_error_line(lines)
    assert status == 2
    assert (
        line.startswith(
            f"embbench embed: error: MLflow store: disk full while writing {runs / 'mlflow.db'} "
        )
        and "EMBBENCH_RUNS" in line
    )
    assert not (runs / "mlflow.db").exists() and not list(runs.glob(".mlflow.db.*"))  # no half
    assert ResultStore().records() == []
    subprocess.run(["umount", "-l", str(runs)], check=True)  # space again: the rerun completes
    status, lines = _cli_embed(tmp_path, capsys, embed_options)
    assert status == 0, lines
    assert len(ResultStore().records()) == 1


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (30, "is on a read-only file system"),
        (28, "disk full while writing"),
        (13, "is not writable by this user"),
    ],
)
def test_write_probe_names_the_folder_and_the_fix(tmp_path, monkeypatch, code, words):
    """The probe behind the engine's check, where no file system can be mounted (no root)."""
    import errno

    from embbench import _utils

    def failing_open(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    assert code in (errno.EROFS, errno.ENOSPC, errno.EACCES)
    monkeypatch.setattr(_utils, "open", failing_open, raising=False)
    line = _utils.writable_problem(tmp_path / "cache", "EMBBENCH_CACHE")
    assert line is not None and len(line.splitlines()) == 1
    assert f"{tmp_path / 'cache'}" in line and words in line and "EMBBENCH_CACHE" in line
    assert not list((tmp_path / "cache").iterdir())  # no probe file left behind
    monkeypatch.undo()
    assert _utils.writable_problem(tmp_path / "cache", "EMBBENCH_CACHE") is None


def test_mlflow_store_full_mid_run_becomes_one_line(tmp_path):
    import sqlite3

    from embbench._utils import DiskFullError, storage_fault

    db = tmp_path / "runs" / "mlflow.db"
    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as inner:
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full") from inner
    except RuntimeError as err:
        fault = storage_fault(err, {tmp_path / "runs": "EMBBENCH_RUNS"}, db)
    assert isinstance(fault, DiskFullError)
    assert fault.strerror.startswith(f"MLflow store: disk full while writing {db} ")
    assert "EMBBENCH_RUNS" in fault.strerror and len(str(fault).splitlines()) == 1
    assert storage_fault(ValueError("x"), {}, db) is None
