"""The six public dataset loaders, the registry and params, and verify, on fixture trees."""

from __future__ import annotations

import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from fixtures_datasets import (
    CARS_CLASSES,
    EXPECTED,
    FASHION_COMMA_IDS,
    FOOD_NAMES,
    P10K_CLASSES,
    RAM_CV,
    RP2K_TEST,
    SOP_TEST,
    SOP_TRAIN,
    make_cars_devkit_tree,
    make_cars_metric_tree,
    make_fashion_tree,
    make_food2k_tree,
    make_products10k_tree,
    make_rp2k_tree,
    make_sop_tree,
    write_jpeg,
)

from embbench.catalogue import CatalogueError
from embbench.datasets import (
    DatasetLayoutError,
    DatasetParamsError,
    UnknownNameError,
    create_catalogue,
    get_dataset_info,
    list_datasets,
    verify,
    verify_main,
)
from embbench.datasets._common import carve_val, stratified_pick
from embbench.datasets._params import default_params_path, load_dataset_params
from embbench.images import load_rgb
from embbench.paths import data_dir

PUBLIC = ("cars196", "sop", "food2k", "rp2k", "products10k", "fashion")


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """All fixture trees, built once (tests that break a tree build their own)."""
    root = tmp_path_factory.mktemp("datasets")
    return {
        "cars196": make_cars_devkit_tree(root),
        "cars_metric": make_cars_metric_tree(root),
        "sop": make_sop_tree(root),
        "food2k": make_food2k_tree(root),
        "rp2k": make_rp2k_tree(root),
        "products10k": make_products10k_tree(root),
        "fashion": make_fashion_tree(root),
    }


def _classes(cat, split: str, col: str | None = None) -> set:
    return set(cat.split(split)[col or cat.default_label])


# ---------------------------------------------------------------------------------------------
# registry and params


def test_registry_names_and_did_you_mean():
    assert set(PUBLIC) | {"manifest", "folder", "demo", "demo_b"} == set(list_datasets())
    assert list_datasets(public_only=True) == sorted(PUBLIC)
    with pytest.raises(UnknownNameError, match="Did you mean 'sop'"):
        create_catalogue("sopp")
    with pytest.raises(UnknownNameError, match="cars196"):
        get_dataset_info("cars")


@pytest.mark.parametrize("name", PUBLIC)
def test_dataset_info_from_params(name):
    info = get_dataset_info(name)
    assert info.public and info.default_label in info.label_columns
    assert info.split_scheme in info.split_schemes
    assert info.protocol in ("within", "cross") and info.k == 5
    assert set(info.follows.values()) <= {"paper", "uned", "publisher", "ours"}
    assert {"label", "split_scheme", "protocol", "k"} <= set(info.follows)
    assert info.published["images"] > 0 and info.default_label in info.published["classes"]
    assert info.paper_table["train"] > 0 and info.licence


def test_params_defaults_stated():
    assert get_dataset_info("sop").default_label == "super_class_id"  # paper: 12 categories
    assert get_dataset_info("cars196").published_splits("dml") == {"train": 8054, "test": 8131}
    assert get_dataset_info("fashion").exclude == {"masterCategory": ("Home",)}
    assert get_dataset_info("demo").default_label == "product"
    assert not get_dataset_info("manifest").public


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "    protocol: within                  # uned: queries = index = test, query "
            "removed by id",
            "    protocol: withn",
            r"datasets\.cars196\.protocol.*'within' or 'cross'",
        ),
        (
            "    label: class                      # paper: 196 categories",
            "    label: klass",
            r"label 'klass' is not one of labels",
        ),
        (
            "    k: 5                              # paper\n    published:\n      images: 16185",
            "    k: 5\n    colour: red\n    published:\n      images: 16185",
            r"datasets\.cars196\.colour.*Extra inputs",
        ),
        (
            "    query_split: test\n    index_split: test\n    k: 5                              "
            "# paper\n    published:\n      images: 16185",
            "    query_split: test\n    index_split: train\n    k: 5\n    published:\n"
            "      images: 16185",
            r"needs query_split == index_split",
        ),
    ],
)
def test_params_validation_names_key_and_value(tmp_path, old, new, message):
    text = default_params_path().read_text(encoding="utf-8")
    assert old in text
    bad = tmp_path / "datasets.yaml"
    bad.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(DatasetParamsError, match=message) as err:
        load_dataset_params(bad)
    assert str(bad) in str(err.value)


