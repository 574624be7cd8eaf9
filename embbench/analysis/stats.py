"""Statistics over the per-query arrays: bootstrap CIs, paired tests, Holm's correction.

:class:`PerQuery` loads the arrays saved beside each result record; :class:`BootstrapCache`
keeps resampled results between reports; :func:`add_confidence_intervals` and
:func:`paired_tests` add the intervals and the tests to the analysis frame.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from embbench._utils import atomic_write_json, stable_hash
from embbench.analysis._common import text as _text
from embbench.bootstrap import bootstrap_ci, paired_bootstrap_test
from embbench.metrics import metric_names
from embbench.paths import runs_dir
from embbench.records import ResultStore

logger = logging.getLogger(__name__)


class PerQuery:
    """Loads (and memoises) the per-query arrays saved beside each result record.

    Args:
        store: The result store holding the records (default ``runs/results``).
    """

    def __init__(self, store: ResultStore | None = None) -> None:
        self.store = store or ResultStore()
        self._memo: dict[Path, dict[str, np.ndarray] | None] = {}

    def path(self, row: Mapping[str, Any]) -> Path | None:
        """Where ``row``'s arrays are (``None`` when the run saved none on this machine)."""
        stage, dataset = row.get("stage"), row.get("dataset_id", row.get("dataset"))
        model, mode, chash = row.get("model"), row.get("mode"), row.get("config_hash")
        if not all(isinstance(v, str) and v for v in (stage, dataset, model, mode, chash)):
            return None
        task = _text(row.get("task")) or "image-image"  # other tasks: <mode>-<task>-<hash>
        json_path = self.store.path(stage, dataset, model, mode, chash, task)
        # runs read from MLflow lack ``per_query_file``: the record was logged before the store
        # named the file, which is always <record stem>-per_query.npz
        name = _text(row.get("per_query_file")) or f"{json_path.stem}-per_query.npz"
        path = json_path.with_name(name)
        return path if path.is_file() else None

    def identity(self, row: Mapping[str, Any]) -> str | None:
        """A key that changes whenever ``row``'s arrays change (path, size, mtime)."""
        path = self.path(row)
        if path is None:
            return None
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"

    def __call__(self, row: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
        """The arrays of ``row`` (``None`` when the run saved none or they are not on disk)."""
        path = self.path(row)
        if path is None:
            return None
        if path not in self._memo:
            try:
                with np.load(path, allow_pickle=False) as z:
                    self._memo[path] = {key: z[key] for key in z.files}
            except (OSError, ValueError) as exc:
                logger.warning("per-query arrays %s unreadable: %s", path, exc)
                self._memo[path] = None
        return self._memo[path]


class BootstrapCache:
    """Bootstrap results keyed by the per-query files and settings they came from.

    Bootstrapping hundreds of results over tens of thousands of queries takes minutes; the
    report is rerun after every stage. Each CI and paired test is stored in
    ``<runs_dir>/analysis/bootstrap.json`` under a key made of the per-query files' identity
    (path, size, modification time), the metric and the bootstrap settings, so only new or
    changed results are resampled.

    Args:
        path: The cache file (default ``<runs_dir>/analysis/bootstrap.json``).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else runs_dir() / "analysis" / "bootstrap.json"
        self._data: dict[str, Any] = {}
        self._dirty = False
        if self.path.is_file():
            try:
                self._data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                logger.warning("ignoring unreadable bootstrap cache %s (%s)", self.path, exc)

    @staticmethod
    def key(*parts: Any) -> str:
        """The cache key of ``parts``."""
        return stable_hash(list(parts), length=24)

    def get(self, key: str) -> Any:
        """The stored value, or ``None``."""
        return self._data.get(key)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (written by :meth:`save`)."""
        self._data[key] = value
        self._dirty = True

    def save(self) -> None:
        """Write the cache if anything was added."""
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self._data)
        self._dirty = False


def _identity(loader: Any, row: Mapping[str, Any]) -> str | None:
    fn = getattr(loader, "identity", None)
    return fn(row) if callable(fn) else None


