"""Texts in the data (issue 25, items 2b and 6): item texts, class names, the checks before a
text task, and the demo's titles (metadata only: the images stay byte-identical)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_datasets import (
    CARS_CLASSES,
    CARS_HYPHEN,
    CARS_LAST,
    FASHION_COMMA_IDS,
    FOOD_NAMES,
    RAM_CV,
    RP2K_TEST,
    make_cars_devkit_tree,
    make_cars_metric_tree,
    make_fashion_tree,
    make_food2k_tree,
    make_products10k_tree,
    make_rp2k_tree,
    make_sop_tree,
)
from skimage.color import rgb2lab

from embbench.catalogue import Catalogue, CatalogueError, readable_name
from embbench.datasets import check_texts, create_catalogue
from embbench.demo import CATEGORIES, COLOUR_NAMES, PATTERN_WORDS, make_demo_catalogue

# ---- manifests: a text column named, auto-detected, missing, empty ----------------------------


def _manifest(folder: Path, header: str, rows: list[str], name: str = "shop.csv") -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(len(rows)):
        (folder / "img" / f"{i}.jpg").write_bytes(b"x")
    csv = folder / name
    csv.write_text(header + "\n" + "\n".join(rows) + "\n")
    return csv


def test_manifest_title_column_is_auto_detected_and_logged(tmp_path, caplog):
    csv = _manifest(
        tmp_path,
        "path,label,split,title",
        ["img/0.jpg,a,test,Red mug", "img/1.jpg,a,test,", "img/2.jpg,b,test,Blue cup"],
    )
    with caplog.at_level(logging.INFO, logger="embbench.datasets"):
        cat = create_catalogue("manifest", csv)
    assert cat.text_columns == ("title",)
    assert cat.texts().tolist() == ["Red mug", "", "Blue cup"]  # the empty row is kept
    assert any(
        "'title'" in r.getMessage() and "auto-detected" in r.getMessage() for r in caplog.records
    )


def test_manifest_text_column_named_in_options(tmp_path):
    csv = _manifest(
        tmp_path,
        "path,label,split,name,text",
        ["img/0.jpg,a,test,Red mug,x", "img/1.jpg,b,test,Blue cup,y"],
    )
    assert create_catalogue("manifest", csv).text_columns == ("text",)  # auto: 'text'
    cat = create_catalogue("manifest", csv, text_column="name")
    assert cat.texts().tolist() == ["Red mug", "Blue cup"]


def test_manifest_without_text_column_has_none_and_a_text_task_is_refused(tmp_path):
    csv = _manifest(tmp_path, "path,label,split", ["img/0.jpg,a,test", "img/1.jpg,b,test"])
    cat = create_catalogue("manifest", csv)
    assert cat.text_columns == ()
    with pytest.raises(CatalogueError) as err:
        check_texts(cat)
    msg = str(err.value)
    assert "\n" not in msg and str(csv) in msg and "text_column" in msg


def test_named_text_column_missing_from_the_manifest_names_it_and_the_file(tmp_path):
    csv = _manifest(tmp_path, "path,label,split", ["img/0.jpg,a,test"])
    with pytest.raises(CatalogueError, match=r"\['titel'\] not found") as err:
        create_catalogue("manifest", csv, text_column="titel")
    assert str(csv) in str(err.value)


def test_text_column_empty_in_every_row_is_refused_naming_column_and_file(tmp_path):
    csv = _manifest(tmp_path, "path,label,split,title", ["img/0.jpg,a,test,", "img/1.jpg,b,test, "])
    cat = create_catalogue("manifest", csv)  # image tasks still load it
    with pytest.raises(CatalogueError, match="'title' is empty in every row") as err:
        cat.texts()
    assert str(csv) in str(err.value)
    with pytest.raises(CatalogueError, match="'title' is empty in every row"):
        check_texts(cat, "title")


def test_check_texts_names_the_rows_with_an_empty_text(tmp_path):
    csv = _manifest(
        tmp_path,
        "path,label,split,title",
        [
            "img/0.jpg,a,train,",
            "img/1.jpg,a,test,Red mug",
            "img/2.jpg,b,test,",
            "img/3.jpg,b,test,Blue cup",
        ],
    )
    cat = create_catalogue("manifest", csv)
    with pytest.raises(CatalogueError) as err:
        check_texts(cat, "title")
    msg = str(err.value)
    assert "\n" not in msg and "2 row(s)" in msg and "'img/0.jpg'" in msg and "'img/2.jpg'" in msg
    with pytest.raises(CatalogueError, match=r"1 row\(s\).*'img/2.jpg'"):
        check_texts(cat, "title", splits=("test",))
    check_texts(cat.subset(), "title", splits=("val",))  # no val rows: nothing to refuse
    with pytest.raises(CatalogueError, match="has no text column 'label'"):
        cat.texts("label")  # a label is not a text column


# ---- fingerprints: image identity untouched by texts --------------------------------------------


def test_texts_change_texts_fingerprint_not_the_image_fingerprint(tmp_path):
    rows = ["img/0.jpg,a,test,Red mug", "img/1.jpg,b,test,Blue cup"]
    # the same manifest file rewritten: same images, ids, splits and labels; other texts
    with_texts = create_catalogue("manifest", _manifest(tmp_path, "path,label,split,title", rows))
    edited = create_catalogue(
        "manifest",
        _manifest(tmp_path, "path,label,split,title", [rows[0], "img/1.jpg,b,test,Green cup"]),
    )
    plain = create_catalogue(
        "manifest", _manifest(tmp_path, "path,label,split", [r.rsplit(",", 1)[0] for r in rows])
    )
    assert plain.text_columns == () and with_texts.root == plain.root
    assert with_texts.fingerprint() == edited.fingerprint() == plain.fingerprint()
    assert with_texts.texts_fingerprint() != edited.texts_fingerprint()
    assert with_texts.texts_fingerprint() == with_texts.subset().texts_fingerprint()
    with pytest.raises(CatalogueError):
        plain.texts_fingerprint()


# ---- class names --------------------------------------------------------------------------------


def test_class_names_fall_back_to_the_label_value_in_words():
    items = pd.DataFrame(
        {
            "item_id": ["a", "b", "c"],
            "path": ["a", "b", "c"],
            "split": ["test"] * 3,
            "label": ["coffee_maker", "t-shirt", "mug"],
        }
    )
    cat = Catalogue(name="x", items=items, label_columns=("label",), default_label="label")
    assert cat.class_names() == {"coffee_maker": "coffee maker", "mug": "mug", "t-shirt": "t shirt"}
    named = Catalogue(
        name="x",
        items=items,
        label_columns=("label",),
        default_label="label",
        name_maps={"label": {"t-shirt": "T-Shirt"}},
    )
    assert named.class_names()["t-shirt"] == "T-Shirt"  # a given name is used verbatim
    assert named.subset(max_per_split=2).name_maps == named.name_maps
    assert readable_name("  coffee__maker-2 ") == "coffee maker 2"
    with pytest.raises(CatalogueError, match="non-label"):
        Catalogue(
            name="x",
            items=items,
            label_columns=("label",),
            default_label="label",
            name_maps={"colour": {}},
        )


@pytest.mark.parametrize("make", [make_cars_devkit_tree, make_cars_metric_tree])
def test_cars196_class_names_come_from_class_names_of_the_mat_file(tmp_path, make):
    cat = create_catalogue("cars196", make(tmp_path))
    names = cat.class_names("class")
    assert sorted(names) == list(CARS_CLASSES)
    assert names[176] == RAM_CV and names[98] == CARS_HYPHEN and names[196] == CARS_LAST
    assert cat.class_names("class_name")[CARS_HYPHEN] == CARS_HYPHEN  # hyphens kept verbatim
    assert cat.text_columns == ()


def test_food2k_class_names_from_the_names_file_else_the_ids(tmp_path):
    base = make_food2k_tree(tmp_path)
    assert create_catalogue("food2k", base).class_names() == FOOD_NAMES
    (base / "food2k_label2name_en.txt").unlink()
    assert create_catalogue("food2k", base).class_names() == {i: str(i) for i in FOOD_NAMES}


def test_sop_rp2k_products10k_class_names(tmp_path):
    sop = create_catalogue("sop", make_sop_tree(tmp_path))
    assert sop.class_names("super_class_id") == {
        1: "bicycle",
        2: "cabinet",
        3: "chair",
        12: "toaster",
    }
    rp2k = create_catalogue("rp2k", make_rp2k_tree(tmp_path))
    assert set(rp2k.class_names().values()) == set(RP2K_TEST)  # folder names verbatim ('_', '·')
    by_id = rp2k.class_names("category_id")
    assert all(
        by_id[i] == c
        for i, c in zip(rp2k.items["category_id"], rp2k.items["category"], strict=True)
    )
    p10k = create_catalogue("products10k", make_products10k_tree(tmp_path))
    assert p10k.class_names("group") == {0: "0", 1: "1", 2: "2"}  # the layout has ids only


@pytest.mark.parametrize("skip", [False, True])
def test_fashion_product_display_name_is_the_item_text(tmp_path, skip):
    cat = create_catalogue("fashion", make_fashion_tree(tmp_path), skip_malformed=skip)
    assert cat.text_columns == ("productDisplayName",)
    texts = dict(zip(cat.items["item_id"], cat.texts(), strict=True))
    assert texts["images/15970.jpg"] == "Turtle Check Men Navy Blue Shirt"
    assert texts["images/5389.jpg"] == "Kalenji Kapteren 200 Yellow Fw"
    if skip:
        assert not {f"images/{i}.jpg" for i in FASHION_COMMA_IDS} & set(texts)
    else:  # a name with unquoted commas is read whole
        assert texts["images/20010.jpg"] == "Lino Perros Women, Black, Handbag"
    check_texts(cat)
    assert cat.class_names()["Personal Care"] == "Personal Care"


# ---- the demo: titles say what the images show; the images are unchanged ----------------------

# sha256 over the sorted image files of this small demo, generated by the code before titles
# existed (commit 60f3cb0). A change means the images changed, which invalidates every cache.
SMALL = dict(n_categories=3, products_per_category=4, views=(1, 1, 1), image_size=32)
SMALL_DIGEST = "f04df25289048c4d2aa87ff6828729d1678afbbdf1eac6914ad4470723030b87"


def _digest(cat: Catalogue) -> str:
    h = hashlib.sha256()
    for p in sorted(cat.items["path"]):
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def _nearest_palette_name(rgb) -> str:
    """Independent of embbench.demo: scikit-image's CIELAB, brute force over the palette."""
    names = list(COLOUR_NAMES)
    pal = rgb2lab(np.array([list(COLOUR_NAMES.values())], dtype=float) / 255)[0]
    lab = rgb2lab(np.array([[rgb]], dtype=float) / 255)[0, 0]
    return names[int(np.argmin(np.linalg.norm(pal - lab, axis=1)))]


