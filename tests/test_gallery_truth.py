"""What a gallery shows is what the run searched: the run's own catalogue, proven by its
fingerprint, or one line saying why not; never another catalogue that shares its item ids."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from embbench import analysis as an
from embbench.paths import data_dir
from embbench.records import ResultStore, parse_record
from embbench.report import GalleryRenderer

# a small demo (the generator's options, as params/demo/01_embed.yaml passes them)
SMALL = {"n_categories": 4, "products_per_category": 3, "views": [2, 1, 3], "image_size": 32}


@pytest.fixture
def demo_run():
    """A real stage-01 run (tiny random model, exact search) on a small generated demo."""
    from embbench.stages.embed import EmbedConfig, run_embed

    cfg = EmbedConfig(
        models=["test_resnet"],
        weights="random",
        datasets=["demo"],
        data_options={"demo": SMALL},
        batch_size=16,
        num_workers=0,
        backend="exact",
    )
    table = run_embed(cfg)
    (record,) = ResultStore().records("embed")
    return table, record


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def test_the_record_says_how_to_reload_its_catalogue(demo_run):
    _, rec = demo_run
    ref = rec.catalogue
    assert ref is not None and ref.name == "demo" and ref.options == SMALL
    assert Path(ref.root) == Path(rec.dataset_root) and (Path(ref.root) / "spec.json").is_file()
    # records written before the field existed rebuild it from their config and root
    old = rec.model_dump(mode="json")
    old.pop("catalogue")
    again = parse_record(old).catalogue_ref()
    assert again.root == ref.root and again.options == SMALL and again.seed == ref.seed


def test_gallery_shows_only_the_runs_catalogue_never_a_twin_with_its_ids(demo_run):
    from embbench.demo import make_demo_catalogue

    table, rec = demo_run
    run_root = Path(rec.dataset_root)
    # a twin: the same item ids, other pictures (another size), already on disk where the
    # generator's defaults would be looked for
    twin = make_demo_catalogue(data_dir(), **{**SMALL, "image_size": 40})
    assert Path(twin.root) != run_root
    (gallery,) = an.gallery_for_runs(table["mlflow_run_id"], n_sample=4, n_extreme=2)
    cells = [c for r in gallery.rows for c in [r.query, *r.results["test_resnet"]]]
    assert cells and all(Path(c.path).parent.parent.parent == run_root for c in cells)
    assert not gallery.notes
    run_files = {i: Path(p) for i, p in zip(*_ids_paths(run_root), strict=True)}
    assert all(Path(c.path) == run_files[c.item_id] for c in cells)
    # nothing generated while drawing: the data folder holds the run's demo and the twin only
    assert sorted(p.name for p in data_dir().glob("demo-*")) == sorted(
        {run_root.name, Path(twin.root).name}
    )
    # the HTML names each thumbnail's item and the digest of the file it was drawn from
    html = GalleryRenderer(thumb_px=32).render([gallery])
    marks = re.findall(r'data-item-id="([^"]+)" data-sha256="([0-9a-f]{16})"', html)
    assert len(marks) == len(cells)
    assert all(digest == _sha(run_files[item]) for item, digest in marks)


def test_a_catalogue_that_is_not_the_runs_is_one_line_never_a_picture(demo_run):
    from embbench.demo import make_demo_catalogue

    table, rec = demo_run
    twin = make_demo_catalogue(data_dir() / "elsewhere", **{**SMALL, "image_size": 40})
    path = ResultStore().path(*rec.key())
    raw = json.loads(path.read_text())
    raw["catalogue"]["root"] = twin.root  # the record now points at the twin (same ids)
    path.write_text(json.dumps(raw))
    (gallery,) = an.gallery_for_runs(table["mlflow_run_id"])
    assert not gallery.rows and len(gallery.notes) == 1
    assert "is not the one the run embedded" in gallery.notes[0]
    html = GalleryRenderer().render([gallery])
    assert "<img" not in html and "is not the one the run embedded" in html
    # a root that is gone: one line, and nothing is generated in its place
    raw["catalogue"]["root"] = str(data_dir() / "gone" / "demo-0000000000")
    path.write_text(json.dumps(raw))
    (gallery,) = an.gallery_for_runs(table["mlflow_run_id"])
    assert not gallery.rows and "is not on this machine" in gallery.notes[0]
    assert not (data_dir() / "gone").exists()


def _ids_paths(root: Path) -> tuple[list[str], list[str]]:
    rows = [line.split(",") for line in (root / "manifest.csv").read_text().splitlines()[1:]]
    return [r[0] for r in rows], [str(root / r[1]) for r in rows]


def test_a_manifest_named_by_a_relative_path_is_found_from_another_folder(tmp_path, monkeypatch):
    from fixtures_datasets import write_jpeg

    import embbench.datasets._registry as ds
    from embbench.stages.embed import EmbedConfig, run_embed

    monkeypatch.setattr(ds._REGISTRY, "_entries", dict(ds._REGISTRY._entries))  # no leak
    rows = ["path,sku,split"]
    for s in range(4):
        for v in range(3):
            write_jpeg(tmp_path / "shop" / f"i{s}_{v}.jpg", cls=s, view=v)
            rows.append(f"i{s}_{v}.jpg,S{s},test")
    (tmp_path / "shop" / "m.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    table = run_embed(
        EmbedConfig(
            models=["test_resnet"],
            weights="random",
            datasets=["shopx"],
            data_root={"shopx": "shop/m.csv"},
            label="sku",
            backend="exact",
            num_workers=0,
        )
    )
    monkeypatch.chdir(tmp_path / "shop")  # e.g. a notebook's kernel, started elsewhere
    (gallery,) = an.gallery_for_runs(table["mlflow_run_id"], n_sample=2, n_extreme=1)
    assert gallery.rows and not gallery.notes


def test_records_of_the_first_schema_still_say_where_their_catalogue_is():
    folder = Path(__file__).parent / "data" / "records_v1"
    for path in sorted(folder.glob("*.json")):
        raw = json.loads(path.read_text())
        ref = parse_record(raw, str(path)).catalogue_ref()
        assert ref.name == raw["dataset"] and ref.root == raw["dataset_root"], path.name
        assert ref.max_images == raw["config"]["max_images"] and ref.label == raw["config"]["label"]