def test_params_missing_file(tmp_path):
    with pytest.raises(DatasetParamsError, match="not found"):
        load_dataset_params(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------
# Cars196


def test_cars_devkit_classification(trees):
    cat = create_catalogue("cars196", trees["cars196"].parent)  # finds stanford_cars/ below
    items = cat.items
    assert cat.source["variant"] == "devkit" and cat.root == str(trees["cars196"])
    assert len(items) == EXPECTED["cars196"]["images"]
    counts = items["split"].value_counts()
    assert counts["train"] + counts["val"] == EXPECTED["cars196"]["train_official"]
    assert counts["test"] == EXPECTED["cars196"]["test"] and counts["val"] == 2
    assert items["item_id"].is_unique  # test reuses the train file names
    assert {"cars_train/00001.jpg", "cars_test/00001.jpg"} <= set(items["item_id"])
    assert set(items["class"]) == set(CARS_CLASSES)
    assert _classes(cat, "test") == _classes(cat, "train") | _classes(cat, "val")
    assert items.loc[items["class"] == 176, "class_name"].unique().tolist() == [RAM_CV]
    assert items.loc[items["class"] == 1, "class_name"].iloc[0] == "Make1 Model 1 2012"
    assert all(Path(p).is_file() for p in items["path"])
    gray = items.loc[items["item_id"] == "cars_train/00003.jpg", "path"].iloc[0]
    from PIL import Image

    assert Image.open(gray).mode == "L" and load_rgb(gray).mode == "RGB"


def test_cars_dml_split_is_class_disjoint(trees):
    cat = create_catalogue("cars196", trees["cars196"], split_scheme="dml")
    train, val, test = (_classes(cat, s) for s in ("train", "val", "test"))
    assert train | val == {c for c in CARS_CLASSES if c <= 98}
    assert test == {c for c in CARS_CLASSES if c >= 99}
    assert not train & val  # val is carved as whole classes


def test_cars_mat_field_order_and_reordered_file(trees, tmp_path):
    mat = scipy.io.loadmat(trees["cars196"] / "devkit" / "cars_train_annos.mat")
    assert mat["annotations"].dtype.names == (
        "bbox_x1",
        "bbox_y1",
        "bbox_x2",
        "bbox_y2",
        "class",
        "fname",
    )
    base = tmp_path / "copy"
    shutil.copytree(trees["cars196"], base)
    ann = scipy.io.loadmat(base / "devkit" / "cars_train_annos.mat", squeeze_me=True)["annotations"]
    reordered = np.rec.fromarrays(
        [ann["fname"], ann["class"], ann["bbox_x1"]], names=["fname", "class", "bbox_x1"]
    )
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": reordered})
    a = create_catalogue("cars196", trees["cars196"]).items
    b = create_catalogue("cars196", base).items
    assert a[["item_id", "class", "split"]].equals(b[["item_id", "class", "split"]])


def test_cars_metric_layout(trees):
    cat = create_catalogue("cars196", trees["cars_metric"])
    assert cat.source["variant"] == "metric"
    assert cat.items["item_id"].str.startswith("car_ims/").all()
    counts = cat.items["split"].value_counts()
    assert counts["test"] == 12 and counts["train"] + counts["val"] == 18
    dml = create_catalogue("cars196", trees["cars_metric"], split_scheme="dml")
    assert max(_classes(dml, "train") | _classes(dml, "val")) <= 98
    assert min(_classes(dml, "test")) >= 99
    with pytest.raises(DatasetLayoutError, match="devkit/cars_meta.mat"):
        create_catalogue("cars196", trees["cars_metric"], variant="devkit")


def test_cars_missing_test_labels_explained(trees, tmp_path):
    base = tmp_path / "stanford_cars"
    shutil.copytree(trees["cars196"], base)
    (base / "cars_test_annos_withlabels.mat").rename(
        base / "devkit" / "cars_test_annos_withlabels.mat"
    )
    assert len(create_catalogue("cars196", base).items) == 30  # inside devkit/ is accepted
    (base / "devkit" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetLayoutError, match="cars_test_annos_withlabels.mat") as err:
        create_catalogue("cars196", base)
    assert "has no labels" in str(err.value)


# ---------------------------------------------------------------------------------------------
# SOP


def test_sop_dml(trees):
    cat = create_catalogue("sop", trees["sop"].parent)
    items = cat.items
    assert cat.default_label == "super_class_id"
    assert len(items) == EXPECTED["sop"]["images"]
    assert items["item_id"].str.endswith(".JPG").all()  # upper-case suffix kept
    assert items.loc[items["item_id"] == "bicycle_final/111085122801_0.JPG", "class_id"].item() == 1
    counts = items["split"].value_counts()
    assert counts["test"] == 12 and counts["train"] + counts["val"] == 18
    train_products = _classes(cat, "train", "class_id") | _classes(cat, "val", "class_id")
    assert train_products == set(SOP_TRAIN) and _classes(cat, "test", "class_id") == set(SOP_TEST)
    assert not _classes(cat, "train", "class_id") & _classes(cat, "val", "class_id")
    assert set(items["super_class_name"]) == {"bicycle", "cabinet", "chair", "toaster"}
    assert items.groupby("super_class_id")["super_class_name"].nunique().eq(1).all()


def test_sop_closed_set(trees):
    cat = create_catalogue("sop", trees["sop"], split_scheme="classification", label="class_id")
    test, train = _classes(cat, "test"), _classes(cat, "train")
    assert test <= train and len(train) == 10
    assert cat.items["split"].value_counts()["test"] == 15  # test_fraction 0.5 of 30 images


def test_sop_bad_header_named(trees, tmp_path):
    base = tmp_path / "Stanford_Online_Products"
    shutil.copytree(trees["sop"], base)
    lines = (base / "Ebay_train.txt").read_text().splitlines()
    (base / "Ebay_train.txt").write_text("\n".join(lines[1:]) + "\n")  # header dropped
    with pytest.raises(DatasetLayoutError, match=r"Ebay_train.txt line 1 should be the header"):
        create_catalogue("sop", base)


# ---------------------------------------------------------------------------------------------
# Food2K


def test_food2k(trees):
    cat = create_catalogue("food2k", trees["food2k"])
    items = cat.items
    counts = items["split"].value_counts().to_dict()
    assert counts == {k: EXPECTED["food2k"][k] for k in ("train", "val", "test")}
    assert cat.default_label == "food_id" and items["food_id"].nunique() == 5
    assert items["food_name"].nunique() == 3  # names are not unique: ids are the label
    fried = items.loc[items["food_name"] == "Fried shrimp", "food_id"].unique()
    assert sorted(fried) == [i for i, n in FOOD_NAMES.items() if n == "Fried shrimp"]
    assert items.loc[items["item_id"] == "3/0.jpg", "food_id"].item() == 3
    assert any("shared by several ids" in n for n in cat.source["notes"])


def test_food2k_flat_layout(trees, tmp_path):
    base = tmp_path / "food"
    shutil.copytree(trees["food2k"], base)
    for f in (base / "Food2k_label").iterdir():
        f.rename(base / f.name)
    (base / "Food2k_label").rmdir()
    cat = create_catalogue("food2k", base)
    assert cat.source["variant"] == "flat" and len(cat.items) == EXPECTED["food2k"]["images"]


def test_food2k_missing_split_file_and_names(trees, tmp_path):
    base = tmp_path / "Food2K"
    shutil.copytree(trees["food2k"], base)
    (base / "food2k_label2name_en.txt").unlink()
    cat = create_catalogue("food2k", base)
    assert cat.items["food_name"].isna().all()
    assert any("food2k_label2name_en.txt not found" in n for n in cat.source["notes"])
    (base / "Food2k_label" / "val_finetune.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="val_finetune.txt not found"):
        create_catalogue("food2k", base)


# ---------------------------------------------------------------------------------------------
# RP2K


def test_rp2k_utf8_labels(trees):
    cat = create_catalogue("rp2k", trees["rp2k"].parent.parent)  # finds rp2k_dataset/all
    items = cat.items
    assert len(items) == EXPECTED["rp2k"]["images"]
    assert set(items["category"]) == set(RP2K_TEST)
    assert "555（冰炫）" in set(items["category"]) and "others" in set(items["category"])
    ids = dict(zip(items["category"], items["category_id"], strict=True))
    assert ids == {name: i for i, name in enumerate(sorted(RP2K_TEST))}
    counts = items["split"].value_counts()
    assert counts["test"] == 10 and counts["train"] + counts["val"] == 12
    assert _classes(cat, "test") - _classes(cat, "train") - _classes(cat, "val") == {
        "康师傅 红烧牛肉面"
    }
    assert all(Path(p).is_file() for p in items["path"])


def test_rp2k_nfd_and_gbk_folder_names(trees, tmp_path):
    base = tmp_path / "all"
    shutil.copytree(trees["rp2k"], base)
    nfd = unicodedata.normalize("NFD", "Café crème")
    write_jpeg(base / "train" / nfd / "a.jpg")
    gbk = "蓝月亮".encode("gb18030")  # an archive extracted with the wrong filename encoding
    gbk_dir = os.path.join(os.fsencode(base / "train"), gbk)
    os.mkdir(gbk_dir)
    write_jpeg(Path(os.fsdecode(os.path.join(gbk_dir, b"x.jpg"))))
    cat = create_catalogue("rp2k", base, val_fraction=0)
    labels = set(cat.items["category"])
    assert "Café crème" in labels and nfd not in labels
    assert len(cat.items) == EXPECTED["rp2k"]["images"] + 1  # the undecodable folder left out
    (problem,) = cat.source["problems"]
    assert "'train/蓝月亮'" in problem and "unzip -O GB18030" in problem
    assert cat.fingerprint()
    report = verify("rp2k", base)
    assert not report.ok and any("not UTF-8" in p for p in report.problems)


# ---------------------------------------------------------------------------------------------
# Products-10K


def test_products10k(trees):
    cat = create_catalogue("products10k", trees["products10k"])
    items = cat.items
    assert len(items) == EXPECTED["products10k"]["images"]
    assert {"train/0.jpg", "test/0.jpg"} <= set(items["item_id"])  # same name in both splits
    counts = items["split"].value_counts()
    assert counts["test"] == 10 and counts["train"] + counts["val"] == 15
    groups = items.groupby("class")["group"].unique().map(list).to_dict()
    assert groups == {c: [g] for c, g in P10K_CLASSES.items()}  # test groups from train.csv
    assert _classes(cat, "test") <= _classes(cat, "train")
    coarse = create_catalogue("products10k", trees["products10k"], label="group")
    assert coarse.default_label == "group" and coarse.items["group"].nunique() == 3


def test_products10k_test_csv_variants(trees, tmp_path):
    base = tmp_path / "p10k"
    shutil.copytree(trees["products10k"], base)
    text = (base / "test_kaggletest.csv").read_text()
    (base / "test_kaggletest.csv").unlink()
    (base / "test.csv").write_text(text + "99.jpg,12345,Public\n")
    write_jpeg(base / "test" / "99.jpg")
    cat = create_catalogue("products10k", base)
    assert cat.source["test_file"] == "test.csv"
    assert cat.items.loc[cat.items["item_id"] == "test/99.jpg", "group"].item() == -1
    assert any("class that train.csv does not have" in p for p in cat.source["problems"])
    (base / "test.csv").unlink()
    with pytest.raises(DatasetLayoutError, match="test_kaggletest.csv"):
        create_catalogue("products10k", base)


# ---------------------------------------------------------------------------------------------
# Fashion


def test_fashion_quirks(trees):
    cat = create_catalogue("fashion", trees["fashion"].parent)
    items = cat.items.set_index("item_id")
    assert len(items) == EXPECTED["fashion"]["images"]  # nested duplicate not counted twice
    assert "Home" not in set(items["masterCategory"]) and items["masterCategory"].nunique() == 6
    assert "images/39401.jpg" not in items.index and "images/12347.jpg" not in items.index
    assert set(cat.source["missing"]) == {"images/39401.jpg", "images/12347.jpg"}
    row = items.loc["images/20010.jpg"]
    assert row["productDisplayName"] == "Lino Perros Women, Black, Handbag"
    assert (row["masterCategory"], row["usage"], row["year"]) == ("Accessories", "Casual", "2012")
    row = items.loc["images/20011.jpg"]
    assert row["productDisplayName"] == "Scott, International Shirt"
    assert pd.isna(row["baseColour"]) and pd.isna(row["usage"]) and pd.isna(row["year"])
    assert pd.isna(items.loc["images/5389.jpg", "season"])
    assert items.loc["images/15970.jpg", "articleType"] == "Shirts"
    counts = items["split"].value_counts()
    assert (counts["train"], counts["val"], counts["test"]) == (20, 5, 3)
    assert set(cat.split("train")["masterCategory"]) == set(items["masterCategory"])


def test_fashion_small_variant(tmp_path):
    base = make_fashion_tree(tmp_path, nested_duplicate=False)
    base.rename(tmp_path / "myntradataset")
    cat = create_catalogue("fashion", tmp_path)
    assert cat.root == str(tmp_path / "myntradataset")
    assert len(cat.items) == EXPECTED["fashion"]["images"]


def test_fashion_roots_and_options(trees):
    inner = create_catalogue("fashion", trees["fashion"])  # the folder with the nested copy
    assert len(inner.items) == EXPECTED["fashion"]["images"]
    skipped = create_catalogue("fashion", trees["fashion"], skip_malformed=True)
    assert len(skipped.items) == 28 - len(FASHION_COMMA_IDS)
    by_usage = create_catalogue("fashion", trees["fashion"], label="usage")
    assert by_usage.items["usage"].notna().all() and len(by_usage.items) < 28
    assert by_usage.source["dropped_without_label"]["usage"] > 0


# ---------------------------------------------------------------------------------------------
# splits, options, default root, custom catalogues


@pytest.mark.parametrize("name", PUBLIC)
def test_every_loader_schema(trees, name):
    cat = create_catalogue(name, trees[name])
    info = get_dataset_info(name)
    assert cat.name == name and cat.default_label == info.default_label
    assert set(cat.label_columns) == set(info.label_columns)
    assert set(cat.splits) == {"train", "val", "test"}
    assert cat.items["item_id"].is_unique
    assert cat.items[cat.default_label].notna().all()
    again = create_catalogue(name, trees[name])
    assert again.fingerprint() == cat.fingerprint()  # deterministic


def test_seed_changes_val_only(trees):
    a = create_catalogue("fashion", trees["fashion"], seed=0)
    vals = {
        tuple(sorted(create_catalogue("fashion", trees["fashion"], seed=s).split("val")["item_id"]))
        for s in range(4)
    }
    assert len(vals) > 1
    assert a.fingerprint() != create_catalogue("fashion", trees["fashion"], seed=3).fingerprint()


def test_stratified_pick_properties():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), rng.integers(1, 9, 20))
    items = pd.DataFrame(
        {"item_id": [f"i{i:03d}" for i in range(len(labels))], "c": labels, "split": "train"}
    )
    picked = stratified_pick(items, items.index, "c", 0.25, seed=1)
    assert abs(len(picked) - round(len(items) * 0.25)) <= 0
    rest = items.drop(picked)
    assert set(rest["c"]) == set(items["c"])  # every class keeps an image
    singles = items.groupby("c").size().loc[lambda s: s == 1].index
    assert not set(items.loc[picked, "c"]) & set(singles)
    shuffled = items.sample(frac=1, random_state=3)
    again = stratified_pick(shuffled, shuffled.index, "c", 0.25, seed=1)
    assert sorted(items.loc[picked, "item_id"]) == sorted(shuffled.loc[again, "item_id"])
    carved = carve_val(items, stratify="c", fraction=0.5, seed=0, by_class=True)
    val_c, train_c = (set(carved.loc[carved["split"] == s, "c"]) for s in ("val", "train"))
    assert val_c and train_c and not val_c & train_c


