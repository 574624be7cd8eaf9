"""Issue 25 wiring: text cells in stage 01 and probe/kNN cells in stage 03, one record each."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from fixtures_datasets import write_jpeg

from embbench.cells import Cell
from embbench.embed import embed_split
from embbench.models import create_embedder
from embbench.records import ResultStore, parse_record
from embbench.stages.embed import EmbedConfig, EmbedSteps, run_embed
from embbench.text import class_prompt_tasks, item_text_tasks, zero_shot_classify

TEXT_TASKS = ["image-image", "text-image", "image-text", "zero-shot"]


@pytest.fixture
def text_cfg(embed_options):
    """The text cells' grid: a ResNet and a CLIP on the demo; keywords override."""

    def make(**kw) -> EmbedConfig:
        models = ["test_resnet", "test_clip"]
        return EmbedConfig(**{**embed_options, "models": models, "tasks": TEXT_TASKS, **kw})

    return make


def test_record_task_defaults_and_old_records_migrate_as_image_image():
    from embbench.records import Lineage, ResultRecord

    old = ResultRecord(
        stage="embed", mode="pretrained", model="m", dataset="d", lineage=Lineage(base_model="m")
    ).model_dump(mode="json")
    old.pop("task")
    assert parse_record(old).task == "image-image"
    store = ResultStore()
    assert store.path("embed", "d", "m", "pretrained", "h").name == "pretrained-h.json"
    assert store.path("embed", "d", "m", "pretrained", "h", "zero-shot").name == (
        "pretrained-zero-shot-h.json"
    )


