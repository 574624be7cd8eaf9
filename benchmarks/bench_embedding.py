"""Embedding throughput on the CPU: the thread budget against torch's default, and the ceiling.

For each model it measures images/s from JPEG files through ``embbench.embed.embed_split``
(DataLoader workers decoding while the model runs) under several splits of the cores between
intra-op threads and DataLoader workers:

* ``old default``: torch's default (one intra-op thread per core) and 2 workers, what stage 01
  did before the thread budget (oversubscribed: 2 + 2 on 2 cores);
* ``auto``: :func:`embbench._threads.resolve_thread_budget` with the model's FLOP count;
* every other split with ``threads + workers <= cores``.

It prints the ratio of each to the old default (target for the tiny test model: >= 3x on 2
cores) and end-to-end / model-only (the model alone on tensors in memory with the same threads;
target >= 0.95 for ViT-B/16), plus decode-only images/s and the model's forward GFLOP/s per core,
from which the rule's constants come. Each configuration runs once to warm up and the best of
``--repeats`` is kept.

Run: ``python benchmarks/bench_embedding.py [--models test_resnet resnet50] [--images 96]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from embbench._threads import (  # noqa: E402
    ThreadBudget,
    apply_thread_budget,
    available_cores,
    resolve_thread_budget,
)
from embbench.demo import make_demo_catalogue  # noqa: E402
from embbench.embed import embed_split  # noqa: E402
from embbench.images import load_rgb  # noqa: E402
from embbench.models import create_embedder, model_facts  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    return min(fn() for _ in range(repeats))


def model_only(embedder, batch: int, n: int, threads: int) -> float:
    torch.set_num_threads(threads)
    x = torch.randn(batch, *embedder.input_size)
    model = embedder.model.eval()
    with torch.inference_mode():
        model(x)  # warm-up
        t0 = time.perf_counter()
        done = 0
        while done < n:
            model(x)
            done += batch
    return done / (time.perf_counter() - t0)


def decode_only(paths: list[str], transform) -> float:
    t0 = time.perf_counter()
    for p in paths:
        transform(load_rgb(p))
    return len(paths) / (time.perf_counter() - t0)


def end_to_end(embedder, cat, batch: int, budget: ThreadBudget) -> float:
    apply_thread_budget(budget)
    n = len(cat.split("test"))
    t0 = time.perf_counter()
    embed_split(embedder, cat, "test", batch_size=batch, num_workers=budget.workers,
                overwrite=True, progress=False)  # fmt: skip
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["test_resnet", "resnet50", "vit_b16"])
    ap.add_argument("--images", type=int, default=96, help="test images (JPEG, 384 px)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cores = available_cores()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EMBBENCH_CACHE"] = str(Path(tmp) / "cache")
        per_product = 8
        n_products = max(1, args.images // per_product)
        cat = make_demo_catalogue(Path(tmp), n_categories=min(8, n_products),
                                  products_per_category=max(1, n_products // min(8, n_products)),
                                  views=(1, 1, per_product), image_size=384)  # fmt: skip
        paths = cat.split("test")["path"].tolist()
        print(f"{len(paths)} JPEGs of 384x384, batch {args.batch}, {cores} usable cores, "
              f"load average {os.getloadavg()}")  # fmt: skip
        for name in args.models:
            emb = create_embedder(name, weights="random")
            gflops = model_facts(name)["gflops"]
            budgets = {
                "old default": ThreadBudget(os.cpu_count() or 1, 2, cores, "torch default + 2"),
                "auto": resolve_thread_budget("auto", "auto", "cpu", gflops_per_image=gflops),
            }
            for t in range(1, cores + 1):
                for w in range(0, cores - t + 1):
                    budgets.setdefault(f"{t} thr + {w} wkr", ThreadBudget(t, w, cores, "grid"))
            torch.set_num_threads(1)
            d = decode_only(paths[:32], emb.transform)
            m1 = model_only(emb, args.batch, args.batch * 2, 1)
            mc = model_only(emb, args.batch, args.batch * 2, cores)
            print(f"\n{name}: {gflops:.2f} GFLOPs/image; decode-only {d:.0f} img/s/core "
                  f"({1000 / d:.1f} ms); model-only {m1:.1f} img/s on 1 thread "
                  f"({gflops * m1:.0f} GFLOP/s/core), {mc:.1f} img/s on {cores}")  # fmt: skip
            print(f"  {'split':<16}{'threads':>8}{'workers':>8}{'img/s':>9}"
                  f"{'x old default':>15}{'e2e/model-only':>16}")  # fmt: skip
            rates = {}
            for label, b in budgets.items():
                rates[label] = best_of(lambda b=b, e=emb: end_to_end(e, cat, args.batch, b),
                                       args.repeats)  # fmt: skip
            for label, b in budgets.items():
                ceiling = mc if b.intra_op == cores else m1 if b.intra_op == 1 else float("nan")
                print(f"  {label:<16}{b.intra_op:>8}{b.workers:>8}{rates[label]:>9.1f}"
                      f"{rates[label] / rates['old default']:>15.2f}"
                      f"{rates[label] / ceiling:>16.2f}")  # fmt: skip
            print(f"  auto chose: {budgets['auto'].reason}")
        print(f"\nload average {os.getloadavg()}")


if __name__ == "__main__":
    main()
