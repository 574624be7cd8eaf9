"""glibc allocator settings: minor page faults per image and images/s, with and without.

Runs the same workload in fresh child processes (glibc reads its settings at start-up), the
baseline (glibc's defaults, ``EMBBENCH_MALLOC=0`` and no ``MALLOC_*`` variables) and the
candidate (:data:`embbench._malloc.MALLOC_ENV`), interleaved baseline, candidate, baseline, ...
so both see the same machine load. Per child it prints images/s and minor faults per image of
the timed loop (``getrusage(RUSAGE_SELF)`` in the child), and per round the whole child's minor
faults (``getrusage(RUSAGE_CHILDREN)`` in the parent: start-up included). Then the ratios
candidate / baseline (medians over the rounds).

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


def child_env(candidate: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("EMBBENCH_MALLOC_REEXEC", None)
    if candidate:
        env.update(MALLOC_ENV)
    else:
        env[OPT_OUT] = "0"
    return env


def run_child(workload: str, candidate: bool, threads: int, batches: int) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, workload, str(threads), str(batches)],
        env=child_env(candidate), capture_output=True, text=True, check=False,
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
    args = ap.parse_args()
    print(f"EfficientNet-Lite0, batch 32, {args.threads} torch thread(s), {args.batches} timed "
          f"batches per child; load average {os.getloadavg()}")  # fmt: skip
    print(f"candidate: {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}")
    print(f"baseline: glibc defaults ({OPT_OUT}=0, no MALLOC_* variables)")
    for workload in args.workload:
        print(f"\n{workload}:")
        print(f"  {'round':<7}{'setting':<11}{'img/s':>8}{'faults/img':>12}"
              f"{'child faults':>14}{'child s':>9}")  # fmt: skip
        res: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for r in range(args.rounds):
            for candidate in (False, True):
                out = run_child(workload, candidate, args.threads, args.batches)
                res[candidate].append(out)
                name = "candidate" if candidate else "baseline"
                print(f"  {r:<7}{name:<11}{out['img_s']:>8.1f}{out['faults_per_image']:>12.0f}"
                      f"{out['child_faults']:>14.0f}{out['child_s']:>9.1f}")  # fmt: skip

        m = {(c, k): statistics.median(o[k] for o in res[c]) for c in res for k in res[c][0]}
        print(f"  candidate / baseline (medians): "
              f"img/s x{m[True, 'img_s'] / m[False, 'img_s']:.2f}, "
              f"faults/img x{m[True, 'faults_per_image'] / m[False, 'faults_per_image']:.4f} "
              f"({m[False, 'faults_per_image']:.0f} -> {m[True, 'faults_per_image']:.0f}), "
              f"whole-child faults x{m[True, 'child_faults'] / m[False, 'child_faults']:.3f}"
              )  # fmt: skip
    print(f"\nload average {os.getloadavg()}")


if __name__ == "__main__":
    main()
