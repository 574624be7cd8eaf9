"""Index variants through Milvus Lite and faiss, scale sampling/projection, Pareto and sentence."""

from __future__ import annotations

import numpy as np
import pytest

from embbench.deploy import (
    INDEX_TYPES,
    CompressionSpec,
    IndexSpec,
    compare_compressions,
    default_index_grid,
    deployment_sentence,
    evaluate_indexes,
    fit_class_structure,
    measure_scale,
    pareto_mask,
    project,
    quality_latency_figure,
    quality_memory_figure,
    rank_candidates,
    sample_like,
    tie_aware_recall,
    variant_points,
)
from embbench.metrics import evaluate_rankings
from embbench.retrieval import ExactBackend, RetrievalTask, l2_normalize

pytest.importorskip("faiss")

K = 5
LITE_BUILDS = {"FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW"}  # measured on milvus-lite 3.2.2


def _clusters(n=300, d=16, classes=12, seed=0, noise=0.9):
    rng = np.random.default_rng(seed)
    cents = rng.standard_normal((classes, d))
    lab = rng.integers(0, classes, n)
    return (cents[lab] + noise * rng.standard_normal((n, d))).astype(np.float32), lab


def test_rank_candidates_ties_by_id_and_self_by_id():
    ids = np.array([[7, 3, 5, 1, -1], [2, 0, 1, 4, 3]])
    sc = np.array([[0.9, 0.9, 0.5, 0.9, 0.0], [1.0, 0.8, 0.8, 0.2, 0.8]])
    top = rank_candidates(ids, sc, 3, self_ids=np.array([3, 2]))
    assert top.tolist() == [[1, 7, 5], [0, 1, 3]]
    assert rank_candidates(ids[:1], sc[:1], 6).tolist() == [[1, 3, 7, 5, -1, -1]]


def test_tie_aware_recall_counts_duplicates_at_the_boundary():
    x = l2_normalize(np.array([[1, 0], [1, 0.1], [1, 0.1], [0, 1]], dtype=np.float32))
    q = x[:1]
    exact = np.array([[0, 1]])
    assert tie_aware_recall(np.array([[0, 2]]), exact, x, q) == 1.0  # 2 duplicates 1
    assert tie_aware_recall(np.array([[0, 3]]), exact, x, q) == 0.5
    assert tie_aware_recall(np.array([[0, -1]]), exact, x, q) == 0.5


def test_default_grid_shapes():
    specs = default_index_grid(10_000, 96, k=K)
    assert specs[0] == IndexSpec.of("FLAT")
    assert {s.index_type for s in specs} == set(INDEX_TYPES)
    nlist = specs[1].build_params["nlist"]
    assert nlist == 10_000 // 39  # 4 sqrt(n) = 400, capped at 39 training points per list
    pq = next(s for s in specs if s.index_type == "IVF_PQ")
    assert 96 % pq.build_params["m"] == 0 and pq.build_params["nbits"] == 8
    assert all(s.search_params.get("ef", K + 1) > K for s in specs)
    tiny = default_index_grid(100, 8, nprobes=(1, 64))
    assert max(s.search_params.get("nprobe", 0) for s in tiny) == tiny[1].build_params["nlist"]
    assert len({hash(s) for s in specs}) == len(specs)
    with pytest.raises(ValueError, match="index_type"):
        IndexSpec.of("ANNOY")


def test_flat_recall_one_and_metrics_equal_exact(tmp_path):
    x, lab = _clusters()
    x[10] = x[3]  # an exact duplicate: ties at the boundary must not count as misses
    res = evaluate_indexes(
        [IndexSpec.of("FLAT")],
        RetrievalTask(x, lab),
        uri=str(tmp_path / "m.db"),
        timings=False,
        k=K,
    )[0]
    assert res.engine == "milvus-lite" and res.status == "ok"
    assert res.recall == 1.0
    xn = l2_normalize(x)
    ids, _ = ExactBackend().search(xn, xn, K, query_ids=np.arange(len(x)))
    exact = evaluate_rankings(ids, lab, lab, K, exclude_self=True, query_ids=np.arange(len(x)))
    for key, value in exact.summary.items():
        assert res.metrics[key] == pytest.approx(value, abs=1e-12)
        assert res.delta[key] == pytest.approx(0.0, abs=1e-12)


