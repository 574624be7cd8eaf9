"""Catalogue, demo generator, config layering, cache and result records."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from embbench.cache import CacheError, EmbeddingCache
from embbench.catalogue import Catalogue, CatalogueError
from embbench.config import ConfigError
from embbench.demo import make_demo_catalogue
from embbench.manifest import from_image_folder, from_manifest
from embbench.records import Lineage, ResultRecord, ResultStore, results_table
from embbench.stages.embed import EmbedConfig


def test_demo_catalogue_structure_and_determinism(tmp_path):
    a = make_demo_catalogue(
        tmp_path / "a",
        seed=3,
        n_categories=3,
        products_per_category=2,
        views=(2, 1, 2),
        image_size=32,
    )
    b = make_demo_catalogue(
        tmp_path / "b",
        seed=3,
        n_categories=3,
        products_per_category=2,
        views=(2, 1, 2),
        image_size=32,
    )
    assert len(a.items) == 3 * 2 * 5
    assert a.splits == ["train", "val", "test"]
    counts = a.items.groupby("product")["split"].value_counts().unstack()
    assert (counts[["train", "val", "test"]] == [2, 1, 2]).all().all()
    # same seed -> the same content; another folder -> another identity (the root is part of it)
    assert a.content_hashes().tolist() == b.content_hashes().tolist()
    assert a.fingerprint() != b.fingerprint()
    # same seed -> byte-identical images
    pa = sorted((tmp_path / "a").rglob("*.jpg"))
    pb = sorted((tmp_path / "b").rglob("*.jpg"))
    assert [p.read_bytes() for p in pa] == [p.read_bytes() for p in pb]
    c = make_demo_catalogue(
        tmp_path / "a",
        seed=4,
        n_categories=3,
        products_per_category=2,
        views=(2, 1, 2),
        image_size=32,
    )
    assert c.root != a.root
    assert c.fingerprint() != a.fingerprint()  # another seed never reuses a's caches


def test_catalogue_validation_names_the_problem():
    items = pd.DataFrame(
        {"item_id": ["a", "a"], "path": ["x", "y"], "split": ["test"] * 2, "label": [1, 2]}
    )
    with pytest.raises(CatalogueError, match="duplicate item_id"):
        Catalogue("c", items, ("label",), "label")
    with pytest.raises(CatalogueError, match="lacks column"):
        Catalogue("c", items.drop(columns="split"), ("label",), "label")
    ok = Catalogue("c", items.assign(item_id=["a", "b"]), ("label",), "label")
    with pytest.raises(CatalogueError, match="no split 'train'"):
        ok.split("train")


def test_fingerprint_changes_with_labels_and_splits(small_demo):
    items = small_demo.items.copy()
    items.loc[0, "product"] = "other"
    relabelled = Catalogue("demo", items, small_demo.label_columns, "product")
    assert relabelled.fingerprint() != small_demo.fingerprint()
    moved = small_demo.items.copy()
    moved.loc[0, "split"] = "val" if moved.loc[0, "split"] != "val" else "train"
    assert (
        Catalogue("demo", moved, small_demo.label_columns, "product").fingerprint()
        != small_demo.fingerprint()
    )


def test_subset_keeps_whole_classes(small_demo):
    sub = small_demo.subset(6, seed=1)
    test = sub.split("test")
    assert len(test) == 6
    assert (test.groupby("product").size() == 3).all()  # 3 test views per product kept together


def test_manifest_and_folder_loaders(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "imgs" / name).write_bytes(b"")
    (tmp_path / "m.csv").write_text(
        "path,label,split\nimgs/a.jpg,x,train\nhttps://example.com/b.jpg,y,test\n"
    )
    cat = from_manifest(tmp_path / "m.csv")
    assert cat.items["path"].iloc[0] == str(tmp_path / "imgs" / "a.jpg")
    assert cat.items["path"].iloc[1].startswith("https://")
    with pytest.raises(CatalogueError, match=r"column\(s\) \['sku'\] not found"):
        from_manifest(tmp_path / "m.csv", label_columns=("sku",))
    for split in ("train", "test"):
        for label in ("l1", "l2"):
            d = tmp_path / "tree" / split / label
            d.mkdir(parents=True)
            (d / "1.png").write_bytes(b"")
    tree = from_image_folder(tmp_path / "tree")
    assert sorted(tree.splits) == ["test", "train"] and len(tree.items) == 4
    with pytest.raises(CatalogueError, match="does not exist"):
        from_image_folder(tmp_path / "nope")


def test_config_layering_and_errors(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("models: [resnet50]\nk: 5\nbatch_size: 8\n")
    over = tmp_path / "over.yaml"
    over.write_text("batch_size: 4\n")
    cfg = EmbedConfig.from_files(base, over)
    assert cfg.batch_size == 4 and cfg.models == ["resnet50"]
    bad = tmp_path / "typo.yaml"
    bad.write_text("batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"batch_sise.*typo\.yaml.*did you mean 'batch_size'"):
        EmbedConfig.from_files(base, bad)
    worse = tmp_path / "value.yaml"
    worse.write_text("precision: fp8\n")
    with pytest.raises(ConfigError, match=r"precision='fp8'.*value\.yaml"):
        EmbedConfig.from_files(worse)
    # the hash ignores fields that cannot change results
    assert cfg.config_hash() == EmbedConfig.from_files(base).config_hash()
    assert cfg.config_hash() != EmbedConfig.from_files(base, k=3).config_hash()


def test_cache_resume_and_identity(tmp_path):
    ident = {"model": "m", "weights": "random"}
    cache = EmbeddingCache("ds", "m", "test", ident, root=tmp_path)
    ids = [f"i{i}" for i in range(5)]
    cache.begin(ids, shard_size=2, provenance={})
    cache.write_shard(0, np.ones((2, 3)), ids[:2], [])
    # a new run with the same items resumes: shard 0 stays
    again = EmbeddingCache("ds", "m", "test", ident, root=tmp_path)
    again.begin(ids, shard_size=2, provenance={})
    assert again.shard_done(0) and not again.shard_done(1)
    again.write_shard(1, np.zeros((1, 3)), ids[2:3], [{"item_id": "i3", "reason": "bad"}])
    again.write_shard(2, np.full((1, 3), 2.0), ids[4:], [])
    es = again.consolidate(3)
    assert es.vectors.shape == (4, 3) and list(es.item_ids) == ["i0", "i1", "i2", "i4"]
    assert es.failed == [{"item_id": "i3", "reason": "bad"}]
    assert again.is_complete()
    # another identity never reads these vectors
    other = EmbeddingCache(
        "ds", "m", "test", {"model": "m", "weights": "pretrained"}, root=tmp_path
    )
    assert other.path != cache.path and not other.is_complete()
    # a tampered meta.json is refused
    meta = json.loads((cache.path / "meta.json").read_text())
    meta["identity"]["weights"] = "pretrained"
    (cache.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="other vectors"):
        cache.load()


def test_result_store_roundtrip(tmp_path):
    store = ResultStore(tmp_path)
    rec = ResultRecord(
        stage="embed",
        dataset="d",
        model="m",
        mode="pretrained",
        config_hash="abc",
        metrics={"mMP@5": 0.5},
        lineage=Lineage(base_model="m", weights_kind="random"),
    )
    store.save(rec, per_query={"mMP@5": np.array([0.25, 0.75])})
    got = store.get("embed", "d", "m", "pretrained", "abc")
    assert got.metrics == {"mMP@5": 0.5} and got.lineage.weights_kind == "random"
    assert np.allclose(store.per_query(got)["mMP@5"], [0.25, 0.75])
    table = results_table(store)
    assert table.loc[0, "mMP@5"] == 0.5 and table.loc[0, "model"] == "m"
