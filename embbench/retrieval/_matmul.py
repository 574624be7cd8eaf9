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

The other half of a block is **candidate selection** (:func:`block_candidates`): the block's
product in ONE call into a ``(block, n)`` buffer (exactly the bare product the benchmark takes as
the floor), then an exact top-k by levels of strided group maxima (:func:`top_candidates`): one
read of the scores, then only ~1/16 of them and the members of ``c`` groups per query. Each
block runs on one thread with single-threaded libraries (:func:`run_blocks`), ``threads`` blocks
at once: a multi-threaded OpenBLAS call leaves its worker threads spinning for a while after it
returns (``THREAD_TIMEOUT``), and selection or re-scoring started then fought them for the cores
(on 2 cores, ``torch.topk`` after each product took 0.58 s with 2 torch threads against 0.30 s
isolated). The measurement behind ``auto`` times both paths this way (product and selection, one
thread per block).

The selection has two implementations with the same values (``select``, :func:`choose_select`):
``numpy`` (:func:`top_candidates`, the levels above as numpy calls) and ``numba``
(:mod:`embbench.retrieval._select_jit`, the same levels in one compiled loop per row: the row's
group maxima in one vectorised pass, the few members read while the row is still in L2, the
small steps as scalar scans instead of numpy calls with per-row overhead). ``auto`` keeps numpy
until this process has searched :data:`JIT_MIN_SCORES` scores, since loading numba costs
~0.5 s once per process, then uses the compiled one.

