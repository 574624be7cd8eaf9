"""Stage 03 top-tuning: config, input checks, the resumable search, the cell, the notebook.

Most tests use synthetic cached embeddings with class structure (written with EmbeddingCache),
so they need no images and no model; one slow test runs the whole stage on the demo catalogue
with a tiny timm model, one runs the notebook, one checks the TensorFlow backend in a
subprocess (Keras cannot switch backends inside a process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from embbench.cache import EmbeddingCache
from embbench.catalogue import Catalogue
from embbench.cells import run_grid
from embbench.config import ConfigError
from embbench.records import ResultStore
from embbench.stages.toptune import (
    TopTuneConfig,
    TopTuneSteps,
    pretrained_vs_toptuned,
    result_row,
    trials_table,
)
from embbench.toptune import (
    TopTuneError,
    load_toptuned,
    prepare_data,
    required_splits,
    use_keras_backend,
)

ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "val", "test")
SPEC = SimpleNamespace(family="test", backbone="synthetic", paper_name="synthetic", name="fake")
PLAN = {"label": "label", "protocol": "within", "query_split": "test", "index_split": "test"}


def synthetic(
    n_classes: int = 6,
    dim: int = 24,
    per_class: tuple[int, int, int] = (16, 5, 5),
    noise: float = 0.9,
    seed: int = 0,
    name: str = "synth",
    model: str = "fake",
):
    """A catalogue and cached 'pretrained' embeddings: class centroids plus noise."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(n_classes, dim))
    rows, sets = [], {}
    for split, n in zip(SPLITS, per_class, strict=True):
        ids, vecs = [], []
        for c in range(n_classes):
            for j in range(n):
                item = f"{split}/{c}/{j}"
                ids.append(item)
                vecs.append(centroids[c] + noise * rng.normal(size=dim))
                rows.append(
                    {
                        "item_id": item,
                        "path": f"/nowhere/{item}.jpg",
                        "split": split,
                        "label": f"class{c}",
                        "coarse": c % 2,
                        "one": "same",
                    }
                )
        cache = EmbeddingCache(name, model, split, {"synthetic": seed, "dim": dim})
        sets[split] = cache.save_complete(np.asarray(vecs, np.float32) * 3.0, ids, provenance={})
    cat = Catalogue(name, pd.DataFrame(rows), ("label", "coarse", "one"), "label")
    return cat, sets


class SyntheticPretrained:
    """Stands in for a model's pretrained embedder: the synthetic cached embeddings."""

    def __init__(self, sets):
        self.sets = sets

    def __call__(self, model):
        return SimpleNamespace(spec=SPEC, weights_used={"kind": "synthetic"})

    def embed(self, model, inputs, splits):
        return {s: self.sets[s] for s in sorted(set(splits))}

    def cache_keys(self, model, inputs, splits):
        return {s: self.sets[s].meta.get("key") for s in sorted(set(splits))}


def toptune_synthetic(cfg, cat, sets, store=None):
    """One stage-03 cell through the cell engine, on the synthetic catalogue and embeddings."""
    import embbench.cells as cells

    load = cells.load_catalogue
    cells.load_catalogue = lambda *a, **k: cat
    try:
        steps = TopTuneSteps(cfg)
        steps.pretrained = SyntheticPretrained(sets)
        (record,) = run_grid(cfg, steps, store=store, select=lambda c: c.task == "image-image")
    finally:
        cells.load_catalogue = load
    return record


def tiny_cfg(**overrides) -> TopTuneConfig:
    values = dict(
        models=["test_resnet"],
        datasets=["demo"],
        backend="exact",
        max_trials=2,
        executions_per_trial=1,
        search_epochs=6,
        final_epochs=10,
        patience=3,
        hidden_layers=[2, 3],
        units=[16, 32],
        learning_rate=[3e-3, 3e-2],
        optimizers=["adam", "rmsprop"],
        activations=["relu", "gelu"],
        train_batch_size=16,
    )
    values.update(overrides)
    return TopTuneConfig(**values)