def test_demo_titles_describe_the_products_and_images_are_unchanged(tmp_path):
    cat = make_demo_catalogue(tmp_path, seed=0, **SMALL)
    assert _digest(cat) == SMALL_DIGEST
    assert cat.text_columns == ("title",)
    products = json.loads((Path(cat.root) / "products.json").read_text())
    written = pd.read_csv(Path(cat.root) / "manifest.csv")
    assert written["title"].tolist() == cat.items["title"].tolist()
    for _, row in cat.items.iterrows():
        spec = products[row["product"]]
        words = row["title"].split()
        assert words[0] == _nearest_palette_name(spec["color"])
        assert words[-1] == row["category"] == spec["category"] in CATEGORIES
        assert words[1:-1] == (
            [PATTERN_WORDS[spec["pattern"]]] if spec["pattern"] != "solid" else []
        )
    # every class a prompt name: the product's title, the category's shape
    first = cat.items.drop_duplicates("product")
    assert cat.class_names("product") == dict(zip(first["product"], first["title"], strict=True))
    assert cat.class_names("category") == {c: c for c in CATEGORIES[:3]}
    check_texts(cat)
    # more than one colour and pattern word is used (the titles tell products apart)
    assert first["title"].str.split().str[0].nunique() > 1
    assert first["title"].nunique() > len(first) // 2


