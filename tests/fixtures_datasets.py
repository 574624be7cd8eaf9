"""Tiny fixture trees imitating the published layouts of the six datasets.

Each ``make_*_tree(root)`` writes a handful of tiny generated JPEGs with the real file names and
the real annotation formats (including every quirk the loaders handle) under ``root`` and returns
the dataset folder. The module-level ``EXPECTED`` dict holds the counts the loaders must report.
Importable by any test: ``from fixtures_datasets import make_sop_tree``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

RAM_CV = "Ram C/V Cargo Van Minivan 2012"
CARS_HYPHEN = "Mercedes-Benz S-Class Sedan 2012"  # a real class name with hyphens (class 98 here)
CARS_LAST = "smart fortwo Convertible 2012"  # the real class 196 (lower-case, as published)


def colour(i: int) -> tuple[int, int, int]:
    """A distinct, deterministic colour for class ``i``."""
    rng = np.random.default_rng(i + 1)
    return tuple(int(v) for v in rng.integers(30, 226, 3))


def write_jpeg(
    path: Path, cls: int = 0, view: int = 0, size: tuple[int, int] = (16, 12), mode: str = "RGB"
) -> Path:
    """A small JPEG: a class colour with a view-dependent bar (8x8 to 32x32 px)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = colour(cls)
    arr[: max(1, size[1] // 4), : (view % size[0]) + 1] = 255
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, format="JPEG", quality=90)
    return path


# ---------------------------------------------------------------------------------------------
# Cars196

CARS_CLASSES = (1, 2, 98, 99, 176, 196)  # 3 train + 2 test images each


def _cars_names() -> np.ndarray:
    names = np.empty((1, 196), dtype=object)
    for i in range(196):
        names[0, i] = f"Make{i + 1} Model {i + 1} 2012"
    names[0, 175] = RAM_CV  # class 176 in the fixture (a slash in the name)
    names[0, 97] = CARS_HYPHEN
    names[0, 195] = CARS_LAST
    return names


def _cars_annos(fnames: list[str], classes: list[int], with_class: bool = True) -> np.ndarray:
    """The devkit struct array, in the stored field order bbox_*, class, fname."""
    n = len(fnames)
    x1 = np.arange(1, n + 1, dtype=np.uint16)
    arrays = [x1, x1 + 1, x1 + 20, x1 + 30]
    names = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
    if with_class:
        arrays.append(np.array(classes, dtype=np.uint8))
        names.append("class")
    arrays.append(np.array(fnames, dtype=object))
    names.append("fname")
    return np.rec.fromarrays(arrays, names=names)


def make_cars_devkit_tree(root: Path) -> Path:
    """``root/stanford_cars`` in the devkit (classification) layout; returns that folder.

    Stored field order of the annotations: bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname.
    ``cars_train/00003.jpg`` is grayscale; class 176 is named with a slash.
    """
    base = Path(root) / "stanford_cars"
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    names = _cars_names()
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    for split, per_class in (("train", 3), ("test", 2)):
        fnames, classes = [], []
        for c in CARS_CLASSES:
            for v in range(per_class):
                fname = f"{len(fnames) + 1:05d}.jpg"
                mode = "L" if (split, fname) == ("train", "00003.jpg") else "RGB"
                write_jpeg(base / f"cars_{split}" / fname, c, v, mode=mode)
                fnames.append(fname)
                classes.append(c)
        if split == "train":
            scipy.io.savemat(
                base / "devkit" / "cars_train_annos.mat",
                {"annotations": _cars_annos(fnames, classes)},
            )
        else:
            scipy.io.savemat(
                base / "devkit" / "cars_test_annos.mat",
                {"annotations": _cars_annos(fnames, classes, with_class=False)},
            )
            scipy.io.savemat(
                base / "cars_test_annos_withlabels.mat",
                {"annotations": _cars_annos(fnames, classes)},
            )
    return base


def make_cars_metric_tree(root: Path) -> Path:
    """``root/CARS196`` in the metric-learning layout (``cars_annos.mat`` + ``car_ims/``)."""
    base = Path(root) / "CARS196"
    rel, classes, test = [], [], []
    for c in CARS_CLASSES:
        for v in range(5):
            r = f"car_ims/{len(rel) + 1:06d}.jpg"
            write_jpeg(base / r, c, v, mode="L" if len(rel) == 2 else "RGB")
            rel.append(r)
            classes.append(c)
            test.append(1 if v >= 3 else 0)
    n = len(rel)
    x1 = np.arange(1, n + 1, dtype=np.uint16)
    ann = np.rec.fromarrays(
        [
            np.array(rel, dtype=object),
            x1,
            x1,
            x1 + 9,
            x1 + 9,
            np.array(classes, dtype=np.uint8),
            np.array(test, dtype=np.uint8),
        ],
        names=["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"],
    )
    scipy.io.savemat(base / "cars_annos.mat", {"annotations": ann, "class_names": _cars_names()})
    return base


# ---------------------------------------------------------------------------------------------
# SOP

SOP_CATS = (
    "bicycle",
    "cabinet",
    "chair",
    "coffee_maker",
    "fan",
    "kettle",
    "lamp",
    "mug",
    "sofa",
    "stapler",
    "table",
    "toaster",
)
SOP_TRAIN = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3}  # class_id -> super_class_id, 3 images each
SOP_TEST = {7: 1, 8: 2, 9: 3, 10: 12}


