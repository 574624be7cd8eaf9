"""The analysis of the tasks beyond image->image (issue 25): tables, figures, guide, galleries.

Records are written per the record contract (a ``task``; classification metrics in
``classification`` with the accuracy's bootstrap CI in ``details["ci"]``; text queries'
``query_text`` / ``query_label`` / ``topk_ids`` in the per-query file) through
``ResultStore.save``, with values chosen here so every number can be checked.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis import METRICS, make_record, per_query_values, write_records

from embbench import analysis as an
from embbench.analysis import task_plots, tasks
from embbench.analysis.task_guide import task_guide, task_guide_sentences
from embbench.analysis.text_gallery import text_query_gallery
from embbench.records import ResultStore, parse_record
from embbench.stages.analysis import AnalysisConfig

TEMPLATES = ["a photo of a {}", "a product photo of a {}"]


def _save(store: ResultStore, rec: dict, pq=None, *, control: bool = False) -> None:
    record = parse_record(rec)
    record.lineage.control = control  # a random-init control of a real architecture
    store.save(record, per_query=pq)


def _text_record(model, dataset, p, seed, **extra):
    pq = per_query_values(p, seed)
    rec = make_record(
        model, "text-image", "transformer", 32, dataset, "pretrained", pq,
        task="text-image", text_source="class-prompts", templates=TEMPLATES, **extra,
    )  # fmt: skip
    return rec, pq


def _cls_record(model, dataset, task, acc, ci, **extra):
    cls = {"accuracy": acc, "balanced_accuracy": acc - 0.02, "f1_macro": acc - 0.05}
    if task == "zero-shot":
        cls["top5_accuracy"] = min(1.0, acc + 0.2)
    return make_record(
        model, "text-image" if model == "test_clip" else "supervised", "transformer", 32,
        dataset, "pretrained", None, task=task, classification=cls, ci={"accuracy": ci}, **extra,
    )  # fmt: skip


@pytest.fixture
def store(tmp_path) -> ResultStore:
    store = ResultStore(tmp_path / "results")
    write_records(store)
    return store


def _cfg() -> AnalysisConfig:
    return AnalysisConfig(source="records", n_boot=0)


# ------------------------------------------------------------- image->image stays as it was


def test_text_and_baseline_records_never_change_the_image_image_tables(store):
    before = an.load_results(_cfg(), store)
    t3, guide = an.table3(before, "mMP@5"), an.practical_guide(before, "mMP@5")
    # text->image results better than every image one, and a perfect probe
    for i, ds in enumerate(["alpha", "beta"]):
        rec, pq = _text_record("test_clip", ds, 0.99, 500 + i)
        _save(store, rec, pq)
        _save(store, _cls_record("test_vit", ds, "probe", 0.99, [0.98, 1.0]))
    after = an.load_results(_cfg(), store)
    assert set(after["task"]) == {"image-image"}
    pd.testing.assert_frame_equal(an.table3(after, "mMP@5"), t3)
    pd.testing.assert_frame_equal(an.practical_guide(after, "mMP@5"), guide)
    assert len(after) == len(before)
    # every task: the text rows are there, beside (not instead of) the image rows of the cell
    every = an.load_results(_cfg(), store, all_tasks=True)
    assert (every["task"] == "text-image").sum() == 2 and (every["task"] == "probe").sum() == 2
    clip = every[(every["model"] == "test_clip") & (every["mode"] == "pretrained")]
    assert sorted(clip["task"]) == ["image-image"] * 2 + ["text-image"] * 2
    # had they mixed in, table 3 would have changed: the test can fail
    assert not an.table3(every, "mMP@5").equals(t3)


def test_records_without_a_task_read_as_image_image(store):
    df = an.load_results(_cfg(), store, all_tasks=True)
    assert set(df["task"]) == {"image-image"}


# ------------------------------------------------------------------------------- tables


def test_text_image_table_has_the_five_metrics_with_cis_and_names_its_texts(store):
    rec, pq = _text_record("test_clip", "alpha", 0.7, 901)
    _save(store, rec, pq)
    df = an.load_results(_cfg(), store, all_tasks=True)
    df = an.add_confidence_intervals(df, an.PerQuery(store), k=5, n_boot=200, seed=0)
    table = tasks.retrieval_task_table(df, "text-image", k=5)
    (row,) = table.to_dict("records")
    assert row["model"] == "test_clip" and row["dataset"] == "alpha"
    assert row["text_source"] == "class-prompts" and row["templates"] == " | ".join(TEMPLATES)
    for m in METRICS:
        assert row[m] == pytest.approx(float(np.mean(pq[m])))
        assert row[f"{m} low"] <= row[m] <= row[f"{m} high"]
    assert tasks.retrieval_task_table(df, "image-text", k=5).empty


def test_class_prompt_and_item_text_cells_are_two_rows_whose_arrays_are_found(store):
    """Both text->image cells of one model stay; rows read back from MLflow (no per_query_file)
    still find the text cell's own per-query file, not the image cell's."""
    rec, pq = _text_record("test_clip", "alpha", 0.7, 911)
    _save(store, rec, {**pq, "query_text": np.array(["a red mug"] * len(pq["mMP@5"]))})
    item, pq2 = _text_record("test_clip", "alpha", 0.6, 912)
    _save(store, {**item, "text_source": "item-text:title", "config_hash": "item912"}, pq2)
    df = an.load_results(_cfg(), store, all_tasks=True)
    text = df[df["task"] == "text-image"]
    assert sorted(text["text_source"]) == ["class-prompts", "item-text:title"]
    row = text[text["text_source"] == "class-prompts"].iloc[0].to_dict()
    row.pop("per_query_file", None)  # as a row built from an MLflow run
    arrays = an.PerQuery(store)(row)
    assert arrays is not None and list(arrays["query_text"][:1]) == ["a red mug"]


def test_zero_shot_table_and_the_ladder(store):
    _save(store, _cls_record("test_clip", "alpha", "zero-shot", 0.41, [0.35, 0.47], n_classes=4))
    _save(store, _cls_record("test_clip", "alpha", "knn", 0.52, [0.46, 0.58]))
    _save(store, _cls_record("test_clip", "alpha", "probe", 0.61, [0.55, 0.66]))
    _save(store, _cls_record("test_vit", "alpha", "probe", 0.58, [0.52, 0.63]))
    df = an.load_results(_cfg(), store, all_tasks=True)
    zs = tasks.zero_shot_table(df)
    (row,) = zs.to_dict("records")
    assert (row["top1"], row["low"], row["high"]) == (0.41, 0.35, 0.47)
    assert row["top5"] == pytest.approx(0.61) and row["balanced_accuracy"] == pytest.approx(0.39)
    ladder = tasks.classification_ladder(df)
    clip = ladder[(ladder["model"] == "test_clip") & (ladder["dataset"] == "alpha")]
    assert list(clip["step"]) == ["zero-shot", "kNN", "probe", "top-tuned"]
    toptuned = df[(df["model"] == "test_clip") & (df["mode"] == "top-tuned")]
    toptuned = toptuned[toptuned["dataset"] == "alpha"]["test_accuracy"].iloc[0]
    assert list(clip["accuracy"]) == pytest.approx([0.41, 0.52, 0.61, toptuned])
    vit = ladder[(ladder["model"] == "test_vit") & (ladder["dataset"] == "alpha")]
    assert list(vit["step"]) == ["probe", "top-tuned", "fine-tuned"]  # no zero-shot or kNN
    wide = tasks.ladder_wide(ladder)
    assert np.isnan(wide.set_index(["dataset", "model"]).loc[("alpha", "test_vit"), "kNN"])


def test_notebook_03_ladder_reads_the_stage_cells_from_the_store(store):
    _save(store, _cls_record("test_vit", "alpha", "knn", 0.52, [0.46, 0.58]))
    _save(store, _cls_record("test_vit", "alpha", "probe", 0.58, [0.52, 0.63]))
    _save(store, _cls_record("test_resnet", "beta", "probe", 0.5, [0.45, 0.55]))
    cells = pd.DataFrame({"model": ["test_vit"], "dataset": ["alpha"]})
    ladder = tasks.ladder_for_cells(cells, store=store, k=5)
    assert set(ladder["model"]) == {"test_vit"} and set(ladder["dataset"]) == {"alpha"}
    assert list(ladder["step"]) == ["kNN", "probe", "top-tuned", "fine-tuned"]
    from embbench.report.tasks import ladder_display

    (row,) = ladder_display(ladder).to_dict("records")
    assert row["kNN"] == "0.520 [0.46, 0.58]" and row["zero-shot"] == "—"


# ------------------------------------------------------------------------------ figures


def test_task_figures_draw_cis_and_mark_the_control(store):
    rec, pq = _text_record("test_clip", "alpha", 0.7, 902)
    _save(store, rec, pq)
    ctrl, pq2 = _text_record("test_clip_random", "alpha", 0.2, 903)
    _save(store, ctrl, pq2, control=True)
    _save(store, _cls_record("test_clip", "alpha", "zero-shot", 0.41, [0.35, 0.47]))
    _save(store, _cls_record("test_clip", "alpha", "probe", 0.61, [0.55, 0.66]))
    df = an.load_results(_cfg(), store, all_tasks=True)
    df = an.add_confidence_intervals(df, an.PerQuery(store), k=5, n_boot=100)
    table = tasks.retrieval_task_table(df, "text-image", k=5)
    fig = task_plots.task_retrieval_figure(table, "mMP@5")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert "test_clip" in labels and "test_clip_random (control)" in labels
    bars = [c for c in fig.axes[0].containers if type(c).__name__ == "BarContainer"]
    assert bars and bars[0].errorbar is not None  # the CIs are drawn
    assert task_plots.zero_shot_figure(tasks.zero_shot_table(df)) is not None
    ladder = tasks.classification_ladder(df)
    fig = task_plots.ladder_figure(ladder, "alpha")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "test_clip" in legend
    assert task_plots.ladder_figure(ladder, "nowhere") is None
    assert (
        task_plots.task_retrieval_figure(tasks.retrieval_task_table(df, "image-text", 5), "mMP@5")
        is None
    )


# -------------------------------------------------------------------------------- guide


def test_guide_is_honest_without_text_results(store):
    df = an.load_results(_cfg(), store, all_tasks=True)
    guide = task_guide(df, "mMP@5")
    text = " ".join(task_guide_sentences(guide))
    assert "no text->image results: run stage 01 with tasks: [text-image]" in text
    assert "Visual search (image->image) on alpha: test_clip" in text  # the best image result


def test_guide_lets_the_cis_decide(store):
    for model, p, seed in (("test_clip", 0.9, 1), ("big_clip", 0.88, 2), ("tiny_clip", 0.2, 3)):
        rec, pq = _text_record(model, "alpha", p, seed)
        _save(store, rec, pq)
    _save(store, _cls_record("test_vit", "alpha", "probe", 0.96, [0.95, 0.97]))
    df = an.load_results(_cfg(), store, all_tasks=True)
    df = an.add_confidence_intervals(df, an.PerQuery(store), k=5, n_boot=200)
    guide = task_guide(df, "mMP@5").set_index(["question", "dataset"])
    box = guide.loc[("search box", "alpha")]
    assert box["winner"] in ("test_clip", "big_clip") and box["verdict"] == "no clear winner"
    # without the close runner-up, the winner is clear
    alone = df[df["model"] != ("big_clip" if box["winner"] == "test_clip" else "test_clip")]
    assert (
        task_guide(alone, "mMP@5")
        .set_index(["question", "dataset"])
        .loc[("search box", "alpha"), "verdict"]
        == "clear winner"
    )
    cat = guide.loc[("categorisation", "alpha")]
    assert cat["winner"] == "test_vit [probe]" and cat["score"] == 0.96
    assert cat["verdict"] == "no CI"  # top-tuned records store no accuracy CI
    sentences = task_guide_sentences(guide.reset_index())
    assert any(
        s.startswith("Search box (text->image) on alpha") and "no clear winner" in s
        for s in sentences
    )


# ------------------------------------------------------------------------------ gallery


SMALL = {"n_categories": 4, "products_per_category": 3, "views": [2, 1, 3], "image_size": 32}


@pytest.fixture
def demo_run():
    """A real stage-01 run (tiny random model) on a small demo: the catalogue and its cache."""
    from embbench.stages.embed import EmbedConfig, run_embed

    cfg = EmbedConfig(
        models=["test_resnet"], weights="random", datasets=["demo"],
        data_options={"demo": SMALL}, batch_size=16, num_workers=0, backend="exact",
    )  # fmt: skip
    run_embed(cfg)
    (record,) = ResultStore().records("embed")
    return record


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def test_text_query_gallery_shows_the_runs_catalogue_framed_by_relevance(demo_run):
    from embbench.analysis.sources import load_embedding_set
    from embbench.report import GalleryRenderer

    store = ResultStore()
    index = load_embedding_set(demo_run.caches["index"])
    labels = np.asarray(index.labels(_items(demo_run), demo_run.label or "product"))
    classes = sorted(set(labels.tolist()))[:3]
    rng = np.random.default_rng(0)
    topk = rng.integers(0, len(index.item_ids), size=(len(classes), 5))
    pq = {
        **{m: rng.random(len(classes)) for m in METRICS},
        "query_text": np.array([f"a photo of a {c}" for c in classes]),
        "query_label": np.asarray(classes),
        "topk_ids": topk.astype(np.int64),
    }
    raw = demo_run.model_dump(mode="json")
    raw.update(config_hash="text" + raw["config_hash"][4:], per_query_file=None, task="text-image")
    raw["details"] = {**raw["details"], "text_source": "class-prompts"}
    store.save(parse_record(raw), per_query=pq)
    df = an.load_results(_cfg(), store, all_tasks=True)
    (gallery,) = text_query_gallery(df, an.PerQuery(store), n_queries=3, k=5)
    assert not gallery.notes and len(gallery.rows) == 3
    items = _items(demo_run)
    for row in gallery.rows:
        q = list(pq["query_text"]).index(row.query.label)
        cells = row.results["test_resnet · class prompts"]
        assert [c.item_id for c in cells] == [str(index.item_ids[i]) for i in topk[q]]
        for c, i in zip(cells, topk[q], strict=True):
            assert Path(c.path) == Path(items.set_index("item_id").at[index.item_ids[i], "path"])
            assert c.relevant == (labels[i] == classes[q])
    html = GalleryRenderer(thumb_px=32).render([gallery])
    assert "a photo of a" in html and "embbench-text-query" in html
    marks = re.findall(r'data-item-id="([^"]+)" data-sha256="([0-9a-f]{16})"', html)
    paths = items.set_index("item_id")["path"]
    assert len(marks) == 15 and all(d == _sha(paths[i]) for i, d in marks)
    # notebook 01: the runs' text galleries, and the image gallery left to the image result
    from embbench.analysis.text_gallery import text_gallery_for_runs

    (again,) = text_gallery_for_runs([demo_run.mlflow_run_id], k=5, n_queries=3)
    assert [r.query.label for r in again.rows] == [r.query.label for r in gallery.rows]
    (images,) = an.gallery_for_runs([demo_run.mlflow_run_id], n_sample=2, n_extreme=1)
    assert images.entries == ["test_resnet"] and not images.notes
    assert all(r.query.path for r in images.rows)  # image queries only
    # item texts are other queries than class prompts: their own gallery, never an empty one
    titles = np.array([f"item title {i}" for i in range(len(classes))])
    raw.update(config_hash="item" + raw["config_hash"][4:])
    raw["details"] = {**raw["details"], "text_source": "item-text:title"}
    store.save(parse_record(raw), per_query={**pq, "query_text": titles})
    df = an.load_results(_cfg(), store, all_tasks=True)
    both = text_query_gallery(df, an.PerQuery(store), n_queries=3, k=5)
    assert sorted(g.entries[0] for g in both) == [
        "test_resnet · class prompts",
        "test_resnet · title",
    ]
    assert all(len(g.rows) == 3 and not g.notes for g in both)


def _items(record) -> pd.DataFrame:
    from embbench.analysis.sources import _reload

    cat = _reload(record.catalogue_ref())
    assert not isinstance(cat, str), cat
    return cat.items


def test_the_search_box_answer_names_a_control_that_alone_has_text_results(store):
    """Not "no text->image results" when the control has some: it says they are only a floor."""
    ctrl, pq = _text_record("test_clip_random", "alpha", 0.2, 913)
    _save(store, ctrl, pq, control=True)
    df = an.load_results(_cfg(), store, all_tasks=True)
    guide = task_guide(df, "mMP@5")
    verdict = guide.loc[guide["question"] == "search box", "verdict"].iloc[0]
    assert verdict.startswith("only the random-init control(s) test_clip_random have results")
    assert "run stage 01 with tasks: [text-image]" in verdict


def test_the_guide_reads_a_frame_without_a_control_column():
    """A frame with no ``control`` column (no controls anywhere) has no controls to leave out."""
    df = pd.DataFrame(
        {"task": ["image-image"], "mode": ["pretrained"], "model": ["m"], "dataset": ["d"],
         "mMP@5": [0.5]}
    )  # fmt: skip
    guide = task_guide(df, "mMP@5")
    assert guide.loc[guide["question"] == "visual search", "winner"].tolist() == ["m"]
