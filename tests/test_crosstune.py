"""Stage 04 cross-tuning: the grid, missing sources, and real cells with their deltas.

Two tiny demo catalogues with different products (seed 0 as ``demo``, seed 1 as ``demo_b``);
``test_resnet`` with random weights fine-tuned (one epoch) and top-tuned (one trial) on
``demo``, then applied to ``demo_b``.
"""

from __future__ import annotations

import dataclasses

import mlflow
import pytest

import embbench.cells as cells
from embbench.cells import GridError
from embbench.config import ConfigError
from embbench.demo import make_demo_catalogue
from embbench.records import ResultStore
from embbench.stages.crosstune import (
    CROSS_TOP_TUNED,
    CROSS_TUNED,
    CrosstuneConfig,
    delta_matrix,
    grid,
    run_crosstune,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = dict(models=["test_resnet"], weights="random", batch_size=8, num_workers=0, backend="exact")


@pytest.fixture(scope="module")
def two_demos(tmp_path_factory):
    root = tmp_path_factory.mktemp("xdemo")
    kw = dict(n_categories=2, products_per_category=2, views=(4, 2, 2), image_size=40)
    demo = make_demo_catalogue(root, seed=0, **kw)
    demo_b = dataclasses.replace(make_demo_catalogue(root, seed=1, **kw), name="demo_b")
    return {"demo": demo, "demo_b": demo_b}


@pytest.fixture
def use_demos(two_demos, monkeypatch):
    monkeypatch.setattr(cells, "load_catalogue", lambda name, *a, **k: two_demos[name])
    return two_demos


def test_grid_is_sources_times_targets_without_the_diagonal():
    cfg = CrosstuneConfig(
        models=["m"], finetuned_on=["a", "b"], toptuned_on=["a"], datasets=["a", "b", "c"]
    )
    cells = grid(cfg)
    assert [(c.mode, c.source, c.dataset) for c in cells] == [
        (CROSS_TUNED, "b", "a"),
        (CROSS_TUNED, "a", "b"),
        (CROSS_TOP_TUNED, "a", "b"),
        (CROSS_TUNED, "a", "c"),
        (CROSS_TUNED, "b", "c"),
        (CROSS_TOP_TUNED, "a", "c"),
    ]
    assert len(grid(cfg.model_copy(update={"include_diagonal": True}))) == 9
    with pytest.raises(ConfigError, match="finetuned_on and toptuned_on are both empty"):
        CrosstuneConfig.from_params({"models": ["m"], "datasets": ["a"]})


def test_missing_sources_name_the_stage_to_run(use_demos):
    cfg = CrosstuneConfig(**BASE, finetuned_on=["demo"], toptuned_on=["demo"], datasets=["demo_b"])
    with pytest.raises(GridError) as err:
        run_crosstune(cfg)
    text = str(err.value)
    assert "02_finetune models=[test_resnet] datasets=[demo] recipe=A2" in text
    assert "03_toptune models=[test_resnet] datasets=[demo]" in text
    table = run_crosstune(cfg.model_copy(update={"skip_missing": True}))
    assert len(table) == 2 and table["status"].str.startswith("missing").all()


@pytest.mark.slow
def test_cross_tuned_and_cross_top_tuned_cells_give_deltas(use_demos):
    from embbench.stages.finetune import FinetuneConfig, run_finetune
    from embbench.stages.toptune import TopTuneConfig, run_toptune

    run_finetune(
        FinetuneConfig(
            **BASE,
            datasets=["demo"],
            epochs=1,
            train_size=32,
            test_size=32,
            register_mlflow=False,
        )
    )
    run_toptune(
        TopTuneConfig(
            **BASE,
            datasets=["demo"],
            max_trials=1,
            executions_per_trial=1,
            search_epochs=2,
            final_epochs=2,
            patience=1,
            units=[16],
            train_batch_size=16,
        )
    )
    cfg = CrosstuneConfig(**BASE, finetuned_on=["demo"], toptuned_on=["demo"], datasets=["demo_b"])
    table = run_crosstune(cfg)
    assert list(table["mode"]) == [CROSS_TUNED, CROSS_TOP_TUNED]
    assert (table["source"] == "demo").all() and (table["dataset"] == "demo_b").all()
    for _, row in table.iterrows():
        assert 0 <= row["mMP@5"] <= 1 and 0 <= row["pretrained_mMP@5"] <= 1
        assert row["delta_mMP@5"] == pytest.approx(row["mMP@5"] - row["pretrained_mMP@5"])
    store = ResultStore()
    records = {r.mode: r for r in store.records("crosstune")}
    ct, ctt = records[CROSS_TUNED], records[CROSS_TOP_TUNED]
    assert ct.tuned_on == "demo" and ct.lineage.finetuned_on == "demo"
    assert ct.details["finetuned_model"] == "test_resnet_ft_demo_a2"
    assert ct.lineage.weights_kind == "checkpoint"
    # the fine-tuning started from random weights: visible in the cross-tuned record too
    assert ct.lineage.finetune_start == "random" and "from random init" in ct.lineage.describe()
    assert ctt.lineage.toptuned_on == "demo" and ctt.tuned_on == "demo"
    assert ctt.embed_dim == 16  # the MLP's last hidden layer
    run = mlflow.get_run(ct.mlflow_run_id)
    assert run.data.tags["source_dataset"] == "demo" and "delta_mMP_at_5" in run.data.metrics
    # one readable name per cell; the training is a child run of its fine-tuning cell
    runs = {
        r.info.run_name: r
        for r in mlflow.search_runs(experiment_names=["embbench"], output_format="list")
    }
    assert {
        "finetune/test_resnet/demo",
        "finetune/test_resnet/demo/training",
        "toptune/test_resnet/demo",
        "crosstune/test_resnet/demo_b/from-demo",
        "crosstune/test_resnet/demo_b/top-from-demo",
    } <= set(runs)
    (ft,) = store.records("finetune")
    assert runs["finetune/test_resnet/demo/training"].data.tags["mlflow.parentRunId"] == (
        ft.mlflow_run_id
    )
    assert mlflow.get_run(ctt.mlflow_run_id).data.params["source_dataset"] == "demo"
    matrix = delta_matrix(table, CROSS_TUNED)
    assert matrix.loc["demo", "demo_b"] == pytest.approx(table["delta_mMP@5"].iloc[0])

    n_runs = len(mlflow.search_runs(experiment_names=["embbench"]))
    again = run_crosstune(cfg)  # finished cells are skipped
    assert len(mlflow.search_runs(experiment_names=["embbench"])) == n_runs
    assert list(again["config_hash"]) == list(table["config_hash"])
