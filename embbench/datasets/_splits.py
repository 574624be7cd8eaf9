"""Seeded, deterministic splits of a dataset's items (re-exported by ``_common``)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _allocate(counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Spread ``total`` over groups proportionally to ``counts`` (largest remainder), each < n."""
    cap = np.maximum(counts - 1, 0)
    eligible = cap.sum()
    total = int(min(total, eligible))
    if total <= 0:
        return np.zeros_like(counts)
    quota = counts * (total / counts[cap > 0].sum())
    quota[cap == 0] = 0
    take = np.minimum(np.floor(quota).astype(np.int64), cap)
    remaining = total - int(take.sum())
    if remaining > 0:
        frac = quota - np.floor(quota)
        tiebreak = rng.random(len(counts))
        order = np.lexsort((tiebreak, -frac))
        for i in order:
            if remaining == 0:
                break
            if take[i] < cap[i]:
                take[i] += 1
                remaining -= 1
    return take


def stratified_pick(
    items: pd.DataFrame,
    candidates: pd.Index | np.ndarray,
    stratify: str,
    fraction: float,
    seed: int,
) -> pd.Index:
    """Pick about ``fraction`` of the ``candidates`` rows, stratified by the column ``stratify``.

    Every class keeps at least one image out of the pick (a class with one image is never
    picked). Deterministic for a seed, whatever the row order: rows are ordered by
    ``(stratify, item_id)`` before the seeded shuffle.

    Args:
        items: The catalogue table.
        candidates: Index labels of the rows to pick from.
        stratify: The class column.
        fraction: Share of the candidate rows to pick.
        seed: Random seed.

    Returns:
        Index labels of the picked rows.
    """
    rows = items.loc[candidates, [stratify, "item_id"]].copy()
    if rows.empty or fraction <= 0:
        return pd.Index([])
    rows["_key"] = rows[stratify].astype(str)
    rows = rows.sort_values(["_key", "item_id"], kind="stable")
    groups = rows.groupby("_key", sort=True).indices
    keys = list(groups)
    counts = np.array([len(groups[k]) for k in keys], dtype=np.int64)
    rng = np.random.default_rng(seed)
    take = _allocate(counts, int(round(len(rows) * fraction)), rng)
    picked = []
    for key, n in zip(keys, take, strict=True):
        if n:
            idx = groups[key]
            picked.extend(rows.index[rng.permutation(idx)[:n]])
    return pd.Index(picked)


def group_pick(
    items: pd.DataFrame,
    candidates: pd.Index | np.ndarray,
    group: str,
    fraction: float,
    seed: int,
) -> pd.Index:
    """Pick whole classes (column ``group``) until about ``fraction`` of the rows are picked.

    Used for the validation split of class-disjoint (``dml``) schemes, so that validation
    classes are unseen in training like the test classes. At least one class stays unpicked.
    """
    rows = items.loc[candidates, [group]]
    if rows.empty or fraction <= 0:
        return pd.Index([])
    keys = sorted(rows[group].astype(str).unique())
    sizes = rows[group].astype(str).value_counts()
    rng = np.random.default_rng(seed)
    order = [keys[i] for i in rng.permutation(len(keys))]
    target = len(rows) * fraction
    chosen: set[str] = set()
    n = 0
    for key in order[:-1]:
        if n >= target:
            break
        chosen.add(key)
        n += int(sizes[key])
    return rows.index[rows[group].astype(str).isin(chosen)]


def carve_val(
    items: pd.DataFrame,
    *,
    stratify: str,
    fraction: float,
    seed: int,
    by_class: bool = False,
) -> pd.DataFrame:
    """Move about ``fraction`` of the ``train`` rows to a new ``val`` split (seeded).

    Args:
        items: The catalogue table with a ``split`` column.
        stratify: Class column (stratification, or the unit of a class-disjoint pick).
        fraction: Share of train moved to val.
        seed: Random seed.
        by_class: Move whole classes (class-disjoint schemes) instead of images per class.

    Returns:
        The table with the ``split`` column updated (a copy).
    """
    items = items.copy()
    train = items.index[items["split"] == "train"]
    pick = group_pick if by_class else stratified_pick
    val = pick(items, train, stratify, fraction, seed)
    items.loc[val, "split"] = "val"
    return items


def assign_test(items: pd.DataFrame, *, stratify: str, fraction: float, seed: int) -> pd.DataFrame:
    """Put every row in ``train`` except a stratified ``fraction`` in ``test`` (seeded)."""
    items = items.copy()
    items["split"] = "train"
    test = stratified_pick(items, items.index, stratify, fraction, seed)
    items.loc[test, "split"] = "test"
    return items


def check_fraction(name: str, value: float, *, allow_zero: bool = True) -> float:
    """Validate a split fraction, naming the option in the error."""
    lo_ok = value >= 0 if allow_zero else value > 0
    if not (lo_ok and value < 1):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)
