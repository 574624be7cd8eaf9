"""Bad or changed inputs through the public entry points: images replaced under the same names,
manifests with rows that would be mis-scored, params that name no dataset of the grid, YAML alias
bombs. Each case gives the right number or one line naming the file, the rows or the key.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash

from embbench import filehash
from embbench.catalogue import CatalogueError
from embbench.config import ConfigError
from embbench.datasets import fetch_urls
from embbench.datasets.prepare import load_catalogue
from embbench.manifest import from_manifest
from embbench.records import ResultStore
from embbench.stages.embed import EmbedConfig, run_embed
from tests.test_fetch import IMAGES, OPTS, _catalogue, server  # noqa: F401 (fixture)

BASE = dict(weights="random", batch_size=8, num_workers=0, backend="exact")


def _shop(demo, folder: Path, order) -> Path:
    """A manifest whose row i is ``images/<i>.jpg`` holding demo test image ``order[i]``.

    Every shop made from the same demo has the same file names, labels and splits; only the
    pixels behind the names follow ``order``.
    """
    rows = demo.split("test").reset_index(drop=True).iloc[: len(order)]
    (folder / "images").mkdir(parents=True)
    lines = ["path,label,split"]
    for i, label in enumerate(rows["product"]):
        shutil.copyfile(rows["path"][order[i]], folder / "images" / f"{i:03d}.jpg")
        lines.append(f"images/{i:03d}.jpg,{label},test")
    csv = folder / "base.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def _grid(csv: Path, **kw) -> EmbedConfig:
    return EmbedConfig(
        models=["test_resnet"], datasets=["shop"], data_root={"shop": str(csv)}, **BASE, **kw
    )


# ---- 1. a catalogue's images replaced under the same names --------------------------------
@pytest.mark.slow
def test_images_replaced_under_the_same_names_are_scored_afresh(small_demo, tmp_path, monkeypatch):
    n = len(small_demo.split("test"))
    v1 = _shop(small_demo, tmp_path / "v1", list(range(n)))
    v2 = _shop(small_demo, tmp_path / "v2", list(np.random.default_rng(0).permutation(n)))
    # the fresh number on v2, from a cache and runs folder of its own
    monkeypatch.setenv("EMBBENCH_CACHE", str(tmp_path / "fresh" / "cache"))
    monkeypatch.setenv("EMBBENCH_RUNS", str(tmp_path / "fresh" / "runs"))
    fresh = run_embed(_grid(v2))["mMP@5"].item()
    monkeypatch.setenv("EMBBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBBENCH_RUNS", str(tmp_path / "runs"))
    first = run_embed(_grid(v1))["mMP@5"].item()
    assert first != pytest.approx(fresh)  # the replay can tell the two apart
    again = run_embed(_grid(v2))["mMP@5"].item()
    assert again == pytest.approx(fresh)  # not v1's number, "finished earlier"
    roots = {r.dataset_root: r.metrics["mMP@5"] for r in ResultStore().records("embed")}
    assert roots == {str(v1): pytest.approx(first), str(v2): pytest.approx(fresh)}


@pytest.mark.slow
def test_overwrite_always_embeds_the_vectors_again(small_demo, tmp_path):
    csv = _shop(small_demo, tmp_path / "v1", list(range(len(small_demo.split("test")))))
    run_embed(_grid(csv))
    (record,) = ResultStore().records("embed")
    meta = Path(record.caches["query"]) / "meta.json"
    before = json.loads(meta.read_text())["completed"]
    run_embed(_grid(csv, overwrite="always"))
    assert json.loads(meta.read_text())["completed"] != before  # not only rescored


def test_content_change_with_size_and_mtime_kept_changes_the_fingerprint(small_demo, tmp_path):
    csv = _shop(small_demo, tmp_path / "shop", [0, 1, 2, 3, 4, 5])
    fp = from_manifest(csv).fingerprint()
    img = csv.parent / "images" / "002.jpg"
    st = img.stat()
    data = bytearray(img.read_bytes())
    data[len(data) // 2] ^= 0xFF
    img.write_bytes(bytes(data))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p or rsync -t would leave it
    assert (img.stat().st_size, img.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert from_manifest(csv).fingerprint() != fp


def test_warm_fingerprint_stats_the_images_without_reading_them(small_demo, tmp_path, monkeypatch):
    csv = _shop(small_demo, tmp_path / "shop", list(range(12)))
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, str | os.PathLike) else "")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    cold = from_manifest(csv)
    images = set(cold.items["path"])
    fp = cold.fingerprint()
    assert images <= set(opened)  # the first pass reads every image once (and the spy sees it)
    opened.clear()
    warm = from_manifest(csv)  # a new table: nothing remembered in memory
    assert warm.fingerprint() == fp
    assert not images & set(opened)
    assert list(filehash.index_dir().glob("*.json"))  # remembered on disk


def test_first_pass_over_a_large_catalogue_shows_progress(
    small_demo, tmp_path, monkeypatch, capsys
):
    csv = _shop(small_demo, tmp_path / "shop", list(range(12)))
    monkeypatch.setattr(filehash, "PROGRESS_MIN", 10)  # 12 images count as large here
    from_manifest(csv).fingerprint()
    assert "hashing images" in capsys.readouterr().err
    from_manifest(csv).fingerprint()  # warm: nothing to read, no bar
    assert "hashing images" not in capsys.readouterr().err


def test_fetched_rows_are_hashed_by_the_bytes_fetched(server, tmp_path):  # noqa: F811
    base, _ = server
    cat = _catalogue(base, ["/img/0.png", "/img/1.png"])
    assert cat.content_hashes().tolist() == [filehash.URL, filehash.URL]
    fetched, report = fetch_urls(cat, tmp_path / "fetch", **OPTS)
    assert report.ok
    want = [xxhash.xxh3_128_hexdigest(IMAGES[p]) for p in ("/img/0.png", "/img/1.png")]
    assert fetched.content_hashes().tolist() == want
    assert fetched.fingerprint() != cat.fingerprint()


def test_missing_image_and_unwritable_index_are_not_fatal(small_demo, tmp_path, monkeypatch):
    csv = _shop(small_demo, tmp_path / "shop", [0, 1, 2])
    (csv.parent / "images" / "001.jpg").unlink()
    monkeypatch.setattr(filehash, "index_dir", lambda: tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        cat = from_manifest(csv)
        hashes = cat.content_hashes().tolist()
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert hashes[1] == filehash.MISSING and filehash.MISSING not in (hashes[0], hashes[2])
    assert cat.fingerprint()


# ---- 3. manifest rows that would be mis-scored -------------------------------------------------
def _manifest(tmp_path: Path, labels: list[str], splits: list[str]) -> Path:
    csv = tmp_path / "shop.csv"
    rows = [
        f"img{i:02d}.jpg,{lab},{sp}" for i, (lab, sp) in enumerate(zip(labels, splits, strict=True))
    ]
    csv.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return csv


SPLITS16 = ["test"] * 12 + ["Test", "", " test", "Test"]  # 16 rows: 12 scored today


def test_manifest_splits_outside_train_val_test_are_refused_naming_the_rows(tmp_path):
    csv = _manifest(tmp_path, [f"c{i % 4}" for i in range(16)], SPLITS16)
    with pytest.raises(CatalogueError) as err:
        from_manifest(csv)
    text = str(err.value)
    assert "\n" not in text and str(csv) in text
    assert "rows 14, 15, 16, 17 (4 row(s))" in text and "'Test'" in text
    assert "split_case: lower" in text and "empty_split: test" in text
    cat = from_manifest(csv, split_case="lower", empty_split="test")
    assert (cat.items["split"] == "test").sum() == 16  # every row scored
    cat = from_manifest(csv, split_case="lower", empty_split="drop")
    assert len(cat.items) == 15 and set(cat.items["split"]) == {"test"}
    with pytest.raises(CatalogueError, match="split_case='upper' is not one of"):
        from_manifest(csv, split_case="upper")


def test_manifest_empty_labels_are_refused_or_dropped(tmp_path):
    labels = ["a", "b", "", "a", "b", " ", "a", "b"]
    csv = _manifest(tmp_path, labels, ["test"] * 8)
    with pytest.raises(CatalogueError) as err:
        from_manifest(csv)
    text = str(err.value)
    assert "\n" not in text and str(csv) in text and "rows 4, 7 (2 row(s))" in text
    assert "empty_label: drop" in text
    cat = from_manifest(csv, empty_label="drop")
    assert "" not in set(cat.items["label"].str.strip()) and len(cat.items) == 6


def test_manifest_options_come_from_data_options(tmp_path):
    csv = _manifest(tmp_path, [f"c{i % 4}" for i in range(16)], SPLITS16)
    with pytest.raises(CatalogueError, match=r"data_options: \{shop: \{split_case: lower\}\}"):
        load_catalogue("shop", {"shop": str(csv)})
    cat = load_catalogue(
        "shop", {"shop": str(csv)}, options={"split_case": "lower", "empty_split": "test"}
    )
    assert len(cat.split("test")) == 16


# ---- 7. params that should not be accepted -------------------------------------------------
def test_options_for_a_dataset_not_in_the_grid_are_refused_at_dry_run(tmp_path, capsys):
    from embbench.cli import main

    params = tmp_path / "my.yaml"
    params.write_text(
        "models: [test_resnet]\ndatasets: [my_shop]\n"
        "data_root: {my_shop: /data/shop.csv}\n"
        "data_options: {my_sohp: {allow_private: true}}\n"
    )
    assert main(["--dry-run", "embed", "-f", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[0]
    assert "data_options.my_sohp" in err and "did you mean 'my_shop'" in err
    assert str(params) in err
    with pytest.raises(ValueError, match=r"data_root\.sop: no dataset of the grid"):
        EmbedConfig(datasets=["demo"], data_root={"sop": "/data/sop"})


def test_a_later_file_that_replaces_the_grid_drops_the_earlier_files_entries(tmp_path, caplog):
    """README's layering (the demo overlay, then an own catalogue) is not a stray key."""
    from embbench.config import read_params_files

    demo = tmp_path / "demo.yaml"
    demo.write_text("datasets: [demo]\ndata_options: {demo: {products_per_category: 6}}\n")
    mine = tmp_path / "my.yaml"
    mine.write_text("datasets: [my_shop]\ndata_root: {my_shop: /data/shop.csv}\nlabel: sku\n")
    with caplog.at_level("INFO", logger="embbench.config"):
        params, _ = read_params_files([demo, mine])
    assert params["data_options"] == {}
    assert "data_options.demo" in caplog.text and str(demo) in caplog.text
    cfg = EmbedConfig.from_files(demo, mine, models=["test_resnet"])
    assert cfg.datasets == ["my_shop"] and cfg.data_options == {}
    # the same entry written beside the grid (same file) is the user's own: still refused
    both = tmp_path / "both.yaml"
    both.write_text("datasets: [my_shop]\ndata_options: {demo: {}}\n")
    with pytest.raises(ConfigError, match="data_options.demo"):
        EmbedConfig.from_files(demo, both, models=["test_resnet"])


