"""Compiled candidate selection (numba): the exact search's top-k in one read of the scores.

The same selection as :func:`embbench.retrieval._matmul.top_candidates` (strided groups of 16,
two levels of group maxima, then the members of the best groups), run per row in one compiled
loop: the row's group maxima in one pass (an element-wise maximum of its 16 strided slices
into a 5 KB buffer that stays in L1, vectorised by LLVM), the maxima of those the same way,
then the few members that can matter read while the row is still in L2, each small step a
scalar scan over a few hundred values instead of numpy calls with per-row overhead.

Measured (``benchmarks/bench_retrieval.py``, "where exact's time goes") on one 838 x 20k float32
block, one thread of an AMD EPYC (Zen 4), straight after the product wrote it: 3.7-3.9 ms
against 9.9-10.9 ms for the numpy levels; one bare read of the block (``scores.max(axis=1)``)
takes 2.4 ms.

Imported only when used: numba (which imports scipy) and the compiled kernel take ~0.5 s to
load in a new process (see :data:`embbench.retrieval._matmul.JIT_MIN_SCORES`). The kernel is
compiled once (~1.3 s) and cached by numba (``cache=True``: in ``__pycache__`` next to this file
when writable, else numba's per-user cache directory; ``NUMBA_CACHE_DIR`` overrides).
"""

from __future__ import annotations

import logging

import numba as nb
import numpy as np

logger = logging.getLogger(__name__)

GROUP = 16  # members per group, at both levels: _matmul.SELECT_GROUP (not imported from
# there: _matmul imports this module, and the package keeps no import cycles)
_uncached: list[str] = []  # kernels numba could not cache (no writable cache location)


def _compiled(fn):
    """``numba.njit`` (no GIL, no bounds checks), cached on disk where numba finds a place.

    With no writable cache location (a read-only install and home directory) numba refuses
    ``cache=True`` when the function is defined; the kernel is then compiled in each process
    (~1.3 s) instead of failing.
    """
    try:
        return nb.njit(nogil=True, boundscheck=False, cache=True)(fn)
    except RuntimeError as exc:  # "cannot cache function ...: no locator available"
        if not _uncached:
            logger.warning(
                "compiled selection: %s; compiling it in this process (set NUMBA_CACHE_DIR to "
                "a writable folder to cache it)",
                exc,
            )
        _uncached.append(fn.__name__)
        return nb.njit(nogil=True, boundscheck=False)(fn)


@_compiled
def _best(values, ids, size, c, out_v, out_i):
    """The ``c`` largest of ``values[:size]`` (``size >= c``) into ``out_v``/``out_i``.

    Returns:
        The smallest value kept (values equal to it may be left out: callers treat them alike).
    """
    for i in range(c):
        out_v[i] = values[i]
        out_i[i] = ids[i]
    lo = 0
    for i in range(1, c):
        if out_v[i] < out_v[lo]:
            lo = i
    for t in range(c, size):
        x = values[t]
        if x > out_v[lo]:
            out_v[lo] = x
            out_i[lo] = ids[t]
            lo = 0
            for i in range(1, c):
                if out_v[i] < out_v[lo]:
                    lo = i
    return out_v[lo]


@_compiled
def _strided_maxima(src, g, out):
    """``out[j] = max(src[j + m g] for m in range(GROUP))`` for ``j < g`` (vectorised)."""
    for j in range(g):
        out[j] = src[j]
    for m in range(1, GROUP):
        base = m * g
        for j in range(g):
            x = src[base + j]
            out[j] = x if x > out[j] else out[j]


