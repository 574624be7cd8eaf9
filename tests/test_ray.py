"""``embbench ray run``'s errors before any work, and stage 01's extraction on Ray Data.

The grid on a real local cluster with a worker node killed is tests/test_ray_demo.py.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from embbench.pipeline.ray_grid import (
    RAY_INSTALL,
    RayOptions,
    RayResources,
    RayRunError,
    import_ray,
    parse_resources,
    plan_resources,
    run_on_ray,
)

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params"
NOTEBOOKS = ("01_embed", "02_finetune", "03_toptune")
TINY = {
    "01_embed": "models: [test_resnet]\ntasks: [image-image]\nbackend: exact\n",
    # 02 trains a few more steps so that it is still running when 01 ends (it is the cell on
    # the node the test kills); 03 searches one trial
    "02_finetune": "backend: exact\nepochs: 6\ntrain_size: 64\n",
    "03_toptune": "backend: exact\nbaselines: []\nmax_trials: 1\nsearch_epochs: 2\n"
    "final_epochs: 2\n",
}


def _params(tmp_path: Path) -> dict[str, list[Path]]:
    out = {}
    for nb in NOTEBOOKS:
        tiny = tmp_path / f"tiny_{nb}.yaml"
        tiny.write_text(TINY[nb])
        out[nb] = [PARAMS / f"{nb}.yaml", PARAMS / "smoke" / f"{nb}.yaml", tiny]
    return out


# ---- errors before any work (no cluster) -------------------------------------------------------
def test_missing_ray_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayRunError, match="pip install 'embbench\\[ray\\]'"):
        import_ray()
    assert "embbench[ray]" in RAY_INSTALL


def test_unreachable_address_is_one_clear_line(tmp_path, capsys):
    from embbench.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        a for nb, files in _params(tmp_path).items() for f in files for a in ("-f", f"{nb}={f}")
    ]
    assert main(["ray", "run", *args, "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in err and "ray start" in err
    assert main(["ray", "run", *args, "--address", "nohost"]) == 2
    assert "expected auto, local, HOST:PORT" in capsys.readouterr().err


def test_gpus_the_cluster_lacks_are_refused_before_any_work(tmp_path):
    from embbench.pipeline import pipeline_grid

    grid = pipeline_grid(_params(tmp_path))
    cpu_nodes = [{"CPU": 4.0}, {"CPU": 2.0}]
    # default resources on a CPU cluster: the GPU stages run on CPUs
    plan = plan_resources(grid, RayOptions(), cpu_nodes)
    assert {r.gpus for r in plan.values()} == {0}
    with pytest.raises(RayRunError, match=r"02 fine-tuned .* 4 GPU\(s\).*0 GPU\(s\)"):
        plan_resources(grid, RayOptions(resources={"fine-tuned": RayResources(2, 4)}), cpu_nodes)
    with pytest.raises(RayRunError, match="01 pretrained .* 1 GPU"):
        plan_resources(grid, RayOptions(gpus="require"), cpu_nodes)
    with pytest.raises(RayRunError, match="8 CPU"):
        plan_resources(grid, RayOptions(resources={"top-tuned": RayResources(8, 0)}), cpu_nodes)
    # a GPU node: the defaults ask for its GPUs
    plan = plan_resources(grid, RayOptions(), [{"CPU": 4.0, "GPU": 1.0}])
    assert sorted({r.gpus for r in plan.values()}) == [0, 1]
    # a stage 01 cell embedding on Ray Data leaves the GPUs to its actors
    params = _params(tmp_path)
    engine = tmp_path / "engine.yaml"
    engine.write_text("embed_engine: ray\n")
    params["01_embed"].append(engine)
    ray_grid = pipeline_grid(params)
    plan = plan_resources(ray_grid, RayOptions(), [{"CPU": 4.0, "GPU": 1.0}])
    assert {c.cell.mode: plan[c.key].gpus for c in ray_grid.cells} == {
        "pretrained": 0,
        "fine-tuned": 1,
        "top-tuned": 0,
    }


# ---- a real local cluster ----------------------------------------------------------------------
# ---- stage 01's extraction on Ray Data ---------------------------------------------------------
def test_actor_pool_is_planned_from_the_cluster_and_what_the_task_holds():
    from embbench.embed_ray import RayEmbedOptions, plan_actors

    auto = RayEmbedOptions()
    assert plan_actors(auto, 10, {"CPU": 4.0}) == (4, 0.0)  # CPU actors, one per free CPU
    assert plan_actors(auto, 3, {"CPU": 4.0}) == (3, 0.0)  # never more than the shards
    assert plan_actors(auto, 10, {"CPU": 16.0, "GPU": 2.0}) == (2, 1.0)  # one per GPU
    # a cell task holding 1 of 2 CPUs leaves room for one actor
    assert plan_actors(auto, 10, {"CPU": 2.0}, {"CPU": 1.0}) == (1, 0.0)
    assert plan_actors(RayEmbedOptions(actors=3, actor_gpus=0), 10, {"CPU": 8, "GPU": 1}) == (
        3,
        0.0,
    )
    # the task holds the only GPU (or every CPU): the actors would wait for ever, so it fails
    with pytest.raises(RayRunError, match=r"holds 1 and 1.*--resources pretrained=1,0"):
        plan_actors(auto, 10, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0})
    with pytest.raises(RayRunError, match="ray_actor_cpus: 0.5"):
        plan_actors(auto, 10, {"CPU": 1.0}, {"CPU": 1.0})
    half = RayEmbedOptions(actor_cpus=0.5)
    assert plan_actors(half, 10, {"CPU": 2.0}, {"CPU": 1.0}) == (2, 0.0)


def test_a_shard_actor_decodes_ahead_skips_a_bad_image_and_equals_one_process(small_demo, tmp_path):
    """The actor's body without Ray: threads decode in order; an unreadable image is listed."""
    import numpy as np

    from embbench.embed import embed_split, embedding_cache
    from embbench.embed_ray import ShardEmbedder
    from embbench.models import create_embedder

    emb = create_embedder("test_resnet", weights="random")
    ref = embed_split(emb, small_demo, "test", batch_size=4, num_workers=0, progress=False)
    rows = small_demo.split("test")
    ids = rows["item_id"].astype(str).tolist()
    paths = rows["path"].astype(str).tolist()
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("not a JPEG")
    paths[3] = str(bad)
    cache = embedding_cache(emb, small_demo, "test", root=tmp_path / "actor")
    cache.begin(ids, 9, provenance={})
    actor = ShardEmbedder(emb, cache, ids, paths, batch_size=4, decode_threads=3)
    out = actor({"shard": np.array([0, 1]), "start": np.array([0, 9]), "stop": np.array([9, 18])})
    assert out["shard"].tolist() == [0, 1]
    vec0, ids0, failed0 = cache.read_shard(0)
    vec1, ids1, failed1 = cache.read_shard(1)
    assert list(ids0) == ids[:3] + ids[4:9] and [f["item_id"] for f in failed0] == [ids[3]]
    assert list(ids1) == ids[9:18] and not failed1
    want = dict(zip(ref.item_ids, np.asarray(ref.vectors), strict=True))
    got = np.concatenate([vec0, vec1])
    np.testing.assert_allclose(got, [want[i] for i in [*ids0, *ids1]], atol=1e-5)


