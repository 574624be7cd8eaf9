"""RP2K retail products.

Layout::

    all/train/<category>/<image>.jpg
    all/test/<category>/<image>.jpg

The split is the folder and the label is the folder name: UTF-8 Chinese product names with
full-width parentheses, spaces, ``_`` and ``·`` (``555（冰炫）``, ``蓝月亮洗衣液(自然清香) 1kg``),
plus a junk class ``others`` that is kept. Labels: ``category`` (the name, NFC-normalised) and
``category_id`` (its position in the sorted union of train and test folder names).

Folder or file names that are not valid UTF-8 (an archive extracted with the wrong filename
encoding) cannot be stored in the catalogue; their images are left out and reported, with the
fix (re-extract with the right encoding), by the loader notes and ``verify``.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from pathlib import Path

import pandas as pd

from embbench.catalogue import Catalogue
from embbench.datasets._common import (
    DatasetLayoutError,
    Layout,
    LoadRequest,
    list_images,
)
from embbench.datasets._registry import DatasetEntry, register_dataset

logger = logging.getLogger(__name__)

TITLE = "RP2K"

LAYOUT = Layout(
    title=TITLE,
    variants={"folders": ("train", "test")},
    subdirs=("all", "rp2k_dataset/all", "rp2k_dataset", "rp2k/all"),
    archives=("rp2k_dataset.zip",),
    tree="  <root>/train/<category>/<image>.jpg, <root>/test/<category>/<image>.jpg "
    "(the archive's all/ folder)",
)


def undecodable(name: str) -> bool:
    """Whether a name from ``os.scandir`` held bytes that are not UTF-8 (surrogate escapes)."""
    return any("\udc80" <= ch <= "\udcff" for ch in name)


def guess_name(name: str) -> str:
    """A readable guess of an undecodable name (GB18030, the usual zip encoding), for messages."""
    raw = os.fsencode(name)
    try:
        return raw.decode("gb18030")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace")


def load(req: LoadRequest) -> Catalogue:
    """Read RP2K from ``folder`` (the archive's ``all/``).

    Args:
        req: What to read: ``folder``: The folder holding ``train/`` and ``test/``;
            ``variant``: ``folders`` (the only layout); ``info``: The dataset's defaults;
            ``seed``: Seed of the val split; ``split_scheme``: ``classification`` (the only
            scheme); ``val_fraction``: Share of train moved to val (stratified by category);
            ``test_fraction``: Unused (the publisher ships test).

    Returns:
        The catalogue with labels ``category`` and ``category_id``.
    """
    notes = req.notes
    rows = []
    garbled: list[str] = []
    stray = 0
    per_split_categories: dict[str, set[str]] = {}
    for split in ("train", "test"):
        split_dir = req.folder / split
        cats: set[str] = set()
        with os.scandir(split_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if not entry.is_dir():
                stray += entry.is_file()
                continue
            if undecodable(entry.name):
                garbled.append(f"{split}/{guess_name(entry.name)}")
                continue
            label = unicodedata.normalize("NFC", entry.name)  # macOS stores NFD
            cats.add(label)
            for fname in list_images(Path(entry.path)):
                if undecodable(fname):
                    garbled.append(f"{split}/{label}/{guess_name(fname)}")
                    continue
                rel = f"{split}/{label}/{unicodedata.normalize('NFC', fname)}"
                rows.append((rel, entry.path + os.sep + fname, split, label))
        per_split_categories[split] = cats
    if not rows:
        raise DatasetLayoutError(
            f"{TITLE}: no images in {req.folder}/train/<category>/ or "
            f"{req.folder}/test/<category>/; the archive is not extracted completely",
            root=req.folder,
        )
    items = pd.DataFrame(rows, columns=["item_id", "path", "split", "category"])
    labels = sorted(per_split_categories["train"] | per_split_categories["test"])
    index = {name: i for i, name in enumerate(labels)}
    items["category_id"] = items["category"].map(index).astype("int64")
    if stray:
        notes.notes.append(
            f"{stray} files directly in {req.folder}/train or /test were ignored "
            "(images must be in a category folder)"
        )
    if garbled:
        notes.problems.append(
            f"{len(garbled)} folder or file names under {req.folder} are not UTF-8 (e.g. "
            f"{garbled[0]!r}, decoded as GB18030) and were left out: the archive was extracted "
            "with the wrong filename encoding; extract it again with "
            "`unzip -O GB18030 rp2k_dataset.zip` (or `7z x`)"
        )
    only_test = per_split_categories["test"] - per_split_categories["train"]
    if only_test:
        notes.notes.append(
            f"{len(only_test)} categories occur only in test (e.g. {sorted(only_test)[0]!r}): "
            "a classifier trained on train cannot predict them"
        )
    items = req.carve_val(items, "category")
    # Class names: the folder names verbatim (product names, '_' and '·' as the publisher wrote).
    name_maps = {
        "category": {c: c for c in labels},
        "category_id": {i: c for c, i in index.items()},
    }
    return req.finish(
        items,
        ("category", "category_id"),
        **req.carved_val_source(),
        n_categories=len(labels),
        name_maps=name_maps,
    )


register_dataset(DatasetEntry(name="rp2k", loader=load, layout=LAYOUT))
