"""Embedding throughput on the CPU: the thread budget against torch's default, and the ceiling.

For each model it measures images/s from JPEG files through ``embbench.embed.embed_split``
(DataLoader workers decoding while the model runs) under several splits of the cores between
intra-op threads and DataLoader workers:

* ``old default``: torch's default (one intra-op thread per core) and 2 workers, what stage 01
  did before the thread budget (oversubscribed: 2 + 2 on 2 cores);
* ``auto``: :func:`embbench._threads.resolve_thread_budget` with the model's FLOP count;
* every other split with ``threads + workers <= cores``.

It prints the ratio of each to the old default (target for the tiny test model: >= 3x on 2
cores), the physical ceiling (``cores / (decode + forward)`` core-seconds per image, the forward
at its one-thread efficiency: no split can beat it), and end-to-end / model-only (the model
alone on tensors in memory with the same threads; target >= 0.95 for ViT-B/16), plus decode-only
images/s and the model's forward GFLOP/s per core, from which the rule's constants come. When
the budget gives every core to the model, it also prints **embedding / ceiling**: ``auto``
end-to-end over model-only on all cores (tensors in memory, the layout ``embed_split`` uses), in
interleaved pairs (target >= 0.85 on 2 cores). Each
configuration runs once to warm up and the best of ``--repeats`` is kept. Use a few hundred
images (``--images 640``) for small models: DataLoader workers start once per pass, which
dominates a pass of a few dozen images.

**On a GPU** (when ``torch.cuda.is_available()``; ``--gpu-only`` skips the CPU part) it also
measures, per model, model-only images/s in bf16 autocast with channels-last inputs and weights,
against the model's **matrix-product bound**: the device's bf16 GEMM rate (a bare
``8192 x 8192 x 8192`` product, best of 10, timed with CUDA events) divided by the model's forward
FLOPs per image (``model_facts``); and end-to-end images/s from JPEGs through ``embed_split`` on
the GPU (pinned memory, bf16, channels last, one DataLoader worker per free core) as a fraction of
model-only.

Run: ``python benchmarks/bench_embedding.py [--models test_resnet resnet50] [--images 96]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if __name__ == "__main__":  # the start-up settings every embbench process gets (_malloc.py)
    from embbench._malloc import reexec_with_allocator_env

    reexec_with_allocator_env(command=[__file__])

import torch  # noqa: E402

from embbench._malloc import PROCESS_ENV  # noqa: E402
from embbench._threads import (  # noqa: E402
    ThreadBudget,
    apply_thread_budget,
    available_cores,
    resolve_thread_budget,
)
from embbench._torch_utils import channels_last_for  # noqa: E402
from embbench.demo import make_demo_catalogue  # noqa: E402
from embbench.embed import embed_split  # noqa: E402
from embbench.images import load_rgb  # noqa: E402
from embbench.models import create_embedder, model_facts  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    return min(fn() for _ in range(repeats))


def model_only(embedder, batch: int, n: int, threads: int) -> float:
    """Images/s of the model alone on tensors in memory, in the layout ``embed_split`` uses."""
    torch.set_num_threads(threads)
    x = torch.randn(batch, *embedder.input_size)
    model = embedder.model.eval()
    if channels_last_for(model, torch.device("cpu")):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
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


def end_to_end(embedder, cat, batch: int, budget: ThreadBudget, device: str = "cpu",
               precision: str = "fp32") -> float:  # fmt: skip
    """Images/s of ``embed_split`` on the test split under ``budget``, on ``device``."""
    apply_thread_budget(budget)
    n = len(cat.split("test"))
    t0 = time.perf_counter()
    embed_split(embedder, cat, "test", batch_size=batch, num_workers=budget.workers,
                device=device, precision=precision, overwrite=True, progress=False)  # fmt: skip
    return n / (time.perf_counter() - t0)


def gpu_gemm_tflops(dev: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """bf16 TFLOP/s of a bare ``size^3`` matrix product on ``dev`` (best of ``repeats``)."""
    a = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    a @ b  # warm-up (cuBLAS handles, kernel choice)
    best = float("inf")
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        stop.record()
        torch.cuda.synchronize(dev)
        best = min(best, start.elapsed_time(stop) / 1000)
    return 2 * size**3 / best / 1e12


def gpu_model_only(embedder, dev: torch.device, batch: int, iters: int = 20) -> float:
    """Images/s of the model alone on ``dev``: bf16 autocast, channels last, batch ``batch``."""
    model = embedder.model.eval().to(dev, memory_format=torch.channels_last)
    x = torch.randn(batch, *embedder.input_size, device=dev)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(x)  # warm-up (cuDNN autotuning, allocator)
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        torch.cuda.synchronize(dev)
    return batch * iters / (time.perf_counter() - t0)


def gpu_section(models: list[str], cat, batch: int) -> None:
    """The GPU measurements (see the module docstring); says so when there is no GPU."""
    if not torch.cuda.is_available():
        print("\nGPU: none here (torch.cuda.is_available() is False); GPU benchmark not run")
        return
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    peak = gpu_gemm_tflops(dev)
    print(f"\nGPU: {torch.cuda.get_device_name(dev)}; bare bf16 GEMM 8192^3: {peak:.0f} TFLOP/s")
    print(f"  {'model':<14}{'GFLOPs':>8}{'model-only img/s':>18}{'bound img/s':>13}"
          f"{'of bound':>10}{'e2e img/s':>11}{'e2e/model':>11}")  # fmt: skip
    n = len(cat.split("test"))
    for name in models:
        emb = create_embedder(name, weights="random")
        gflops = model_facts(name)["gflops"]
        rate = gpu_model_only(emb, dev, batch)
        bound = peak * 1e3 / gflops
        budget = resolve_thread_budget("auto", "auto", "cuda", gflops_per_image=gflops)
        e2e = best_of(lambda e=emb, b=budget: end_to_end(e, cat, batch, b, "cuda", "bf16"), 1)
        print(f"  {name:<14}{gflops:>8.2f}{rate:>18.0f}{bound:>13.0f}{rate / bound:>10.2f}"
              f"{e2e:>11.0f}{e2e / rate:>11.2f}")  # fmt: skip
        print(f"    end-to-end workers: {budget.workers} ({budget.reason}); {n} images")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["test_resnet", "resnet50", "vit_b16"])
    ap.add_argument("--images", type=int, default=None,
                    help="test images (JPEG, 384 px); default 640 for models under 1 GFLOP "
                         "(worker start-up must not dominate), 64 for larger ones")  # fmt: skip
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gpu-only", action="store_true", help="skip the CPU measurements")
    args = ap.parse_args()
    cores = available_cores()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EMBBENCH_CACHE"] = str(Path(tmp) / "cache")
        catalogues: dict[int, object] = {}

        def catalogue(images: int):
            """A demo catalogue with about ``images`` test JPEGs (made once per size)."""
            if images not in catalogues:
                per_product, n_products = 8, max(1, images // 8)
                catalogues[images] = make_demo_catalogue(
                    Path(tmp) / str(images), n_categories=min(8, n_products),
                    products_per_category=max(1, n_products // min(8, n_products)),
                    views=(1, 1, per_product), image_size=384)  # fmt: skip
            return catalogues[images]

        print(f"JPEGs of 384x384, batch {args.batch}, {cores} usable cores, "
              f"load average {os.getloadavg()}")  # fmt: skip
        print("start-up settings: " + " ".join(f"{k}={os.environ.get(k)}" for k in PROCESS_ENV))
        for name in [] if args.gpu_only else args.models:
            emb = create_embedder(name, weights="random")
            gflops = model_facts(name)["gflops"]
            cat = catalogue(args.images or (640 if gflops < 1 else 64))
            paths = cat.split("test")["path"].tolist()
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
            print(f"\n{name}: {len(paths)} images; {gflops:.2f} GFLOPs/image; "
                  f"decode-only {d:.0f} img/s/core "
                  f"({1000 / d:.1f} ms); model-only {m1:.1f} img/s on 1 thread "
                  f"({gflops * m1:.0f} GFLOP/s/core), {mc:.1f} img/s on {cores}")  # fmt: skip
            print(f"  {'split':<16}{'threads':>8}{'workers':>8}{'img/s':>9}"
                  f"{'x old default':>15}{'e2e/model-only':>16}")  # fmt: skip
            rates = {}
            for label, b in budgets.items():
                rates[label] = best_of(lambda b=b, e=emb, c=cat: end_to_end(e, c, args.batch, b),
                                       args.repeats)  # fmt: skip
            for label, b in budgets.items():
                ceiling = mc if b.intra_op == cores else m1 if b.intra_op == 1 else float("nan")
                print(f"  {label:<16}{b.intra_op:>8}{b.workers:>8}{rates[label]:>9.1f}"
                      f"{rates[label] / rates['old default']:>15.2f}"
                      f"{rates[label] / ceiling:>16.2f}")  # fmt: skip
            print(f"  auto chose: {budgets['auto'].reason}")
            auto = budgets["auto"]
            if auto.intra_op == cores:  # interleaved pairs: the load changes hit both alike
                pairs = []
                for _ in range(max(2, args.repeats)):
                    m = model_only(emb, args.batch, args.batch * 2, cores)
                    pairs.append((end_to_end(emb, cat, args.batch, auto), m))
                best = max(e for e, _ in pairs) / max(m for _, m in pairs)
                med = statistics.median(e / m for e, m in pairs)
                print(f"  embedding / ceiling (auto end-to-end / model-only on {cores} threads, "
                      f"tensors in memory; {len(pairs)} interleaved pairs): {best:.2f} best/best, "
                      f"{med:.2f} median of pairs (target >= 0.85)")  # fmt: skip
            # The floor of core-time per image: decoding plus the forward at its most efficient
            # (one thread per image); no split can beat cores / that.
            ceiling = cores / (1 / d + 1 / m1)
            print(f"  physical ceiling (decode + 1-thread forward core-time on {cores} cores): "
                  f"{ceiling:.1f} img/s = {ceiling / rates['old default']:.2f} x old default; "
                  f"best split reached {max(rates.values()) / ceiling:.2f} of it")  # fmt: skip
        gpu_section(args.models, catalogue(args.images or 640), args.batch)
        print(f"\nload average {os.getloadavg()}")


if __name__ == "__main__":
    main()
