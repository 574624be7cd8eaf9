"""Retrieval galleries: relevance marked exactly as the metrics mark it, HTML self-contained and
bounded, per-category breakdown and disagreements consistent with the per-query arrays."""

from __future__ import annotations

import re

import numpy as np
import pytest

from embbench import analysis as an
from embbench.analysis.sources import load_source
from embbench.cache import EmbeddingCache
from embbench.report import GalleryRenderer
from embbench.retrieval import search_and_evaluate

K = 5


def _with_ties(small_demo, seed: int, dim: int = 8):
    """Test-split vectors where items of DIFFERENT products share identical vectors (ties)."""
    test = small_demo.split("test")
    ids = test["item_id"].to_numpy()
    rng = np.random.default_rng(seed)
    vec = rng.normal(size=(len(ids), dim)).astype(np.float32)
    # every third item copies the vector of an item 7 places on: exact ties across products
    for i in range(0, len(ids) - 7, 3):
        vec[i + 7] = vec[i]
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    return ids, vec


def _source_row(small_demo, model: str, seed: int) -> tuple[dict, dict]:
    ids, vec = _with_ties(small_demo, seed)
    cache = EmbeddingCache("demo", model, "test", {"seed": seed})
    es = cache.save_complete(vec, ids, provenance={})
    labels = es.labels(small_demo.items, "product")
    res = search_and_evaluate(vec, labels, k=K, protocol="within", backend="exact")
    pq = {**res.per_query, "query_index": res.query_index}
    row = {
        "entry": model,
        "model": model,
        "dataset": "demo",
        "dataset_id": "demo",
        "label": "product",
        "protocol": "within",
        "query_split": "test",
        "cache_query": str(es.path),
        "cache_index": str(es.path),
        f"mMP@{K}": res.summary[f"mMP@{K}"],
    }
    return row, pq


@pytest.fixture
def sources(small_demo):
    out = []
    for name, seed in (("tie_a", 1), ("tie_b", 2)):
        row, pq = _source_row(small_demo, name, seed)
        out.append(load_source(row, lambda r, pq=pq: pq, {"demo": small_demo}))
    return out


def test_gallery_marks_relevance_exactly_as_the_metrics(sources):
    src = sources[0]
    every = an.common_queries(sources)
    ranking = an.rank(src, every, K)
    r1 = src.values("mR@1").loc[every].to_numpy()
    mp = src.values(f"mMP@{K}").loc[every].to_numpy()
    assert (ranking.relevant[:, 0] == (r1 == 1)).all()
    m = np.minimum(src.n_relevant[every], K)
    mine = np.array([ranking.relevant[i, : m[i]].sum() / m[i] for i in range(len(every))])
    assert np.allclose(mine, mp)
    # ties by id, self excluded by id: never the query itself; equal scores in id order
    assert not (ranking.ids == every[:, None]).any()
    for ids, sc in zip(ranking.ids, ranking.scores, strict=True):
        for j in range(K - 1):
            if sc[j] == sc[j + 1]:
                assert ids[j] < ids[j + 1]
    assert any((s[:-1] == s[1:]).any() for s in ranking.scores)  # the case has exact ties
    # the built gallery agrees with the per-query R@1 of its sampled queries
    g = an.build_gallery(sources, k=K, n_sample=6, n_extreme=2, seed=0, metric=f"mMP@{K}")
    assert len(g.rows) == 10 and g.group_label == "category"
    pos = {qid: i for i, qid in enumerate(src.query.item_ids)}
    for row in g.rows:
        for s in sources:
            r1 = s.values("mR@1").loc[pos[row.query.item_id]]
            assert row.results[s.entry][0].relevant == bool(r1)
    hardest = [r for r in g.rows if r.section == "hardest"]
    easiest = [r for r in g.rows if r.section == "easiest"]
    assert hardest and easiest
    again = an.build_gallery(sources, k=K, n_sample=6, n_extreme=2, seed=0, metric=f"mMP@{K}")
    assert [r.query.item_id for r in again.rows] == [r.query.item_id for r in g.rows]


def test_gallery_html_is_self_contained_and_bounded(sources):
    g = an.build_gallery(sources, k=K, n_sample=6, n_extreme=2, seed=0, metric=f"mMP@{K}")
    renderer = GalleryRenderer(max_mb=1.0, thumb_px=48)
    html = renderer.render([g])
    assert len(html) <= 1.0e6
    assert not re.search(r"(?:https?|file):", html) and "/tmp" not in html
    imgs = re.findall(r'<img[^>]+src="data:image/jpeg;base64,[^"]+"', html)
    assert len(imgs) == len(g.rows) * (1 + 2 * K)
    n_green = html.count("border:3px solid #1a7f37")
    n_rel = sum(c.relevant for r in g.rows for cells in r.results.values() for c in cells)
    assert n_green == n_rel
    small = GalleryRenderer(max_mb=0.03, thumb_px=48)
    cut = small.render([g])
    assert len(cut) <= 0.03e6 + 2000 and "left out" in cut
    assert 0 < len(re.findall(r"<img", cut)) < len(imgs)


def test_category_breakdown_confusion_and_disagreements(sources):
    bd = an.category_breakdown(sources, [f"mMP@{K}", "mR@1"], n_boot=200, seed=0)
    a = sources[0]
    sub = bd[(bd["entry"] == a.entry) & (bd["metric"] == "mR@1")]
    v = a.values("mR@1")
    cats = a.group_of(v.index.to_numpy(), "category")
    for cat, value, n in zip(sub["category"], sub["value"], sub["n"], strict=True):
        assert n == (cats == cat).sum() and value == pytest.approx(v[cats == cat].mean())
    means = bd[bd["metric"] == f"mMP@{K}"].groupby("category", sort=False)["value"].mean()
    assert list(means) == sorted(means)  # weakest first
    assert (sub["low"] <= sub["value"] + 1e-12).all()
    conf = an.category_confusion(a)
    assert conf.to_numpy().sum() == (v == 0).sum() == conf.attrs["n_wrong"]
    d = an.disagreements(a, sources[1])
    r1a, r1b = a.values("mR@1"), sources[1].values("mR@1")
    assert len(d["a_only"]) == int(((r1a == 1) & (r1b == 0)).sum())
    assert len(d["b_only"]) == int(((r1b == 1) & (r1a == 0)).sum())
    table = an.disagreement_table([(a, sources[1])])
    assert table.loc[0, "a right, b wrong"] == len(d["a_only"])
