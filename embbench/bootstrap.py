"""Bootstrap confidence intervals of per-query metric means, and the paired bootstrap test.

Per-query values (e.g. ``RetrievalResult.per_query["mMP@5"]`` of :mod:`embbench.metrics`) are
resampled with replacement; intervals are percentile intervals of the resampled means.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["bootstrap_ci", "paired_bootstrap_test"]

_BOOT_CHUNK_ELEMENTS = 4_000_000  # bootstrap draws materialised at once (int64: 32 MB)


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``values``, drawn in chunks."""
    n = len(values)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        draws = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[draws].mean(axis=1)
    return means


def _check_boot_args(values: Any, n_boot: int, alpha: float, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what}: per-query values must be 1-D, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: per-query values contain NaN or inf")
    if n_boot < 1:
        raise ValueError(f"{what}: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{what}: alpha must be in (0, 1), got {alpha}")
    return arr


def bootstrap_ci(
    per_query: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of per-query values.

    Args:
        per_query: Per-query metric values (e.g. ``RetrievalResult.per_query["mMP@5"]``).
        n_boot: Number of bootstrap resamples.
        seed: Random seed.
        alpha: ``1 - alpha`` is the coverage (0.05 gives a 95% interval).

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no values.
    """
    arr = _check_boot_args(per_query, n_boot, alpha, "bootstrap_ci")
    if arr.size == 0:
        return float("nan"), float("nan")
    means = _bootstrap_means(arr, n_boot, seed)
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def paired_bootstrap_test(
    a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float]:
    """Paired bootstrap comparison of two models' per-query values on the same queries.

    The queries are resampled jointly; ``diff`` is ``mean(a - b)``, ``low``/``high`` its
    percentile interval, and ``p_value`` the two-sided bootstrap p-value of "no difference":
    the share of centred resampled differences at least as far from 0 as the observed one,
    ``(1 + #{|m* - diff| >= |diff|}) / (n_boot + 1)``.

    Args:
        a: Per-query values of model A.
        b: Per-query values of model B, same queries in the same order.
        n_boot: Number of bootstrap resamples.
        seed: Random seed.
        alpha: ``1 - alpha`` is the interval's coverage.

    Returns:
        ``{"diff", "low", "high", "p_value"}``.
    """
    x = _check_boot_args(a, n_boot, alpha, "paired_bootstrap_test")
    y = _check_boot_args(b, n_boot, alpha, "paired_bootstrap_test")
    if x.shape != y.shape:
        raise ValueError(
            f"paired_bootstrap_test: a and b must cover the same queries, got {x.shape} and "
            f"{y.shape}"
        )
    if x.size == 0:
        nan = float("nan")
        return {"diff": nan, "low": nan, "high": nan, "p_value": nan}
    d = x - y
    diff = float(d.mean())
    means = _bootstrap_means(d, n_boot, seed)
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    extreme = np.abs(means - diff) >= abs(diff) - 1e-15
    p_value = (1.0 + float(extreme.sum())) / (n_boot + 1.0)
    return {"diff": diff, "low": float(low), "high": float(high), "p_value": min(1.0, p_value)}