def test_options_errors(trees):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['colour'\].*skip_malformed"):
        create_catalogue("fashion", trees["fashion"], colour="red")
    with pytest.raises(ValueError, match="split_scheme 'dml' is not available"):
        create_catalogue("food2k", trees["food2k"], split_scheme="dml")
    with pytest.raises(ValueError, match="val_fraction must be in"):
        create_catalogue("sop", trees["sop"], val_fraction=1.5)
    with pytest.raises(CatalogueError, match="Did you mean 'class_id'"):
        create_catalogue("sop", trees["sop"], label="clas_id")


def test_drop_missing(trees, tmp_path):
    base = tmp_path / "Stanford_Online_Products"
    shutil.copytree(trees["sop"], base)
    (base / "bicycle_final" / "111085122801_0.JPG").unlink()
    assert len(create_catalogue("sop", base).items) == 30
    cat = create_catalogue("sop", base, drop_missing=True)
    assert len(cat.items) == 29 and cat.source["dropped_missing_files"] == 1


def test_default_root_under_data_dir():
    make_sop_tree(data_dir())  # data/Stanford_Online_Products: the archive's folder name
    assert len(create_catalogue("sop").items) == 30
    make_food2k_tree(data_dir() / "food2k")  # data/food2k/Food2K
    assert len(create_catalogue("food2k").items) == 30
    with pytest.raises(DatasetLayoutError, match="does not exist.*EMBBENCH_DATA"):
        create_catalogue("rp2k")