@_compiled
def _collect(src, starts, n_starts, stride, bound, tail_from, tail_to, buf_v, buf_i):
    """The members of groups ``starts`` and the columns in no group that reach ``bound``.

    Members are ``src[starts[t] + m * stride]`` (``m < GROUP``, ``t < n_starts``), the columns
    in no group ``src[tail_from:tail_to]``; those ``>= bound`` go to ``buf_v``/``buf_i``.

    Returns:
        How many were written.
    """
    size = 0
    for t in range(n_starts):
        for m in range(GROUP):
            j = starts[t] + m * stride
            x = src[j]
            if x >= bound:
                buf_v[size] = x
                buf_i[size] = j
                size += 1
    for j in range(tail_from, tail_to):
        x = src[j]
        if x >= bound:
            buf_v[size] = x
            buf_i[size] = j
            size += 1
    return size


@_compiled
def top_candidates_rows(scores, c, vals, cols):
    """Each row's ``c`` largest values and their columns into ``vals``/``cols`` (unsorted).

    ``scores`` is ``(b, n)`` float32, C-contiguous, with ``n // 256 >= c``; ``vals`` and
    ``cols`` are ``(b, c)``.

    Level 1: ``g1 = n // 16`` strided groups (group ``j``: columns ``j + m g1``), their maxima
    ``h1``; level 2: ``g2 = g1 // 16`` strided groups of ``h1``, their maxima ``h2``. The ``c``
    best of ``h2`` bound the ``c``-th best of ``h1`` from below (``c`` distinct values of ``h1``
    reach it), so only ``h1`` values at or above it, among the members of those level-2 groups
    and the level-1 groups in none, can be among the ``c`` best groups; likewise the ``c`` best
    group maxima bound the ``c``-th best score, so only members of those groups, and the columns
    in no group, at or above it are compared. Values equal the full top-k's (exact ties may
    return another of the equal columns).
    """
    b, n = scores.shape
    g1 = n // GROUP
    g2 = g1 // GROUP
    h1 = np.empty(g1, np.float32)
    h2 = np.empty(g2, np.float32)
    h2_ids = np.arange(g2)
    best_v = np.empty(c, np.float32)
    best_i = np.empty(c, np.int64)
    cap = c * GROUP + GROUP
    buf_v = np.empty(cap, np.float32)
    buf_i = np.empty(cap, np.int64)
    starts = np.empty(c, np.int64)
    out_v = np.empty(c, np.float32)
    out_i = np.empty(c, np.int64)
    for r in range(b):
        row = scores[r]
        _strided_maxima(row, g1, h1)
        _strided_maxima(h1, g2, h2)
        bound = _best(h2, h2_ids, g2, c, best_v, best_i)
        for t in range(c):
            starts[t] = best_i[t]
        size = _collect(h1, starts, c, g2, bound, g2 * GROUP, g1, buf_v, buf_i)
        bound = _best(buf_v, buf_i, size, c, best_v, best_i)
        for t in range(c):
            starts[t] = best_i[t]
        size = _collect(row, starts, c, g1, bound, g1 * GROUP, n, buf_v, buf_i)
        _best(buf_v, buf_i, size, c, out_v, out_i)
        for t in range(c):
            vals[r, t] = out_v[t]
            cols[r, t] = out_i[t]


def top_candidates(scores: np.ndarray, n_cand: int) -> tuple[np.ndarray, np.ndarray]:
    """The compiled :func:`embbench.retrieval._matmul.top_candidates` (group 16).

    Args:
        scores: ``(b, n)`` float32, C-contiguous, with ``n // 256 >= n_cand``.
        n_cand: Candidates per row.

    Returns:
        ``(values, columns)``: float32 and int64 arrays ``(b, n_cand)``, unsorted.
    """
    b, n = scores.shape
    if n // (GROUP * GROUP) < n_cand:
        raise ValueError(f"compiled selection needs n // 256 >= n_cand, got n={n}, {n_cand=}")
    vals = np.empty((b, n_cand), dtype=np.float32)
    cols = np.empty((b, n_cand), dtype=np.int64)
    top_candidates_rows(np.ascontiguousarray(scores, dtype=np.float32), n_cand, vals, cols)
    return vals, cols