def test_demo_folder_written_before_titles_gets_them_and_keeps_its_images(tmp_path):
    cat = make_demo_catalogue(tmp_path, seed=0, **SMALL)
    folder = Path(cat.root)
    stats = {p: Path(p).stat().st_mtime_ns for p in cat.items["path"]}
    # what a demo folder written by the previous version holds: no title, no products.json
    manifest = pd.read_csv(folder / "manifest.csv").drop(columns="title")
    manifest.to_csv(folder / "manifest.csv", index=False)
    (folder / "products.json").unlink()
    again = make_demo_catalogue(tmp_path, seed=0, **SMALL)
    assert again.items["title"].tolist() == cat.items["title"].tolist()
    assert again.fingerprint() == cat.fingerprint()
    assert {p: Path(p).stat().st_mtime_ns for p in again.items["path"]} == stats
    assert "title" in pd.read_csv(folder / "manifest.csv")
    assert (folder / "products.json").is_file()


def test_demo_twin_has_titles_too(tmp_path):
    twin = create_catalogue("demo_b", tmp_path, **SMALL)
    assert twin.name == "demo_b" and twin.text_columns == ("title",)
    assert set(twin.class_names("product").values()) == set(twin.items["title"])


def test_a_title_column_is_never_taken_for_the_category():
    """Titles have few distinct values (many products share "red mug"), but are not labels."""
    import pandas as pd

    from embbench.analysis.sources import GallerySource, category_column

    items = pd.DataFrame(
        {
            "item_id": list("abcdef"),
            "path": list("abcdef"),
            "split": ["test"] * 6,
            "sku": ["s1", "s2", "s3", "s4", "s5", "s6"],
            "title": ["red mug", "red mug", "blue mug", "blue mug", "red mug", "blue mug"],
        }
    )
    source = GallerySource(
        "m", "shop", {}, None, None, None, None, True, items, "sku", {}, ("title",)
    )
    assert category_column(source) == "sku"
    untyped = GallerySource("m", "shop", {}, None, None, None, None, True, items, "sku")
    assert category_column(untyped) == "title"  # what the analysis did before
