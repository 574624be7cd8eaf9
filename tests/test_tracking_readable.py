"""MLflow a person can read: run names, cell parameters, source, input dataset, nesting, the
ML view of the UI, metric names; and a held Milvus Lite file reported before any work.

The stage tests run tiny real cells (a timm test model on the small demo catalogue, a
synthetic top-tuning cell) and read the tracking store back with MlflowClient.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from embbench._utils import metric_key, metric_name
from embbench.tracking import setup_mlflow, source_tags, ui_link

ROOT = Path(__file__).resolve().parent.parent


def _runs(experiment: str = "embbench") -> list:
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


# ---- metric names -------------------------------------------------------------------------------
def test_metric_names_map_both_ways_because_mlflow_refuses_at(tmp_path):
    setup_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", "embbench")
    refused = pytest.raises(mlflow.exceptions.MlflowException, match="Names may only contain")
    with mlflow.start_run(), refused:
        mlflow.log_metric("mMP@5", 0.5)  # if MLflow ever accepts it, log the real name
    for name in ("mMP@5", "mR@1", "MAP@10", "NDCG@5"):
        assert metric_name(metric_key(name)) == name and "@" not in metric_key(name)


# ---- source -------------------------------------------------------------------------------------
def test_source_is_the_notebook_or_the_cli():
    nb = {"EMBBENCH_NOTEBOOK": "/p/notebooks/01_embed.ipynb"}
    assert source_tags([], nb) == {
        "mlflow.source.type": "NOTEBOOK",
        "mlflow.source.name": "/p/notebooks/01_embed.ipynb",
    }
    lab = source_tags(
        ["/v/lib/ipykernel_launcher.py", "-f", "k.json"],
        {"JPY_SESSION_NAME": "/p/notebooks/05_analysis.ipynb"},
    )
    assert lab["mlflow.source.name"].endswith("05_analysis.ipynb")
    cli = source_tags(["/v/bin/embbench", "--debug", "run-cell", "x"], {})
    assert cli == {"mlflow.source.type": "LOCAL", "mlflow.source.name": "embbench run-cell"}
    assert source_tags(["/v/lib/embbench/__main__.py", "nb"], {})["mlflow.source.name"] == (
        "embbench nb"
    )
    assert source_tags(["/v/bin/pytest"], {}) == {}  # MLflow's own guess stays


# ---- a stage 01 cell and its deployment variant -------------------------------------------------
@pytest.mark.slow
def test_stage01_runs_read_well_in_mlflow(demo_cells, embed_options, monkeypatch):
    from embbench.stages.embed import EmbedConfig, run_embed

    notebook = str(ROOT / "notebooks" / "01_embed.ipynb")
    monkeypatch.setenv("EMBBENCH_NOTEBOOK", notebook)
    cfg = EmbedConfig(
        **embed_options | {"models": ["test_resnet", "test_vit"], "batch_size": 16},
        compressions=["int8"],
        variant_models=["test_resnet"],
    )
    run_embed(cfg)
    runs = {r.info.run_name: r for r in _runs()}
    # one readable name per cell: stage/model/dataset[/variant]
    assert sorted(runs) == [
        "embed/test_resnet/demo",
        "embed/test_resnet/demo/int8",
        "embed/test_vit/demo",
    ]
    plain, variant = runs["embed/test_resnet/demo"], runs["embed/test_resnet/demo/int8"]
    # the variant is nested under its plain cell's run
    assert variant.data.tags["mlflow.parentRunId"] == plain.info.run_id
    assert "mlflow.parentRunId" not in plain.data.tags
    # only the cell's own parameters: its model, dataset, mode, variant, hyper-parameters
    p = plain.data.params
    assert (p["model"], p["dataset"], p["mode"], p["stage"]) == (
        "test_resnet",
        "demo",
        "pretrained",
        "embed",
    )
    assert variant.data.params["variant"] == "int8" and "variant" not in p
    assert not [k for k in p if k.startswith("config.") or k in ("models", "datasets")]
    assert not [v for v in p.values() if "test_vit" in v]  # no other cell's model
    assert p["k"] == "5" and p["label"] == "product" and p["weights"] == "random"
    # the two models' runs differ in their model (what "show diff only" shows), same keys
    other = runs["embed/test_vit/demo"].data.params
    assert set(other) == set(p)
    assert {k for k in p if p[k] != other[k]} == {"model"}
    # the notebook is the run's source
    for run in runs.values():
        assert run.data.tags["mlflow.source.type"] == "NOTEBOOK"
        assert run.data.tags["mlflow.source.name"] == notebook
    # the catalogue is the run's input dataset: name, root, fingerprint, scored split
    (inp,) = plain.inputs.dataset_inputs
    assert inp.dataset.name == "demo" and inp.dataset.digest == demo_cells.fingerprint()
    assert str(Path(demo_cells.root).resolve()) in inp.dataset.source
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "test"
    # the metrics under the mapped names; the analysis reads the runs back
    assert "mMP_at_5" in plain.data.metrics
    from embbench.analysis.load import mlflow_records

    recs = mlflow_records()
    assert {r.model for r in recs} == {"test_resnet", "test_vit"}
    assert all("mMP@5" in r.metrics for r in recs)


# ---- stage 03: trials nested under the cell -----------------------------------------------------
@pytest.mark.slow
def test_toptune_trials_are_named_and_nested_under_their_cell(tmp_path):
    from test_toptune import synthetic, tiny_cfg, toptune_synthetic

    cat, sets = synthetic()
    record = toptune_synthetic(tiny_cfg(), cat, sets)
    cell = mlflow.get_run(record.mlflow_run_id)
    assert cell.info.run_name == "toptune/test_resnet/demo"
    assert cell.data.params["model"] == "test_resnet" and "models" not in cell.data.params
    assert cell.data.params["units"] == "[16, 32]"  # the cell's hyper-parameter space
    trials = [r for r in _runs() if r.data.tags.get("run_kind") == "trial"]
    assert trials and all(r.data.tags["mlflow.parentRunId"] == cell.info.run_id for r in trials)
    assert all(re.fullmatch(r"toptune/test_resnet/demo/trial-\w+", r.info.run_name) for r in trials)
    (inp,) = cell.inputs.dataset_inputs
    assert inp.dataset.digest == cat.fingerprint()


@pytest.mark.slow
def test_finetune_training_run_logs_its_cells_parameters_not_the_grid(demo_cells):
    from test_finetune import TINY

    from embbench.stages.finetune import FinetuneConfig, finetune_job, make_trainer

    cfg = FinetuneConfig(**{**TINY, "models": ["test_resnet", "test_vit"]})
    params = make_trainer(cfg, finetune_job(cfg, "test_resnet", "demo")).run_params
    assert (params["model"], params["dataset"], params["stage"]) == (
        "test_resnet",
        "demo",
        "finetune",
    )
    assert "config" not in params and "models" not in params and params["epochs"] == 1


# ---- the UI opens on the runs table in the ML view ----------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _page_text(chromium, url: str, profile: Path) -> str:
    """The visible text of the page at ``url`` (scripts and styles dropped)."""
    dom = chromium.dom(url, profile, budget_ms=15000)
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", dom, flags=re.S)
    return " | ".join(t.strip() for t in re.split(r"<[^>]+>", dom) if t.strip())


@pytest.mark.slow
@pytest.mark.browser
def test_printed_ui_link_opens_the_runs_in_the_ml_view(services, chromium, tmp_path):
    uri = setup_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", "embbench")
    with mlflow.start_run(run_name="embed/test_resnet/demo"):
        mlflow.log_metric("mMP_at_5", 0.5)
    port = services.free_port()
    base = f"http://127.0.0.1:{port}"
    services.start("mlflow", tmp_path, port)  # serves the store above (tmp_path/mlflow.db)
    link = ui_link("embbench", uri, base)
    exp_id = mlflow.MlflowClient(uri).get_experiment_by_name("embbench").experiment_id
    assert link == f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    ml = _page_text(chromium, link, tmp_path / "p1")
    assert "embed/test_resnet/demo" in ml
    assert "Model registry" in ml and "Evaluation runs" not in ml  # the ML side bar
    # why the link carries the view: MLflow 3.17 ignores the experiment's kind tag and
    # opens the same page in its GenAI view (runs as "Evaluation runs")
    plain = _page_text(chromium, link.split("?")[0], tmp_path / "p2")
    assert "Evaluation runs" in plain


# ---- a Milvus Lite file held by another process -------------------------------------------------
HOLD = """
import sys, time
from pymilvus import MilvusClient
client = MilvusClient(uri=sys.argv[1])
print("holding", flush=True)
time.sleep(300)
"""


@pytest.mark.slow
def test_held_milvus_lite_file_is_reported_before_any_work(demo_cells, embed_options, tmp_path):
    from embbench.cells import GridError
    from embbench.paths import cache_dir
    from embbench.stages.embed import EmbedConfig, run_embed

    db = tmp_path / "held" / "milvus.db"
    db.parent.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(db)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        cfg = EmbedConfig(
            **{**embed_options, "batch_size": 16, "backend": "milvus", "milvus_uri": str(db)}
        )
        with pytest.raises(GridError) as err:
            run_embed(cfg)
        lines = [ln for ln in str(err.value).splitlines() if "Milvus Lite" in ln]
        assert len(lines) == 1, str(err.value)
        line = lines[0]
        assert f"pid {holder.pid}" in line and "pymilvus" in line  # the holder, by command
        assert "milvus-lite server" in line and "backend: exact" in line  # the fixes
        # nothing was embedded or tracked before the report
        assert not list(cache_dir().rglob("vectors.npy"))
        assert not (tmp_path / "runs" / "mlflow.db").exists()
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone the same grid runs on the file
    table = run_embed(cfg)
    assert table["mMP@5"].between(0, 1).all()
