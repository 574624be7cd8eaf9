"""Linear-probe benchmark: embbench's L-BFGS fit against scikit-learn's default solver.

On seeded, L2-normalised "embeddings" with class structure (Gaussian class centroids on the unit
sphere + isotropic noise; default 60k train x 768 dims, 1,000 classes, 10k test) it fits the same
model at the same C twice, in one process, on the same data and thread count:

* **embbench**: :func:`embbench.probe.fit_logistic` (float32 torch, full-batch L-BFGS,
  strong-Wolfe line search, stop at ``max |grad| <= 1e-4`` or ``max_iter`` iterations);
* **scikit-learn**: ``LogisticRegression(C=C, max_iter=max_iter)``: its default solver (lbfgs,
  scipy, ``tol=1e-4``), same objective (multinomial cross-entropy + ``||W||^2 / (2C)``,
  intercept unpenalised). **Same max_iter policy**: both stop at ``--max-iter`` iterations
  (default 100, scikit-learn's default) or at the tolerance, whichever comes first; the output
  says how many each ran and whether it converged.

It prints both times, the ratio, both test accuracies, both final objectives (float64), the
agreement of their predictions, the thread counts and BLAS kernels (threadpoolctl), the load
average before and after (the machine may be shared), and the **physical floor**: the time of
the bare float32 forward and backward products of one loss+gradient evaluation (``X @ W`` and
``X.T @ G``, best of 3) times the number of evaluations the fit ran, i.e. what the fit would
cost if L-BFGS itself, the softmax and the line search were free. ``--grid`` also times the
whole :func:`embbench.probe.linear_probe` (CLIP_benchmark's C search on a val split + refit),
which scikit-learn has no single call for.

Usage::

    python benchmarks/bench_probe.py                          # 60k x 768, 1000 classes, ~2-8 min
    python benchmarks/bench_probe.py --n 20000 --classes 300  # ~10 s to 1 min on 2 cores
    python benchmarks/bench_probe.py --quick                  # seconds: smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Idle OpenMP threads sleep instead of spinning (as tests/conftest.py): on 2 busy cores spinning
# torch threads made each tiny L-BFGS fit ~80x slower. Printed below; override on the command line.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def make_data(n: int, n_test: int, dim: int, classes: int, noise: float, seed: int):
    """Unit-norm class centroids + Gaussian noise of total norm ``noise``, L2-normalised rows."""
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((classes, dim), dtype=np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)

    def split(m: int):
        y = rng.integers(0, classes, m)
        x = cent[y] + (noise / np.sqrt(dim)) * rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32), y

    return split(n), split(n_test)


def bare_products(x: np.ndarray, classes: int, device: str, repeats: int = 3) -> float:
    """Best time of one forward ``X @ W`` and one backward ``X.T @ G`` (float32 torch)."""
    import torch

    xt = torch.from_numpy(x).to(device)
    w = torch.randn(x.shape[1], classes, device=device)
    g = torch.randn(x.shape[0], classes, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        _ = xt @ w
        _ = xt.T @ g
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, c: float) -> float:
    """scikit-learn's scaled objective ``mean CE + ||W||^2 / (2 C n)`` in float64 (blocks)."""
    import torch

    wt = torch.from_numpy(np.asarray(w, np.float64))
    bt = torch.from_numpy(np.asarray(b, np.float64))
    ce = 0.0
    for lo in range(0, len(x), 8192):
        logits = torch.from_numpy(x[lo : lo + 8192].astype(np.float64)) @ wt + bt
        tgt = torch.from_numpy(np.asarray(y[lo : lo + 8192], np.int64))
        ce += float(torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"))
    return ce / len(x) + float((wt * wt).sum()) / (2 * c * len(x))


def blas_lines() -> list[str]:
    from threadpoolctl import threadpool_info

    return [
        f"  {i.get('user_api')}: {i.get('internal_api')} {i.get('version', '')} "
        f"kernels={i.get('architecture', '-')} threads={i.get('num_threads')} "
        f"({Path(i.get('filepath', '')).name})"
        for i in threadpool_info()
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60_000, help="train rows")
    ap.add_argument("--test", type=int, default=10_000, help="test rows")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=6.0, help="noise norm (centroids have norm 1)")
    ap.add_argument("--c", type=float, default=1.0, help="inverse L2 strength (sklearn's C)")
    ap.add_argument("--max-iter", type=int, default=100, help="both solvers (sklearn default)")
    ap.add_argument("--threads", type=int, default=None, help="default: usable cores")
    ap.add_argument("--device", default="cpu", help="embbench's device (sklearn: CPU)")
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--grid", action="store_true", help="also time linear_probe's C search")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2k x 64, 20 classes")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.test, args.dim, args.classes = 2000, 500, 64, 20

    import sklearn
    import torch
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from embbench._threads import available_cores
    from embbench.probe import fit_logistic, linear_probe

    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"{available_cores()} usable; threads for both: {threads}"
    )
    print(
        f"load average before: {os.getloadavg()} (the machine may be shared: times are upper "
        f"bounds)"
    )
    print(
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"OPENBLAS_*: {[k for k in os.environ if k.startswith('OPENBLAS')]}"
    )
    print(f"torch {torch.__version__}, scikit-learn {sklearn.__version__}, numpy {np.__version__}")
    (x, y), (xte, yte) = make_data(args.n, args.test, args.dim, args.classes, args.noise, args.seed)
    print(
        f"data: train {x.shape}, test {xte.shape}, {args.classes} classes, float32, "
        f"noise {args.noise}; C={args.c}, max_iter={args.max_iter}, tol=1e-4 (both)"
    )

    with threadpool_limits(limits=threads):
        print("BLAS (threadpoolctl):")
        print("\n".join(blas_lines()))
        print(
            f"  torch: {torch.get_num_threads()} intra-op threads, MKL "
            f"{torch.backends.mkl.is_available()} (torch's BLAS is linked into it; "
            f"threadpoolctl lists the others)"
        )
        pair = bare_products(x, args.classes, args.device)
        gflop = 2 * 2 * args.n * args.dim * args.classes / 1e9
        print(
            f"bare forward+backward products: {pair:.3f} s per evaluation "
            f"({gflop / pair:.0f} GFLOP/s)"
        )

        # warm-ups, untimed: the first L-BFGS step pays one-time lazy imports (~3 s), sklearn's
        # first fit its own
        fit_logistic(x[:200], y[:200] % 3, 3, args.c, max_iter=5, device=args.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning of the 5-iteration warm-up
            LogisticRegression(max_iter=5).fit(x[:200], y[:200] % 3)
        t = time.perf_counter()
        fit = fit_logistic(
            x, y, args.classes, args.c, max_iter=args.max_iter, device=args.device, seed=args.seed
        )
        t_ours = time.perf_counter() - t
        p_ours = fit.decision(xte).argmax(1)
        acc_ours = float(np.mean(p_ours == yte))
        floor = pair * fit.n_eval
        print(
            f"embbench fit_logistic: {t_ours:.1f} s, {fit.n_iter} iterations, {fit.n_eval} "
            f"evaluations, converged={fit.converged}, test accuracy {acc_ours:.4f}"
        )
        f_ours = objective(x, y, fit.weight, fit.bias, args.c)
        print(f"  objective (float64) {f_ours:.6f}")
        print(
            f"  physical floor (bare products x {fit.n_eval} evaluations): {floor:.1f} s; "
            f"fit / floor = {t_ours / floor:.2f}"
        )

        if not args.skip_sklearn:
            t = time.perf_counter()
            sk = LogisticRegression(C=args.c, max_iter=args.max_iter).fit(x, y)
            t_sk = time.perf_counter() - t
            p_sk = sk.predict(xte)
            acc_sk = float(np.mean(p_sk == yte))
            it = int(np.max(sk.n_iter_))
            print(
                f"scikit-learn LogisticRegression (lbfgs, max_iter={args.max_iter}): "
                f"{t_sk:.1f} s, {it} iterations, converged={it < args.max_iter}, coef dtype "
                f"{sk.coef_.dtype}, test accuracy {acc_sk:.4f}"
            )
            f_sk = objective(x, y, sk.coef_.T, sk.intercept_, args.c)
            print(f"  objective (float64) {f_sk:.6f} (embbench - sklearn: {f_ours - f_sk:+.2e})")
            print(f"  floor at its iterations (>= 1 evaluation each): {pair * it:.1f} s")
            print(
                f"RATIO sklearn / embbench = {t_sk / t_ours:.1f}x; accuracy embbench "
                f"{acc_ours:.4f} vs sklearn {acc_sk:.4f}; predictions agree on "
                f"{np.mean(p_ours == p_sk):.4f}"
            )

        if args.grid:
            (xv, yv), _ = make_data(
                max(args.n // 6, 100), 1, args.dim, args.classes, args.noise, args.seed
            )  # same centroids (same seed), fresh noise
            res = linear_probe(
                x, y, xv, yv, xte, yte, max_iter=args.max_iter, device=args.device, seed=args.seed
            )
            print(
                f"linear_probe (peak search, {len(res.val_accuracy)} fits + refit): "
                f"{res.wall_s:.1f} s, chosen C={res.chosen_c:.3g}, test accuracy "
                f"{np.mean(res.predictions == yte):.4f}"
            )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
