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

The other half of a block is **candidate selection** (:func:`top_candidates`): the ``c`` best
columns of each row of the ``(block, n)`` score matrix, in two stages (group maxima, then top-k
inside the best groups), which is one memory pass where ``torch.topk`` over whole rows costs ~2x
more. **Its threads depend on the path** (:func:`selection_threads`): after a numpy product,
OpenBLAS's worker threads keep spinning for a while (its ``THREAD_TIMEOUT``), so torch threads
started right then fight them for the cores: on 2 cores, ``torch.topk`` after each product took
0.58 s with 2 torch threads against 0.30 s isolated, and 1 thread did as well as 2. So after a
numpy product the selection runs on one torch thread; after a torch product it shares torch's
pool. The measurement behind ``auto`` times the product *and* the selection of each path, so on a
many-core machine where one selection thread becomes the bottleneck, the torch path wins.
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
from typing import Any, Literal

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
SELECT_GROUP = 64  # columns per group in top_candidates' first stage (64-128 measured best)
CALIBRATION_CAND = 8  # candidates per row selected in the timing (k = 5, self, margin 2)
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


def top_candidates(scores: Any, n_cand: int, group: int = SELECT_GROUP) -> tuple[Any, Any]:
    """The ``n_cand`` largest values of each row of a 2-D float32 torch tensor, and their columns.

    Exact, in two stages: the max of each group of ``group`` consecutive columns, the ``n_cand``
    groups with the largest maxima, then ``torch.topk`` over those groups' columns only. Every
    value among a row's ``n_cand`` largest lies in one of those groups (a value beaten by fewer
    than ``n_cand`` others has fewer than ``n_cand`` group maxima above it), and every value left
    out is <= the smallest value returned, so the values equal ``torch.topk``'s (which columns
    are returned among exactly equal values may differ; the exact backend resolves ties by id).

    Returns:
        ``(values, columns)``, each ``(rows, n_cand)``, unsorted.
    """
    import torch  # heavy; only the exact backend selects

    b, n = scores.shape
    n_groups = n // group
    if n_groups <= 2 * n_cand:  # too few groups for the first stage to save anything
        return torch.topk(scores, n_cand, dim=1, sorted=False)
    main = n_groups * group
    gmax = scores.as_strided((b, n_groups, group), (scores.stride(0), group, 1)).amax(dim=2)
    if main < n:  # the last, partial group
        gmax = torch.cat([gmax, scores[:, main:].amax(dim=1, keepdim=True)], dim=1)
    best = torch.topk(gmax, n_cand, dim=1, sorted=False).indices
    cols = (best[:, :, None] * group + torch.arange(group)[None, None, :]).reshape(b, -1)
    if main == n:
        vals = torch.gather(scores, 1, cols)
    else:
        past_end = cols >= n  # columns of the partial group that do not exist
        cols.clamp_(max=n - 1)
        vals = torch.gather(scores, 1, cols).masked_fill_(past_end, float("-inf"))
    top, pos = torch.topk(vals, n_cand, dim=1, sorted=False)
    return top, torch.gather(cols, 1, pos)


def selection_threads(path: str, threads: int | None) -> int:
    """Torch threads for candidate selection after a product on ``path`` (see module doc)."""
    import torch  # heavy; see top_candidates

    if path == "numpy":
        return 1
    return threads if threads is not None else torch.get_num_threads()


def block_step(
    path: str,
    queries: np.ndarray,
    index: np.ndarray,
    out: np.ndarray,
    n_cand: int,
    threads: int | None,
) -> tuple[Any, Any, Any]:
    """One block of an exact search: ``out = queries @ index.T``, then its top candidates.

    Returns:
        ``(scores, values, columns)``: ``out`` as a torch tensor (shared memory) and the
        ``n_cand`` best values and columns of each row (:func:`top_candidates`).
    """
    import torch  # heavy; see top_candidates

    matmul_into(path, queries, index, out)
    scores = torch.from_numpy(out)
    before = torch.get_num_threads()
    sel = selection_threads(path, threads)
    if sel != before:
        torch.set_num_threads(sel)
    try:
        vals, cols = top_candidates(scores, min(n_cand, out.shape[1]))
    finally:
        if sel != before:
            torch.set_num_threads(before)
    return scores, vals, cols


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
        "measured": "product+selection",  # what measure_paths times; older choices re-measure
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
    """Effective GFLOP/s of each path on one ``256 x 8192 x dim`` block (best of ``repeats``).

    A block is the product and its candidate selection (:func:`block_step`), so the figure
    includes what each path's threading costs the selection.
    """
    rng = np.random.default_rng(0)
    m, n = _CALIBRATION_SHAPE
    a = rng.standard_normal((m, dim), dtype=np.float32)
    b = rng.standard_normal((n, dim), dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)
    best = dict.fromkeys(MATMUL_PATHS, float("inf"))
    with thread_limit(threads):
        for path in MATMUL_PATHS:
            block_step(path, a, b, out, CALIBRATION_CAND, threads)  # warm-up (pools, buffers)
        for _ in range(repeats):  # interleaved, so a noisy neighbour hurts both alike
            for path in MATMUL_PATHS:
                t0 = time.perf_counter()
                block_step(path, a, b, out, CALIBRATION_CAND, threads)
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
