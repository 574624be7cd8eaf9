"""Start-up settings (glibc allocator, libgomp waiting): page faults/image, images/s, with/without.

Runs the same workload in fresh child processes (glibc and libgomp read their settings at
start-up): the baseline (glibc's defaults, ``EMBBENCH_MALLOC=0``, no ``MALLOC_*``/``OMP_*``
variables), the candidate (:data:`embbench._malloc.MALLOC_ENV`) and the candidate with
``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning; together
:data:`embbench._malloc.PROCESS_ENV`, what embbench sets), interleaved baseline, candidate,
candidate + passive, baseline, ... so all see the same machine load. Per child it prints
images/s and minor faults per image of the timed loop (``getrusage(RUSAGE_SELF)`` in the
child), and per round the whole child's minor faults (``getrusage(RUSAGE_CHILDREN)`` in the
parent: start-up included). Then the ratios of each to the baseline (medians over the rounds).

Workloads (``--workload``): ``embed``: EfficientNet-Lite0 (the demo's model, packaged ImageNet
weights) forward passes at 224 px, batch 32, as stage 01 runs them; ``train``: Lite0 training
steps (forward, backward, SGD) at 128 px, batch 32, as the demo's stage 02 runs them.

Run: ``python benchmarks/bench_allocator.py [--workload embed train] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from embbench._malloc import MALLOC_ENV, OPT_OUT

CHILD = r"""
import json, resource, sys, time
import torch
from embbench.models import create_embedder

workload, threads, batches, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 32
torch.manual_seed(0)
torch.set_num_threads(threads)
emb = create_embedder("efficientnet_lite0", weights="pretrained")
model = emb.model
if workload == "embed":
    model.eval()
    x = torch.randn(batch, *emb.input_size)
    def step():
        with torch.inference_mode():
            model(x)
else:
    model.train()
    x = torch.randn(batch, 3, 128, 128)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    def step():
        opt.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        opt.step()
step()  # warm-up: weights touched, oneDNN primitives made
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t0 = time.perf_counter()
for _ in range(batches):
    step()
dt = time.perf_counter() - t0
f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = batches * batch
print(json.dumps({"img_s": n / dt, "faults_per_image": (f1 - f0) / n}))
"""


SETTINGS: dict[str, dict[str, str]] = {
    "baseline": {OPT_OUT: "0"},
    "candidate": dict(MALLOC_ENV),
    "cand+passive": {**MALLOC_ENV, "OMP_WAIT_POLICY": "PASSIVE"},
}


def child_env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OMP_", "GOMP_"))}
    env.pop("EMBBENCH_MALLOC_REEXEC", None)
    env.update(SETTINGS[setting])
    return env


def run_child(workload: str, setting: str, threads: int, batches: int) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, workload, str(threads), str(batches)],
        env=child_env(setting), capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["child_faults"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before
    out["child_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", nargs="+", default=["embed", "train"], choices=["embed", "train"])
    ap.add_argument("--rounds", type=int, default=2, help="baseline/candidate pairs per workload")
    ap.add_argument("--batches", type=int, default=4, help="timed batches of 32 per child")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                    help="environments to compare; the first is the ratios' baseline")  # fmt: skip
    args = ap.parse_args()
    print(f"EfficientNet-Lite0, batch 32, {args.threads} torch thread(s), {args.batches} timed "
          f"batches per child; load average {os.getloadavg()}")  # fmt: skip
    for name, env in SETTINGS.items():
        print(f"{name}: {' '.join(f'{k}={v}' for k, v in env.items())}")
    for workload in args.workload:
        print(f"\n{workload}:")
        print(f"  {'round':<7}{'setting':<11}{'img/s':>8}{'faults/img':>12}"
              f"{'child faults':>14}{'child s':>9}")  # fmt: skip
        res: dict[str, list[dict[str, float]]] = {k: [] for k in args.settings}
        for r in range(args.rounds):
            for name in args.settings:
                out = run_child(workload, name, args.threads, args.batches)
                res[name].append(out)
                print(f"  {r:<7}{name:<11}{out['img_s']:>8.1f}{out['faults_per_image']:>12.0f}"
                      f"{out['child_faults']:>14.0f}{out['child_s']:>9.1f}")  # fmt: skip

        m = {(c, k): statistics.median(o[k] for o in res[c]) for c in res for k in res[c][0]}
        for name in args.settings[1:]:
            b = args.settings[0]
            print(f"  {name} / {b} (medians): "
                  f"img/s x{m[name, 'img_s'] / m[b, 'img_s']:.2f}, "
                  f"faults/img x{m[name, 'faults_per_image'] / m[b, 'faults_per_image']:.4f} "
                  f"({m[b, 'faults_per_image']:.0f} -> {m[name, 'faults_per_image']:.0f}), "
                  f"whole-child faults x{m[name, 'child_faults'] / m[b, 'child_faults']:.3f}"
                  )  # fmt: skip
    print(f"\nload average {os.getloadavg()}")


if __name__ == "__main__":
    main()
