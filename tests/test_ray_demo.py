"""The demo's grid on a local 2-node Ray cluster, a worker node killed, against the demo itself.

Both runs use the files ``embbench demo`` layers for each stage (``params/<nb>.yaml``,
``params/small/`` where a stage has one, ``params/demo/``) plus one trim per stage that keeps
every kind of cell the demo has (real packaged ImageNet weights, the text tasks of the CLIP
control, the index variants on Milvus, the transfer recipe, cross-tuning from demo to demo_b,
the report) with fewer models and products and smaller training budgets, to fit CI. The
reference is what ``make demo`` runs (each notebook through papermill, 05 rendered as the
report); the Ray run is ``embbench ray run``'s :func:`run_on_ray` on a head with no CPUs and
two 1-CPU worker nodes, searching a Milvus server (a Milvus Lite file is one process's). The
whole demo (five models) was compared the same way by hand (README, "Ray").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("01_embed", "02_finetune", "03_toptune", "04_crosstune", "05_analysis")
ONE = "{products_per_category: 1}"
TRIM = {  # the demo's grid, fewer models and products (every stage and task kept)
    "01_embed": f"models: [efficientnet_lite0, tiny_clip_random]\ndata_options: {{demo: {ONE}}}\n",
    "02_finetune": f"models: [efficientnet_lite0]\ndata_options: {{demo: {ONE}}}\nepochs: 2\n",
    "03_toptune": f"models: [efficientnet_lite0]\ndata_options: {{demo: {ONE}}}\n"
    "max_trials: 1\nsearch_epochs: 3\nfinal_epochs: 10\n",
    "04_crosstune": f"models: [efficientnet_lite0]\ndata_options: {{demo: {ONE}, demo_b: {ONE}}}\n",
    "05_analysis": "n_boot: 50\n",
}

pytestmark = [pytest.mark.slow, pytest.mark.notebook]


def _demo_params(tmp_path: Path) -> dict[str, list[Path]]:
    from embbench.cli import _params_for

    out = {}
    for nb in NOTEBOOKS:
        trim = tmp_path / f"trim_{nb}.yaml"
        trim.write_text(TRIM[nb])
        out[nb] = _params_for(nb, ROOT, [str(trim)], demo=True)
    return out


def _home(monkeypatch, home: Path) -> None:
    for var in ("EMBBENCH_CACHE", "EMBBENCH_RUNS", "EMBBENCH_REPORTS"):
        monkeypatch.setenv(var, str(home / var.lower()))


def _records() -> dict[tuple, object]:
    from embbench.records import ResultStore

    out = {}
    for r in ResultStore().records():
        lin = r.lineage
        variant = json.dumps(lin.variant, sort_keys=True)
        text = r.details.get("text_source", "")  # class prompts or the items' titles
        key = (r.stage, r.mode, r.task, r.model, r.dataset, lin.finetuned_on, lin.toptuned_on)
        key += (variant, text)
        assert key not in out, f"two records for {key}"
        out[key] = r
    return out


def _mlflow_runs() -> list:
    """The MLflow runs of the home's store.

    Read with a client: ``mlflow.set_tracking_uri`` would export the URI to the environment,
    which ``embbench ray run`` hands to its workers.
    """
    import mlflow

    from embbench.tracking import default_tracking_uri

    client = mlflow.MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("embbench")
    return client.search_runs([exp.experiment_id], max_results=5000)


def _top(runs: list) -> list:
    """The cells' runs (not the nested runs of their variants)."""
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def test_the_demo_grid_on_ray_equals_the_demo_and_survives_a_lost_node(
    tmp_path, monkeypatch, services, ray_cluster
):
    from embbench.notebook_graph import run_graph
    from embbench.pipeline.ray_grid import RayOptions, RayResources, RayRunError, run_on_ray
    from embbench.records import ResultStore

    params = _demo_params(tmp_path)
    port = services.free_port()
    services.start("milvus", tmp_path / "milvus", port)
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("EMBBENCH_DATA", str(tmp_path / "data"))  # generated once, shared

    # what `make demo` runs: two notebooks at once on 2 cores, their Lite file served by a
    # milvus-lite server of run_graph's own
    _home(monkeypatch, tmp_path / "demo")
    outputs, report = run_graph([(nb, params[nb]) for nb in NOTEBOOKS])
    assert report.is_file() and len(outputs) == 5
    assert (tmp_path / "demo" / "embbench_runs" / "milvus.db").exists()
    demo = _records()
    demo_runs = _mlflow_runs()

    # the same grid on the cluster; the first cell to finish kills the other worker node
    _home(monkeypatch, tmp_path / "ray")
    cluster, workers = ray_cluster
    # asking for GPUs this cluster lacks fails before any work
    gpu = {"pretrained": RayResources(1, 1)}
    with pytest.raises(RayRunError, match="01 pretrained .* 1 GPU"):
        run_on_ray(params, RayOptions(address=cluster.address, milvus_uri=uri, resources=gpu))
    assert not ResultStore().records()
    by_id = {w.node_id: w for w in workers}
    killed: list[str] = []

    def kill_other_node(result: dict) -> None:
        if not killed:
            killed.append(next(n for n in by_id if n != result["node"]))
            cluster.remove_node(by_id[killed[0]], allow_graceful=False)

    result = run_on_ray(
        params,
        RayOptions(
            address=cluster.address,
            milvus_uri=uri,
            resources={"fine-tuned": RayResources(1, 0)},  # the worker nodes have 1 CPU each
            max_retries=2,
        ),
        on_result=kill_other_node,
    )
    assert killed and result.report and Path(result.report).is_file()
    survivor = next(n for n in by_id if n not in killed)
    # every cell finished on the survivor: the killed node's running cell ran again there
    assert {r["node"] for r in result.cells} == {survivor}
    ray = _records()

    # the same records: every cell of the demo, the same config hashes and metrics
    assert ray.keys() == demo.keys()
    assert any(k[-2] != "{}" for k in demo)  # the index variants
    assert {k[:2] for k in demo} >= {
        ("embed", "pretrained"),
        ("finetune", "fine-tuned"),
        ("toptune", "top-tuned"),
        ("crosstune", "cross-tuned"),
    }
    assert {k[2] for k in demo} >= {"image-image", "text-image", "image-text", "zero-shot"}
    for key, ref in demo.items():
        got = ray[key]
        assert got.config_hash == ref.config_hash, key
        assert got.metrics == pytest.approx(ref.metrics, abs=1e-4), key
    # nothing computed twice: the records the Ray tasks returned are the ones on disk, and the
    # retried cell's MLflow run was reopened, not doubled (as many runs as the demo made)
    saved = {r.config_hash: r.saved for r in ray.values()}
    assert all(saved[r["record"]["config_hash"]] == r["record"]["saved"] for r in result.cells)
    runs = _mlflow_runs()
    assert len(_top(runs)) == len(_top(demo_runs)) and len(runs) == len(demo_runs)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.mlflow_run_id for r in ray.values()} <= {r.info.run_id for r in runs}