def test_grid_gives_text_cells_to_text_models_only_and_logs_it(text_cfg, caplog):
    steps = EmbedSteps(text_cfg())
    with caplog.at_level("INFO"):
        grid = steps.grid()
    assert [(c.model, c.task) for c in grid] == [
        ("test_resnet", "image-image"),
        ("test_clip", "image-image"),
        ("test_clip", "text-image"),
        ("test_clip", "image-text"),
        ("test_clip", "zero-shot"),
    ]
    assert any("test_resnet" in r.getMessage() and "image-only" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    # the image-only grid keeps today's cells (and hash: the task is not in it)
    assert steps.grid()[0] == Cell("embed", "pretrained", "test_resnet", "demo")


@pytest.mark.slow
def test_text_cells_records_equal_the_text_package_on_the_same_vectors(demo_cells, text_cfg):
    small_demo = demo_cells
    cfg = text_cfg()
    table = run_embed(cfg)
    assert list(zip(table["model"], table["task"], strict=True)) == [
        ("test_resnet", "image-image"),
        ("test_clip", "image-image"),
        ("test_clip", "text-image"),
        ("test_clip", "text-image"),
        ("test_clip", "image-text"),
        ("test_clip", "zero-shot"),
    ]
    store = ResultStore()
    recs = {(r.model, r.task, r.details.get("text_source")): r for r in store.records("embed")}
    assert len(recs) == 6
    # the same vectors the records scored: the image cache of the image-image cell
    emb = create_embedder("test_clip", weights="random", with_text=True)
    es = embed_split(emb, small_demo, "test", batch_size=8, num_workers=0, progress=False)
    image = recs[("test_clip", "image-image", None)]
    assert image.caches["index"] == str(es.path)
    labels = es.labels(small_demo.items, "product")
    vecs = np.asarray(es.vectors)
    cp = class_prompt_tasks(
        emb.text, vecs, labels, class_names=small_demo.class_names("product"),
        templates=cfg.templates, dataset="demo", progress=False,
    )  # fmt: skip
    it = item_text_tasks(
        emb.text, vecs, labels, small_demo.items, text_column="title", label="product",
        split="test", dataset="demo", progress=False,
    )  # fmt: skip
    t_cls = recs[("test_clip", "text-image", "class-prompts")]
    t_item = recs[("test_clip", "text-image", "item-text:title")]
    i_txt = recs[("test_clip", "image-text", "item-text:title")]
    zs = recs[("test_clip", "zero-shot", None)]
    for rec, want in ((t_cls, cp.text_image), (t_item, it.text_image), (i_txt, it.image_text)):
        assert rec.metrics == pytest.approx(want.summary)
        assert set(rec.metrics) == set(image.metrics)
        assert rec.n_queries == want.n_queries and rec.n_lone == want.n_lone
        assert rec.caches == image.caches  # never embedded twice
        assert set(rec.details["ci"]) == set(rec.metrics)
    assert t_cls.details["templates"] == cfg.templates
    pq = store.per_query(t_cls)
    assert list(pq["query_text"]) == cp.class_names
    assert list(store.per_query(t_item)["query_text"]) == list(it.texts.texts)
    assert list(store.per_query(i_txt)["index_text"]) == list(it.texts.texts)
    assert i_txt.n_index == len(it.texts.texts)
    # zero-shot: classification only, with top-tuning's keys, balanced and top-5 accuracy, a CI
    want = zero_shot_classify(vecs, labels, cp.class_vectors, cp.class_labels)
    assert zs.metrics == {}
    assert zs.classification["accuracy"] == pytest.approx(want.summary["top1"])
    assert zs.classification["top5_accuracy"] == pytest.approx(want.summary["top5"])
    assert zs.classification["balanced_accuracy"] == pytest.approx(
        want.summary["balanced_accuracy"]
    )
    assert {"f1_macro", "precision_weighted"} <= set(zs.classification)
    lo, hi = zs.details["ci"]["accuracy"]
    assert lo <= zs.classification["accuracy"] <= hi
    # the record files: image-image as before, other tasks named by the task
    names = sorted(p.name for p in (store.root / "embed/demo/test_clip").glob("*.json"))
    assert sum(n.startswith("pretrained-text-image-") for n in names) == 2
    assert sum(n.startswith("pretrained-zero-shot-") for n in names) == 1
    # one MLflow run per cell, named stage/model/dataset/<task>, classification keys logged
    runs = mlflow.search_runs(experiment_names=["embbench"])
    assert len(runs) == 6
    names = set(runs["tags.mlflow.runName"])
    assert {"embed/test_clip/demo", "embed/test_clip/demo/zero-shot",
            "embed/test_clip/demo/image-text"} <= names  # fmt: skip
    zrun = runs[runs["tags.mlflow.runName"] == "embed/test_clip/demo/zero-shot"].iloc[0]
    assert zrun["metrics.test_accuracy"] == pytest.approx(zs.classification["accuracy"])
    assert zrun["tags.task"] == "zero-shot"
    # a second run skips every finished cell
    again = run_embed(cfg)
    assert list(again["config_hash"]) == list(table["config_hash"])
    assert len(mlflow.search_runs(experiment_names=["embbench"])) == 6
    raw = json.loads((store.root / "embed/demo/test_clip" / names_of(t_cls)).read_text())
    assert raw["task"] == "text-image"


def names_of(rec):
    return f"pretrained-{rec.task}-{rec.config_hash}.json"


# ---- bad input: one line, exit 2, before any work ---------------------------------------------
PARAMS = Path(__file__).resolve().parent.parent / "params"
BASE = ["-f", str(PARAMS / "01_embed.yaml"), "-f", str(PARAMS / "smoke" / "01_embed.yaml")]


def _shop(tmp_path, titles, **params):
    """A user's manifest with a ``title`` column: 2 SKUs x 3 views, and a params file on it."""
    rows = []
    for s, (sku, title) in enumerate((("A-1", titles[0]), ("B-2", titles[1]))):
        for v in range(3):
            rel = f"img/{sku}_{v}.jpg"
            write_jpeg(tmp_path / rel, cls=s, view=v, size=(24, 24))
            rows.append({"path": rel, "sku": sku, "split": "test", "title": title})
    csv = tmp_path / "shop.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    own = {"datasets": ["shop"], "data_root": {"shop": str(csv)}, "label": "sku", **params}
    (tmp_path / "shop.yaml").write_text(yaml.safe_dump(own))
    return ["-f", str(tmp_path / "shop.yaml")]


def _run(argv, capsys):
    from embbench.cli import main

    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    # the engine lists its pre-work problems one per line under one header line
    return code, [line for line in err if "--debug" not in line and "problem(s)" not in line]


def _nothing_computed():
    """No record and no embedding written (the images' content hashes of the check may be)."""
    from embbench.paths import cache_dir

    assert not ResultStore().records()
    written = (
        [p for p in Path(cache_dir()).rglob("*") if p.is_file()] if cache_dir().exists() else []
    )
    assert all("file_hashes" in p.parts for p in written), written


def test_run_cell_text_task_on_an_image_only_model_is_one_line_exit_2(capsys):
    argv = ["run-cell", "01_embed", *BASE, "--model", "test_resnet", "--dataset", "demo"]
    code, err = _run([*argv, "--task", "text-image"], capsys)
    assert code == 2 and len(err) == 1
    assert "'test_resnet'" in err[0] and "text-image" in err[0] and "Fix:" in err[0]
    _nothing_computed()


@pytest.mark.parametrize(
    ("titles", "params", "words"),
    [
        (("red mug", "blue lamp"), {"text_column": "colour"}, "colour"),
        (("", " "), {"text_column": "title"}, "'title' is empty in every row"),
        (("red mug", "blue lamp"), {"templates": []}, "templates is an empty list"),
        (("red mug", "blue lamp"), {"templates": ["a photo of a mug"]}, "{}"),
        (("red mug", "blue lamp"), {"models": ["test_resnet"]}, "text tower"),
    ],
)
def test_bad_text_inputs_are_one_line_exit_2_before_any_work(
    tmp_path, capsys, titles, params, words
):
    own = _shop(tmp_path, titles, tasks=["image-image", "text-image", "image-text"], **params)
    code, err = _run(["embed", *BASE, *own], capsys)
    assert code == 2, err
    assert len(err) == 1 and words in err[0], err
    _nothing_computed()


def test_a_users_title_column_gets_text_records_and_image_only_models_none(tmp_path, capsys):
    own = _shop(
        tmp_path,
        ("red striped mug", "blue dotted lamp"),
        backend="exact",
        tasks=["image-image", "text-image", "image-text", "zero-shot"],
    )
    code, _ = _run(["embed", *BASE, *own], capsys)
    assert code == 0
    got = sorted(
        (r.model, r.task, r.details.get("text_source", "")) for r in ResultStore().records()
    )
    assert got == [
        ("test_clip", "image-image", ""),
        ("test_clip", "image-text", "item-text:title"),
        ("test_clip", "text-image", "class-prompts"),
        ("test_clip", "text-image", "item-text:title"),
        ("test_clip", "zero-shot", ""),
        ("test_resnet", "image-image", ""),
    ]
    for rec in ResultStore().records():
        assert rec.task == "image-image" or "ci" in rec.details


def test_item_text_cell_run_nests_under_its_text_image_cell_run(demo_cells, text_cfg):
    run_embed(text_cfg(models=["test_clip"], tasks=["text-image"]))
    runs = mlflow.search_runs(experiment_names=["embbench"])
    plain = runs[runs["tags.mlflow.runName"] == "embed/test_clip/demo/text-image"]
    item = runs[runs["tags.mlflow.runName"] == "embed/test_clip/demo/item-text/text-image"]
    assert len(plain) == len(item) == 1
    assert item.iloc[0]["tags.mlflow.parentRunId"] == plain.iloc[0]["run_id"]
