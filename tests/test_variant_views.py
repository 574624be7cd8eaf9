"""Deployment variants apart from their plain model: bars of plain scores (never averaged with
the variants), variants labelled by name, gallery columns named by model and variant, identical
columns merged and a variant whose own ranking is unknown left out with a note."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_gallery import K, _source_row

from embbench import analysis as an
from embbench.analysis.load import records_frame
from embbench.analysis.sources import load_source
from embbench.analysis.stage_plots import PLAIN, embed_figure, variants_figure, variants_table
from embbench.records import Lineage, ResultRecord

VARIANTS = {"int8": 0.64, "IVF_SQ8 nprobe=1": 0.21, "HNSW": 0.62}


def _results() -> pd.DataFrame:
    rows = [
        {
            "model": "lite0",
            "dataset": "demo",
            "variant": "",
            "weights": "pretrained",
            "mMP@5": 0.646,
        },
        {"model": "lite1", "dataset": "demo", "variant": "", "weights": "pretrained", "mMP@5": 0.5},
    ]
    rows += [
        {"model": "lite0", "dataset": "demo", "variant": v, "weights": "pretrained", "mMP@5": s}
        for v, s in VARIANTS.items()
    ]
    return pd.DataFrame(rows)


def test_bars_show_each_plain_score_and_variants_stand_apart_by_name():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = embed_figure(_results(), "mMP@5")
    (ax,) = fig.axes
    heights = sorted(round(p.get_height(), 3) for p in ax.patches if p.get_height() > 0)
    assert heights == [0.5, 0.646]  # the plain scores, not lite0's mean over its variants
    assert not ax.lines  # no error bar: one run per bar
    table = variants_table(_results(), "mMP@5")
    assert list(table["variant"]) == [PLAIN, *VARIANTS]
    assert (table["model"] == "lite0").all()
    delta = dict(zip(table["variant"], table["delta mMP@5 vs plain"], strict=True))
    assert delta[PLAIN] == 0 and delta["IVF_SQ8 nprobe=1"] == pytest.approx(0.21 - 0.646)
    grid = variants_figure(_results(), "mMP@5")
    labels = [t.get_text() for ax in grid.axes.flat for t in ax.get_yticklabels()]
    assert labels == [PLAIN, *VARIANTS]
    plain_only = _results().query("variant == ''")
    assert variants_table(plain_only, "mMP@5") is None and variants_figure(plain_only, "m") is None
    plt.close("all")


def test_a_variants_entry_names_the_model_and_the_variant():
    def rec(variant: str) -> ResultRecord:
        lineage = Lineage(base_model="lite0", variant={"name": variant} if variant else {})
        return ResultRecord(
            stage="embed",
            mode="pretrained",
            model="lite0",
            dataset="demo",
            lineage=lineage,
            metrics={"mMP@5": 0.5},
            k=5,
            config_hash=variant or "plain",
        )

    frame = records_frame([rec(""), rec("IVF_SQ8 nprobe=1"), rec("int8")], 5)
    assert sorted(frame["entry"]) == ["lite0", "lite0 · IVF_SQ8 nprobe=1", "lite0 · int8"]


def test_gallery_merges_identical_columns_and_leaves_out_unknown_variant_rankings(small_demo):
    row, pq = _source_row(small_demo, "lite0", 1)
    plain = load_source(row, lambda r: pq, {"demo": small_demo})
    every = np.flatnonzero(plain.n_relevant > 0)
    ranked = an.rank(plain, every, K)
    stored = {**pq, "topk_ids": ranked.ids, "topk_scores": ranked.scores, "query_index": every}
    same = load_source(
        {**row, "entry": "lite0 · int8", "variant": "int8"}, lambda r: stored, {"demo": small_demo}
    )
    unknown = [
        load_source(
            {**row, "entry": f"lite0 · {v}", "variant": v}, lambda r: pq, {"demo": small_demo}
        )
        for v in ("HNSW", "float16")
    ]
    other_row, other_pq = _source_row(small_demo, "lite1", 2)
    other = load_source(other_row, lambda r: other_pq, {"demo": small_demo})
    g = an.build_gallery(
        [same, plain, *unknown, other], k=K, n_sample=4, n_extreme=2, seed=0, metric=f"mMP@{K}"
    )
    assert g.entries == ["lite0", "lite1"]  # the plain model kept, its identical twin merged
    assert g.same_as == {"lite0": ["lite0 · int8"]}
    assert g.notes == [g.notes[0]]  # one line for every variant left out
    assert g.notes[0].startswith("lite0 · HNSW, lite0 · float16: not shown")
    assert all(set(r.results) == {"lite0", "lite1"} for r in g.rows)


def test_a_real_runs_variants_are_shown_by_their_own_ranking_or_merged():
    from embbench.records import ResultStore
    from embbench.stages.embed import EmbedConfig, run_embed

    demo = {"n_categories": 4, "products_per_category": 3, "views": [3, 1, 3], "image_size": 32}
    table = run_embed(
        EmbedConfig(
            models=["test_resnet"],
            weights="random",
            datasets=["demo"],
            data_options={"demo": demo},
            backend="exact",
            num_workers=0,
            compressions=["float16", "binary"],
            indexes=["FLAT"],
        )
    )
    store = ResultStore()
    for rec in store.records("embed"):  # every cell stores the ranking it scored
        pq = store.per_query(rec)
        assert pq["topk_ids"].shape == (rec.n_queries, rec.k)
    (g,) = an.gallery_for_runs(table["mlflow_run_id"], n_sample=3, n_extreme=2)
    variants = {f"test_resnet · {v}" for v in table["variant"] if v}
    merged = {e for twins in g.same_as.values() for e in twins}
    assert g.entries[0] == "test_resnet" and not g.notes
    assert set(g.entries[1:]) | merged == variants and not set(g.entries) & merged
    # each column's top-1 is right exactly when its own run's per-query R@1 says so
    from embbench.analysis.sources import load_embedding_set

    recs = {
        " · ".join(["test_resnet", *([r.lineage.variant["name"]] if r.lineage.variant else [])]): r
        for r in store.records("embed")
    }
    for entry in g.entries:
        rec = recs[entry]
        pq = store.per_query(rec)
        r1 = dict(zip(pq["query_index"].tolist(), pq["mR@1"].tolist(), strict=True))
        pos = {i: n for n, i in enumerate(load_embedding_set(rec.caches["query"]).item_ids)}
        for row in g.rows:
            assert row.results[entry][0].relevant == bool(r1[pos[row.query.item_id]])
    rankings = [[c.item_id for c in r.results[e]] for r in g.rows for e in g.entries]
    assert len({tuple(x) for x in rankings}) > 1
