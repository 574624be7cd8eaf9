"""The grid as a Kubeflow pipeline: the compiled full grid, and a tiny grid run end to end with
kfp's local runner against a Milvus Lite server and an MLflow tracking server."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kfp")
pytest.importorskip("kfp.kubernetes")

from embbench._malloc import PROCESS_ENV  # noqa: E402
from embbench.pipeline import compile_pipeline, group_params, pipeline_grid  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params"
BIN = Path(sys.executable).parent


# ---- the paper's full grid, compiled -----------------------------------------------------------
@pytest.fixture(scope="module")
def full_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    files = sorted(PARAMS.glob("0*.yaml"))
    grid = compile_pipeline(
        group_params(files),
        out,
        image="registry.example/embbench:1",
        gpu_node_selector={"pool": "gpu"},
    )
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    return grid, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _grid_size(notebook: str) -> tuple[int, int]:
    cfg = yaml.safe_load((PARAMS / f"{notebook}.yaml").read_text())
    return len(cfg["models"]), len(cfg["datasets"])


def test_full_grid_task_count_matches_the_params(full_grid):
    grid, spec, _ = full_grid
    n01, n02, n03 = (_grid_size(nb) for nb in ("01_embed", "02_finetune", "03_toptune"))
    c04 = yaml.safe_load((PARAMS / "04_crosstune.yaml").read_text())
    per_mode = len(c04["models"]) * sum(
        1 for t in c04["datasets"] for s in c04["finetuned_on"] if s != t
    )
    from embbench.models import get_model_spec, text_capable

    c01 = yaml.safe_load((PARAMS / "01_embed.yaml").read_text())
    n_text = sum(text_capable(get_model_spec(m)) for m in c01["models"])
    text_tasks = [t for t in c01["tasks"] if t != "image-image"]
    baselines = yaml.safe_load((PARAMS / "03_toptune.yaml").read_text())["baselines"]
    expected_tasks = {
        "image-image": n01[0] * n01[1] + n03[0] * n03[1],  # 01 pretrained and 03 top-tuned
        **{t: n_text * n01[1] for t in text_tasks},  # text-image models only
        **{b: n03[0] * n03[1] for b in baselines},  # every model
    }
    assert n_text == 8 and len(text_tasks) == 3 and len(baselines) == 2
    expected = {
        "pretrained": n01[0] * n01[1]
        + n_text * n01[1] * len(text_tasks)
        + n03[0] * n03[1] * len(baselines),
        "fine-tuned": n02[0] * n02[1],
        "top-tuned": n03[0] * n03[1],
        "cross-tuned": per_mode,
        "cross-top-tuned": len(c04["models"])
        * sum(1 for t in c04["datasets"] for s in c04["toptuned_on"] if s != t),
    }
    assert Counter(c.cell.mode for c in grid.cells) == expected
    got = Counter(c.cell.task for c in grid.cells if c.notebook in ("01_embed", "03_toptune"))
    assert got == expected_tasks
    tasks = spec["root"]["dag"]["tasks"]
    # + the report; 517 before the text tasks (8 models x 6 datasets x 3) and the baselines
    assert len(tasks) == sum(expected.values()) + 1 == 517 + 144 + 2 * 114


def test_full_grid_dependencies_follow_the_stage_order(full_grid):
    grid, spec, _ = full_grid
    tasks = spec["root"]["dag"]["tasks"]
    by_label = {t["taskInfo"]["name"]: name for name, t in tasks.items()}
    deps = {
        t["taskInfo"]["name"]: {tasks[d]["taskInfo"]["name"] for d in t.get("dependentTasks", [])}
        for t in tasks.values()
    }
    assert deps["03 top-tuned resnet50 on sop"] == {"01 pretrained resnet50 on sop"}
    assert deps["04 cross-tuned resnet50 on sop (from cars196)"] == {
        "02 fine-tuned resnet50 on cars196",
        "01 pretrained resnet50 on sop",
    }
    assert deps["04 cross-top-tuned vit_b16 on fashion (from rp2k)"] == {
        "03 top-tuned vit_b16 on rp2k",
        "01 pretrained vit_b16 on fashion",
    }
    assert deps["01 pretrained resnet50 on sop"] == set()
    # text and baseline cells wait for the image cell whose cached vectors they reuse
    assert deps["01 pretrained zero-shot siglip_b16 on sop"] == {"01 pretrained siglip_b16 on sop"}
    assert deps["03 pretrained probe resnet50 on sop"] == {"01 pretrained resnet50 on sop"}
    assert deps["02 fine-tuned resnet50 on cars196"] == set()
    assert deps["05 report"] == set(by_label) - {"05 report"}
    # every cell task carries its cell key as its cache key; keys are unique
    keys = [t["cachingOptions"]["cacheKey"] for t in tasks.values()]
    assert len(set(keys)) == len(keys)
    assert all(t["cachingOptions"].get("enableCache") for t in tasks.values())
    assert all(t["retryPolicy"]["maxRetryCount"] == 3 for t in tasks.values())


def test_full_grid_resources_secrets_and_volume(full_grid):
    _, spec, k8s = full_grid
    tasks = spec["root"]["dag"]["tasks"]
    executors = spec["deploymentSpec"]["executors"]
    seen = Counter()
    for task in tasks.values():
        label = task["taskInfo"]["name"]
        mode = "report" if label == "05 report" else label.split()[1]
        exe = task["componentRef"]["name"].replace("comp-", "exec-")
        container = executors[exe]["container"]
        res = container["resources"]
        gpus = int(res.get("accelerator", {}).get("resourceCount", 0))
        want = {"pretrained": 1, "fine-tuned": 4, "cross-tuned": 1}.get(mode, 0)
        assert gpus == want, label
        if gpus:
            assert "accelerator_type" in res["accelerator"]["resourceType"]
            assert k8s[exe]["nodeSelector"]["labels"] == {"pool": "gpu"}
            assert k8s[exe]["tolerations"][0]["key"] == "nvidia.com/gpu"
        else:
            assert "nodeSelector" not in k8s[exe], label
        assert res["resourceCpuLimit"] and res["resourceMemoryLimit"]
        if mode in ("top-tuned", "cross-top-tuned", "report"):
            assert (res["resourceCpuLimit"], res["resourceMemoryLimit"]) == ("2", "8G")
        if mode == "fine-tuned":
            nproc = task["inputs"]["parameters"]["nproc"]["runtimeValue"]["constant"]
            assert int(nproc) == 4  # torchrun --nproc_per_node=4 inside the task
        assert container["image"] == "registry.example/embbench:1"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["EMBBENCH_RUNS"] == "/mnt/embbench/runs"
        assert env["EMBBENCH_CACHE"] == "/mnt/embbench/cache"
        assert {k: env[k] for k in PROCESS_ENV} == PROCESS_ENV  # glibc's allocator settings
        assert k8s[exe]["pvcMount"][0]["mountPath"] == "/mnt/embbench"
        secret_env = {m["envVar"] for m in k8s[exe]["secretAsEnv"][0]["keyToEnv"]}
        assert {"MILVUS_TOKEN", "MLFLOW_TRACKING_TOKEN"} <= secret_env
        seen[mode] += 1
    # secrets are environment variables, never parameters
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"params", "milvus_uri", "tracking_uri", "accelerator_type"}
    assert "TOKEN" not in json.dumps(params)
    assert seen["report"] == 1


def test_cheap_task_check_keeps_kfps_check_and_restores_it():
    # kfp's own check calls inspect.stack() on every setter (minutes for the full grid once
    # TensorFlow is loaded); while building, the same check runs without it.
    from types import SimpleNamespace

    from kfp.dsl.pipeline_task import PipelineTask

    from embbench.pipeline.build import _cheap_task_checks

    original = PipelineTask.__dict__["_ensure_container_spec_exists"]
    with _cheap_task_checks():
        assert PipelineTask.__dict__["_ensure_container_spec_exists"] is not original

        def set_cpu_limit(task):
            PipelineTask._ensure_container_spec_exists(task)

        set_cpu_limit(SimpleNamespace(container_spec=object()))  # a container task: fine
        with pytest.raises(ValueError, match="set_cpu_limit can only be used on single-step"):
            set_cpu_limit(SimpleNamespace(container_spec=None))
    assert PipelineTask.__dict__["_ensure_container_spec_exists"] is original


def test_group_params_names_notebooks():
    got = group_params(["params/01_embed.yaml", "params/smoke/01_embed.yaml", "05_analysis=x.yml"])
    assert got == {
        "01_embed": [Path("params/01_embed.yaml"), Path("params/smoke/01_embed.yaml")],
        "05_analysis": [Path("x.yml")],
    }
    from embbench.config import ConfigError

    with pytest.raises(ConfigError, match="NOTEBOOK=path"):
        group_params(["my_models.yaml"])


def test_run_cell_rejects_a_cell_outside_the_grid():
    from embbench.cli import main

    files = ["-f", str(PARAMS / "01_embed.yaml"), "-f", str(PARAMS / "smoke" / "01_embed.yaml")]
    assert main(["run-cell", "01_embed", *files, "--model", "resnet50", "--dataset", "demo"]) == 2


# ---- a tiny grid end to end with kfp's local runner ---------------------------------------------
@pytest.fixture
def milvus_server(services, tmp_path):
    port = services.free_port()
    services.start("milvus", tmp_path, port)
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def mlflow_server(services, tmp_path):
    port = services.free_port()
    services.start("mlflow", tmp_path, port)
    return f"http://127.0.0.1:{port}"


def _tiny_params() -> dict[str, list[Path]]:
    """Pretrained, fine-tuned, top-tuned, cross-tuned and the report, at smoke size."""
    notebooks = ["01_embed", "02_finetune", "03_toptune", "04_crosstune", "05_analysis"]
    return {nb: [PARAMS / f"{nb}.yaml", PARAMS / "smoke" / f"{nb}.yaml"] for nb in notebooks}


def _cell_runs() -> list:
    """The experiment's cell runs (a training or a trial is a child run of its cell's run)."""
    import mlflow

    runs = mlflow.search_runs(experiment_names=["embbench"], output_format="list")
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


@pytest.mark.slow
def test_local_pipeline_end_to_end(tmp_path, monkeypatch, milvus_server, mlflow_server):
    import mlflow

    from embbench.pipeline import run_local
    from embbench.records import ResultStore

    monkeypatch.chdir(ROOT)  # the tasks run `python -m embbench` of this checkout
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    params = _tiny_params()
    grid = pipeline_grid(params)
    cells = grid.cells
    assert {c.cell.mode for c in cells} == {
        "pretrained",
        "fine-tuned",
        "top-tuned",
        "cross-tuned",
        "cross-top-tuned",
    }

    t0 = time.perf_counter()
    run_local(
        params, milvus_uri=milvus_server, tracking_uri=mlflow_server, pipeline_root=tmp_path / "kfp"
    )
    first_s = time.perf_counter() - t0

    store = ResultStore()
    # a text-image task also scores the catalogue's item texts (the demo's titles): a cell the
    # engine adds once the data is loaded, nested under its task's run like a deployment variant
    every = store.records()
    records = [
        r
        for r in every
        if not (r.task == "text-image" and "item-text" in r.details.get("text_source", ""))
    ]
    assert len(every) - len(records) == sum(c.cell.task == "text-image" for c in cells) > 0
    cross = ("cross-tuned", "cross-top-tuned")  # a cell's source: where a cross cell came from
    assert sorted(
        (r.mode, r.task, r.model, r.dataset, r.tuned_on if r.mode in cross else None)
        for r in records
    ) == sorted(
        (c.cell.mode, c.cell.task, c.cell.model, c.cell.dataset, c.cell.source) for c in cells
    )
    # probe and kNN classify (no search); the text tasks search their small galleries exactly
    assert all(r.backend == "none" for r in records if r.task in ("probe", "knn"))
    assert all(r.backend in ("milvus", "exact") for r in records if r.task not in ("probe", "knn"))
    assert any(r.backend == "milvus" for r in records)  # searched in the Milvus Lite server
    saved = {r.config_hash: r.saved for r in every}

    mlflow.set_tracking_uri(mlflow_server)
    runs = _cell_runs()
    run_ids = sorted(r.info.run_id for r in runs)
    assert len(run_ids) == len(cells)  # exactly one MLflow run per cell
    assert sorted(r.mlflow_run_id for r in records) == run_ids
    report = Path(os.environ["EMBBENCH_REPORTS"]) / "report.html"
    assert report.is_file() and "embbench smoke report" in report.read_text(encoding="utf-8")
    html = list((tmp_path / "kfp").rglob("report*"))
    assert any(p.is_file() for p in html)  # the report task's HTML artifact

    # a second submission of the same pipeline recomputes nothing (kfp's cache off: every
    # task runs, and the cell engine skips its finished cell)
    report.unlink()
    t0 = time.perf_counter()
    run_local(
        params,
        milvus_uri=milvus_server,
        tracking_uri=mlflow_server,
        pipeline_root=tmp_path / "kfp2",
    )
    second_s = time.perf_counter() - t0
    again = ResultStore().records()
    assert {r.config_hash: r.saved for r in again} == saved
    assert sorted(r.info.run_id for r in _cell_runs()) == run_ids
    assert report.is_file()
    sys.stdout.write(
        f"\nlocal pipeline: {len(cells)} cells + report, first {first_s:.0f} s, "
        f"second {second_s:.0f} s\n"
    )
    shutil.rmtree(tmp_path / "kfp", ignore_errors=True)


def test_a_local_pipeline_that_cannot_run_fails_before_any_task(tmp_path):
    """run-local checks what a notebook checks before its first cell, once, before kfp starts."""
    pytest.importorskip("kfp")
    from embbench.cells_validate import GridError
    from embbench.pipeline import run_local

    params = _tiny_params()
    text = tmp_path / "text.yaml"  # text tasks asked of image-only models
    text.write_text("models: [test_resnet]\ntasks: [image-image, text-image]\n")
    params["01_embed"].append(text)
    with pytest.raises(GridError, match="text-image model"):
        run_local(params, pipeline_root=tmp_path / "kfp")
    assert not (tmp_path / "kfp").exists()  # no task ran
