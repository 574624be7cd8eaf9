"""Stage 01's deployment variants run as cells of the engine, each recorded with its lineage."""

from __future__ import annotations

import numpy as np
import pytest

from embbench.deploy import CompressionSpec, fit_compression
from embbench.records import ResultStore
from embbench.retrieval import search_and_evaluate
from embbench.stages.embed import EmbedConfig, run_embed


@pytest.mark.slow
def test_compression_and_index_variants_are_cells(demo_cells, embed_options):
    variants = {"compressions": ["int8", "pca_half", "binary"], "indexes": ["FLAT", "IVF_SQ8"]}
    cfg = EmbedConfig(**embed_options, deploy_timings=False, **variants)
    table = run_embed(cfg)
    records = {r.lineage.variant.get("name", ""): r for r in ResultStore().records("embed")}
    exact = records[""]
    assert {"int8", "binary", "FLAT"} <= set(records) and len(records) == len(table)
    assert any(name.startswith("pca") for name in records)
    assert any(name.startswith("IVF_SQ8") for name in records)
    # every variant is its own cell: its own hash, its lineage, the float32 numbers beside it
    assert len({r.config_hash for r in records.values()}) == len(records)
    for name, rec in records.items():
        if name:
            assert rec.lineage.variant["name"] == name
            assert rec.pretrained_metrics == pytest.approx(exact.metrics)
    # FLAT through Milvus Lite ranks exactly as the exact backend
    flat = records["FLAT"]
    assert flat.details["recall"] == pytest.approx(1.0)
    assert flat.metrics == pytest.approx(exact.metrics)
    # a tiny index's IVF has one list and searches everything (0.0 when Lite ignored nlist)
    ivf = [rec for name, rec in records.items() if name.startswith("IVF_SQ8(nlist=1)")]
    assert ivf and all(r.details["short_queries"] == 0 for r in ivf)
    assert all(r.metrics == pytest.approx(exact.metrics, abs=0.05) for r in ivf)
    # int8: the record equals an independent computation on the same cached vectors
    test = demo_cells.split("test")
    q = np.load(exact.caches["query"] + "/vectors.npy")
    ids = np.load(exact.caches["query"] + "/ids.npy", allow_pickle=False)
    from pathlib import Path

    (train_dir,) = [p for p in Path(exact.caches["query"]).parent.glob("train-*") if p.is_dir()]
    train = np.load(train_dir / "vectors.npy")
    fitted = fit_compression(CompressionSpec("int8"), train)
    labels = test.set_index("item_id").loc[ids, "product"].to_numpy()
    ref = search_and_evaluate(fitted.decode(fitted.encode(q)), labels, k=5, protocol="within")
    assert records["int8"].metrics == pytest.approx(ref.summary)
    assert records["int8"].details["bytes_per_vector"] * 4 == q.shape[1] * 4
    # a rerun computes nothing
    again = run_embed(cfg)
    assert list(again["config_hash"]) == list(table["config_hash"])

    # stage 05: the variants leave the paper's tables and feed the deployment section
    from embbench.analysis import deployment_points
    from embbench.deploy import plots as deploy_plots
    from embbench.stages.analysis import AnalysisConfig, run_analysis

    a = run_analysis(AnalysisConfig(source="records", n_boot=0, facts=False, gallery=False))
    assert (a.results["variant"].fillna("") == "").all() and len(a.results) == 1
    assert set(a.deploy["variant"]) == set(records) - {""}
    int8 = a.deploy.set_index("variant").loc["int8"]
    assert int8["memory_ratio"] == pytest.approx(0.25)
    assert int8["quality_ratio"] == pytest.approx(
        records["int8"].metrics["mMP@5"] / exact.metrics["mMP@5"]
    )
    assert any(s.startswith("For model test_resnet on dataset demo") for s in a.sentences)
    (points,) = deployment_points(a.deploy).values()
    assert deploy_plots.quality_memory_figure(points).axes
    assert deploy_plots.quality_latency_figure(points).axes


def test_deployment_rows_without_timings_beside_timed_ones():
    # The demo's case: compression rows carry no timing_source (NaN in the analysis frame once
    # index rows with one are beside them); the table, points and both figures must draw.
    import pandas as pd

    from embbench.analysis import deployment_points, deployment_table
    from embbench.deploy import plots as deploy_plots

    base = {"model": "m", "dataset": "d", "pretrained_metrics.mMP@5": 0.5, "embed_dim": 8}
    results = pd.DataFrame([
        {**base, "variant": "", "mMP@5": 0.5},
        {**base, "variant": "int8", "variant_kind": "compression", "mMP@5": 0.49,
         "bytes_per_vector": 8.0},
        {**base, "variant": "HNSW M16 ef64", "variant_kind": "index", "mMP@5": 0.5,
         "bytes_per_vector": 40.0, "p50_ms": 0.1, "p99_ms": 0.2, "timing_source": "faiss",
         "engine": "faiss"},
    ])  # fmt: skip
    table = deployment_table(results, "mMP@5")
    assert list(table["timing_source"]) == ["", "faiss"]
    assert list(table["kind"]) == ["compression", "index"]
    (points,) = deployment_points(table).values()
    assert deploy_plots.quality_latency_figure(points).axes
    assert deploy_plots.quality_memory_figure(points).axes