# ---- config ---------------------------------------------------------------------------------
def test_config_defaults_are_the_papers_budgets():
    cfg = TopTuneConfig()
    assert (cfg.max_trials, cfg.executions_per_trial, cfg.search_epochs, cfg.final_epochs) == (
        20,
        2,
        30,
        1000,
    )
    assert cfg.hidden_layers == [2, 3]
    assert "keras_backend" in TopTuneConfig.hash_exclude
    # max_trials changes the result record but not the tuner folder (budgets extend a search)
    assert cfg.config_hash() != tiny_cfg(max_trials=3).config_hash()


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("hidden_layers", [3, 2], "min <= max"),
        ("hidden_layers", [2], "[min, max]"),
        ("learning_rate", [0.0, 0.1], "0 < min"),
        ("momentum", [0.5, 1.0], "max < 1"),
        ("optimizers", ["sgd", "adamm"], "adamm"),
        ("activations", ["relu", "rleu"], "rleu"),
        ("clipvalue", [-1.0], ">= 0"),
        ("units", [], "at least one"),
        ("keras_backend", "theano", "keras_backend"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(key, value, words):
    with pytest.raises(ConfigError) as err:
        TopTuneConfig.from_params({key: value})
    assert key in str(err.value) and words in str(err.value)


def test_config_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'max_trials'"):
        TopTuneConfig.from_params({"max_trial": 3})


# ---- input checks ---------------------------------------------------------------------------
def test_prepare_data_normalises_and_encodes():
    cat, sets = synthetic()
    data = prepare_data(sets, cat, "label", dataset="synth")
    assert data.classes.tolist() == [f"class{c}" for c in range(6)]
    for split in SPLITS:
        np.testing.assert_allclose(np.linalg.norm(data.x[split], axis=1), 1.0, rtol=1e-5)
        assert data.y[split].min() >= 0 and data.x[split].dtype == np.float32
    assert data.dim == 24


def test_missing_split_fails_clearly():
    cat, sets = synthetic()
    del sets["val"]
    with pytest.raises(TopTuneError) as err:
        prepare_data(sets, cat, "label", dataset="synth", model="fake")
    msg = str(err.value)
    assert "'synth'" in msg and "'val'" in msg and "Fix" in msg


def test_catalogue_without_val_split_fails_clearly():
    cat, _ = synthetic()
    items = cat.items[cat.items["split"] != "val"].reset_index(drop=True)
    cat2 = Catalogue("synth", items, cat.label_columns, cat.default_label)
    with pytest.raises(TopTuneError, match=r"'synth'.*missing \['val'\].*Fix"):
        required_splits(cat2, PLAN, "synth")


def test_absent_labels_fail_naming_split_and_label():
    cat, sets = synthetic()
    items = cat.items.copy()
    items["label"] = items["label"].astype(object)
    items.loc[items["split"] == "test", "label"] = None
    cat2 = Catalogue("synth", items, cat.label_columns, cat.default_label)
    with pytest.raises(TopTuneError) as err:
        prepare_data(sets, cat2, "label", dataset="synth")
    msg = str(err.value)
    assert "split 'test'" in msg and "'label'" in msg and "Fix" in msg


def test_single_class_fails_clearly():
    cat, sets = synthetic()
    with pytest.raises(TopTuneError, match=r"single class.*'one'.*at least two"):
        prepare_data(sets, cat, "one", dataset="synth")


def test_unknown_label_column_fails_clearly():
    cat, sets = synthetic()
    with pytest.raises(TopTuneError, match=r"'colour' is not a column.*'label', 'coarse'"):
        prepare_data(sets, cat, "colour", dataset="synth")


def test_class_disjoint_val_fails_clearly():
    cat, sets = synthetic()
    items = cat.items.copy()
    val = items["split"] == "val"
    items.loc[val, "label"] = "new-" + items.loc[val, "label"]
    cat2 = Catalogue("synth", items, cat.label_columns, cat.default_label)
    with pytest.raises(TopTuneError, match=r"split 'val'.*class-disjoint.*Fix"):
        prepare_data(sets, cat2, "label", dataset="synth")


def test_keras_backend_choice_errors():
    with pytest.raises(TopTuneError, match="not a Keras backend"):
        use_keras_backend("theano")
    current = use_keras_backend("auto")
    import keras

    assert keras.backend.backend() == current
    other = next(b for b in ("tensorflow", "torch", "jax") if b != current)
    with pytest.raises(TopTuneError, match=r"already imported.*restart"):
        use_keras_backend(other)


def test_load_toptuned_missing_model_says_how_to_make_it(tmp_path):
    with pytest.raises(TopTuneError, match=r"no top-tuned model at .*run 03_toptune"):
        load_toptuned(tmp_path / "nothing")
    with pytest.raises(TopTuneError, match="has no toptune_model_path"):
        load_toptuned({"stage": "embed", "model": "m", "dataset": "d"})


def test_all_zero_toptuned_rows_get_a_direction():
    from embbench.retrieval import l2_normalize
    from embbench.toptune import fill_zero_rows

    v = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0]], np.float32)
    assert fill_zero_rows(v, "test") == 1
    np.testing.assert_allclose(l2_normalize(v)[0], 0.5)  # retrieval accepts it now
    assert fill_zero_rows(v, "test") == 0


