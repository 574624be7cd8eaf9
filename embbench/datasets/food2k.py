"""Food2K.

Layout::

    Food2k_complete/0/ ... 1999/<image>.jpg     # folder = integer label, 0-based
    Food2k_label/train_finetune.txt  val_finetune.txt  test_finetune.txt
    food2k_label2name_en.txt                     # '<id>--<English name>'; names NOT unique

Split lines are ``<class_dir>/<file>.jpg <label>`` (the label is the last space-separated
field). The published train / val / test split is used as is. Labels: ``food_id`` (the integer,
the default: 'Fried shrimp' is the English name of three ids) and ``food_name`` (English).
Item ids are paths relative to ``Food2k_complete``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from embbench.catalogue import Catalogue
from embbench.datasets._common import (
    DatasetLayoutError,
    Layout,
    LoadRequest,
    join_paths,
    label_and_name_maps,
    read_text_lines,
    require_file,
)
from embbench.datasets._registry import DatasetEntry, register_dataset

logger = logging.getLogger(__name__)

TITLE = "Food2K"
SPLIT_FILES = {
    "train": "train_finetune.txt",
    "val": "val_finetune.txt",
    "test": "test_finetune.txt",
}
NAMES_FILE = "food2k_label2name_en.txt"
IMAGE_DIR = "Food2k_complete"

LAYOUT = Layout(
    title=TITLE,
    variants={
        "standard": ("Food2k_label/train_finetune.txt",),
        "flat": ("train_finetune.txt", IMAGE_DIR),
    },
    subdirs=("Food2K", "Food2K_dataset"),
    archives=("Food2k_complete.zip", "Food2k_complete.tar", "Food2K.zip"),
    tree=(
        "  <root>/Food2k_complete/<0..1999>/<image>.jpg\n"
        "  <root>/Food2k_label/{train,val,test}_finetune.txt\n"
        "  <root>/food2k_label2name_en.txt (or inside Food2k_label/)"
    ),
)


def _strip(rel: str) -> str:
    rel = rel.replace("\\", "/").lstrip("/")
    return rel.removeprefix(IMAGE_DIR + "/")


def read_split_file(path: Path) -> list[tuple[str, int]]:
    """Parse ``<dir>/<file>.jpg <label>`` lines; raise naming the file and line if malformed."""
    rows = []
    split_file = require_file(path, TITLE, "split file")
    for lineno, line in enumerate(read_text_lines(split_file, TITLE), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DatasetLayoutError(
                f"{TITLE}: {path} line {lineno} is not '<class_dir>/<file>.jpg <label>': "
                f"{line[:80]!r}",
                root=path.parent,
            )
        rows.append((_strip(parts[0]), int(parts[1])))
    return rows


def read_names(path: Path) -> tuple[dict[int, str], int]:
    """Parse ``<id>--<name>`` lines into ``{id: name}``; also return the count of bad lines."""
    names: dict[int, str] = {}
    bad = 0
    for line in read_text_lines(path, TITLE):
        if not line.strip():
            continue
        head, sep, name = line.partition("--")
        if not sep or not head.strip().isdigit():
            bad += 1
            continue
        names[int(head.strip())] = name.strip()
    return names, bad


def load(req: LoadRequest) -> Catalogue:
    """Read Food2K from ``folder`` with its published train / val / test split.

    Args:
        req: What to read: ``folder``: The folder holding ``Food2k_label/`` (or the split
            files directly); ``variant``: ``standard`` or ``flat`` (split files next to
            ``Food2k_complete/``); ``info``: The dataset's defaults; ``seed``: Unused (the
            publisher's split is used); ``split_scheme``: ``classification`` (the only
            scheme); ``val_fraction``: Unused (the publisher ships val); ``test_fraction``:
            Unused (the publisher ships test).

    Returns:
        The catalogue with labels ``food_id`` and ``food_name``.
    """
    label_dir = req.folder / "Food2k_label" if req.variant == "standard" else req.folder
    image_dir = req.folder / IMAGE_DIR
    notes = req.notes
    if not image_dir.is_dir():
        raise DatasetLayoutError(
            f"{TITLE}: image folder {image_dir} not found (expected "
            f"{image_dir}/<0..1999>/<image>.jpg); extract Food2k_complete into {req.folder}",
            root=req.folder,
        )
    frames = []
    for split, fname in SPLIT_FILES.items():
        rows = read_split_file(label_dir / fname)
        frames.append(pd.DataFrame(rows, columns=["item_id", "food_id"]).assign(split=split))
    items = pd.concat(frames, ignore_index=True)
    dup = items["item_id"].duplicated(keep=False)
    if dup.any():
        example = items.loc[dup, ["item_id", "split"]].head(2).to_dict("records")
        raise DatasetLayoutError(
            f"{TITLE}: {int(dup.sum())} images are listed more than once in the split files in "
            f"{label_dir} (e.g. {example}); the split files are not the published ones",
            root=label_dir,
        )
    items["path"] = join_paths(image_dir, items["item_id"])
    # The folder is the label: flag lines whose label disagrees with their folder.
    folders = items["item_id"].str.split("/", n=1).str[0]
    numeric = folders.str.isdigit()
    mismatch = numeric & (folders.where(numeric, "-1").astype(int) != items["food_id"])
    if mismatch.any():
        ex = items.loc[mismatch, ["item_id", "food_id"]].iloc[0].tolist()
        notes.problems.append(
            f"{int(mismatch.sum())} lines of the split files in {label_dir} give a label that "
            f"differs from their folder (e.g. {ex[0]} labelled {ex[1]}); the label in the file "
            "is used: check that the split files match Food2k_complete"
        )
    names_path = next(
        (
            p
            for p in (
                req.folder / NAMES_FILE,
                label_dir / NAMES_FILE,
                req.folder / "Food2k_label" / NAMES_FILE,
            )
            if p.is_file()
        ),
        None,
    )
    if names_path is None:
        notes.notes.append(
            f"{NAMES_FILE} not found in {req.folder} or {label_dir}: food_name is empty (labels "
            "use the integer food_id, so nothing else changes)"
        )
        items["food_name"] = None
    else:
        names, bad = read_names(names_path)
        if bad:
            notes.notes.append(f"{names_path}: {bad} lines are not '<id>--<name>' and were ignored")
        items["food_name"] = items["food_id"].map(names)
        unnamed = items["food_name"].isna()
        if unnamed.any():
            notes.notes.append(
                f"{names_path} has no name for {items.loc[unnamed, 'food_id'].nunique()} ids"
            )
        counts = pd.Series(names).value_counts()
        shared = counts[counts > 1]
        if len(shared):
            notes.notes.append(
                f"{len(shared)} English names are shared by several ids (e.g. "
                f"{shared.index[0]!r} x{int(shared.iloc[0])}); food_id is the label"
            )
    # Class prompts use the English names file; without it, class_names() falls back to ids.
    name_maps = label_and_name_maps(items, "food_id", "food_name")
    return req.finish(items, ("food_id", "food_name"), val_from="publisher", name_maps=name_maps)


register_dataset(DatasetEntry(name="food2k", loader=load, layout=LAYOUT))
