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

The other half of a block is **candidate selection**, fused with the product
(:func:`block_candidates`): the product of a block of queries runs in tiles of ~:data:`TILE_BYTES`
(index rows by queries, so every tile is contiguous), and right after each tile's product the
same thread reduces it to the maxima of strided groups of :data:`SELECT_GROUP` index rows (one
pass of element-wise maxima over a tile still in cache); once per block, the ``c`` best groups
per query are chosen and ``torch.topk`` runs over their members only. Each block runs on one
thread with single-threaded libraries (:func:`run_blocks`), ``threads`` blocks at once: a
multi-threaded OpenBLAS call leaves its worker threads spinning for a while after it returns
(``THREAD_TIMEOUT``), and selection or re-scoring started then fought them for the cores (on 2
cores, ``torch.topk`` after each product took 0.58 s with 2 torch threads against 0.30 s
isolated). The measurement behind ``auto`` times both paths this way (tiles, selection, one
thread per block).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

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
SELECT_GROUP = 16  # members per group in the first selection stage (block_candidates)
CALIBRATION_CAND = 8  # candidates per row selected in the timing (k = 5, self, margin 2)
_MEMO: dict[str, str] = {}
TILE_BYTES = 4 * 2**20  # one column tile of a block's scores: stays in the core's cache
T = TypeVar("T")
R = TypeVar("R")