def test_manifest_folder_and_demo(tmp_path):
    write_jpeg(tmp_path / "imgs" / "a.jpg")
    write_jpeg(tmp_path / "imgs" / "b.jpg", 1)
    csv = tmp_path / "shop.csv"
    csv.write_text("path,category,split\nimgs/a.jpg,mug,test\nimgs/b.jpg,lamp,test\n")
    cat = create_catalogue("manifest", csv, label="category")
    assert cat.default_label == "category" and Path(cat.items["path"][0]).is_file()
    report = verify("manifest", csv, label="category")
    assert report.ok and report.checked_images == 2 and not report.expected
    (tmp_path / "imgs" / "b.jpg").unlink()
    assert verify("manifest", csv, label="category").missing == [str(tmp_path / "imgs/b.jpg")]
    folder = tmp_path / "tree"
    write_jpeg(folder / "test" / "mug" / "1.jpg")
    write_jpeg(folder / "train" / "mug" / "2.jpg")
    assert create_catalogue("folder", folder).splits == ["train", "test"]
    with pytest.raises(CatalogueError, match="needs root"):
        create_catalogue("manifest")
    demo = create_catalogue(
        "demo",
        tmp_path / "demo",
        n_categories=2,
        products_per_category=2,
        views=(1, 1, 1),
        image_size=16,
    )
    assert demo.name == "demo" and demo.default_label == get_dataset_info("demo").default_label


