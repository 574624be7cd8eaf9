"""Products-10K.

Layout::

    train/<name>.jpg      # flat, numeric names; the same name can occur in test/
    test/<name>.jpg
    train.csv             # header: name,class,group   (class = SKU id, group = 0..360)
    test_kaggletest.csv   # name,class,Usage (Public/Private); test.csv is accepted too

Images are keyed by ``(split, name)`` (item id ``train/<name>``), since names repeat across
train and test. Labels: ``class`` (SKU) and ``group`` (361 coarse groups). The test file has no
group column: test groups come from the class -> group map of ``train.csv`` (closed set);
classes absent from train get group -1 and are reported. The layout names no class or group
(ids only), so class names (``Catalogue.class_names``) are the ids and there is no item text.
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
    nested_image_dir,
    require_file,
)
from embbench.datasets._registry import DatasetEntry, register_dataset

logger = logging.getLogger(__name__)

TITLE = "Products-10K"
TEST_FILES = ("test_kaggletest.csv", "test.csv")

LAYOUT = Layout(
    title=TITLE,
    variants={"csv": ("train.csv", "train")},
    subdirs=("products10k", "products-10k", "product_10k", "product10k"),
    archives=("train.zip", "test.zip", "products10k.zip", "products-10k.zip"),
    tree=(
        "  <root>/train.csv (name,class,group), <root>/test_kaggletest.csv (name,class,Usage)\n"
        "  <root>/train/<name>.jpg, <root>/test/<name>.jpg"
    ),
)


def _read_csv(path: Path, needed: tuple[str, ...]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DatasetLayoutError(
            f"{TITLE}: cannot parse {path} ({type(err).__name__}: {err}); download it again",
            root=path.parent,
        ) from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DatasetLayoutError(
            f"{TITLE}: {path} lacks column(s) {missing}; its header is {list(df.columns)} "
            f"(expected {','.join(needed)}...)",
            root=path.parent,
        )
    for col in needed[1:]:
        bad = ~df[col].str.strip().str.fullmatch(r"-?\d+")
        if bad.any():
            row = int(bad.to_numpy().argmax()) + 2
            raise DatasetLayoutError(
                f"{TITLE}: {path} line {row}: column {col!r} is not an integer: "
                f"{df[col][bad].iloc[0]!r}",
                root=path.parent,
            )
        df[col] = df[col].str.strip().astype("int64")
    df["name"] = df["name"].str.strip()
    return df


def _file_name(name: str) -> str:
    return name if Path(name).suffix else f"{name}.jpg"


def load(req: LoadRequest) -> Catalogue:
    """Read Products-10K from ``folder``.

    Args:
        req: What to read: ``folder``: The folder holding ``train.csv``; ``variant``:
            ``csv`` (the only layout); ``info``: The dataset's defaults; ``seed``: Seed of
            the val split; ``split_scheme``: ``classification`` (the only scheme);
            ``val_fraction``: Share of train moved to val (stratified by class);
            ``test_fraction``: Unused (the publisher ships test).

    Returns:
        The catalogue with labels ``class`` and ``group``.
    """
    notes = req.notes
    train = _read_csv(
        require_file(req.folder / "train.csv", TITLE, "annotation file"), ("name", "class", "group")
    )
    test_csv = next((req.folder / n for n in TEST_FILES if (req.folder / n).is_file()), None)
    if test_csv is None:
        raise DatasetLayoutError(
            f"{TITLE}: no test annotation file in {req.folder} (expected {TEST_FILES[0]} with "
            f"columns name,class,Usage, or {TEST_FILES[1]}); download it with the test images",
            root=req.folder,
        )
    test = _read_csv(test_csv, ("name", "class"))
    groups_of = train.groupby("class")["group"].agg(lambda g: g.mode().iloc[0])
    inconsistent = train.groupby("class")["group"].nunique()
    if (inconsistent > 1).any():
        notes.problems.append(
            f"{int((inconsistent > 1).sum())} classes in {req.folder / 'train.csv'} have several "
            "groups; the most frequent one is used"
        )
    if "group" in test.columns:
        test["group"] = test["group"].astype("int64")
    else:
        test["group"] = test["class"].map(groups_of)
        unknown = test["group"].isna()
        if unknown.any():
            notes.problems.append(
                f"{int(unknown.sum())} rows of {test_csv} have a class that train.csv does not "
                f"have (e.g. class {int(test.loc[unknown, 'class'].iloc[0])}); their group is -1"
            )
        test["group"] = test["group"].fillna(-1).astype("int64")
    frames = []
    for split, df in (("train", train), ("test", test)):
        img_dir = nested_image_dir(req.folder / split)
        files = [_file_name(n) for n in df["name"]]
        frames.append(
            pd.DataFrame(
                {
                    "item_id": [f"{split}/{f}" for f in files],
                    "path": join_paths(img_dir, files),
                    "split": split,
                    "class": df["class"].to_numpy(),
                    "group": df["group"].to_numpy(),
                }
            )
        )
    items = pd.concat(frames, ignore_index=True)
    dup = items["item_id"].duplicated()
    if dup.any():
        notes.problems.append(
            f"{int(dup.sum())} names are listed twice within one split file (e.g. "
            f"{items.loc[dup, 'item_id'].iloc[0]}); the first row is kept"
        )
        items = items[~dup].reset_index(drop=True)
    items = req.carve_val(items, "class")
    return req.finish(
        items,
        ("class", "group"),
        **req.carved_val_source(),
        test_file=test_csv.name,
    )


register_dataset(DatasetEntry(name="products10k", loader=load, layout=LAYOUT))
