"""Fashion Product Images (Kaggle, paramaggarwal), full and small variants.

Layout::

    fashion-dataset/images/<id>.jpg  styles.csv  images.csv  styles/<id>.json
       (the archive also holds a nested duplicate fashion-dataset/fashion-dataset/..., ignored)
    small variant: images/<id>.jpg + styles.csv, or myntradataset/{images,styles.csv}

``styles.csv`` header: ``id,gender,masterCategory,subCategory,articleType,baseColour,season,year,
usage,productDisplayName``. Quirks handled: 22 rows have unquoted commas inside
``productDisplayName`` (rows are split on the first 9 commas and the rest joined, or dropped with
``skip_malformed=True`` as the paper most likely did); literal ``NA`` strings and empty fields
become missing values; 5 ids have no image (dropped, listed as known); masterCategory ``Home``
(1 image) is dropped (params ``exclude``).

Labels: ``masterCategory`` (default: the paper's six categories), ``subCategory``,
``articleType``, ``gender``, ``baseColour``, ``season``, ``usage``; ``year`` and
``productDisplayName`` are kept as extra columns; ``productDisplayName`` is the item text
(``Catalogue.texts``; a row without one keeps it empty) and class names are the label values.
There is no official split: a seeded split stratified by ``masterCategory`` (fractions from
params, the paper's sizes).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from embbench.catalogue import IMAGE_SUFFIXES, Catalogue
from embbench.datasets._common import (
    DatasetLayoutError,
    Layout,
    LoadRequest,
    join_paths,
    read_text_lines,
    stratified_pick,
    suffix,
)
from embbench.datasets._registry import DatasetEntry, register_dataset

logger = logging.getLogger(__name__)

TITLE = "Fashion Product Images"
COLUMNS = [
    "id",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
]
LABELS = ("masterCategory", "subCategory", "articleType", "gender", "baseColour", "season", "usage")

LAYOUT = Layout(
    title=TITLE,
    variants={"kaggle": ("styles.csv", "images")},
    subdirs=(
        "fashion-dataset",
        "myntradataset",
        "fashion-product-images-dataset",
        "fashion-product-images-small",
        "fashion-dataset/fashion-dataset",
    ),
    archives=(
        "fashion-product-images-dataset.zip",
        "fashion-product-images-small.zip",
        "archive.zip",
    ),
    tree="  <root>/styles.csv, <root>/images/<id>.jpg (the archive's fashion-dataset/ folder, "
    "or myntradataset/ of the small variant)",
)


def _value(text: str) -> str | None:
    text = text.strip()
    return None if text in ("", "NA") else text


def read_styles(path: Path) -> tuple[pd.DataFrame, list[int], list[int]]:
    """Parse ``styles.csv`` robustly.

    Args:
        path: The file.

    Returns:
        ``(table, comma_rows, bad_rows)``: the table (``id`` as int, missing values as
        ``None``, and a bool column ``unquoted_commas``), the 1-based line numbers of rows whose
        product name held unquoted commas, and those of rows that could not be parsed at all
        (too few fields or a non-integer id).

    Raises:
        DatasetLayoutError: The header is not the published one.
    """
    lines = read_text_lines(path, TITLE)
    if not lines or [c.strip() for c in lines[0].split(",")] != COLUMNS:
        got = lines[0][:120] if lines else "(empty file)"
        raise DatasetLayoutError(
            f"{TITLE}: {path} line 1 should be the header {','.join(COLUMNS)}, got {got!r}",
            root=path.parent,
        )
    rows, comma_rows, bad_rows = [], [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",", len(COLUMNS) - 1)
        if len(parts) < len(COLUMNS) or not parts[0].strip().isdigit():
            bad_rows.append(lineno)
            continue
        name = parts[-1].strip()
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name, unquoted = name[1:-1].replace('""', '"'), False
        else:
            unquoted = "," in name
        if unquoted:
            comma_rows.append(lineno)
        rows.append([int(parts[0]), *(_value(p) for p in parts[1:-1]), name or None, unquoted])
    table = pd.DataFrame(rows, columns=[*COLUMNS, "unquoted_commas"])
    return table, comma_rows, bad_rows


def _image_files(folder: Path) -> dict[str, str]:
    """``{stem: file name}`` of the images in ``folder`` (one scan, no per-file stat)."""
    out: dict[str, str] = {}
    try:
        with os.scandir(folder) as it:
            for e in it:
                ext = suffix(e.name)
                stem = e.name[: len(e.name) - len(ext)]
                if ext in IMAGE_SUFFIXES and (stem not in out or ext == ".jpg"):
                    out[stem] = e.name
    except FileNotFoundError:
        pass
    return out


def load(req: LoadRequest, *, skip_malformed: bool = False) -> Catalogue:
    """Read Fashion Product Images from ``folder``.

    Args:
        req: What to read: ``folder``: The folder holding ``styles.csv`` and ``images/``;
            ``variant``: ``kaggle`` (the only layout; full and small variants look alike);
            ``info``: The dataset's defaults (``exclude``, ``known_missing``); ``seed``:
            Seed of the split; ``split_scheme``: ``classification`` (the only scheme);
            ``val_fraction``: Share of all images in val; ``test_fraction``: Share of all
            images in test.
        skip_malformed: Drop the rows with unquoted commas in productDisplayName (the paper's
            count) instead of parsing them.

    Returns:
        The catalogue (label columns listed in the module docstring).
    """
    if req.val_fraction + req.test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {req.val_fraction} + "
            f"{req.test_fraction}"
        )
    notes = req.notes
    styles_path = req.folder / "styles.csv"
    table, comma_rows, bad_rows = read_styles(styles_path)
    if bad_rows:
        notes.problems.append(
            f"{styles_path}: {len(bad_rows)} rows could not be parsed and were skipped (lines "
            f"{bad_rows[:5]}); the file looks damaged: download it again"
        )
    if comma_rows:
        if skip_malformed:
            table = table[~table["unquoted_commas"]]
        notes.notes.append(
            f"{len(comma_rows)} rows of {styles_path.name} have unquoted commas in "
            f"productDisplayName (e.g. line {comma_rows[0]}): "
            + ("dropped (skip_malformed)" if skip_malformed else "parsed on the first 9 commas")
        )
    dup = table["id"].duplicated()
    if dup.any():
        notes.problems.append(f"{styles_path}: {int(dup.sum())} duplicate ids; first kept")
        table = table[~dup]
    for column, values in req.info.exclude.items():
        drop = table[column].isin(values)
        if drop.any():
            notes.notes.append(f"dropped {int(drop.sum())} rows with {column} in {list(values)}")
            table = table[~drop]
    images = _image_files(req.folder / "images")
    table = table.copy()
    table["file"] = [images.get(str(i)) for i in table["id"]]
    absent = table["file"].isna()
    missing = [f"images/{i}.jpg" for i in table.loc[absent, "id"]]
    if missing:
        known = set(req.info.known_missing)
        unknown = [m for m in missing if m not in known]
        notes.missing.extend(missing)
        notes.notes.append(
            f"{len(missing)} ids of styles.csv have no image in {req.folder / 'images'} and were "
            f"dropped ({len(missing) - len(unknown)} of them are known to be missing from the "
            "published archive)"
        )
    table = table[~absent]
    if table.empty:
        raise DatasetLayoutError(
            f"{TITLE}: none of the ids in {styles_path} has an image in {req.folder / 'images'}; "
            "extract images/ completely",
            root=req.folder,
        )
    items = pd.DataFrame(
        {
            "item_id": ["images/" + f for f in table["file"]],
            "path": join_paths(req.folder / "images", table["file"]),
        }
    )
    for col in (*LABELS, "year", "productDisplayName"):
        items[col] = table[col].to_numpy()
    # Stratified by masterCategory whatever the label, so the split does not depend on it.
    items = req.assign_test(items, "masterCategory")
    rest = items.index[items["split"] == "train"]
    val = stratified_pick(
        items, rest, "masterCategory", req.val_fraction / (1 - req.test_fraction), req.seed + 1
    )
    items.loc[val, "split"] = "val"
    return req.finish(
        items,
        LABELS,
        extra_columns=("year", "productDisplayName"),
        text_columns=("productDisplayName",),
        seed=req.seed,
        val_fraction=req.val_fraction,
        test_fraction=req.test_fraction,
        val_from="ours",
        skip_malformed=skip_malformed,
    )


register_dataset(DatasetEntry(name="fashion", loader=load, layout=LAYOUT))
