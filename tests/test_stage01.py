"""Stage 01 end to end on the demo catalogue: tiny models, Milvus Lite, MLflow, papermill."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from embbench.embed import embed_split
from embbench.models import create_embedder
from embbench.paths import project_root, runs_dir
from embbench.records import ResultStore
from embbench.retrieval import create_backend
from embbench.stages.embed import EmbedConfig, run_embed
from embbench.vectors import l2_normalize

PARAMS = project_root() / "params"


@pytest.mark.slow
def test_milvus_and_exact_return_the_same_rankings_on_demo(small_demo):
    emb = create_embedder("test_resnet", weights="random")
    es = embed_split(emb, small_demo, "test", batch_size=8, num_workers=0, progress=False)
    vectors = l2_normalize(np.asarray(es.vectors))
    # duplicate a few vectors so exact ties must be broken by id in both backends
    vectors = np.concatenate([vectors, vectors[:5]])
    ids = np.arange(len(vectors))
    exact = create_backend("exact")
    milvus = create_backend("milvus", uri=str(runs_dir() / "agree.db"))
    try:
        e_ids, e_d = exact.search(vectors, vectors, 5, query_ids=ids)
        m_ids, m_d = milvus.search(vectors, vectors, 5, query_ids=ids)
    finally:
        milvus.close()
    assert (e_ids == m_ids).all()
    assert np.allclose(e_d, m_d, atol=1e-4)
    # self excluded by id: a duplicate of the query may stay, the query itself never
    assert not (e_ids == ids[:, None]).any()
    assert (e_ids[:5, 0] == ids[-5:]).all()  # the duplicates of 0..4 rank first for 0..4


@pytest.mark.slow
def test_run_embed_records_mlflow_and_skips_finished(demo_cells, embed_options):
    small_demo = demo_cells
    models = ["test_resnet", "test_clip"]
    cfg = EmbedConfig(**{**embed_options, "models": models, "backend": "milvus"})
    table = run_embed(cfg)
    assert list(table["model"]) == ["test_resnet", "test_clip"]
    for metric in ("mMP@5", "mR@1", "MAP@5", "MRR@5", "NDCG@5"):
        assert table[metric].between(0, 1).all()
    assert (table["n_queries"] == len(small_demo.split("test"))).all()
    assert (table["weights"] == "random").all()
    records = ResultStore().records("embed")
    assert len(records) == 2
    rec = records[0]
    assert rec.lineage.weights_kind == "random" and rec.git_sha
    assert rec.protocol == "within" and rec.label == "product" and rec.backend == "milvus"
    runs = mlflow.search_runs(experiment_names=["embbench"])
    assert len(runs) == 2
    assert set(runs["tags.family"]) == {"supervised", "text-image"}
    assert set(runs["tags.mode"]) == {"pretrained"}
    assert runs["metrics.mMP_at_5"].notna().all()
    client = mlflow.MlflowClient()
    art = client.download_artifacts(runs["run_id"].iloc[0], "result.json")
    assert json.loads(Path(art).read_text())["mode"] == "pretrained"
    # the exact backend gives the same numbers (ranking agreement on real embeddings); changing
    # only the backend scores again (from the cached vectors) and the record names the backend
    again = run_embed(cfg.model_copy(update={"backend": "exact"}))
    assert np.allclose(again["mMP@5"], table["mMP@5"]) and np.allclose(
        again["NDCG@5"], table["NDCG@5"]
    )
    assert {r.backend for r in ResultStore().records("embed")} == {"milvus", "exact"}
    cfg = cfg.model_copy(update={"backend": "exact"})
    # reruns skip finished cells
    n_runs = len(mlflow.search_runs(experiment_names=["embbench"]))
    run_embed(cfg)
    assert len(mlflow.search_runs(experiment_names=["embbench"])) == n_runs


@pytest.mark.slow
@pytest.mark.notebook
def test_notebook_01_runs_with_smoke_params():
    from embbench.notebooks import run_notebook

    out = run_notebook(
        "01_embed", [PARAMS / "01_embed.yaml", PARAMS / "smoke" / "01_embed.yaml"], progress=False
    )
    import nbformat

    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # the paper grid's tasks: image-image for both, the text tasks for the text-image test_clip
    # (text->image by class prompts and by the demo's titles, image->text, zero-shot)
    tasks = sorted((r.model, r.task) for r in ResultStore().records("embed"))
    assert tasks == [
        ("test_clip", t)
        for t in ("image-image", "image-text", "text-image", "text-image", "zero-shot")
    ] + [("test_resnet", "image-image")]
    # the kernel's runs name the notebook as their source (not ipykernel_launcher.py)
    from embbench.tracking import default_tracking_uri

    client = mlflow.MlflowClient(default_tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("embbench").experiment_id])
    assert {
        (r.data.tags["mlflow.source.type"], r.data.tags["mlflow.source.name"]) for r in runs
    } == {("NOTEBOOK", str(project_root() / "notebooks/01_embed.ipynb"))}
    # the gallery of its own run: framed thumbnails embedded in the output
    html = "".join(
        o.get("data", {}).get("text/html", "") for c in nb.cells for o in c.get("outputs", [])
    )
    assert html.count("embbench-thumb") >= 2 * (1 + 2 * 5) and "#1a7f37" in html


def test_bad_params_fail_fast_naming_key(tmp_path):
    from embbench.config import ConfigError
    from embbench.notebooks import resolve_params

    bad = tmp_path / "bad.yaml"
    bad.write_text("modles: [resnet50]\n")
    with pytest.raises(ConfigError, match=r"modles.*bad\.yaml.*did you mean 'models'"):
        resolve_params("01_embed", [PARAMS / "01_embed.yaml", bad])