@pytest.fixture(scope="module")
def one_node_cluster():
    """A head without CPUs and one worker node of 2 CPUs (a cell task holds one, an actor the
    other), shared by this module's Ray Data tests."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_ray_data_embedding_resumes_a_cache_and_equals_one_process(
    small_demo, tmp_path, caplog, one_node_cluster
):
    import shutil

    import numpy as np

    from embbench.embed import embed_split, embedding_cache
    from embbench.embed_ray import RayEmbedOptions, embed_split_ray
    from embbench.models import create_embedder

    emb = create_embedder("test_resnet", weights="random")
    ref = embed_split(
        emb,
        small_demo,
        "test",
        batch_size=4,
        shard_size=9,
        num_workers=0,
        keep_shards=True,
        cache_root=tmp_path / "one",
    )
    # a killed Ray run: the same cache folder with two shards done, not consolidated
    one = embedding_cache(emb, small_demo, "test", root=tmp_path / "one")
    cache = embedding_cache(emb, small_demo, "test", root=tmp_path / "ray")
    n_shards = cache.n_shards(len(ref.item_ids), 9)
    assert cache.key == one.key and n_shards == 4
    shutil.copytree(one.path, cache.path)
    for name in cache.CONSOLIDATED:
        (cache.path / name).unlink()
    for s in range(2, n_shards):
        for name in (f"shard-{s:05d}.npy", f"shard-{s:05d}.ids.npy", f"shard-{s:05d}.json"):
            (cache.path / name).unlink()
    assert not cache.is_complete()

    caplog.set_level("INFO", logger="embbench.embed_ray")
    dist = embed_split_ray(
        emb,
        small_demo,
        "test",
        batch_size=4,
        shard_size=9,
        options=RayEmbedOptions(address=one_node_cluster.address, actors=2),
        cache_root=tmp_path / "ray",
    )
    assert "2 of 4 shard(s) already done" in caplog.text
    assert "2 shard(s) embedded by Ray Data" in caplog.text  # only the rest
    assert cache.is_complete()
    assert list(dist.item_ids) == list(ref.item_ids)
    np.testing.assert_allclose(np.asarray(dist.vectors), np.asarray(ref.vectors), atol=1e-5)
    import ray

    assert not ray.is_initialized()  # the connection it opened here is closed


def test_embed_engine_is_checked_and_changes_neither_the_hash_nor_the_cache(monkeypatch):
    from embbench.config import ConfigError
    from embbench.stages.embed import EmbedConfig, EmbedSteps

    local = EmbedConfig()
    ray = EmbedConfig(embed_engine="ray", ray_actors=2, ray_actor_gpus=0, ray_address="auto")
    assert ray.config_hash() == local.config_hash()  # where, not what: the same record key
    assert local.ray_options() is None
    assert ray.ray_options().actors == 2 and ray.ray_options().actor_gpus == 0
    assert EmbedConfig(embed_engine="ray").ray_options().actor_gpus is None  # auto
    with pytest.raises(ConfigError, match=r"embed_engine='rya'.*did you mean 'ray'"):
        EmbedConfig.from_params({"embed_engine": "rya"})
    with pytest.raises(ConfigError, match="ray_actor_gpus"):
        EmbedConfig.from_params({"ray_actor_gpus": -1})
    monkeypatch.setitem(sys.modules, "ray", None)  # not installed: said before any cell
    problems = EmbedSteps(ray).check([], {})
    assert any("embed_engine: ray needs Ray" in p and "embbench[ray]" in p for p in problems)
    assert not EmbedSteps(local).check([], {})


@pytest.mark.slow
def test_a_stage_01_cell_on_ray_data_inside_ray_run_equals_the_local_engine(
    small_demo, tmp_path, monkeypatch, one_node_cluster
):
    """``embbench ray run`` runs the cell as a Ray task; its embedding joins that connection."""
    import numpy as np

    import embbench.embed_ray
    from embbench.pipeline import run_one_cell
    from embbench.records import ResultStore

    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(
        f"models: [test_resnet]\ntasks: [image-image]\nbackend: exact\nbatch_size: 4\n"
        f"data_root: {{demo: {small_demo.root}}}\nembed_engine: ray\n"
    )
    files = [PARAMS / "01_embed.yaml", PARAMS / "smoke" / "01_embed.yaml", tiny]
    result = run_on_ray({"01_embed": files}, RayOptions(address=one_node_cluster.address))
    (cell,) = result.cells
    (rec,) = ResultStore().records()
    assert rec.config_hash == cell["record"]["config_hash"]

    # the same cell in one process with the local engine, in another home
    home = {v: tmp_path / "local" / v.lower() for v in ("EMBBENCH_CACHE", "EMBBENCH_RUNS")}
    for var, path in home.items():
        monkeypatch.setenv(var, str(path))
    ref = run_one_cell(
        "01_embed",
        files,
        {"embed_engine": "local"},
        model="test_resnet",
        dataset="demo",
        mode="pretrained",
    )
    assert ref.config_hash == rec.config_hash
    assert ref.metrics == pytest.approx(rec.metrics, abs=1e-6)
    # the same cache entries (keys), the same vectors; the Ray run's say who computed them
    ray_root, one_root = tmp_path / "cache", home["EMBBENCH_CACHE"]
    done = sorted(p.parent.relative_to(ray_root) for p in ray_root.rglob("vectors.npy"))
    assert done and done == sorted(
        p.parent.relative_to(one_root) for p in one_root.rglob("vectors.npy")
    )
    for entry in done:
        a, b = np.load(ray_root / entry / "vectors.npy"), np.load(one_root / entry / "vectors.npy")
        np.testing.assert_allclose(a, b, atol=1e-5)
        meta = json.loads((ray_root / entry / "meta.json").read_text())
        assert meta["provenance"]["engine"] == "ray-data"

    # embed_engine: ray on a complete cache reads it back without Ray
    def no_ray(what: str = "") -> None:
        raise AssertionError("Ray was started for vectors already in the cache")

    monkeypatch.setattr(embbench.embed_ray, "import_ray", no_ray)
    monkeypatch.setenv("EMBBENCH_RUNS", str(tmp_path / "again"))
    monkeypatch.setenv("EMBBENCH_CACHE", str(tmp_path / "cache"))
    again = run_one_cell("01_embed", files, model="test_resnet", dataset="demo", mode="pretrained")
    assert again.metrics == pytest.approx(rec.metrics, abs=1e-6)


def test_resources_option_parses_and_names_a_bad_item():
    assert parse_resources(["fine-tuned=8,4", "top-tuned=2"]) == {
        "fine-tuned": RayResources(8, 4),
        "top-tuned": RayResources(2, 0),
    }
    with pytest.raises(RayRunError, match="fine-tuned=eight"):
        parse_resources(["fine-tuned=eight"])


def test_a_grid_that_cannot_run_fails_on_the_driver_before_connecting(tmp_path, capsys):
    """The engine's up-front checks run before any task is sent: one message, no cluster."""
    from embbench.cli import main

    params = _params(tmp_path)
    text = tmp_path / "text.yaml"  # text tasks asked of an image-only model
    text.write_text("tasks: [image-image, text-image]\n")
    params["01_embed"].append(text)
    args = [a for nb, files in params.items() for f in files for a in ("-f", f"{nb}={f}")]
    with socket.socket() as s:  # nothing listens: connecting would fail with another message
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["ray", "run", *args, "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert "found before running any cell" in err and "need a text-image model" in err
    assert "cannot reach the Ray cluster" not in err
