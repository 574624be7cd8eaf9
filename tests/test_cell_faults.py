"""Faults at the cell level: a crash mid-cell, two runs of one grid at once, services down."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import mlflow
import pytest

from embbench.cells import GridError
from embbench.records import ResultStore
from embbench.services import ServiceUnreachableError
from embbench.stages.embed import EmbedConfig, EmbedSteps, run_embed


class _Crash(RuntimeError):
    pass


def _cell_runs():
    from embbench.tracking import setup_mlflow

    setup_mlflow()  # the project's store (this process may not have opened it yet)
    runs = mlflow.search_runs(experiment_names=["embbench"], output_format="list")
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


@pytest.mark.slow
def test_a_crash_mid_cell_leaves_one_run_per_cell(demo_cells, embed_options, monkeypatch):
    cfg = EmbedConfig(**embed_options)
    produce = EmbedSteps.produce

    def crash(self, cell, inputs):
        produce(self, cell, inputs)  # the work is done (and cached) ...
        raise _Crash("killed")  # ... then the process dies before the record

    monkeypatch.setattr(EmbedSteps, "produce", crash)
    with pytest.raises(_Crash):
        run_embed(cfg)
    (failed,) = _cell_runs()
    assert failed.info.status == "FAILED"  # not left RUNNING
    assert ResultStore().records() == []  # no number recorded
    monkeypatch.setattr(EmbedSteps, "produce", produce)
    run_embed(cfg)
    (run,) = _cell_runs()  # the rerun resumed the same run: one run per cell, ever
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    (rec,) = ResultStore().records()
    assert rec.mlflow_run_id == run.info.run_id
    run_embed(cfg)  # finished: skipped, nothing new
    assert len(_cell_runs()) == 1


@pytest.mark.slow
def test_two_runs_of_one_grid_compute_each_cell_once(small_demo, embed_options, tmp_path):
    # the second process waits for the first's cell lock, then skips the finished cell
    script = textwrap.dedent(f"""
        import embbench
        embbench.setup_logging()
        import embbench.cells as cells
        from embbench.demo import make_demo_catalogue
        from embbench.stages.embed import EmbedConfig, run_embed
        cat = make_demo_catalogue({str(small_demo.root)!r}.rsplit("/", 1)[0],
                                  n_categories=4, products_per_category=3, views=(4, 2, 3),
                                  image_size=48)
        cells.load_catalogue = lambda *a, **k: cat
        run_embed(EmbedConfig(**{embed_options!r}))
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert len(ResultStore().records()) == 1
    assert len(_cell_runs()) == 1
    assert sum("finished earlier" in e for e in errs) == 1  # the other one skipped it


def test_unreachable_services_fail_in_seconds_naming_the_uri(demo_cells, embed_options):
    t0 = time.perf_counter()
    cfg = EmbedConfig(**{**embed_options, "backend": "milvus", "milvus_uri": "http://127.0.0.1:9"})
    with pytest.raises(GridError, match="127.0.0.1:9"):
        run_embed(cfg)
    cfg = EmbedConfig(**{**embed_options, "tracking_uri": "http://127.0.0.1:9"})
    with pytest.raises(ServiceUnreachableError, match="127.0.0.1:9"):
        run_embed(cfg)
    assert time.perf_counter() - t0 < 30
    assert ResultStore().records() == []