def test_every_variant_builds_and_searches(tmp_path):
    x, lab = _clusters(n=400)
    specs = default_index_grid(len(x), x.shape[1], k=K, nprobes=(4,), efs=(16,))
    results = evaluate_indexes(
        specs, RetrievalTask(x, lab), uri=str(tmp_path / "m.db"), timings=False, k=K
    )
    by_type = {r.spec.index_type: r for r in results}
    assert set(by_type) == set(INDEX_TYPES)
    for kind, r in by_type.items():
        if kind in LITE_BUILDS:
            assert (r.engine, r.status) == ("milvus-lite", "ok"), (kind, r.error)
        elif kind == "DISKANN":  # rejected by Lite, and Vamana has no faiss family
            assert r.status == "unsupported" and "DISKANN" in r.error
        else:  # rejected by Lite: quality measured on the faiss family, labelled so
            assert (r.engine, r.status) == ("faiss", "ok") and "milvus-lite" in r.error
        if r.status == "ok":
            assert 0.0 < r.recall <= 1.0 and 0.0 < r.metrics[f"mMP@{K}"] <= 1.0
    assert by_type["HNSW"].recall > 0.9


def test_a_tiny_ivf_with_one_list_finds_what_flat_finds(tmp_path, caplog):
    """Regression (demo with 32 test images): IVF_FLAT / IVF_SQ8 of nlist=1, nprobe=1 scored 0.0
    everywhere (Lite ignored nlist); a search short of candidates is counted and named."""
    x, lab = _clusters(n=32, classes=8)
    ivfs = [IndexSpec.of(t, {"nlist": 1}, {"nprobe": 1}) for t in ("IVF_FLAT", "IVF_SQ8")]
    split = IndexSpec.of("IVF_FLAT", {"nlist": 8}, {"nprobe": 1})  # lists of ~4 vectors
    specs = [IndexSpec.of("FLAT"), *ivfs, split]
    flat, ivf, sq8, short = evaluate_indexes(
        specs, RetrievalTask(x, lab), uri=str(tmp_path / "m.db"), timings=False, k=K
    )
    for r in (flat, ivf, sq8):
        assert (r.engine, r.status, r.short_queries, r.min_hits) == ("milvus-lite", "ok", 0, K + 3)
    assert ivf.recall == 1.0 and ivf.metrics == pytest.approx(flat.metrics)
    assert sq8.recall > 0.9 and sq8.metrics[f"mMP@{K}"] > 0.9 * flat.metrics[f"mMP@{K}"]
    assert short.short_queries > 0 and short.to_dict()["short_queries"] == short.short_queries
    assert f"{split.name} [milvus-lite] on a collection of 32 vectors returned fewer" in caplog.text


def test_the_default_grid_at_a_handful_of_vectors_fails_per_variant(tmp_path):
    """8 vectors: PQ trains 2**3 centroids; SCANN's 4-bit fast scan cannot train (16 centroids)
    and is reported ``failed`` with faiss' reason, while the other variants are scored."""
    x, lab = _clusters(n=8, classes=4)
    specs = default_index_grid(len(x), x.shape[1], k=K, nprobes=(1,), efs=(16,))
    pq = next(s for s in specs if s.index_type == "IVF_PQ")
    assert pq.build_params["nbits"] == 3 and pq.build_params["nlist"] == 1
    results = evaluate_indexes(
        specs, RetrievalTask(x, lab), uri=str(tmp_path / "m.db"), timings=False, k=K
    )
    status = {r.spec.index_type: (r.status, r.error or "") for r in results}
    assert status["SCANN"][0] == "failed" and "faiss: " in status["SCANN"][1]
    assert status["DISKANN"][0] == "unsupported"
    ok = [r for r in results if r.status == "ok"]
    assert {r.spec.index_type for r in ok} == set(INDEX_TYPES) - {"SCANN", "DISKANN"}
    assert all(r.short_queries == 0 and r.recall > 0.5 for r in ok)


