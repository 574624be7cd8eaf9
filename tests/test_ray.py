"""``embbench ray run``'s errors before any work, and stage 01's extraction on Ray Data.

The grid on a real local cluster with a worker node killed is tests/test_ray_demo.py.
"""

from __future__ import annotations

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
    assert "expected auto, HOST:PORT" in capsys.readouterr().err


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


# ---- a real local cluster ----------------------------------------------------------------------
# ---- stage 01's extraction on Ray Data ---------------------------------------------------------
@pytest.mark.slow
def test_ray_data_embedding_writes_the_same_cache_as_one_process(small_demo, tmp_path):
    pytest.importorskip("ray")
    import numpy as np

    from embbench.embed import embed_split, embedding_cache
    from embbench.models import create_embedder
    from embbench.pipeline.ray_embed import embed_split_ray

    emb = create_embedder("test_resnet", weights="random")
    ref = embed_split(emb, small_demo, "test", batch_size=4, shard_size=5, num_workers=0)
    dist = embed_split_ray(
        emb,
        small_demo,
        "test",
        batch_size=4,
        shard_size=5,
        concurrency=2,
        cache_root=tmp_path / "ray_cache",
    )
    cache = embedding_cache(emb, small_demo, "test", root=tmp_path / "ray_cache")
    assert cache.is_complete() and cache.n_shards(len(ref.item_ids), 5) > 2  # 2 actors
    assert list(dist.item_ids) == list(ref.item_ids)
    np.testing.assert_allclose(np.asarray(dist.vectors), np.asarray(ref.vectors), atol=1e-5)
    again = embed_split_ray(emb, small_demo, "test", cache_root=tmp_path / "ray_cache")
    assert list(again.item_ids) == list(dist.item_ids)  # complete: read back, Ray not started


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