# ---- the search ---------------------------------------------------------------------------------
def _keras_space(cfg: TopTuneConfig):
    from embbench.toptune import SearchSpace, keras_model
    from embbench.toptune import search as toptune_search

    return keras_model, toptune_search, SearchSpace(**cfg.search_space())


@pytest.mark.slow
def test_search_runs_resumes_and_extends(tmp_path):
    keras_model, toptune_search, space = _keras_space(tiny_cfg(hidden_layers=[2, 3]))
    cat, sets = synthetic()
    data = prepare_data(sets, cat, "label", dataset="synth")
    arrays = toptune_search.TrainArrays(
        data.x["train"], data.y["train"], data.x["val"], data.y["val"]
    )

    def search(max_trials, hypermodel_cls=keras_model.MLPHyperModel):
        hm = hypermodel_cls(space, data.dim, len(data.classes))
        tuner = toptune_search.make_tuner(
            hm,
            directory=tmp_path,
            project_name="s",
            max_trials=max_trials,
            executions_per_trial=1,
            seed=0,
        )
        return tuner, hm, toptune_search.run_search(tuner, arrays, epochs=2, batch_size=32, seed=0)

    class Interrupted(keras_model.MLPHyperModel):
        fits = 0

        def fit(self, hp, model, *a, **kw):
            self.fits += 1
            if self.fits == 2:  # trial 0 finishes, the process dies during trial 1
                raise KeyboardInterrupt
            return super().fit(hp, model, *a, **kw)

    with pytest.raises(KeyboardInterrupt):
        search(3, Interrupted)
    tuner, hm, new = search(3)  # resumes: reruns the interrupted trial, then one more
    assert new == 2 and toptune_search.completed_trials(tuner) == 3
    tuner, hm, new = search(3)  # finished: nothing is trained again
    assert new == 0 and hm.builds <= 1
    tuner, hm, new = search(4)  # a larger budget continues the same search
    assert new == 1 and toptune_search.completed_trials(tuner) == 4
    for t in toptune_search.trial_summaries(tuner):
        model = hm.build(tuner.oracle.trials[t["trial_id"]].hyperparameters)
        names = keras_model.hidden_layer_names(model)
        assert 2 <= len(names) <= 3 and len(names) == t["hyperparameters"]["hidden_layers"]
        assert model.layers[-1].name == "classifier"


