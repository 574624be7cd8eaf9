"""Index variants at growing sizes, and a projection to 10M / 100M items.

Vectors are drawn with the class structure of a real embedding (``--embedding x.npy --labels
y.npy``: class centroids and per-dimension spreads, see ``embbench.deploy.scale``) or, without
one, of a seeded stand-in (``--dim`` dims, ``--classes`` classes, ``--noise`` within-class
noise). At each size the faiss families of FLAT, IVF_FLAT, IVF_SQ8, IVF_PQ (nprobe 16), HNSW
(ef 64) and sign codes (BIN_FLAT, Hamming) are built and measured: recall@k against exact search,
mMP@k on the synthetic labels, memory per vector, build time, latency p50/p99 at batch 1 and
throughput at batch 1,000, all labelled ``faiss`` (a Milvus server builds on these families;
Milvus Lite is pure Python and is not timed here). Ratios are printed against the named
baseline, FLAT (exact, float32) at the same size. The last table is a PROJECTION: measured bytes
per vector times items, and latency from a power law fitted on the measured sizes.

Usage::

    python benchmarks/bench_ann_scale.py                              # 10k, 30k, 100k x 512
    python benchmarks/bench_ann_scale.py --sizes 10000 100000 1000000 --threads 2
    python benchmarks/bench_ann_scale.py --embedding emb.npy --labels lab.npy

faiss-cpu bundles an OpenBLAS that does not recognise Zen 5 CPUs (see docs/stack.md): set
``OPENBLAS_CORETYPE`` for this command only if you compare against other BLAS users.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from embbench.deploy import fit_class_structure, measure_scale, project


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    p.add_argument("--embedding", help=".npy of real embeddings to take the class structure from")
    p.add_argument("--labels", help=".npy of their labels")
    p.add_argument("--dim", type=int, default=512, help="stand-in dimension (no --embedding)")
    p.add_argument("--classes", type=int, default=200, help="stand-in classes")
    p.add_argument("--per-class", type=int, default=10, help="stand-in items per class")
    p.add_argument("--noise", type=float, default=0.06, help="stand-in within-class std per dim")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--single", type=int, default=200, help="single-query searches for p50/p99")
    p.add_argument("--targets", type=int, nargs="+", default=[10_000_000, 100_000_000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="log each variant as it is measured")
    return p.parse_args(argv)


def _standin(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    cents = rng.standard_normal((args.classes, args.dim)).astype(np.float32)
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    lab = np.repeat(np.arange(args.classes), args.per_class)
    x = cents[lab] + args.noise * rng.standard_normal((len(lab), args.dim)).astype(np.float32)
    return x, lab


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    if args.embedding:
        x, lab = np.load(args.embedding), np.load(args.labels)
        source = f"class structure of {args.embedding} ({x.shape[0]} x {x.shape[1]})"
    else:
        x, lab = _standin(args)
        source = f"seeded stand-in ({args.classes} classes x {args.per_class}, dim {args.dim})"
    structure = fit_class_structure(x, lab)
    print(
        f"# vectors drawn with the {source}; k={args.k}, {args.queries} queries, "
        f"{args.threads} faiss threads for batches, 1 for single queries; "
        "all timings: faiss families on this machine"
    )
    metric = f"mMP@{args.k}"
    head = (
        f"{'n':>9} {'variant':<22} {'recall':>6} {metric:>7} {'B/vec':>7} {'build s':>8} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'QPS@1k':>8} | vs FLAT: {'mem':>5} {'p99':>6} {metric:>6}"
    )
    print(head)
    print("-" * len(head), flush=True)
    points = []
    for n in sorted(args.sizes):  # one size at a time, printed as it lands
        t0 = time.perf_counter()
        here = measure_scale(
            structure,
            [n],
            k=args.k,
            n_queries=args.queries,
            seed=args.seed,
            threads=args.threads,
            n_single=args.single,
            batch=1000,
        )
        points += here
        base = next(p for p in here if p.variant == "FLAT")
        for p in here:
            t = p.timing
            print(
                f"{p.n:>9,} {p.variant:<22} {p.recall:>6.3f} {p.metrics[metric]:>7.3f} "
                f"{p.bytes_per_vector:>7.0f} {t.build_s:>8.2f} {t.p50_ms:>7.3f} {t.p99_ms:>7.3f} "
                f"{t.qps_batch:>8.0f} | {p.bytes_per_vector / base.bytes_per_vector:>13.3f} "
                f"{t.p99_ms / base.timing.p99_ms:>6.2f} "
                f"{p.metrics[metric] / base.metrics[metric]:>6.3f}"
            )
        print(f"# n={n:,}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(
        "\n# PROJECTION (not measured): memory = bytes/vector x n; p50 = a * n^b (b <= 1) "
        f"fitted on {sorted({p.n for p in points})}; p99 = p50 x p99/p50 at the largest size"
    )
    print(f"{'n':>12} {'variant':<22} {'memory GB':>10} {'p50 ms':>9} {'p99 ms':>9} {'b':>8}")
    for pr in project(points, args.targets):
        print(
            f"{pr.n:>12,} {pr.variant:<22} {pr.memory_bytes / 1e9:>10.1f} {pr.p50_ms:>9.2f} "
            f"{pr.p99_ms:>9.2f} {pr.exponent:>8.2f}"
        )


if __name__ == "__main__":
    main()
