"""The float32 matrix-product path of the exact backend: numpy (OpenBLAS) or torch (MKL).

Both compute ``queries @ index.T`` in float32 into a caller-owned buffer; they differ only in
speed, and the exact backend re-scores its candidates canonically, so results are identical
whichever path ran (tested). Which is faster depends on the machine and its settings: on a
``1024 x 20k x 768`` product with 2 threads, numpy's OpenBLAS 0.3.31 reached 94 GFLOP/s against
torch's 62 on the project's AVX2 AMD EPYC machines (Haswell kernels), and ~480 against ~207 on a
Zen 5 machine (SkylakeX kernels, ``OPENBLAS_CORETYPE`` unset; ~255 with it set to Haswell).
So the rule is:

* ``matmul="auto"`` (default): for products under :data:`AUTO_MIN_FLOP` (where the choice cannot
  matter) use numpy; otherwise time both paths on a ``256 x 8192 x d`` product (5 interleaved
  runs each, ~0.5 s on a quiet 2-core machine) and cache the winner (numpy unless torch is >= 10%
  faster) per machine in ``cache_dir()/blas_choice.json``, keyed by the CPU, the library
  versions, the BLAS kernels threadpoolctl reports, the ``OPENBLAS_*``/``MKL_*`` environment and
  the thread count. A changed setting measures again.
* ``matmul="numpy"`` or ``"torch"`` forces a path; delete the cache file to measure again (a
  measurement taken while the machine was busy can pick the slower path).

faiss is not offered as a path: faiss-cpu bundles its own older OpenBLAS (0.3.15), which does not
know recent CPUs and falls back to slow kernels unless ``OPENBLAS_CORETYPE`` is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from embbench._utils import atomic_write_json
from embbench.paths import cache_dir

logger = logging.getLogger(__name__)

MatmulPath = Literal["numpy", "torch"]
MATMUL_PATHS: tuple[str, ...] = ("numpy", "torch")
AUTO_MIN_FLOP = 2e9  # below this the path cannot matter (< ~20 ms either way): numpy, no timing
TORCH_MARGIN = 1.1  # torch is chosen only when >= 10% faster than numpy in the measurement
_CALIBRATION_SHAPE = (256, 8192)  # (queries, index rows) of the timing product
_MEMO: dict[str, str] = {}


def matmul_into(path: str, queries: np.ndarray, index: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = queries @ index.T`` in float32 through ``path`` (``numpy`` or ``torch``)."""
    if path == "numpy":
        np.matmul(queries, index.T, out=out)
    elif path == "torch":
        import torch  # heavy; only when the torch path is chosen

        torch.mm(torch.from_numpy(queries), torch.from_numpy(index).T, out=torch.from_numpy(out))
    else:
        raise ValueError(f"matmul path must be one of {MATMUL_PATHS} or 'auto', got {path!r}")


@contextlib.contextmanager
def thread_limit(threads: int | None) -> Iterator[None]:
    """Limit both BLAS pools (OpenBLAS/MKL through threadpoolctl) and torch's to ``threads``."""
    if threads is None:
        yield
        return
    import torch  # heavy; the exact backend imports it anyway for top-k

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(old)


def blas_fingerprint(threads: int | None) -> dict[str, object]:
    """What decides which product path is faster here (the key of the cached choice)."""
    import torch  # heavy; see thread_limit

    cpu, flags = platform.machine(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = hashlib.sha1(line.encode()).hexdigest()[:12]
                break
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "blas": sorted(
            f"{i.get('internal_api')}:{i.get('version')}:{i.get('architecture', '')}"
            for i in threadpool_info()
            if i.get("user_api") == "blas"
        ),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("OPENBLAS", "MKL_"))},
        "threads": threads if threads is not None else torch.get_num_threads(),
    }


def measure_paths(dim: int, threads: int | None, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of each path on a ``256 x 8192 x dim`` float32 product (best of ``repeats``)."""
    rng = np.random.default_rng(0)
    m, n = _CALIBRATION_SHAPE
    a = rng.standard_normal((m, dim), dtype=np.float32)
    b = rng.standard_normal((n, dim), dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)
    best = dict.fromkeys(MATMUL_PATHS, float("inf"))
    with thread_limit(threads):
        for path in MATMUL_PATHS:
            matmul_into(path, a, b, out)  # warm-up (thread pools, packing buffers)
        for _ in range(repeats):  # interleaved, so a noisy neighbour hurts both alike
            for path in MATMUL_PATHS:
                t0 = time.perf_counter()
                matmul_into(path, a, b, out)
                best[path] = min(best[path], time.perf_counter() - t0)
    return {path: 2.0 * m * n * dim / t / 1e9 for path, t in best.items()}


def choose_matmul(dim: int, threads: int | None, flop: float) -> str:
    """The product path for a search of ``flop`` floating-point operations (see module doc)."""
    if flop < AUTO_MIN_FLOP:
        return "numpy"
    fp = blas_fingerprint(threads)
    key = hashlib.sha1(json.dumps([fp, dim], sort_keys=True).encode()).hexdigest()[:16]
    if key in _MEMO:
        return _MEMO[key]
    path = cache_dir() / "blas_choice.json"
    table: dict[str, dict] = {}
    with contextlib.suppress(OSError, ValueError):
        table = json.loads(path.read_text())
    entry = table.get(key)
    if not entry or entry.get("choice") not in MATMUL_PATHS:
        gflops = measure_paths(dim, threads)
        # numpy unless torch is clearly faster: a busy neighbour can swing one timing by 10%.
        choice = "torch" if gflops["torch"] > TORCH_MARGIN * gflops["numpy"] else "numpy"
        entry = {"choice": choice, "gflops": gflops, **fp, "dim": dim}
        table[key] = entry
        with contextlib.suppress(OSError):
            atomic_write_json(path, table)
        logger.info(
            "exact search: measured float32 products %s; using %s (cached in %s)",
            {p: round(g, 1) for p, g in gflops.items()},
            entry["choice"],
            path,
        )
    _MEMO[key] = entry["choice"]
    return entry["choice"]