@pytest.mark.slow
def test_timings_are_labelled_and_cross_protocol(tmp_path):
    x, lab = _clusters(n=400)
    q, q_lab = _clusters(n=50, seed=0)
    specs = [
        IndexSpec.of("FLAT"),
        IndexSpec.of("IVF_SQ8", {"nlist": 8}, {"nprobe": 2}),
        IndexSpec.of("IVF_PQ", {"nlist": 8, "m": 4, "nbits": 4}, {"nprobe": 2}),
    ]
    results = evaluate_indexes(
        specs,
        RetrievalTask(q, q_lab, x, lab, protocol="cross"),
        uri=str(tmp_path / "m.db"),
        n_single=20,
        batch=100,
        lite_timing_queries=5,
        threads=1,
        k=K,
    )
    flat, sq8, pq = results
    assert flat.recall == 1.0
    assert [t.source for t in flat.timings] == ["milvus-lite", "faiss"]
    assert [t.source for t in pq.timings] == ["faiss"]  # Lite rejects IVF_PQ
    f = sq8.timing("faiss")
    assert f.p50_ms <= f.p99_ms and f.qps_batch > 0 and f.batch == 100 and f.threads == 1
    # memory per vector: float32 FLAT ~ 4 d, SQ8 ~ d (+ ids and centroids)
    assert flat.bytes_per_vector == pytest.approx(64, rel=0.05)
    assert sq8.bytes_per_vector < 0.5 * flat.bytes_per_vector
    assert pq.bytes_per_vector < sq8.bytes_per_vector
    row = sq8.to_dict()
    assert row["index_type"] == "IVF_SQ8" and row["search_params"] == {"nprobe": 2}


def test_scale_sampling_and_projection():
    x, lab = _clusters(n=300, d=16)
    st = fit_class_structure(x, lab)
    assert st.centroids.shape == (12, 16) and st.items_per_class == pytest.approx(25)
    y, ylab = sample_like(st, 1000, seed=1)
    assert y.shape == (1000, 16) and np.allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    assert 30 <= len(np.unique(ylab)) <= 40
    again, _ = sample_like(st, 1000, seed=1)
    assert np.array_equal(y, again)
    grid = lambda n, d: [IndexSpec.of("FLAT"), IndexSpec.of("HNSW", {"M": 8}, {"ef": 16})]  # noqa: E731
    points = measure_scale(st, [500, 1000], grid=grid, n_queries=50, n_single=5, batch=50, k=K)
    assert [(p.n, p.variant) for p in points] == [
        (n, v) for n in (500, 1000) for v in ("FLAT", "HNSW ef=16", "BIN_FLAT hamming")
    ]
    assert all(p.recall == 1.0 for p in points if p.variant == "FLAT")
    assert all(p.timing.source == "faiss" for p in points)
    binary = [p for p in points if p.variant.startswith("BIN")]
    assert binary[0].bytes_per_vector == pytest.approx(2, rel=0.2)
    proj = project(points, targets=(10_000_000,))
    assert {p.label for p in proj} == {"projection"} and len(proj) == 3
    flat = next(p for p in proj if p.variant == "FLAT")
    assert flat.memory_bytes == pytest.approx(points[3].bytes_per_vector * 1e7)
    assert flat.fitted_on == [500, 1000]


def test_pareto_points_figures_and_sentence(tmp_path):
    from matplotlib.figure import Figure

    x, lab = _clusters(n=300)
    comps = compare_compressions(
        [CompressionSpec("float32"), CompressionSpec("int8"), CompressionSpec("binary")],
        x,
        RetrievalTask(x, lab),
        k=K,
    )
    idx = evaluate_indexes(
        [IndexSpec.of("FLAT"), IndexSpec.of("IVF_SQ8", {"nlist": 8}, {"nprobe": 8})],
        RetrievalTask(x, lab),
        uri=str(tmp_path / "m.db"),
        n_single=5,
        batch=50,
        lite_timing_queries=2,
        k=K,
    )
    pts = variant_points(comps, idx, metric=f"mMP@{K}")
    assert [p.label for p in pts][:3] == ["float32", "int8", "binary"]
    assert pts[0].quality_ratio == 1.0 and pts[1].memory_ratio == 0.25
    assert all(p.timing_source == "faiss" for p in pts if p.family != "compression")
    assert isinstance(quality_memory_figure(pts, model="m", dataset="d"), Figure)
    assert isinstance(quality_latency_figure(pts), Figure)
    text = deployment_sentence(pts, model="m", dataset="d", n_items=300, keep=0.9)
    assert text.startswith("For model m on dataset d at 300 items, ")
    assert "of mMP@5 at" in text and " vectors (" in text and "p99 " in text
    strict = deployment_sentence(pts, model="m", dataset="d", n_items=300, keep=1.01)
    assert "no variant" in strict
    assert pareto_mask(np.array([1, 2, 3, np.nan]), np.array([0.5, 0.9, 0.8, 1.0])).tolist() == [
        True, True, False, False,
    ]  # fmt: skip
