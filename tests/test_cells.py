"""The cell engine: the grid is checked before any work, and a user's catalogue is read right."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

import embbench.cells as cells
from embbench.cells import GridError
from embbench.paths import cache_dir
from embbench.records import ResultStore, parse_record
from embbench.stages.embed import EmbedConfig, run_embed

BASE = dict(weights="random", batch_size=8, num_workers=0, backend="exact")
OLD_RECORDS = Path(__file__).parent / "data" / "records_v1"


def test_unknown_model_in_fifth_position_fails_before_any_cell(small_demo, monkeypatch):
    monkeypatch.setattr(cells, "load_catalogue", lambda *a, **k: small_demo)
    models = ["test_resnet", "test_clip", "test_resnet", "test_clip", "tset_resnet"]
    cfg = EmbedConfig(models=models, datasets=["demo"], **BASE)
    with pytest.raises(GridError, match=r"tset_resnet.*Did you mean 'test_resnet'"):
        run_embed(cfg)
    # nothing was embedded, recorded or logged
    assert not (cache_dir() / "embeddings").exists()
    assert ResultStore().records() == []


def test_unknown_backend_and_dataset_are_listed_together(small_demo, monkeypatch):
    monkeypatch.setattr(cells, "load_catalogue", lambda *a, **k: small_demo)
    cfg = EmbedConfig(
        models=["test_resnet"], datasets=["demo", "sopp"], **{**BASE, "backend": "faiss"}
    )
    with pytest.raises(GridError) as err:
        run_embed(cfg)
    text = str(err.value)
    assert "backend 'faiss' is unknown" in text and "'exact'" in text
    assert "Unknown dataset 'sopp'" in text and "'sop'" in text
    assert mlflow.active_run() is None


@pytest.mark.slow
def test_manifest_label_column_is_passed_to_the_catalogue(small_demo, tmp_path):
    # a user's CSV whose label column is not called "label": stage 01 must read `label`
    import shutil

    rows = small_demo.items.sample(24, random_state=0)
    csv = tmp_path / "shop" / "catalogue.csv"
    (csv.parent / "images").mkdir(parents=True)
    for p in rows["path"]:
        shutil.copy(p, csv.parent / "images")
    lines = ["path,category,split"] + [
        f"images/{Path(p).name},{c},test"
        for p, c in zip(rows["path"], rows["category"], strict=True)
    ]
    csv.write_text("\n".join(lines) + "\n")
    cfg = EmbedConfig(
        models=["test_resnet"],
        datasets=["manifest"],
        label="category",
        data_root={"manifest": str(csv)},
        **BASE,
    )
    table = run_embed(cfg)
    assert table.loc[0, "n_queries"] == 24
    (rec,) = ResultStore().records("embed")
    assert rec.label == "category" and rec.backend == "exact"
    # images outside the manifest's folder are refused before any work, unless allowed
    outside = tmp_path / "elsewhere.csv"
    outside.write_text(
        "path,category\n"
        + "".join(f"{p},{c}\n" for p, c in zip(rows["path"], rows["category"], strict=True))
    )
    cfg = cfg.model_copy(update={"data_root": {"manifest": str(outside)}})
    with pytest.raises(GridError, match="outside the manifest's folder"):
        run_embed(cfg)
    allowed = cfg.model_copy(update={"data_options": {"manifest": {"allow_outside_root": True}}})
    assert run_embed(allowed).loc[0, "n_queries"] == 24


@pytest.mark.parametrize("path", sorted(OLD_RECORDS.glob("*.json")), ids=lambda p: p.stem)
def test_records_of_the_first_landing_still_load(path):
    raw = json.loads(path.read_text())
    rec = parse_record(raw, str(path))
    assert rec.metrics == raw["metrics"] and rec.mode == raw["mode"]
    assert rec.lineage.weights_kind == raw["weights_used"]["kind"]
    assert rec.git_sha == raw["git_sha"]
    if rec.mode in ("fine-tuned", "cross-tuned"):
        # those runs started from random weights: the lineage says so, end to end
        assert rec.lineage.finetune_start == "random"
        assert "from random init" in rec.lineage.describe()
    if rec.mode == "top-tuned":
        assert rec.lineage.toptuned_on == raw["dataset"]
        assert rec.test_accuracy == raw["classification"]["accuracy"]


def test_the_done_line_of_a_classification_cell_shows_its_accuracy():
    from types import SimpleNamespace

    from embbench.cells import _headline

    probe = SimpleNamespace(metrics={}, classification={"accuracy": 0.96, "f1_macro": 0.9})
    assert _headline(probe) == {"accuracy": 0.96}
    retrieval = SimpleNamespace(metrics={"mMP@5": 0.6}, classification={"accuracy": 0.9})
    assert _headline(retrieval) == {"mMP@5": 0.6}