# ---------------------------------------------------------------------------------------------
# verify


@pytest.mark.parametrize("name", PUBLIC)
def test_verify_good_trees(trees, name):
    report = verify(name, trees[name])
    assert report.ok, report.format()
    assert report.checked_images == sum(report.counts.values()) == EXPECTED[name]["images"]
    assert not report.missing and not report.unreadable and not report.problems
    assert report.expected["images"] == get_dataset_info(name).published["images"]
    assert any("subset" in n for n in report.notes)
    text = report.format()
    assert text.startswith(f"{name} at ") and ": OK" in text.splitlines()[0]


def test_verify_counts_against_published(trees):
    report = verify("sop", trees["sop"], check_images=False)
    assert report.checked_images == 0
    assert report.counts == {"train": 15, "val": 3, "test": 12}
    assert report.classes["all"] == 4 and report.expected["classes"] == 12
    assert report.differences["train"] == 18 - 59551  # train + carved val vs published train
    assert report.differences["test"] == 12 - 60502


def test_verify_wrong_root(trees, tmp_path):
    report = verify("sop", tmp_path / "nowhere")
    assert not report.ok and len(report.problems) == 1
    assert "does not exist" in report.problems[0] and "Ebay_train.txt" in report.problems[0]
    other = verify("sop", trees["food2k"])
    assert not other.ok
    msg = other.problems[0]
    assert "expected Ebay_train.txt + Ebay_test.txt" in msg
    assert str(trees["food2k"]) in msg and "Food2k_label/" in msg  # what the root holds


