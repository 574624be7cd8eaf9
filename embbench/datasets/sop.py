"""Stanford Online Products (SOP).

Layout::

    Stanford_Online_Products/
      Ebay_info.txt  Ebay_train.txt  Ebay_test.txt   (+ Ebay_final.txt, <cat>_final.txt: unused)
      bicycle_final/111085122871_0.JPG ...           # upper-case .JPG
      cabinet_final/ chair_final/ ... toaster_final/

``Ebay_train.txt`` / ``Ebay_test.txt``: one header line ``image_id class_id super_class_id path``,
then space-separated rows. Images are keyed by ``path`` (the item id), not ``image_id``.
Labels: ``class_id`` (product, 1..22,634), ``super_class_id`` (12 categories, 1 = bicycle ...
12 = toaster, alphabetical) and ``super_class_name`` (the folder name without ``_final``).
Class names: the category words (``coffee maker``) for both category labels; products
(``class_id``) have no names in the layout, so their class names are the ids.

Split schemes: ``dml`` = Ebay_train / Ebay_test (class-disjoint: the published split; val is
carved as whole products from train); ``classification`` = closed set: every product's images
are split between train and test (stratified by ``class_id``, seeded).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from embbench.catalogue import Catalogue, readable_name
from embbench.datasets._common import (
    DatasetLayoutError,
    Layout,
    LoadRequest,
    join_paths,
    names_by_value,
    read_text_lines,
)
from embbench.datasets._registry import DatasetEntry, register_dataset

logger = logging.getLogger(__name__)

TITLE = "SOP (Stanford Online Products)"
HEADER = ["image_id", "class_id", "super_class_id", "path"]

LAYOUT = Layout(
    title=TITLE,
    variants={"ebay": ("Ebay_train.txt", "Ebay_test.txt")},
    subdirs=("Stanford_Online_Products", "SOP"),
    archives=("Stanford_Online_Products.zip",),
    tree=(
        "  <root>/Ebay_train.txt, <root>/Ebay_test.txt (header: image_id class_id "
        "super_class_id path)\n"
        "  <root>/bicycle_final/111085122871_0.JPG ... <root>/toaster_final/..."
    ),
)


def read_ebay_file(path: Path) -> pd.DataFrame:
    """Parse one ``Ebay_*.txt`` file; raise naming the file and line when it is malformed."""
    lines = read_text_lines(path, TITLE)
    if not lines:
        raise DatasetLayoutError(f"{TITLE}: {path} is empty; extract it again", root=path.parent)
    header = lines[0].split()
    if header != HEADER:
        raise DatasetLayoutError(
            f"{TITLE}: {path} line 1 should be the header {' '.join(HEADER)!r}, got "
            f"{lines[0][:80]!r}; is this the right file?",
            root=path.parent,
        )
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
            raise DatasetLayoutError(
                f"{TITLE}: {path} line {lineno} is not '<image_id> <class_id> <super_class_id> "
                f"<path>': {line[:80]!r}; the file is damaged, extract it again",
                root=path.parent,
            )
        rows.append((parts[3], int(parts[1]), int(parts[2])))
    return pd.DataFrame(rows, columns=["item_id", "class_id", "super_class_id"])


def load(req: LoadRequest) -> Catalogue:
    """Read SOP from ``folder``.

    Args:
        req: What to read: ``folder``: The folder holding ``Ebay_train.txt``; ``variant``:
            ``ebay`` (the only layout); ``info``: The dataset's defaults; ``seed``: Seed of
            the val split (and of the closed-set test split); ``split_scheme``: ``dml``
            (Ebay_train / Ebay_test) or ``classification`` (closed set); ``val_fraction``:
            Share of train moved to val; ``test_fraction``: Share of each product's images
            put in test (``classification`` only).

    Returns:
        The catalogue with labels ``class_id``, ``super_class_id``, ``super_class_name``.
    """
    frames = []
    for split in ("train", "test"):
        df = read_ebay_file(req.folder / f"Ebay_{split}.txt")
        df["split"] = split
        frames.append(df)
    items = pd.concat(frames, ignore_index=True)
    dup = items["item_id"].duplicated(keep=False)
    if dup.any():
        example = items.loc[dup, "item_id"].iloc[0]
        raise DatasetLayoutError(
            f"{TITLE}: {int(dup.sum())} paths are listed twice in Ebay_train.txt/Ebay_test.txt "
            f"(e.g. {example!r}); the files in {req.folder} are not the published ones",
            root=req.folder,
        )
    items["path"] = join_paths(req.folder, items["item_id"])
    items["super_class_name"] = [
        p.split("/", 1)[0].removesuffix("_final") for p in items["item_id"]
    ]
    notes = req.notes
    if req.split_scheme == "classification":
        items = req.assign_test(items, "class_id")
        notes.notes.append(
            f"closed-set split (ours): {req.test_fraction:.0%} of each product's images in test"
        )
    items = req.carve_val(items, "class_id")
    # Class names: the folder's category ("coffee_maker" -> "coffee maker"); products have none.
    cats = names_by_value(items, "super_class_id", "super_class_name")
    name_maps = {"super_class_id": {k: readable_name(v) for k, v in cats.items()}}
    return req.finish(
        items,
        ("class_id", "super_class_id", "super_class_name"),
        **req.carved_val_source(),
        name_maps=name_maps,
    )


register_dataset(DatasetEntry(name="sop", loader=load, layout=LAYOUT))
