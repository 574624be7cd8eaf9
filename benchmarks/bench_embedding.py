"""Embedding throughput: end-to-end from JPEG files vs the model alone on pre-made tensors.

Baseline: the same model, batch size and torch threads running forward passes on tensors
already in memory (the ceiling). Target: end-to-end images/s from JPEG files through
``embbench.embed.embed_split`` (DataLoader workers decoding while the model runs) at least
0.9x that ceiling for a ViT-B-size model. For a small model the script also shows where the time
goes (decode + preprocess alone vs forward alone), since there decoding can dominate.

Run: ``python benchmarks/bench_embedding.py [--models vit_b16 test_resnet] [--images 192]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from embbench.demo import make_demo_catalogue  # noqa: E402
from embbench.embed import embed_split  # noqa: E402
from embbench.images import load_rgb  # noqa: E402
from embbench.models import create_embedder  # noqa: E402


def model_only(embedder, batch: int, n: int) -> float:
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


def end_to_end(embedder, cat, batch: int, workers: int) -> float:
    n = len(cat.split("test"))
    t0 = time.perf_counter()
    embed_split(embedder, cat, "test", batch_size=batch, num_workers=workers, overwrite=True,
                progress=False)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["vit_b16", "resnet50", "test_resnet"])
    ap.add_argument("--images", type=int, default=192, help="test images (JPEG, 384 px)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EMBBENCH_CACHE"] = str(Path(tmp) / "cache")
        per_product = 8
        n_products = max(1, args.images // per_product)
        cat = make_demo_catalogue(Path(tmp), n_categories=min(8, n_products),
                                  products_per_category=max(1, n_products // min(8, n_products)),
                                  views=(1, 1, per_product), image_size=384)
        paths = cat.split("test")["path"].tolist()
        print(f"{len(paths)} JPEGs of 384x384, batch {args.batch}, {args.workers} workers, "
              f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
        print(f"{'model':<14}{'model-only/s':>14}{'decode-only/s':>15}{'end-to-end/s':>14}"
              f"{'ratio e2e/model':>17}")
        for name in args.models:
            emb = create_embedder(name, weights="random")
            m = model_only(emb, args.batch, max(args.batch * 3, len(paths) // 2))
            d = decode_only(paths[:64], emb.transform)
            e = end_to_end(emb, cat, args.batch, args.workers)
            target = "  (target >= 0.90)" if emb.embed_dim >= 768 else ""
            print(f"{name:<14}{m:>14.1f}{d:>15.1f}{e:>14.1f}{e / m:>17.2f}{target}")


if __name__ == "__main__":
    main()
