"""Embedding throughput on the CPU: embedding / ceiling, and the thread budget's splits.

**Embedding / ceiling** (the one ratio this script prints per model, issue #26 item 4; target
>= 0.85 on 2 cores): end-to-end images/s of :func:`embbench.embed.embed_split` from the image
files on disk (decoding, preprocessing, forward, cache writes) over model-only images/s, the
same model forward on the same images already decoded into tensors in memory, with the same
intra-op threads, batch size and layout (channels-last for conv nets). Both run under the thread
budget's ``auto`` choice. The configurations are measured in interleaved rounds (each round
runs every one once, in turn, so a change in the machine's load hits all of them) and the
ratio printed is the median over the rounds of each round's end-to-end / model-only (the two
measured close in time, so a change in load cancels). Besides the current path it runs, in the
same rounds, the path it replaced and, with ``--all-paths``, the steps between (``embed_split``
with its parts swapped by the script):

* ``old: inline, float``: decoding inline in the model's thread, each image through the whole
  transform to a float tensor (the path before :mod:`embbench.decode`);
* ``inline, uint8``: decoding inline, uint8 images normalised once per batch;
* ``ahead, nice 0``: decoded ahead by a background thread at normal priority;
* ``ahead, nice 19``: the current path (background thread at the lowest priority).

The header prints the thread and BLAS configuration and the load average (before and after).

``--splits`` also measures every split of the cores between intra-op threads and DataLoader
workers against torch's old default (2 threads + 2 workers), best of ``--repeats``.

**On a GPU** (when ``torch.cuda.is_available()``; ``--gpu-only`` skips the CPU part) it also
measures, per model, model-only images/s in bf16 autocast with channels-last inputs and weights,
against the model's **matrix-product bound**: the device's bf16 GEMM rate (a bare
``8192 x 8192 x 8192`` product, best of 10, timed with CUDA events) divided by the model's forward
FLOPs per image (``model_facts``); and end-to-end images/s from JPEGs through ``embed_split`` on
the GPU (pinned memory, bf16, channels last, one DataLoader worker per free core) as a fraction of
model-only.

Run: ``python benchmarks/bench_embedding.py [--models efficientnet_lite0] [--images 192]
[--rounds 5] [--splits]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if __name__ == "__main__":  # the start-up settings every embbench process gets (_malloc.py)
    from embbench._malloc import reexec_with_allocator_env

    reexec_with_allocator_env(command=[__file__])

import torch  # noqa: E402

import embbench.embed as embed_mod  # noqa: E402
from embbench._malloc import PROCESS_ENV  # noqa: E402
from embbench._threads import (  # noqa: E402
    ThreadBudget,
    apply_thread_budget,
    available_cores,
    resolve_thread_budget,
)
from embbench._torch_utils import channels_last_for  # noqa: E402
from embbench.decode import DecodeAhead, Preprocess, decode_row, split_transform  # noqa: E402
from embbench.demo import make_demo_catalogue  # noqa: E402
from embbench.embed import embed_split  # noqa: E402
from embbench.models import create_embedder, model_facts  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    return min(fn() for _ in range(repeats))


class Inline:
    """Decoding in the model's thread, batch after batch (what ``embed_split`` did before)."""

    def __init__(self, paths, prep: Preprocess, batches) -> None:
        self.paths, self.prep, self.batches = paths, prep, batches

    def __iter__(self):
        for rows in self.batches:
            got = [(i, *decode_row(self.paths[i], self.prep)) for i in rows]
            ok = [(i, t) for i, t, r in got if r is None]
            bad = [(i, r) for i, _, r in got if r is not None]
            yield [i for i, _ in ok], self.prep.batch([t for _, t in ok]) if ok else None, bad


# How each path decodes: (DecodeAhead replacement or None, split the transform, niceness).
PATHS = {
    "old: inline, float": (Inline, False, 0),
    "inline, uint8": (Inline, True, 0),
    "ahead, nice 0": (DecodeAhead, True, 0),
    "ahead, nice 19": (None, True, None),  # embed_split as it is
}
CURRENT = "ahead, nice 19"
OLD = "old: inline, float"