def test_verify_unextracted_archive(tmp_path):
    (tmp_path / "Stanford_Online_Products.zip").write_bytes(b"PK\x03\x04")
    report = verify("sop", tmp_path)
    assert "extract it first" in report.problems[0]
    assert "Stanford_Online_Products.zip" in report.problems[0]


def test_verify_missing_annotation_file(trees, tmp_path):
    base = tmp_path / "Stanford_Online_Products"
    shutil.copytree(trees["sop"], base)
    (base / "Ebay_test.txt").unlink()
    report = verify("sop", base)
    assert not report.ok
    assert "lacks ['Ebay_test.txt']" in report.problems[0]
    assert "partly extracted" in report.problems[0]
    cars = tmp_path / "cars"
    shutil.copytree(trees["cars196"], cars)
    (cars / "devkit" / "cars_train_annos.mat").unlink()
    report = verify("cars196", cars)
    assert "devkit/cars_train_annos.mat" in report.problems[0]


def test_verify_half_extracted_images(trees, tmp_path):
    base = tmp_path / "Stanford_Online_Products"
    shutil.copytree(trees["sop"], base)
    shutil.rmtree(base / "chair_final")
    (base / "bicycle_final" / "111085122801_1.JPG").unlink()
    report = verify("sop", base)
    assert not report.ok
    assert len(report.missing) == 3 * 3 + 1  # chair: products 5, 6 (train) and 9 (test)
    assert str(base / "bicycle_final" / "111085122801_1.JPG") in report.missing
    (problem,) = report.problems
    assert "10 of 30 images" in problem and "Whole folders are absent" in problem
    assert str(base / "chair_final") in problem and "drop_missing=True" in problem
    assert report.checked_images == 20