def add_confidence_intervals(
    df: pd.DataFrame,
    loader: Callable[[Mapping[str, Any]], dict[str, np.ndarray] | None],
    *,
    k: int,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    cache: BootstrapCache | None = None,
) -> pd.DataFrame:
    """Add ``<metric> low`` / ``<metric> high``: percentile bootstrap CIs over the queries.

    Rows without per-query arrays keep ``NaN`` bounds (shown as missing, never as zero).

    Args:
        df: The results table.
        loader: Row -> per-query arrays (see :class:`PerQuery`).
        k: The metric cut-off.
        n_boot: Bootstrap resamples (0 leaves every bound missing).
        seed: Bootstrap seed.
        confidence: Coverage of the intervals.
        cache: Reuses intervals computed earlier from the same per-query files.

    Returns:
        A copy of ``df`` with two columns per metric.
    """
    out = df.copy()
    names = metric_names(k)
    lows = {m: np.full(len(out), np.nan) for m in names}
    highs = {m: np.full(len(out), np.nan) for m in names}
    if n_boot > 0:
        for i, row in enumerate(out.to_dict("records")):
            ident = _identity(loader, row) if cache is not None else None
            key = BootstrapCache.key("ci", ident, n_boot, seed, confidence) if ident else None
            hit = cache.get(key) if key and cache is not None else None
            if hit is None:
                arrays = loader(row)
                if not arrays:
                    continue
                hit = {}
                for m in names:
                    values = arrays.get(m)
                    if values is None or len(values) == 0:
                        continue
                    hit[m] = bootstrap_ci(values, n_boot=n_boot, seed=seed, alpha=1.0 - confidence)
                if key and cache is not None:
                    cache.put(key, hit)
            for m, (lo, hi) in hit.items():
                if m in lows:
                    lows[m][i], highs[m][i] = lo, hi
    for m in names:
        out[f"{m} low"] = lows[m]
        out[f"{m} high"] = highs[m]
    return out