Where the time goes (``benchmarks/bench_retrieval.py`` prints it for the machine it runs on, as
"where exact's time goes"): at 20k x 768, one 838-query block on one thread of an AMD EPYC (Zen
4, OpenBLAS SkylakeX kernels), in thread CPU time, the product took 243 ms; the numpy
selection 10.1 ms (reading the 64 MiB of scores once for the group maxima 4.7 ms, memory-bound:
the scores of one call do not fit in cache; the rest 5.4 ms), the compiled one 3.7 ms (1.5%;
``scores.max(axis=1)``, one bare read, takes 2.4 ms); re-scoring and ranking 4.7 ms (1.9%).
Taking the product in 4-16 MiB tiles to select while each tile was in cache (an earlier
design) measured worse: the tiles alone cost 1-2.5% (each call repacks the block's queries) and
the selection on them ~8%.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, TypeVar

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
SELECT_PATHS: tuple[str, ...] = ("numpy", "numba")
# Scores a process searches before ``select="auto"`` loads the compiled selection: loading numba
# (with the scipy it imports) and its cached kernel costs ~0.5 s of one core in a new process
# (0.15-0.2 s import, 0.3 s for the first call) and ~120 MB of memory, measured here; the kernel
# saved 0.07-0.12 s of wall time on a 20k x 20k search on 2 cores (~0.2-0.3 ns per score), so
# it pays once a process has searched ~1.5-2.5e9 scores (a 40-50k catalogue searched once).
JIT_MIN_SCORES = 1.5e9
_MEMO: dict[str, str] = {}
# This process's compiled selection: scores searched so far (the auto rule's counter), whether
# the kernel is loaded, whether loading it failed (then auto stays on numpy).
_jit_state: dict[str, float | bool] = {"scores": 0.0, "loaded": False, "failed": False}
_jit_lock = threading.Lock()
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


def _top_columns(a: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``c`` largest values of each row of ``a`` and their columns (unsorted)."""
    cols = np.argpartition(a, a.shape[1] - c, axis=1)[:, a.shape[1] - c :]
    return np.take_along_axis(a, cols, axis=1), cols


def group_maxima(scores: np.ndarray, group: int = SELECT_GROUP) -> np.ndarray:
    """The maxima of the strided column groups of a 2-D float32 array: ``(rows, n // group)``.

    Group ``j`` of a row is its columns ``j, j + g, ..., j + (group - 1) g`` (``g = n //
    group``; the ``n % group`` last columns belong to none). Taken as one reduction over the
    middle axis of a ``(rows, group, g)`` view, which reads each row once, front to back: about
    twice as fast as ``group - 1`` element-wise maxima of column slices, which jump between rows
    (4.5 against 8.9 ms for a cold 838 x 20k block; the read is memory-bound).
    """
    b, n = scores.shape
    g = n // group
    out = np.empty((b, g), dtype=np.float32)
    np.max(scores[:, : group * g].reshape(b, group, g), axis=1, out=out)
    return out


def top_candidates(
    scores: np.ndarray, n_cand: int, group: int = SELECT_GROUP
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_cand`` largest values of each row of a 2-D float32 array, and their columns.

    Exact, by levels: the maxima of :func:`group_maxima` are searched the same way (so at
    20k columns and ``group = 16``: 1,250 group maxima, then 78 maxima of those), then
    ``n_cand`` groups with the largest maxima are kept and only their members (and the
    ``n % group`` columns in no group) are compared. Every value among a row's ``n_cand``
    largest lies in one of those groups (a value beaten by fewer than ``n_cand`` others has
    fewer than ``n_cand`` group maxima above it), and every value left out is <= the smallest
    value returned, so the values equal a full top-k's (which columns are returned among
    exactly equal values may differ; the exact backend resolves ties by id). Rows with at most
    ``2 * n_cand`` groups are searched directly.

    Returns:
        ``(values, columns)``: float32 and int64 arrays ``(rows, n_cand)``, unsorted.
    """
    b, n = scores.shape
    c = min(n_cand, n)
    n_groups = n // group
    if n_groups <= 2 * c:  # too few groups for a level to save anything
        return _top_columns(scores, c)
    _, best = top_candidates(group_maxima(scores, group), c, group)  # the c best groups
    cols = (best[:, :, None] + n_groups * np.arange(group)).reshape(b, -1)
    if n_groups * group < n:  # the columns past the last full slice are always candidates
        rest = np.arange(n_groups * group, n)
        cols = np.concatenate([cols, np.broadcast_to(rest, (b, rest.size))], axis=1)
    vals, pos = _top_columns(np.take_along_axis(scores, cols, axis=1), c)
    return vals, np.take_along_axis(cols, pos, axis=1)


def score_buffer(block: int, n: int) -> np.ndarray:
    """Scratch for one block of ``block`` queries: its ``(block, n)`` float32 scores (1-D)."""
    return np.empty(block * n, dtype=np.float32)


def block_scores(path: str, queries: np.ndarray, index: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """``queries @ index.T`` in float32 into ``buf`` (one call); returns the ``(b, n)`` view.

    The product alone: the benchmark times it as the floor of :func:`block_candidates`.
    """
    b, n = queries.shape[0], index.shape[0]
    if buf.size < b * n:
        raise ValueError(f"score buffer too small: {buf.size} < {b * n} elements")
    scores = buf[: b * n].reshape(b, n)
    matmul_into(path, queries, index, scores)
    return scores


def block_candidates(
    path: str,
    queries: np.ndarray,
    index: np.ndarray,
    n_cand: int,
    buf: np.ndarray,
    select: str = "numpy",
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_cand`` best fast scores of each query against ``index``, and their columns.

    The first step of the exact search, run on ONE thread per block (see :func:`run_blocks`):
    the block's product in one call (:func:`block_scores`, the same call as the bare product
    the benchmark takes as the floor), then the selection: :func:`top_candidates` (``numpy``)
    or its compiled twin (``numba``, :mod:`embbench.retrieval._select_jit`; the same values,
    used where :func:`jit_applies`). The scores stay in ``buf`` (``(b, n)``, row per query) for
    the caller (widening reads them).

    Args:
        path: The product path (:func:`matmul_into`).
        queries: ``(b, d)`` float32 queries.
        index: ``(n, d)`` float32 index vectors.
        n_cand: Candidates per query (clamped to ``n``).
        buf: 1-D float32 scratch of :func:`score_buffer` ``(b, n)`` elements (or more).
        select: The selection path, ``numpy`` or ``numba`` (see :func:`choose_select`).

    Returns:
        ``(values, columns)``: float32 and int64 arrays ``(b, min(n_cand, n))``, unsorted;
        ``columns`` are index positions.
    """
    scores = block_scores(path, queries, index, buf)
    if select == "numba" and jit_applies(index.shape[0], n_cand):
        return _jit().top_candidates(scores, n_cand)
    return top_candidates(scores, n_cand)


def jit_applies(n: int, n_cand: int) -> bool:
    """Whether the compiled selection serves ``n_cand`` candidates among ``n`` columns.

    It needs at least ``n_cand`` groups of groups (``n // 256``); below that the numpy levels
    search the rows directly anyway.
    """
    return n // (SELECT_GROUP * SELECT_GROUP) >= n_cand


def _jit():  # the compiled selection module, imported (and numba loaded) on first use
    import embbench.retrieval._select_jit as jit

    return jit


def choose_select(select: str, n: int, n_scores: float, n_cand: int) -> str:
    """The selection path of one search: ``numpy`` or ``numba``.

    ``auto`` (the default): ``numba`` once the compiled kernel is loaded in this process, or
    once this process's searches, this one included, reach :data:`JIT_MIN_SCORES` scores
    (loading it costs more than it saves before that); ``numpy`` otherwise, where the compiled
    selection does not apply (:func:`jit_applies`), or where numba cannot be imported (logged
    once). ``numba`` forces it (an ImportError says what to install), ``numpy`` forbids it.
    Both give the same values, and the exact search the same ids and distances (tested).

    Args:
        select: ``auto``, ``numpy`` or ``numba``.
        n: Index rows.
        n_scores: Scores this search computes (queries x index rows).
        n_cand: Candidates per query.

    Returns:
        ``numpy`` or ``numba``, what :func:`block_candidates` is to use for this search.
    """
    if select not in ("auto", *SELECT_PATHS):
        raise ValueError(f"select must be 'auto' or one of {SELECT_PATHS}, got {select!r}")
    with _jit_lock:
        _jit_state["scores"] += n_scores
        if select == "numpy" or not jit_applies(n, n_cand):
            return "numpy"
        if select == "numba":
            if not _jit_state["loaded"]:
                try:
                    _load_jit()
                except ImportError as exc:
                    raise ImportError(
                        f"select='numba' needs numba ({exc}); install it (pip install numba) "
                        "or use select='auto'"
                    ) from exc
            return "numba"
        if _jit_state["loaded"]:
            return "numba"
        if _jit_state["failed"] or _jit_state["scores"] < JIT_MIN_SCORES:
            return "numpy"
        try:
            seconds = _load_jit()
        except Exception as exc:  # noqa: BLE001 - whatever failed, the numpy path still serves
            _jit_state["failed"] = True
            logger.warning("exact search: compiled selection unavailable (%s); using numpy", exc)
            return "numpy"
        logger.info(
            "exact search: %.2g scores searched in this process; compiled selection (numba) "
            "loaded in %.2f s",
            _jit_state["scores"],
            seconds,
        )
        return "numba"


def _load_jit() -> float:
    """Import the compiled selection and run it once (numba compiles it or loads its cache).

    Returns:
        The seconds it took.
    """
    t0 = time.perf_counter()
    _jit().top_candidates(np.zeros((1, SELECT_GROUP * SELECT_GROUP), dtype=np.float32), 1)
    _jit_state["loaded"] = True
    return time.perf_counter() - t0


def search_workers(threads: int | None) -> int:
    """Blocks searched at once: ``threads``, else torch's current thread count."""
    import torch  # heavy; imported only when used

    return threads if threads is not None else torch.get_num_threads()


@contextlib.contextmanager
def single_threaded_libraries() -> Iterator[None]:
    """BLAS (threadpoolctl: OpenBLAS, MKL) and torch on one thread each, restored on exit."""
    import torch  # heavy; imported only when used

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
    at once, each on one core, and no BLAS worker thread is
    left spinning after a product to fight the selection for the cores (see module doc).
    """
    with single_threaded_libraries():
        if workers <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(fn, items))


def blas_fingerprint(threads: int | None) -> dict[str, object]:
    """What decides which product path is faster here (the key of the cached choice)."""
    import torch  # heavy; imported only when used

    cpu, flags = platform.machine(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = hashlib.sha1(line.encode()).hexdigest()[:12]
                break
    return {
        "measured": "block product+selection, 1 thread per block",  # older ones re-measure
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

    Timed as the search runs them: :func:`block_candidates` (product and selection) on
    single-threaded libraries, one block per worker at once (:func:`run_blocks`).
    """
    rng = np.random.default_rng(0)
    m, n = _CALIBRATION_SHAPE
    a = rng.standard_normal((m, dim), dtype=np.float32)
    b = rng.standard_normal((n, dim), dtype=np.float32)
    workers = search_workers(threads)
    bufs = [score_buffer(m, n) for _ in range(workers)]
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