def make_sop_tree(root: Path) -> Path:
    """``root/Stanford_Online_Products`` with header lines, upper-case .JPG, 12 folders."""
    base = Path(root) / "Stanford_Online_Products"
    base.mkdir(parents=True, exist_ok=True)
    for cat in SOP_CATS:
        (base / f"{cat}_final").mkdir(exist_ok=True)
    (base / "Ebay_info.txt").write_text("image_id class_id super_class_id path\n")
    for split, classes in (("train", SOP_TRAIN), ("test", SOP_TEST)):
        lines = ["image_id class_id super_class_id path"]
        image_id = 1  # restarts per file: images are keyed by path, not image_id
        for cls, sup in classes.items():
            product = 111085122800 + cls
            for v in range(3):
                rel = f"{SOP_CATS[sup - 1]}_final/{product}_{v}.JPG"
                write_jpeg(base / rel, cls, v)
                lines.append(f"{image_id} {cls} {sup} {rel}")
                image_id += 1
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    (base / "Ebay_final.txt").write_text("image_id class_id super_class_id path\n")
    return base


# ---------------------------------------------------------------------------------------------
# Food2K

FOOD_NAMES = {
    0: "Fried shrimp",
    1: "Fried shrimp",
    2: "Braised pork",
    3: "Fried shrimp",
    4: "Mapo tofu",
}
FOOD_PER_SPLIT = {"train": 3, "val": 1, "test": 2}


def make_food2k_tree(root: Path) -> Path:
    """``root/Food2K`` with Food2k_complete/<id>/, Food2k_label/*_finetune.txt, names file."""
    base = Path(root) / "Food2K"
    lines: dict[str, list[str]] = {s: [] for s in FOOD_PER_SPLIT}
    for cls in FOOD_NAMES:
        n = 0
        for split, count in FOOD_PER_SPLIT.items():
            for _ in range(count):
                rel = f"{cls}/{n}.jpg"
                write_jpeg(base / "Food2k_complete" / rel, cls, n, size=(12, 12))
                lines[split].append(f"{rel} {cls}")
                n += 1
    (base / "Food2k_label").mkdir(parents=True, exist_ok=True)
    for split, rows in lines.items():
        (base / "Food2k_label" / f"{split}_finetune.txt").write_text("\n".join(rows) + "\n")
    (base / "food2k_label2name_en.txt").write_text(
        "".join(f"{i}--{name}\n" for i, name in FOOD_NAMES.items()), encoding="utf-8"
    )
    return base


# ---------------------------------------------------------------------------------------------
# RP2K

RP2K_TRAIN = ("555（冰炫）", "蓝月亮洗衣液(自然清香) 1kg", "农夫山泉·天然水_550ml", "others")
RP2K_TEST = (*RP2K_TRAIN, "康师傅 红烧牛肉面")  # the last one occurs only in test


def make_rp2k_tree(root: Path) -> Path:
    """``root/rp2k_dataset/all`` with UTF-8 category folders (3 train, 2 test images each)."""
    base = Path(root) / "rp2k_dataset" / "all"
    for split, cats, per in (("train", RP2K_TRAIN, 3), ("test", RP2K_TEST, 2)):
        for i, cat in enumerate(cats):
            for v in range(per):
                write_jpeg(base / split / cat / f"{i}_{v:04d}.jpg", i, v, size=(10, 16))
    return base


# ---------------------------------------------------------------------------------------------
# Products-10K

P10K_CLASSES = {0: 0, 1: 0, 2: 1, 10: 2, 11: 2}  # class -> group


def make_products10k_tree(root: Path) -> Path:
    """``root/products10k``: train/ and test/ reuse the same file names (0.jpg, ...)."""
    base = Path(root) / "products10k"
    train_rows, test_rows = ["name,class,group"], ["name,class,Usage"]
    n = 0
    for cls, group in P10K_CLASSES.items():
        for v in range(3):
            write_jpeg(base / "train" / f"{n}.jpg", cls, v)
            train_rows.append(f"{n}.jpg,{cls},{group}")
            n += 1
    n = 0
    for cls in P10K_CLASSES:
        for v in range(2):
            write_jpeg(base / "test" / f"{n}.jpg", cls, v + 5)
            test_rows.append(f"{n}.jpg,{cls},{'Public' if v == 0 else 'Private'}")
            n += 1
    (base / "train.csv").write_text("\n".join(train_rows) + "\n")
    (base / "test_kaggletest.csv").write_text("\n".join(test_rows) + "\n")
    return base


