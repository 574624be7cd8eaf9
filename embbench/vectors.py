"""Row vectors: the one L2 normaliser and the checks it shares with the retrieval backends.

This module sits with the small utilities (it imports nothing from embbench). Every L2
normalisation of embeddings in the package goes through :func:`l2_normalize`: float32 out,
float64 norms, rows already of unit norm left bit for bit, finite values required, and an
explicit policy for all-zero rows instead of an epsilon.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

__all__ = ["CHECK_CHUNK_BYTES", "as_matrix", "l2_normalize", "row_chunks", "row_norms"]

CHECK_CHUNK_BYTES = 8 * 2**20  # row chunk of the validation passes (no (n, d) temporaries)


def row_chunks(n: int, d: int, budget_bytes: int = CHECK_CHUNK_BYTES) -> Iterator[slice]:
    """Slices of at most ``budget_bytes`` of float64 ``(rows, d)`` work each, covering ``0..n``."""
    step = max(1, budget_bytes // max(1, 8 * d))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def row_norms(arr: np.ndarray) -> np.ndarray:
    """Row L2 norms with float64 accumulation, chunked (no ``(n, d)`` temporary)."""
    out = np.empty(arr.shape[0], dtype=np.float64)
    for sl in row_chunks(*arr.shape):
        part = arr[sl]
        out[sl] = np.einsum("ij,ij->i", part, part, dtype=np.float64)
    return np.sqrt(out)


def as_matrix(x: Any, what: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``(n, d)`` array of finite values (no copy if it is one)."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D (n, dim) array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{what}: expected numeric vectors, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    for sl in row_chunks(*arr.shape):
        finite = np.isfinite(arr[sl]).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
            raise ValueError(
                f"{what}: {len(bad)} rows contain NaN or inf (first at row {int(bad[0])}); "
                "re-compute or drop those embeddings."
            )
    return arr


def l2_normalize(
    vectors: np.ndarray, what: str = "vectors", *, zero_rows: Literal["raise", "keep"] = "raise"
) -> np.ndarray:
    """Row-wise L2 normalisation to float32, idempotent.

    The one normaliser of the package. Norms are accumulated in float64; rows whose norm is
    already 1 within ``2**-20`` are returned unchanged (bit for bit), so normalising normalised
    vectors changes nothing (and returns the same array, no copy). There is no epsilon: an
    all-zero row has no direction, and ``zero_rows`` says what happens to it.

    Args:
        vectors: ``(n, d)`` array.
        what: Name used in error messages.
        zero_rows: ``"raise"`` (retrieval: a zero embedding is a bug upstream) or ``"keep"``
            (training inputs: the row stays all zeros).

    Returns:
        A C-contiguous float32 array of unit rows.

    Raises:
        ValueError: On a non-2-D array, NaN/inf values, or an all-zero row under ``"raise"``.
    """
    arr = as_matrix(vectors, what)
    norms = row_norms(arr)
    zero = norms == 0
    if zero.any() and zero_rows != "keep":
        raise ValueError(
            f"{what}: {int(zero.sum())} rows are all zeros (first at row "
            f"{int(np.flatnonzero(zero)[0])}) and cannot be L2-normalised; check the embeddings."
        )
    scale = np.where(np.abs(norms - 1.0) <= 2.0**-20, 1.0, 1.0 / np.where(zero, 1.0, norms))
    if (scale == 1.0).all():
        return arr
    return np.ascontiguousarray((arr * scale[:, None]).astype(np.float32))
