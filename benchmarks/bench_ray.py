"""The same small grid on a local Ray cluster with 1 and with 2 worker nodes: the wall-time ratio.

Each run starts a real local cluster (``ray.cluster_utils.Cluster``: a head with no CPUs and
``N`` worker nodes of ``--cpus-per-node`` CPUs), runs the grid with ``embbench.pipeline.
ray_grid.run_on_ray`` in a fresh runs/cache folder (the demo catalogue is generated once, before
any timing), and stops the cluster. The timed part is ``run_on_ray``: connecting, the workers'
start-up (importing torch and embbench), the cells and their records; the cluster's own start is
not timed. Runs are interleaved (1 node, 2 nodes, 1 node, 2 nodes ...) and the ratio is printed
per round against the named baseline, 1 worker node.

The grid: stage 01 pretrained for two tiny models, 02 fine-tuned and 03 top-tuned for one (the
smoke params, exact search): four cells, three of them independent at the start.

NOTE: on a 2-core machine shared with other work, two worker nodes share those cores; the ratio
says what a second node buys there, not on a real cluster of separate machines.

Usage::

    python benchmarks/bench_ray.py [--rounds 2] [--cpus-per-node 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params"
TINY = {
    "01_embed": "models: [test_resnet, test_clip]\ntasks: [image-image]\nbackend: exact\n",
    "02_finetune": "backend: exact\n",
    "03_toptune": "backend: exact\nbaselines: []\n",
}


def _params(tmp: Path) -> dict[str, list[Path]]:
    out = {}
    for nb, text in TINY.items():
        tiny = tmp / f"tiny_{nb}.yaml"
        tiny.write_text(text)
        out[nb] = [PARAMS / f"{nb}.yaml", PARAMS / "smoke" / f"{nb}.yaml", tiny]
    return out


def _one_run(n_nodes: int, cpus: int, params: dict, home: Path) -> float:
    from ray.cluster_utils import Cluster

    from embbench.pipeline.ray_grid import RayOptions, RayResources, run_on_ray

    for var in ("EMBBENCH_CACHE", "EMBBENCH_RUNS", "EMBBENCH_REPORTS"):
        os.environ[var] = str(home / var.lower())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(n_nodes):
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        options = RayOptions(
            address=cluster.address, resources={"fine-tuned": RayResources(min(cpus, 2), 0)}
        )
        t0 = time.perf_counter()
        result = run_on_ray(params, options)
        wall = time.perf_counter() - t0
    finally:
        cluster.shutdown()
    assert len(result.cells) == 4
    return wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpus-per-node", type=int, default=1)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["EMBBENCH_DATA"] = str(tmp / "data")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        params = _params(tmp)
        from embbench.cells import load_cell_inputs
        from embbench.pipeline.grid import load_config

        load_cell_inputs(load_config("01_embed", params["01_embed"]), "demo")  # data, untimed
        print(
            f"grid: 4 cells; worker nodes of {args.cpus_per_node} CPU(s); "
            f"{os.cpu_count()} core(s) on this machine, shared"
        )
        print(f"{'round':>5} {'1 node (s)':>11} {'2 nodes (s)':>12} {'ratio 1/2':>10}")
        ratios = []
        for r in range(args.rounds):
            one = _one_run(1, args.cpus_per_node, params, tmp / f"r{r}_n1")
            two = _one_run(2, args.cpus_per_node, params, tmp / f"r{r}_n2")
            ratios.append(one / two)
            print(f"{r + 1:>5} {one:>11.1f} {two:>12.1f} {one / two:>10.2f}")
        print(f"median speed-up of 2 worker nodes over 1 (baseline): {median(ratios):.2f}x")


if __name__ == "__main__":
    main()