def test_verify_truncated_and_non_image(trees, tmp_path):
    base = tmp_path / "products10k"
    shutil.copytree(trees["products10k"], base)
    bad = base / "test" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    (base / "train" / "4.jpg").write_text("not an image")
    report = verify("products10k", base)
    assert not report.ok and not report.missing
    reasons = dict(report.unreadable)
    assert set(reasons) == {str(bad), str(base / "train" / "4.jpg")}
    assert reasons[str(bad)].startswith("truncated file")
    assert "not an image" in reasons[str(base / "train" / "4.jpg")]
    assert any("2 of 25 decoded images are unreadable" in p for p in report.problems)
    sample = verify("products10k", base, max_images=5)
    assert sample.checked_images == 5


def test_verify_fashion_unexpected_missing(trees, tmp_path):
    base = tmp_path / "fashion-dataset"
    shutil.copytree(trees["fashion"], base)
    (base / "images" / "15970.jpg").unlink()
    report = verify("fashion", base)
    assert not report.ok
    assert report.missing == [str(base / "images" / "15970.jpg")]  # not the 2 known ones
    assert any("images/15970.jpg" in p for p in report.problems)


def test_verify_main_exit_codes(trees, tmp_path, capsys):
    assert verify_main(["rp2k", "--root", str(trees["rp2k"]), "--no-images"]) == 0
    out = capsys.readouterr().out
    assert "rp2k at" in out and "OK" in out
    assert verify_main(["rp2k", "--root", str(tmp_path)]) == 1
    assert "PROBLEMS FOUND" in capsys.readouterr().out
    assert verify_main(["rp2kk"]) == 2
    assert "Did you mean 'rp2k'" in capsys.readouterr().err