@contextmanager
def decoding_path(label: str):
    """``embed_split`` with the decoding of ``PATHS[label]`` swapped in."""
    loader, split, nice = PATHS[label]
    saved = embed_mod.DecodeAhead, embed_mod.split_transform
    if loader is DecodeAhead:
        embed_mod.DecodeAhead = lambda *a, **k: DecodeAhead(*a, **{**k, "nice": nice})
    elif loader is not None:
        embed_mod.DecodeAhead = loader
    if not split:
        embed_mod.split_transform = Preprocess
    try:
        yield
    finally:
        embed_mod.DecodeAhead, embed_mod.split_transform = saved


def decoded_batches(embedder, paths: list[str], batch: int) -> list[torch.Tensor]:
    """The images decoded once into the batches ``embed_split`` feeds the model (same layout)."""
    prep = split_transform(embedder.transform)
    nhwc = channels_last_for(embedder.model, torch.device("cpu"))
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    out = []
    for b in range(0, len(paths), batch):
        items = [decode_row(p, prep)[0] for p in paths[b : b + batch]]
        out.append(prep.batch(items).contiguous(memory_format=fmt))
    return out


def model_only(embedder, batches: list[torch.Tensor], threads: int) -> float:
    """Images/s of the model alone on ``batches`` (tensors in memory) with ``threads``."""
    torch.set_num_threads(threads)
    model = embedder.model.eval()
    if channels_last_for(model, torch.device("cpu")):
        model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for x in batches:
            model(x)
    return sum(len(x) for x in batches) / (time.perf_counter() - t0)


def decode_only(paths: list[str], prep: Preprocess) -> float:
    """Images/s/core of decoding + the per-image preprocessing of ``prep``, one thread."""
    t0 = time.perf_counter()
    for p in paths:
        decode_row(p, prep)
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


def thread_config(budget: ThreadBudget) -> str:
    """torch's threads, BLAS, OpenMP wait policy and the budget, on one line."""
    blas = next(
        (w for w in torch.__config__.show().replace(",", " ").split() if w.startswith("BLAS_")),
        "BLAS_INFO=?",
    )
    return (
        f"budget {budget.intra_op} intra-op thread(s) + {budget.workers} worker(s) on "
        f"{budget.cores} core(s) ({budget.reason}); torch.get_num_threads()="
        f"{torch.get_num_threads()}, {blas}, parallel backend "
        f"{torch.__config__.parallel_info().split('ATen parallel backend: ')[-1].strip()}"
    )