# ---- one cell, end to end on synthetic embeddings ---------------------------------------------
@pytest.mark.slow
def test_toptune_cell_end_to_end(tmp_path):
    import mlflow

    cat, sets = synthetic()
    cfg = tiny_cfg()
    store = ResultStore()
    record = toptune_synthetic(cfg, cat, sets, store)
    d = record.details
    # classification: 6 classes, chance = 1/6; top-tuning must be far above it
    acc = record.classification["accuracy"]
    assert acc > 5 * (1 / 6), record.classification
    assert set(record.classification) >= {
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "precision_weighted",
        "recall_weighted",
        "f1_weighted",
    }
    cm = np.load(d["confusion_matrix_path"])
    assert cm["matrix"].shape == (6, 6) and cm["matrix"].sum() == 30
    # MLP shape within the configured range, embedding = last hidden layer
    assert 2 <= d["hidden_layers"] <= 3
    hp = d["best_hyperparameters"]
    assert d["hidden_layers"] == hp["hidden_layers"]
    last_units = hp[f"units_{hp['hidden_layers']}"]
    # top-tuned retrieval metrics through the shared retrieval code, beside the baseline
    assert set(record.metrics) == {"mMP@5", "mR@1", "MAP@5", "MRR@5", "NDCG@5"}
    assert all(0.0 <= v <= 1.0 for v in record.metrics.values())
    assert set(record.pretrained_metrics) == set(record.metrics)
    assert record.mode == "top-tuned" and record.stage == "toptune"
    assert record.lineage.toptuned_on == "demo" and record.lineage.weights_kind == "synthetic"
    for split in SPLITS:
        tt = np.load(Path(d["toptuned_caches"][split]) / "vectors.npy")
        assert tt.shape == (len(sets[split].vectors), last_units)
    # the saved model reproduces the cached top-tuned embeddings (cross-top-tuning entry point)
    head = load_toptuned(Path(record.toptune_model_path).parent)
    assert (head.source_model, head.source_dataset, head.label) == ("test_resnet", "demo", "label")
    tt_test = np.load(Path(d["toptuned_caches"]["test"]) / "vectors.npy")
    np.testing.assert_allclose(head.embed(np.asarray(sets["test"].vectors)), tt_test, atol=1e-5)
    assert head.embed_dim == last_units
    with pytest.raises(TopTuneError, match=r"expects \(n, 24\)"):
        head.embed(np.zeros((3, 7), np.float32))
    # MLflow: the cell's one run holds the search, with one child run per trial
    parent = record.mlflow_run_id
    children = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
        output_format="list",
        search_all_experiments=True,
    )
    assert sorted(r.data.tags["run_kind"] for r in children) == ["trial"] * d["n_trials"]
    parent_run = mlflow.get_run(parent)
    assert parent_run.data.metrics["test_accuracy"] == pytest.approx(acc)
    assert {"mMP_at_5", "pretrained_mMP_at_5"} <= set(parent_run.data.metrics)
    # a rerun with the same config reads the record back
    again = toptune_synthetic(cfg, cat, sets, store)
    assert again.mlflow_run_id == record.mlflow_run_id
    # tables for the notebook
    results = pd.DataFrame([result_row(record)])
    assert results.loc[0, "accuracy"] == acc and "pretrained_mMP@5" in results
    trials = trials_table(results, store)
    assert len(trials) == d["n_trials"] and trials["best_so_far"].is_monotonic_increasing
    long = pretrained_vs_toptuned(results)
    assert sorted(long["mode"]) == ["pretrained", "top-tuned"]