def ci_table(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Long table of every result's metrics with their CI bounds (for the report)."""
    rows = []
    for row in df.to_dict("records"):
        for m in metric_names(k):
            if pd.isna(row.get(m)):
                continue
            rows.append(
                {
                    "dataset": row["dataset"],
                    "entry": row["entry"],
                    "metric": m,
                    "value": row[m],
                    "low": row.get(f"{m} low", np.nan),
                    "high": row.get(f"{m} high", np.nan),
                    "n_queries": row.get("n_queries"),
                }
            )
    return pd.DataFrame(
        rows, columns=["dataset", "entry", "metric", "value", "low", "high", "n_queries"]
    )


def aligned(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Two runs' per-query values of ``metric`` on their common queries, in the same order.

    Queries are matched by the saved ``query_index`` (the query's position in its split), so
    runs that excluded different lone queries still pair up correctly.
    """
    va, vb = np.asarray(a[metric], dtype=float), np.asarray(b[metric], dtype=float)
    qa = np.asarray(a.get("query_index", np.arange(len(va))))
    qb = np.asarray(b.get("query_index", np.arange(len(vb))))
    if len(qa) != len(va) or len(qb) != len(vb):
        raise ValueError(
            f"per-query arrays of {metric}: query_index has {len(qa)}/{len(qb)} entries for "
            f"{len(va)}/{len(vb)} values"
        )
    _, ia, ib = np.intersect1d(qa, qb, assume_unique=True, return_indices=True)
    return va[ia], vb[ib]


def _pairable(ra: Mapping[str, Any], rb: Mapping[str, Any]) -> str:
    """Why two results cannot be compared query by query ('' when they can)."""
    for col in ("dataset_fingerprint", "label", "protocol", "query_split"):
        va, vb = ra.get(col), rb.get(col)
        if isinstance(va, str) and isinstance(vb, str) and va != vb:
            return f"different {col}"
    return ""


def paired_test(
    ra: Mapping[str, Any],
    rb: Mapping[str, Any],
    loader: Callable[[Mapping[str, Any]], dict[str, np.ndarray] | None],
    metric: str,
    *,
    n_boot: int,
    seed: int,
    alpha: float,
    cache: BootstrapCache | None = None,
) -> dict[str, Any]:
    """Paired bootstrap test of two results on their common queries.

    Returns:
        ``{"diff", "low", "high", "p_value", "n_common", "note"}``; NaN values and a ``note``
        when the test could not be run (no per-query arrays, different query sets).
    """
    nan = math.nan
    empty = {"diff": nan, "low": nan, "high": nan, "p_value": nan, "n_common": 0}
    why = _pairable(ra, rb)
    if why:
        return {**empty, "note": why}
    key = None
    if cache is not None:
        ia, ib = _identity(loader, ra), _identity(loader, rb)
        if ia and ib:
            key = BootstrapCache.key("paired", ia, ib, metric, n_boot, seed, alpha)
            hit = cache.get(key)
            if hit is not None:
                return hit
    pa, pb = loader(ra), loader(rb)
    if not pa or not pb or metric not in pa or metric not in pb:
        return {**empty, "note": "no per-query arrays"}
    a, b = aligned(pa, pb, metric)
    if len(a) == 0:
        return {**empty, "note": "no common queries"}
    res = paired_bootstrap_test(a, b, n_boot=n_boot, seed=seed, alpha=alpha)
    out = {**res, "n_common": len(a), "note": ""}
    if key is not None and cache is not None:
        cache.put(key, out)
    return out


def holm(p_values: Iterable[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN)."""
    p = np.asarray(list(p_values), dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if not len(ok):
        return out
    order = ok[np.argsort(p[ok])]
    m = len(order)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        out[idx] = running
    return out


def paired_tests(
    df: pd.DataFrame,
    loader: Callable[[Mapping[str, Any]], dict[str, np.ndarray] | None],
    metric: str,
    *,
    pairs: Literal["best", "all"] = "best",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    cache: BootstrapCache | None = None,
) -> pd.DataFrame:
    """Do two results really differ on a dataset? Paired bootstrap over the shared queries.

    Per dataset, the best result (by ``metric``) is compared with every other one
    (``pairs="best"``), or every pair is compared (``"all"``). p-values are Holm-adjusted within
    each dataset.

    Returns:
        One row per pair: ``dataset``, ``a``, ``b`` (entries), ``mean a``, ``mean b``, ``diff``
        (a - b on the common queries), ``low``, ``high``, ``p_value``, ``p_holm``,
        ``significant`` (``p_holm < alpha``; missing when untested), ``n_common``, ``note``.
    """
    cols = [
        "dataset",
        "a",
        "b",
        "mean a",
        "mean b",
        "diff",
        "low",
        "high",
        "p_value",
        "p_holm",
        "significant",
        "n_common",
        "note",
    ]
    if n_boot <= 0 or df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for dataset, group in df[df[metric].notna()].groupby("dataset", sort=True):
        ranked = group.sort_values(metric, ascending=False).to_dict("records")
        if len(ranked) < 2:
            continue
        if pairs == "best":
            todo = [(ranked[0], other) for other in ranked[1:]]
        else:
            todo = [(x, y) for i, x in enumerate(ranked) for y in ranked[i + 1 :]]
        block = []
        for ra, rb in todo:
            res = paired_test(
                ra, rb, loader, metric, n_boot=n_boot, seed=seed, alpha=alpha, cache=cache
            )
            block.append(
                {
                    "dataset": dataset,
                    "a": ra["entry"],
                    "b": rb["entry"],
                    "mean a": ra[metric],
                    "mean b": rb[metric],
                    **{k: res[k] for k in ("diff", "low", "high", "p_value", "n_common", "note")},
                }
            )
        adjusted = holm(r["p_value"] for r in block)
        for r, p in zip(block, adjusted, strict=True):
            r["p_holm"] = p
            r["significant"] = bool(p < alpha) if not np.isnan(p) else None
        rows.extend(block)
    out = pd.DataFrame(rows, columns=cols)
    out.attrs["n_boot"] = n_boot
    return out


def resolvable(n_tests: int, n_boot: int, alpha: float) -> bool:
    """Whether ``n_boot`` resamples can reach significance after Holm over ``n_tests`` tests.

    The smallest bootstrap p-value is ``1 / (n_boot + 1)``; Holm multiplies it by the number of
    tests.
    """
    return n_boot > 0 and n_tests / (n_boot + 1.0) <= alpha