def ceiling_rounds(name: str, emb, cat, batch: int, rounds: int, all_paths: bool) -> None:
    """Embedding / ceiling for ``name``: every path and model-only in interleaved rounds."""
    gflops = model_facts(name)["gflops"]
    budget = resolve_thread_budget(
        "auto", "auto", "cpu", gflops_per_image=gflops, decode_ahead=True
    )
    apply_thread_budget(budget)
    paths = cat.split("test")["path"].tolist()
    tensors = decoded_batches(emb, paths, batch)
    torch.set_num_threads(1)
    d_float = decode_only(paths[:32], Preprocess(emb.transform))
    d_u8 = decode_only(paths[:32], split_transform(emb.transform))
    print(f"\n{name}: {len(paths)} images, {gflops:.2f} GFLOPs/image, batch {batch}; decode + "
          f"preprocess one image on one core: {1000 / d_float:.2f} ms to float, "
          f"{1000 / d_u8:.2f} ms to uint8")  # fmt: skip
    apply_thread_budget(budget)
    print("  " + thread_config(budget))
    labels = ["model-only", *(PATHS if all_paths else (OLD, CURRENT))]
    rates: dict[str, list[float]] = {k: [] for k in labels}

    cpu_ms: dict[str, list[float]] = {k: [] for k in labels}

    def run(label: str) -> float:
        c0 = time.process_time()
        if label == "model-only":
            rate = model_only(emb, tensors, budget.intra_op)
        else:
            with decoding_path(label):
                rate = end_to_end(emb, cat, batch, budget)
        cpu_ms[label].append((time.process_time() - c0) * 1000 / len(paths))
        return rate

    for label in labels:  # warm-up
        run(label)
        cpu_ms[label].clear()
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:  # rotate the order
            rates[label].append(run(label))
    ceiling = statistics.median(rates["model-only"])

    def ratio(label: str) -> float:  # the headline: median over rounds of e2e / model-only
        return statistics.median(
            e / m for e, m in zip(rates[label], rates["model-only"], strict=True)
        )

    print(f"  {'path':<22}{'median img/s':>13}{'/ ceiling':>11}{'CPU ms/img':>12}   "
          f"per round: img/s / ceiling of that round")  # fmt: skip
    for label in labels:
        per = [e / m for e, m in zip(rates[label], rates["model-only"], strict=True)]
        rounds_text = " ".join(f"{e:.1f}/{q:.2f}" for e, q in zip(rates[label], per, strict=True))
        print(f"  {label:<22}{statistics.median(rates[label]):>13.1f}{ratio(label):>11.2f}"
              f"{statistics.median(cpu_ms[label]):>12.2f}   {rounds_text}")  # fmt: skip
    # Were the forward's threads never idle, decoding could only add its core time per image.
    bound = budget.cores / (budget.cores / ceiling + 1 / d_u8) / ceiling
    print(f"  EMBEDDING / CEILING ({name}, {budget.cores} cores): {ratio(CURRENT):.2f} "
          f"(embed_split from files over model-only on the same images decoded, median of "
          f"{rounds} interleaved rounds' ratios; target >= 0.85); before this change "
          f"{ratio(OLD):.2f}; with no idle core time in the forward to fill, decoding's own core "
          f"time would cap it at {bound:.2f}")  # fmt: skip


def splits_table(name: str, emb, cat, batch: int, repeats: int, cores: int) -> None:
    """Every split of the cores between threads and workers against torch's old default."""
    gflops = model_facts(name)["gflops"]
    budgets = {
        "old default": ThreadBudget(os.cpu_count() or 1, 2, cores, "torch default + 2"),
        "auto": resolve_thread_budget(
            "auto", "auto", "cpu", gflops_per_image=gflops, decode_ahead=True
        ),
    }
    for t in range(1, cores + 1):
        for w in range(0, cores - t + 1):
            budgets.setdefault(f"{t} thr + {w} wkr", ThreadBudget(t, w, cores, "grid"))
    print(f"  splits (best of {repeats}): {'threads':>8}{'workers':>8}{'img/s':>9}"
          f"{'x old default':>15}")  # fmt: skip
    rates = {
        label: best_of(lambda b=b: end_to_end(emb, cat, batch, b), repeats)
        for label, b in budgets.items()
    }
    for label, b in budgets.items():
        print(f"  {label:<26}{b.intra_op:>8}{b.workers:>8}{rates[label]:>9.1f}"
              f"{rates[label] / rates['old default']:>15.2f}")  # fmt: skip
    print(f"  auto chose: {budgets['auto'].reason}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["efficientnet_lite0", "test_resnet"])
    ap.add_argument("--images", type=int, default=None,
                    help="test images (JPEG, 384 px); default 192 for models under 1 GFLOP, "
                         "64 for larger ones")  # fmt: skip
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds (median)")
    ap.add_argument("--all-paths", action="store_true",
                    help="also the steps between (uint8 inline; ahead at nice 0)")  # fmt: skip
    ap.add_argument("--splits", action="store_true", help="also time every thread/worker split")
    ap.add_argument("--repeats", type=int, default=2, help="best of, for --splits")
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
            cat = catalogue(args.images or (192 if gflops < 1 else 64))
            ceiling_rounds(name, emb, cat, args.batch, args.rounds, args.all_paths)
            if args.splits:
                splits_table(name, emb, cat, args.batch, args.repeats, cores)
        gpu_section(args.models, catalogue(args.images or 192), args.batch)
        print(f"\nload average {os.getloadavg()}")


if __name__ == "__main__":
    main()