def test_probe_and_knn_cells_equal_the_probe_functions_on_the_frozen_embeddings():
    import mlflow

    from embbench.probe import knn_classify, linear_probe, score_predictions

    cat, sets = synthetic()
    cfg = tiny_cfg(knn_k=7, knn_temperature=0.1)
    steps = TopTuneSteps(cfg)
    assert [c.task for c in steps.grid()] == ["image-image", "probe", "knn"]
    import embbench.cells as cells

    load = cells.load_catalogue
    cells.load_catalogue = lambda *a, **k: cat
    try:
        steps.pretrained = SyntheticPretrained(sets)
        probe, knn = run_grid(cfg, steps, select=lambda c: c.task != "image-image")
    finally:
        cells.load_catalogue = load
    x = {s: np.asarray(sets[s].vectors) for s in SPLITS}
    y = {s: sets[s].labels(cat.items, "label") for s in SPLITS}
    res = linear_probe(x["train"], y["train"], x["val"], y["val"], x["test"], progress=False)
    want, _ = score_predictions(y["test"], res.predictions, res.classes)
    assert (probe.task, probe.mode, probe.metrics) == ("probe", "pretrained", {})
    assert {k: probe.classification[k] for k in want} == pytest.approx(want)
    assert probe.details["chosen_c"] == res.chosen_c
    assert probe.val_accuracy == pytest.approx(res.val_accuracy[res.chosen_c])
    pred = knn_classify(x["train"], y["train"], x["test"], k=7, temperature=0.1)
    want, _ = score_predictions(y["test"], pred, np.unique(y["train"]))
    assert {k: knn.classification[k] for k in want} == pytest.approx(want)
    assert (knn.details["k"], knn.details["temperature"]) == (7, 0.1)
    for rec in (probe, knn):
        lo, hi = rec.details["ci"]["accuracy"]
        assert lo <= rec.classification["accuracy"] <= hi
        assert 0 <= rec.classification["balanced_accuracy"] <= 1
        run = mlflow.get_run(rec.mlflow_run_id)
        assert run.info.run_name == f"toptune/test_resnet/demo/{rec.task}"
        assert run.data.metrics["test_accuracy"] == pytest.approx(rec.classification["accuracy"])
    # the baselines' settings change only their cells: the top-tuned cell keeps its hash
    assert TopTuneConfig(knn_k=3).config_hash() == TopTuneConfig().config_hash()


# ---- the TensorFlow backend (Keras picks its backend once per process) -------------------------
@pytest.mark.slow
def test_tensorflow_backend_works(tmp_path):
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_toptune import synthetic, tiny_cfg, toptune_synthetic
        from embbench.toptune import load_toptuned
        import numpy as np
        cat, sets = synthetic()
        rec = toptune_synthetic(tiny_cfg(keras_backend="tensorflow"), cat, sets)
        head = load_toptuned(Path(rec.toptune_model_path).parent)
        # a timm/torchvision model after TensorFlow: triton must not crash the process
        from embbench.models import create_embedder
        create_embedder("test_resnet", weights="random")
        import keras
        print(json.dumps({{"backend": keras.backend.backend(), "acc":
              rec.classification["accuracy"], "backend_rec": rec.details["keras_backend"],
              "dim": head.embed(np.asarray(sets["test"].vectors)).shape[1]}}))
        """
    )
    env = {**os.environ, "KERAS_BACKEND": ""}
    env.pop("KERAS_BACKEND")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["backend"] == out["backend_rec"] == "tensorflow"
    assert out["acc"] > 5 * (1 / 6)


# ---- the whole stage on the demo catalogue with a tiny model ------------------------------------
@pytest.mark.slow
def test_run_toptune_on_demo(small_demo, monkeypatch):
    import embbench.cells as stage
    from embbench.stages.toptune import run_toptune

    monkeypatch.setattr(stage, "load_catalogue", lambda *a, **k: small_demo)
    cfg = tiny_cfg(
        models=["test_resnet"],
        weights="random",
        datasets=["demo"],
        label="category",
        num_workers=0,
        batch_size=16,
    )
    results = run_toptune(cfg)
    # the top-tuned cell, then the probe and kNN baselines of the image-only model
    assert list(zip(results["mode"], results["task"], strict=True)) == [
        ("top-tuned", "image-image"),
        ("pretrained", "probe"),
        ("pretrained", "knn"),
    ]
    assert results["accuracy"].between(0, 1).all()
    row = results.iloc[0]
    assert row["mode"] == "top-tuned" and 2 <= row["hidden_layers"] <= 3
    assert 0.0 <= row["mMP@5"] <= 1.0 and 0.0 <= row["pretrained_mMP@5"] <= 1.0
    again = run_toptune(cfg)  # finished cell: read back, nothing trained
    assert again.iloc[0]["config_hash"] == row["config_hash"]


@pytest.mark.slow
@pytest.mark.notebook
def test_notebook_runs_with_smoke_params():
    from embbench.notebooks import run_notebook

    out = run_notebook(
        "03_toptune",
        [ROOT / "params/03_toptune.yaml", ROOT / "params/smoke/03_toptune.yaml"],
        progress=False,
    )
    assert out.is_file()