def test_cli_verify_delegates(trees, capsys):
    from embbench.cli import main

    assert main(["verify", "food2k", "--root", str(trees["food2k"])]) == 0
    assert "food2k at" in capsys.readouterr().out


def test_demo_b_is_the_demo_with_other_products(tmp_path):
    a = create_catalogue(
        "demo", tmp_path, n_categories=2, products_per_category=2, views=(1, 1, 2), image_size=24
    )
    b = create_catalogue(
        "demo_b", tmp_path, n_categories=2, products_per_category=2, views=(1, 1, 2), image_size=24
    )
    assert b.name == "demo_b" and b.source["variant_of"] == "demo"
    assert set(a.items["category"]) == set(b.items["category"])  # same shapes
    assert a.root != b.root and a.fingerprint() != b.fingerprint()  # other images
    assert get_dataset_info("demo_b").default_label == "product"


def test_every_loader_takes_one_load_request():
    # one calling convention: load(request, **options), built-in and a user's catalogue alike
    import inspect

    from embbench.datasets._registry import get_entry

    for name in list_datasets():
        params = list(inspect.signature(get_entry(name).loader).parameters.values())
        assert params[0].kind is params[0].POSITIONAL_OR_KEYWORD, name
        assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params[1:]), name


def test_load_request_finish_names_roots_and_records_the_source(tmp_path):
    from embbench.datasets import LoadRequest
    from embbench.datasets._common import LoadNotes

    items = pd.DataFrame(
        {
            "item_id": ["a.jpg", "b.jpg"],
            "path": ["/x/a.jpg", "/x/b.jpg"],
            "split": ["test", "test"],
            "class_id": [1, 2],
            "super_class_id": [7, 7],
            "scratch": [1, 2],
            "note": ["n", "m"],
        }
    )
    req = LoadRequest(
        name="sop",
        folder=tmp_path,
        variant="ebay",
        seed=3,
        info=get_dataset_info("sop"),
        split_scheme="dml",
        val_fraction=0.1,
        test_fraction=0.2,
        notes=LoadNotes(notes=["seen"]),
    )
    cat = req.finish(
        items,
        ("super_class_id", "class_id"),
        extra_columns=("note",),
        seed=3,
        val_from="train",
    )
    assert cat.name == "sop" and cat.root == str(tmp_path)
    assert list(cat.items.columns) == [
        "item_id",
        "path",
        "split",
        "super_class_id",
        "class_id",
        "note",
    ]
    assert cat.label_columns == ("super_class_id", "class_id")
    assert cat.default_label == get_dataset_info("sop").default_label
    assert list(cat.source.items()) == [
        ("loader", "sop"),
        ("variant", "ebay"),
        ("split_scheme", "dml"),
        ("seed", 3),
        ("val_from", "train"),
        ("notes", ["seen"]),
        ("problems", []),
        ("missing", []),
    ]
    with pytest.raises(ValueError, match="public datasets only"):
        LoadRequest(name="shop", folder=None, variant=None, seed=0).finish(items, ("class_id",))


def test_the_package_init_only_re_exports():
    # the registry and the factory live in _registry / _factory; __init__ holds no logic
    import ast

    import embbench.datasets as package

    tree = ast.parse(Path(package.__file__).read_text())
    kinds = {type(node).__name__ for node in tree.body[1:]}  # after the docstring
    assert kinds <= {"ImportFrom", "Import", "Assign"}, kinds
    assigned = [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets]
    assert assigned == ["__all__"]
    assert all(hasattr(package, name) for name in package.__all__)


def test_layout_subdirs_match_ignoring_case(trees, tmp_path):
    # one spelling in the Layout finds the archive's folder whatever its case
    shutil.copytree(trees["food2k"], tmp_path / "FOOD2k")
    cat = create_catalogue("food2k", tmp_path)
    assert cat.root == str(tmp_path / "FOOD2k") and len(cat.items) == EXPECTED["food2k"]["images"]