def test_crosstune_options_may_name_its_source_datasets():
    from embbench.stages import config_for

    cfg = config_for("04_crosstune")(
        datasets=["demo_b"], toptuned_on=["demo"], data_options={"demo": {}, "demo_b": {}}
    )
    assert cfg.grid_datasets() == ["demo_b", "demo"]


def test_yaml_alias_bomb_is_refused_before_validation(tmp_path, capsys):
    from embbench.cli import main

    lines = [
        "models: [test_resnet]",
        "datasets: [demo]",
        "data_options:",
        "  demo:",
        '    l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
    ]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")  # 9**9 values once expanded
    start = time.perf_counter()
    assert main(["--dry-run", "embed", "-f", str(bomb)]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip().splitlines()[0]
    assert str(bomb) in err and "aliases expand to more than 100,000 values" in err
    recursive = tmp_path / "rec.yaml"
    recursive.write_text("models: &m [test_resnet, *m]\n")
    assert main(["--dry-run", "embed", "-f", str(recursive)]) == 2
    assert "recursive alias" in capsys.readouterr().err
    ok = tmp_path / "anchors.yaml"  # a few anchors are fine
    ok.write_text(
        "models: [test_resnet]\ndatasets: [demo]\n"
        "data_options: {demo: &d {products_per_category: 2}}\n"
    )
    assert main(["--dry-run", "embed", "-f", str(ok)]) == 0


def test_a_file_shared_by_the_demo_notebooks_serves_each_with_its_own_keys(tmp_path, capsys):
    """``embbench demo -f my.yaml``: data_root/label mean nothing to notebook 05; a typo does."""
    from embbench.cli import main

    mine = tmp_path / "my.yaml"
    mine.write_text("datasets: [my_shop]\ndata_root: {my_shop: /data/shop.csv}\nlabel: sku\n")
    names = "01_embed,03_toptune,05_analysis"
    assert main(["--dry-run", "demo", "--notebooks", names, "-f", str(mine)]) == 0
    assert capsys.readouterr().out.count("would run") == 3
    typo = tmp_path / "typo.yaml"
    typo.write_text("datasets: [my_shop]\ndata_root: {my_shop: /data/shop.csv}\nlabl: sku\n")
    assert main(["--dry-run", "demo", "--notebooks", names, "-f", str(typo)]) == 2
    err = capsys.readouterr().err
    assert "'labl'" in err and "did you mean 'label'" in err and str(typo) in err
    # a run checks every notebook's params before the first one starts
    assert main(["demo", "--notebooks", names, "-f", str(typo)]) == 2