# ---------------------------------------------------------------------------------------------
# Fashion Product Images

FASHION_HEADER = (
    "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,"
    "usage,productDisplayName"
)
# (masterCategory, subCategory, articleType) -> count of rows with an image
FASHION_CATS = [
    ("Apparel", "Topwear", "Shirts", 8),
    ("Accessories", "Bags", "Handbags", 6),
    ("Footwear", "Shoes", "Sports Shoes", 6),
    ("Personal Care", "Fragrance", "Perfume and Body Mist", 4),
    ("Free Items", "Free Gifts", "Free Gifts", 2),
    ("Sporting Goods", "Sports Equipment", "Footballs", 2),
    ("Home", "Home Furnishing", "Cushion Covers", 1),
]
FASHION_MISSING = (39401, 12347)  # listed in styles.csv, no image (published quirk)
FASHION_COMMA_IDS = (20010, 20011)  # productDisplayName with unquoted commas


def _fashion_rows() -> list[tuple[int, str]]:
    rows: list[tuple[int, str]] = [
        (
            15970,
            "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,"
            "Turtle Check Men Navy Blue Shirt",
        ),
        (
            5389,
            "5389,Unisex,Footwear,Shoes,Sports Shoes,Yellow,,2011,Sports,"
            "Kalenji Kapteren 200 Yellow Fw",
        ),
        (
            20010,
            "20010,Women,Accessories,Bags,Handbags,Black,Summer,2012,Casual,"
            "Lino Perros Women, Black, Handbag",
        ),
        (20011, "20011,Men,Apparel,Topwear,Shirts,NA,Winter,,NA,Scott, International Shirt"),
        (39401, "39401,Men,Apparel,Topwear,Shirts,Blue,Fall,2011,Casual,No Image Shirt"),
        (12347, "12347,Men,Footwear,Shoes,Sports Shoes,Red,Fall,2011,Sports,No Image Shoe"),
    ]
    used = {"Apparel": 2, "Footwear": 1, "Accessories": 1}  # image rows among the quirk rows
    next_id = 30000
    for master, sub, article, count in FASHION_CATS:
        for _ in range(count - used.get(master, 0)):
            usage = "NA" if next_id % 5 == 0 else "Casual"
            rows.append(
                (
                    next_id,
                    f"{next_id},Women,{master},{sub},{article},Green,Spring,2017,"
                    f"{usage},Plain {article} {next_id}",
                )
            )
            next_id += 1
    return rows


def make_fashion_tree(root: Path, *, nested_duplicate: bool = True) -> Path:
    """``root/fashion-dataset`` (full Kaggle layout) with every styles.csv quirk.

    Quirks: two rows with unquoted commas in productDisplayName, literal ``NA``, empty season
    and year, two ids without image, one ``Home`` row, and the nested duplicate
    ``fashion-dataset/fashion-dataset/`` folder (which must not be counted twice).
    """
    base = Path(root) / "fashion-dataset"
    rows = _fashion_rows()
    (base / "styles").mkdir(parents=True, exist_ok=True)
    masters = [m for m, *_ in FASHION_CATS]
    for rid, line in rows:
        (base / "styles" / f"{rid}.json").write_text(json.dumps({"data": {"id": rid}}))
        if rid in FASHION_MISSING:
            continue
        master = line.split(",")[2]
        write_jpeg(base / "images" / f"{rid}.jpg", masters.index(master), rid % 7, size=(8, 11))
    (base / "styles.csv").write_text(
        FASHION_HEADER + "\n" + "\n".join(line for _, line in rows) + "\n", encoding="utf-8"
    )
    (base / "images.csv").write_text(
        "filename,link\n"
        + "".join(f"{rid}.jpg,http://assets.myntassets.com/{rid}.jpg\n" for rid, _ in rows)
    )
    if nested_duplicate:
        dup = base / "fashion-dataset"
        dup.mkdir()
        shutil.copytree(base / "images", dup / "images")
        shutil.copy(base / "styles.csv", dup / "styles.csv")
    return base


EXPECTED = {
    "cars196": {"images": 30, "classes": len(CARS_CLASSES), "train_official": 18, "test": 12},
    "sop": {"images": 30, "train_official": 18, "test": 12, "classes": 10, "super_classes": 4},
    "food2k": {"images": 30, "train": 15, "val": 5, "test": 10, "classes": 5},
    "rp2k": {"images": 22, "train_official": 12, "test": 10, "classes": 5},
    "products10k": {"images": 25, "train_official": 15, "test": 10, "classes": 5, "groups": 3},
    "fashion": {"rows": 29 + 2, "images": 28, "classes": 6},
}