def matmul_into(path: str, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = a @ b.T`` in float32 through ``path`` (``numpy`` or ``torch``)."""
    if path == "numpy":
        np.matmul(a, b.T, out=out)
    elif path == "torch":
        import torch  # heavy; only when the torch path is chosen

        torch.mm(torch.from_numpy(a), torch.from_numpy(b).T, out=torch.from_numpy(out))
    else:
        raise ValueError(f"matmul path must be one of {MATMUL_PATHS} or 'auto', got {path!r}")


def top_candidates(scores: Any, n_cand: int, group: int = SELECT_GROUP) -> tuple[Any, Any]:
    """The ``n_cand`` largest values of each row of a 2-D float32 torch tensor, and their columns.

    Exact, in two stages. With ``g = n // group`` groups, group ``j`` is the strided set of
    columns ``j, j + g, j + 2g, ...`` (``group`` of them), so the group maxima are ``group - 1``
    element-wise maxima of contiguous column slices (one SIMD pass over the scores, no reduction
    loop per group); then the ``n_cand`` groups with the largest maxima are kept and
    ``torch.topk`` runs over their columns (and the ``n % group`` columns past the last full
    slice) only. Every value among a row's ``n_cand`` largest lies in one of those groups (a value
    beaten by fewer than ``n_cand`` others has fewer than ``n_cand`` group maxima above it), and
    every value left out is <= the smallest value returned, so the values equal ``torch.topk``'s
    (which columns are returned among exactly equal values may differ; the exact backend
    resolves ties by id).

    Returns:
        ``(values, columns)``, each ``(rows, n_cand)``, unsorted.
    """
    import torch  # heavy; only the exact backend selects

    b, n = scores.shape
    n_groups = n // group
    if n_groups <= 2 * n_cand:  # too few groups for the first stage to save anything
        return torch.topk(scores, n_cand, dim=1, sorted=False)
    s = scores.numpy()
    main = n_groups * group
    gmax = s[:, :n_groups].copy()
    for j in range(1, group):
        np.maximum(gmax, s[:, j * n_groups : (j + 1) * n_groups], out=gmax)
    best = torch.topk(torch.from_numpy(gmax), n_cand, dim=1, sorted=False).indices
    cols = (best[:, :, None] + n_groups * torch.arange(group)[None, None, :]).reshape(b, -1)
    if main < n:  # the columns past the last full slice are always candidates
        cols = torch.cat([cols, torch.arange(main, n).expand(b, n - main)], dim=1)
    top, pos = torch.topk(torch.gather(scores, 1, cols), n_cand, dim=1, sorted=False)
    return top, torch.gather(cols, 1, pos)


def tile_rows(block: int, n: int, tile_bytes: int | None = None) -> int:
    """Index rows per tile so that a ``(rows, block)`` float32 tile fits ``tile_bytes``.

    A multiple of :data:`SELECT_GROUP`, at least ``16 * SELECT_GROUP``, at most ``n``.
    """
    rows = (tile_bytes or TILE_BYTES) // max(1, 4 * block) // SELECT_GROUP * SELECT_GROUP
    return int(min(n, max(16 * SELECT_GROUP, rows)))


def tile_buffer(block: int, n: int) -> np.ndarray:
    """Scratch for one block of ``block`` queries: its ``(n, block)`` float32 scores (1-D)."""
    return np.empty(block * n, dtype=np.float32)


def _tiles(queries: np.ndarray, index: np.ndarray, buf: np.ndarray) -> Iterator[tuple[int, Any]]:
    """``(first index row, view)`` for each tile of the ``(n, b)`` scores ``index @ queries.T``.

    The scores are kept transposed (index rows by queries) so that every tile, and every group
    slice of it, is one contiguous run of memory.
    """
    b, n = queries.shape[0], index.shape[0]
    if buf.size < b * n:
        raise ValueError(f"score buffer too small: {buf.size} < {b * n} elements")
    width = tile_rows(b, n)
    for start in range(0, n, width):
        stop = min(n, start + width)
        yield start, buf[start * b : stop * b].reshape(stop - start, b)


def block_candidates(
    path: str, queries: np.ndarray, index: np.ndarray, n_cand: int, buf: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_cand`` best fast scores of each query against ``index``, and their columns.

    The fused step of the exact search, run on ONE thread per block (see :func:`run_blocks`).
    The product is computed one tile of :func:`tile_rows` index rows at a time (~
    :data:`TILE_BYTES`, transposed: ``index_tile @ queries.T``) into the block's scores in
    ``buf``; right after each tile's product, while it is in that core's cache, the same thread
    takes the maxima of its :data:`SELECT_GROUP` strided groups of index rows (group ``j`` of a
    ``w``-row tile: rows ``j, j + w/g, ...``), as element-wise maxima of contiguous slices. Once
    per block, the ``n_cand`` groups with the largest maxima are chosen per query and
    ``torch.topk`` runs over their members only. Exact for the same reason as
    :func:`top_candidates`: a value among a query's ``n_cand`` largest lies in one of its
    ``n_cand`` best groups, and every value left out is <= the smallest returned.

    Args:
        path: The product path (:func:`matmul_into`).
        queries: ``(b, d)`` float32 queries.
        index: ``(n, d)`` float32 index vectors.
        n_cand: Candidates per query (clamped to ``n``).
        buf: 1-D float32 scratch of :func:`tile_buffer` ``(b, n)`` elements (or more).

    Returns:
        ``(values, columns)``: float32 and int64 arrays ``(b, min(n_cand, n))``, unsorted;
        ``columns`` are index positions.
    """
    import torch  # heavy; see top_candidates

    b, n = queries.shape[0], index.shape[0]
    c, g = min(n_cand, n), SELECT_GROUP
    width = tile_rows(b, n)
    sizes = [min(width, n - start) // g for start in range(0, n, width)]  # groups per tile
    gmax = np.empty((sum(sizes), b), dtype=np.float32)  # group maxima, filled tile by tile
    base, stride, rest, at = [], [], [], 0
    for (start, out), ng in zip(_tiles(queries, index, buf), sizes, strict=True):
        w = out.shape[0]
        matmul_into(path, index[start : start + w], queries, out)
        if ng:
            m = gmax[at : at + ng]
            np.maximum(out[:ng], out[ng : 2 * ng], out=m)
            for j in range(2, g):
                np.maximum(m, out[j * ng : (j + 1) * ng], out=m)
            base.append(start + np.arange(ng))
            stride.append(np.full(ng, ng))
            at += ng
        rest.extend(range(start + ng * g, start + w))  # past the last full slice: candidates
    scores_t = buf[: b * n].reshape(n, b)
    if at <= 2 * c:  # too few groups for the second stage to save anything
        v, col = torch.topk(torch.from_numpy(scores_t).T, c, dim=1, sorted=False)
        return v.numpy(), col.numpy()
    gm = torch.from_numpy(np.ascontiguousarray(gmax.T))  # (b, groups)
    best = torch.topk(gm, c, dim=1, sorted=False).indices.numpy()
    members = np.concatenate(stride)[best][:, :, None] * np.arange(g)
    cols = (np.concatenate(base)[best][:, :, None] + members).reshape(b, -1)
    if rest:
        cols = np.concatenate([cols, np.broadcast_to(np.array(rest), (b, len(rest)))], axis=1)
    vals = scores_t.reshape(-1)[cols * b + np.arange(b)[:, None]]  # scores_t[cols, row]
    v, pos = torch.topk(torch.from_numpy(vals), c, dim=1, sorted=False)
    return v.numpy(), np.take_along_axis(cols, pos.numpy(), axis=1)


def tiled_product(path: str, queries: np.ndarray, index: np.ndarray, buf: np.ndarray) -> None:
    """The products of :func:`block_candidates` alone, same tiles and calls, no selection.

    The floor of the fused step: the benchmark times it to tell the cost of selection and
    re-scoring from that of the tiling.
    """
    for start, out in _tiles(queries, index, buf):
        matmul_into(path, index[start : start + out.shape[0]], queries, out)


def search_workers(threads: int | None) -> int:
    """Blocks searched at once: ``threads``, else torch's current thread count."""
    import torch  # heavy; see top_candidates

    return threads if threads is not None else torch.get_num_threads()


@contextlib.contextmanager
def single_threaded_libraries() -> Iterator[None]:
    """BLAS (threadpoolctl: OpenBLAS, MKL) and torch on one thread each, restored on exit."""
    import torch  # heavy; see top_candidates

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(old)


def run_blocks(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``[fn(item) for item in items]`` on ``workers`` threads, libraries single-threaded.

    The heavy calls (BLAS, torch, numpy's gathers) release the GIL, so ``workers`` blocks run
    at once, each on one core with its tile in that core's cache, and no BLAS worker thread is
    left spinning after a product to fight the selection for the cores (see module doc).
    """
    with single_threaded_libraries():
        if workers <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(fn, items))


def blas_fingerprint(threads: int | None) -> dict[str, object]:
    """What decides which product path is faster here (the key of the cached choice)."""
    import torch  # heavy; see top_candidates

    cpu, flags = platform.machine(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = hashlib.sha1(line.encode()).hexdigest()[:12]
                break
    return {
        "measured": "tiles+selection, 1 thread per block",  # older choices re-measure
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
    """Effective GFLOP/s of each path on ``256 x 8192 x dim`` blocks (best of ``repeats``).

    Timed as the search runs them: :func:`block_candidates` (tiled product and selection) on
    single-threaded libraries, one block per worker at once (:func:`run_blocks`).
    """
    rng = np.random.default_rng(0)
    m, n = _CALIBRATION_SHAPE
    a = rng.standard_normal((m, dim), dtype=np.float32)
    b = rng.standard_normal((n, dim), dtype=np.float32)
    workers = search_workers(threads)
    bufs = [tile_buffer(m, n) for _ in range(workers)]
    best = dict.fromkeys(MATMUL_PATHS, float("inf"))
    for rep in range(repeats + 1):  # the first round warms up (pools, buffers)
        for path in MATMUL_PATHS:  # interleaved, so a noisy neighbour hurts both alike
            t0 = time.perf_counter()
            run_blocks(lambda buf, p=path: block_candidates(p, a, b, CALIBRATION_CAND, buf),
                       bufs, workers)  # fmt: skip
            if rep:
                best[path] = min(best[path], time.perf_counter() - t0)
    return {path: 2.0 * m * n * dim * workers / t / 1e9 for path, t in best.items()}


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
