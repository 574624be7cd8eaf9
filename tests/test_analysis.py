"""Stage 05 analysis: tables, figure data, CIs and paired tests from SYNTHETIC tracked runs.

The runs are written exactly as stages 01-04 write them (``ResultStore.save`` with per-query
arrays, and one MLflow run per record with the record as ``result.json``), with values chosen
here, so every number in the tables can be checked against an independent computation.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embbench import analysis as an
from embbench.config import ConfigError
from embbench.records import ResultStore, parse_record
from embbench.stages.analysis import AnalysisConfig, run_analysis

K = 5
METRICS = [f"mMP@{K}", "mR@1", f"MAP@{K}", f"MRR@{K}", f"NDCG@{K}"]
N_QUERIES = 120

# (model, family, backbone, embed_dim): test_vit/test_resnet/test_clip are real tiny registry
# models (model facts computable offline); ssl_tiny is not registered (facts stay missing).
MODELS = [
    ("test_vit", "supervised", "transformer", 64),
    ("test_resnet", "supervised", "convolutional", 96),
    ("ssl_tiny", "ssl", "transformer", 32),
    ("test_clip", "text-image", "transformer", 32),
]
DATASETS = ["alpha", "beta"]
# quality of each pretrained model on each dataset (probability of a hit), and the top-tuning
# shift; ssl_tiny is NOT top-tuned on beta (a missing cell).
QUALITY = {
    ("test_vit", "alpha"): 0.55,
    ("test_resnet", "alpha"): 0.45,
    ("ssl_tiny", "alpha"): 0.60,
    ("test_clip", "alpha"): 0.80,
    ("test_vit", "beta"): 0.35,
    ("test_resnet", "beta"): 0.30,
    ("ssl_tiny", "beta"): 0.50,
    ("test_clip", "beta"): 0.70,
}
TOPTUNE_SHIFT = {"test_vit": 0.10, "test_resnet": 0.05, "ssl_tiny": 0.15, "test_clip": 0.08}


def per_query_values(p: float, seed: int, n: int = N_QUERIES) -> dict[str, np.ndarray]:
    """Per-query metric values with a hit rate near ``p`` (consistent across metrics)."""
    rng = np.random.default_rng(seed)
    hit = (rng.random(n) < p).astype(float)
    frac = np.clip(hit * 0.6 + rng.random(n) * 0.4 * p, 0, 1)
    lone = np.array([3, 17])  # two lone queries excluded, as the metrics module does
    keep = np.setdiff1d(np.arange(n + len(lone)), lone)
    return {
        f"mMP@{K}": frac,
        "mR@1": hit,
        f"MAP@{K}": frac * 0.9,
        f"MRR@{K}": np.clip(hit + 0.2 * (1 - hit) * rng.random(n), 0, 1),
        f"NDCG@{K}": np.clip(frac * 1.05, 0, 1),
        "query_index": keep.astype(np.int64),
    }


def make_record(model, family, backbone, dim, dataset, mode, pq=None, **extra) -> dict:
    metrics = {m: float(np.mean(pq[m])) for m in METRICS} if pq is not None else {}
    rec = {
        "stage": {"pretrained": "embed", "top-tuned": "toptune", "fine-tuned": "finetune"}.get(
            mode, "crosstune"
        ),
        "mode": mode,
        "model": model,
        "dataset": dataset,
        "config_hash": f"h{zlib.crc32(repr((model, dataset, mode, extra)).encode()):08x}",
        "config": {"k": K},
        "family": family,
        "backbone": backbone,
        "paper_name": model.replace("_", " ").upper(),
        "weights_used": {"kind": "random", "seed": 0},
        "weights_kind": "random",
        "label": "product",
        "protocol": "within",
        "query_split": "test",
        "index_split": "test",
        "k": K,
        "backend": "exact",
        "metrics": metrics,
        "n_queries": len(pq[METRICS[0]]) if pq is not None else None,
        "n_lone": 2,
        "embed_dim": dim,
        "dataset_fingerprint": f"fp-{dataset}",
        "wall_s": 1.0,
        "git_sha": "0123456789abcdef",
        **extra,
    }
    return rec


def synthetic_records() -> list[tuple[dict, dict | None]]:
    """(record, per-query arrays) for every synthetic run, with the fields stages 01-04 write."""
    out = []
    seed = 0
    for model, family, backbone, dim in MODELS:
        for ds in DATASETS:
            seed += 1
            p = QUALITY[(model, ds)]
            pq = per_query_values(p, seed)
            pre = make_record(model, family, backbone, dim, ds, "pretrained", pq)
            out.append((pre, pq))
            if model == "ssl_tiny" and ds == "beta":
                continue  # missing cell: not top-tuned there
            pq_t = per_query_values(p + TOPTUNE_SHIFT[model], seed + 1000)
            rec = make_record(
                model,
                family,
                backbone,
                64,
                ds,
                "top-tuned",
                pq_t,
                classification={"accuracy": 0.5 + TOPTUNE_SHIFT[model] + p / 4, "f1_macro": 0.4},
                val_accuracy=0.5 + TOPTUNE_SHIFT[model],
                tuner_wall_s=300.0 * (1 + dim / 64),
                final_fit_wall_s=60.0 * (1 + dim / 64),
                source_dataset=ds,
                tuned_on=ds,
                pretrained_metrics=dict(pre["metrics"]),
            )
            out.append((rec, pq_t))
    # fine-tuning on alpha (table 2): the record's model is the base model, as 02 writes it
    for model, dim, p, val, acc, hours, gpu in (
        ("test_resnet", 96, 0.75, 0.87, 0.85, 1.9, 7.6),
        ("test_vit", 64, 0.85, 0.90, 0.88, 2.4, 9.6),
    ):
        pq = per_query_values(p, zlib.crc32(model.encode()) % 1000)
        backbone = "convolutional" if model == "test_resnet" else "transformer"
        rec = make_record(
            model,
            "supervised",
            backbone,
            dim,
            "alpha",
            "fine-tuned",
            pq,
            finetuned_model=f"{model}_ft_alpha_a2",
            recipe="a2",
            val_accuracy=val,
            classification={"accuracy": acc},
            train_wall_s=hours * 3600,
            gpu_hours=gpu,
            train_mlflow_run_id=f"train-{model}",
        )
        rec["paper_name"] += " (fine-tuned)"
        out.append((rec, pq))
    # cross-tuning as 04 writes it: the model fine-tuned on alpha embeds beta; the MLP top-tuned
    # on beta maps alpha's pretrained embeddings. Each carries the target's pretrained baseline.
    pre = {(r["model"], r["dataset"]): r["metrics"] for r, _ in out if r["mode"] == "pretrained"}
    pq = per_query_values(0.20, 77)
    out.append(
        (
            make_record(
                "test_resnet",
                "supervised",
                "convolutional",
                96,
                "beta",
                "cross-tuned",
                pq,
                source_dataset="alpha",
                finetuned_model="test_resnet_ft_alpha_a2",
                pretrained_metrics=pre[("test_resnet", "beta")],
            ),
            pq,
        )
    )
    pq = per_query_values(0.60, 78)
    out.append(
        (
            make_record(
                "test_vit",
                "supervised",
                "transformer",
                64,
                "alpha",
                "cross-top-tuned",
                pq,
                tuned_on="beta",
                source_dataset="beta",
                pretrained_metrics=pre[("test_vit", "alpha")],
            ),
            pq,
        )
    )
    return out


def write_records(store: ResultStore) -> list[dict]:
    recs = []
    for rec, pq in synthetic_records():
        store.save(parse_record(rec), per_query=pq)
        recs.append(rec)
    return recs


def log_mlflow_runs(tracking_uri: str, experiment: str, store: ResultStore) -> list[dict]:
    """Write the synthetic records AND log them to MLflow the way score_and_record does."""
    import mlflow

    from embbench.tracking import log_json_artifact, mlflow_run, setup_mlflow

    setup_mlflow(tracking_uri, experiment)
    recs = []
    for rec, pq in synthetic_records():
        tags = {
            "stage": rec["stage"],
            "mode": rec["mode"],
            "model": rec["model"],
            "dataset": rec["dataset"],
            "family": rec["family"],
            "backbone": rec["backbone"],
            "weights": rec["weights_kind"],
            "config_hash": rec["config_hash"],
        }
        with mlflow_run(f"{rec['stage']}:{rec['model']}:{rec['dataset']}", tags=tags) as run:
            mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in rec["metrics"].items()})
            rec = {**rec, "mlflow_run_id": run.info.run_id}
            log_json_artifact(rec, "result.json")
        store.save(parse_record(rec), per_query=pq)
        recs.append(rec)
    # a tuner's search and trial runs (mode tag, no result.json) are not results
    search_tags = {"stage": "toptune", "mode": "top-tuned", "model": "test_vit", "dataset": "alpha"}
    with mlflow_run("search", tags={**search_tags, "run_kind": "search"}):
        mlflow.log_metrics({"retrieval_mMP_at_5": 0.9, "final_val_accuracy": 0.5})
        with mlflow_run("trial", tags={**search_tags, "run_kind": "trial"}, nested=True):
            mlflow.log_metric("objective_val_accuracy", 0.3)
    # a fine-tuning whose model was never scored for retrieval (table 2 shows "—")
    with mlflow_run(
        "finetune-train",
        tags={
            "stage": "finetune",
            "mode": "training",
            "model": "ssl_tiny",
            "dataset": "alpha",
            "recipe": "a2",
        },
    ):
        mlflow.log_metrics(
            {
                "val_accuracy": 0.45,
                "train_wall_s": 2.37 * 3600,
                "gpu_hours": 9.5,
                "test_accuracy": 0.44,
            }
        )
    # a run logged without its result.json artifact, in another experiment
    setup_mlflow(tracking_uri, "bare")
    with mlflow_run(
        "x",
        tags={
            "stage": "embed",
            "mode": "pretrained",
            "model": "m",
            "dataset": "d",
            "family": "ssl",
            "weights": "pretrained",
        },
    ):
        mlflow.log_metrics({"mMP_at_5": 0.4, "mR_at_1": 0.5, "n_queries": 10})
    return recs


@pytest.fixture(scope="session")
def stored_runs(tmp_path_factory):
    """A runs folder holding the synthetic result records (no MLflow)."""
    root = tmp_path_factory.mktemp("stored_runs")
    recs = write_records(ResultStore(root / "results"))
    return {"root": root, "records": recs}


@pytest.fixture(scope="session")
def tracked_runs(tmp_path_factory):
    """A runs folder with the synthetic records AND an MLflow store logging the same runs."""
    root = tmp_path_factory.mktemp("tracked_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBBENCH_RUNS", str(root))
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        recs = log_mlflow_runs(uri, "synthetic", ResultStore(root / "results"))
    return {"root": root, "uri": uri, "experiment": "synthetic", "records": recs}


@pytest.fixture
def runs_env(stored_runs, monkeypatch):
    monkeypatch.setenv("EMBBENCH_RUNS", str(stored_runs["root"]))
    return stored_runs


@pytest.fixture
def mlflow_env(tracked_runs, monkeypatch):
    monkeypatch.setenv("EMBBENCH_RUNS", str(tracked_runs["root"]))
    return tracked_runs


@pytest.fixture
def results(runs_env) -> pd.DataFrame:
    cfg = AnalysisConfig(source="records", n_boot=0)
    return an.load_results(cfg)


def facts_stub(name: str) -> dict:
    if name == "ssl_tiny":
        raise KeyError(f"Unknown model {name!r}")
    return {
        "params_m": len(name) * 1.5,
        "gflops": len(name) * 0.2,
        "gmacs": len(name) * 0.1,
        "embed_dim": 64,
    }


# ------------------------------------------------------------------------------- config


def test_config_validates_metric_and_names():
    assert AnalysisConfig().metric == "mMP@5"
    with pytest.raises(ConfigError, match="k=10"):
        AnalysisConfig.from_params({"k": 10})  # default metric mMP@5 is not a k=10 metric
    assert AnalysisConfig.from_params({"k": 10, "metric": "mMP@10"}).metric == "mMP@10"
    with pytest.raises(ConfigError, match="did you mean 'n_boot'"):
        AnalysisConfig.from_params({"nboot": 10})
    with pytest.raises(ConfigError, match="report_name"):
        AnalysisConfig.from_params({"report_name": "../x.html"})


# -------------------------------------------------------------------------------- loading


@pytest.mark.slow
def test_records_and_mlflow_give_the_same_table(mlflow_env):
    runs_env = mlflow_env
    by_records = an.load_results(AnalysisConfig(source="records", n_boot=0))
    by_mlflow = an.load_results(
        AnalysisConfig(
            source="mlflow",
            tracking_uri=runs_env["uri"],
            experiment=runs_env["experiment"],
            n_boot=0,
        )
    )
    n = len(synthetic_records())
    assert len(by_records) == n
    # MLflow also holds a fine-tuning never scored for retrieval (table 2 shows it, metrics "—")
    unscored = by_mlflow[by_mlflow["mR@1"].isna()]
    assert len(by_mlflow) == n + 1 and len(unscored) == 1
    u = unscored.iloc[0]
    assert (u["model"], u["mode"], u["val_accuracy"]) == ("ssl_tiny", "fine-tuned", 0.45)
    assert u["train_hours"] == pytest.approx(2.37) and u["family"] == "ssl"  # from its other runs
    key = ["model", "dataset", "mode"]
    a = by_records.sort_values(key).reset_index(drop=True)
    b = by_mlflow.drop(unscored.index).sort_values(key).reset_index(drop=True)
    for col in [*METRICS, "val_accuracy", "test_accuracy", "train_hours", "gpu_hours"]:
        np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), equal_nan=True)
    assert b["mlflow_run_id"].notna().all()
    assert set(b["mlflow_run_id"]) == {r["mlflow_run_id"] for r in runs_env["records"]}
    # canonical fields: seconds converted to hours, classification accuracy found
    ft = a[(a["model"] == "test_vit") & (a["mode"] == "fine-tuned")].iloc[0]
    assert ft["train_hours"] == pytest.approx(2.4)
    assert ft["val_accuracy"] == pytest.approx(0.90) and ft["test_accuracy"] == 0.88
    tt = a[(a["model"] == "test_clip") & (a["mode"] == "top-tuned")].iloc[0]
    assert tt["test_accuracy"] == pytest.approx(0.5 + 0.08 + 0.80 / 4)
    assert tt["train_hours"] == pytest.approx(360.0 * 1.5 / 3600)  # search + final fit
    # the tuner's search and trial runs are not results
    assert (
        len(
            by_mlflow[
                (by_mlflow["mode"] == "top-tuned")
                & (by_mlflow["model"] == "test_vit")
                & (by_mlflow["dataset"] == "alpha")
            ]
        )
        == 1
    )
    t2 = an.table2(by_mlflow, "mR@1")
    assert list(t2["model"]) == ["test_vit", "test_resnet", "ssl_tiny"]
    assert math.isnan(t2.iloc[2]["mR@1"]) and t2.iloc[2]["val_accuracy"] == 0.45


@pytest.mark.slow
def test_mlflow_errors_name_the_problem(mlflow_env, tmp_path):
    runs_env = mlflow_env
    with pytest.raises(an.AnalysisError, match="experiment 'nope' not found"):
        an.mlflow_records(runs_env["uri"], "nope")
    with pytest.raises(an.AnalysisError, match="no MLflow store"):
        an.mlflow_records(f"sqlite:///{tmp_path / 'missing.db'}", "x")


@pytest.mark.slow
def test_mlflow_run_without_artifact_is_rebuilt_from_tags(mlflow_env):
    uri = mlflow_env["uri"]
    df = an.load_results(AnalysisConfig(tracking_uri=uri, experiment="bare", n_boot=0))
    row = df.iloc[0]
    assert (row["model"], row["family"], row["weights_kind"]) == ("m", "ssl", "pretrained")
    assert row["mMP@5"] == pytest.approx(0.4) and row["mR@1"] == pytest.approx(0.5)
    assert math.isnan(row["NDCG@5"])  # not logged: missing, not zero


def test_latest_run_wins_and_other_k_is_left_out(tmp_path):
    store = ResultStore(tmp_path / "results")
    pq = per_query_values(0.5, 1)
    old = make_record("m", "ssl", "transformer", 8, "d", "pretrained", pq)
    store.save(old, per_query=pq)
    pq2 = per_query_values(0.9, 2)
    new = make_record("m", "ssl", "transformer", 8, "d", "pretrained", pq2, note="rerun")
    store.save(new, per_query=pq2)
    other_k = {**make_record("m2", "ssl", "transformer", 8, "d", "pretrained", pq), "k": 10}
    store.save(other_k, per_query=pq)
    df = an.load_results(AnalysisConfig(source="records", n_boot=0), store)
    assert len(df) == 1 and df.attrs["superseded"] == 1
    assert df.iloc[0]["mMP@5"] == pytest.approx(np.mean(pq2["mMP@5"]))


def test_filters_and_empty_results_error(runs_env):
    df = an.load_results(
        AnalysisConfig(source="records", models=["test_clip"], datasets=["beta"], n_boot=0)
    )
    assert set(df["model"]) == {"test_clip"} and set(df["dataset"]) == {"beta"}
    with pytest.raises(an.AnalysisError, match="no results at k=5"):
        an.load_results(AnalysisConfig(source="records", models=["nothing"], n_boot=0))


# --------------------------------------------------------------------------------- tables


def _mean_of(recs, family, mode, dataset, metric="mMP@5"):
    vals = [
        r["metrics"][metric]
        for r in recs
        if r["family"] == family and r["mode"] == mode and r["dataset"] == dataset
    ]
    return float(np.mean(vals)) if vals else math.nan


def test_table3_values_improvement_and_missing_cells(results, runs_env):
    recs = [r for r, _ in synthetic_records()]
    t3 = an.table3(results, "mMP@5")
    assert list(t3.columns) == ["alpha", "beta", "Mean"]
    assert list(t3.index.get_level_values(0).unique()) == ["supervised", "ssl", "text-image"]
    for fam in ("supervised", "ssl", "text-image"):
        for ds in DATASETS:
            for mode in ("pretrained", "top-tuned"):
                exp = _mean_of(recs, fam, mode, ds)
                got = t3.loc[(fam, mode), ds]
                if math.isnan(exp):
                    assert math.isnan(got)
                else:
                    assert got == pytest.approx(exp)
            imp = t3.loc[(fam, "improvement"), ds]
            diff = t3.loc[(fam, "top-tuned"), ds] - t3.loc[(fam, "pretrained"), ds]
            assert (math.isnan(imp) and math.isnan(diff)) or imp == pytest.approx(diff)
    # supervised = mean over test_vit and test_resnet, never over fine-tuned models
    sup = np.mean(
        [
            r["metrics"]["mMP@5"]
            for r in recs
            if r["model"] in ("test_vit", "test_resnet")
            and r["mode"] == "pretrained"
            and r["dataset"] == "alpha"
        ]
    )
    assert t3.loc[("supervised", "pretrained"), "alpha"] == pytest.approx(sup)
    # ssl was not top-tuned on beta: that cell, its improvement and its mean are missing
    assert math.isnan(t3.loc[("ssl", "top-tuned"), "beta"])
    assert math.isnan(t3.loc[("ssl", "improvement"), "beta"])
    assert math.isnan(t3.loc[("ssl", "top-tuned"), "Mean"])
    assert t3.loc[("ssl", "pretrained"), "Mean"] == pytest.approx(
        np.mean([t3.loc[("ssl", "pretrained"), d] for d in DATASETS])
    )
    assert t3.loc[("text-image", "improvement"), "Mean"] == pytest.approx(
        t3.loc[("text-image", "top-tuned"), "Mean"] - t3.loc[("text-image", "pretrained"), "Mean"]
    )
    assert (t3.stack() != 0).all()  # nothing was filled with zero


def test_table2_fine_tuning(results):
    t2 = an.table2(results, "mR@1")
    assert list(t2["model"]) == ["test_vit", "test_resnet"]  # best val accuracy first
    assert list(t2["finetuned_model"]) == ["test_vit_ft_alpha_a2", "test_resnet_ft_alpha_a2"]
    assert list(t2["val_accuracy"]) == pytest.approx([0.90, 0.87])
    assert list(t2["test_accuracy"]) == pytest.approx([0.88, 0.85])
    assert list(t2["train_hours"]) == pytest.approx([2.4, 1.9])
    assert list(t2["gpu_hours"]) == pytest.approx([9.6, 7.6])
    ft = results[results["mode"] == "fine-tuned"].set_index("model")["mR@1"]
    assert list(t2["mR@1"]) == pytest.approx([ft["test_vit"], ft["test_resnet"]])


def test_toptune_baseline_on_another_label_becomes_a_pretrained_row(tmp_path):
    """03 top-tunes on categories while 01 scored products: each label is its own column."""
    store = ResultStore(tmp_path / "results")
    pq = per_query_values(0.5, 1)
    store.save(make_record("m", "ssl", "transformer", 8, "d", "pretrained", pq), per_query=pq)
    pq_t = per_query_values(0.7, 2)
    base = {"mMP@5": 0.61, "mR@1": 0.6, "MAP@5": 0.5, "MRR@5": 0.65, "NDCG@5": 0.62}
    tt = make_record(
        "m", "ssl", "transformer", 8, "d", "top-tuned", pq_t, tuned_on="d", pretrained_metrics=base
    )
    tt["label"] = "category"
    store.save(tt, per_query=pq_t)
    df = an.load_results(AnalysisConfig(source="records", n_boot=0), store)
    assert sorted(df["dataset"]) == ["d (category)", "d (category)", "d (product)"]
    derived = df[(df["dataset"] == "d (category)") & (df["mode"] == "pretrained")].iloc[0]
    assert derived["stage"] == an.BASELINE_STAGE and derived["mMP@5"] == 0.61
    assert derived["embed_dim"] == 8  # from the model's stage-01 run
    t3 = an.table3(df, "mMP@5")
    assert t3.loc[("ssl", "improvement"), "d (category)"] == pytest.approx(
        np.mean(pq_t["mMP@5"]) - 0.61
    )
    assert math.isnan(t3.loc[("ssl", "top-tuned"), "d (product)"])
    assert an.PerQuery(store)(derived.to_dict()) is None  # no per-query arrays: no CI


# ---------------------------------------------------------------------------- figure data


def test_model_facts_table_with_a_failing_model(results):
    facts = an.model_facts_table(results, facts_fn=facts_stub)
    assert set(facts["model"]) == {"test_vit", "test_resnet", "ssl_tiny", "test_clip"}
    row = facts.set_index("model").loc["test_resnet"]
    assert row["params_m"] == pytest.approx(len("test_resnet") * 1.5)
    assert row["embed_dim"] == 96  # from the runs
    bad = facts.set_index("model").loc["ssl_tiny"]
    assert math.isnan(bad["params_m"]) and "Unknown model" in bad["error"]
    off = an.model_facts_table(results, compute=False)
    assert off["params_m"].isna().all() and off["embed_dim"].notna().all()


def test_metric_correlation(results):
    corr = an.metric_correlation(results, K)
    assert list(corr.index)[:5] == METRICS and "test_accuracy" in corr.index
    assert np.allclose(np.diag(corr.to_numpy(float)), 1.0)
    assert corr.loc["mMP@5", "MAP@5"] == pytest.approx(1.0)  # MAP = 0.9 * MP per query


def test_best_per_type_and_zscores(results):
    best = an.best_per_type(results, "mMP@5")
    sup_pre_alpha = best[(best["dataset"] == "alpha") & (best["type"] == "Pretrained Supervised")]
    cand = results[
        (results["dataset"] == "alpha")
        & (results["mode"] == "pretrained")
        & (results["family"] == "supervised")
    ]
    assert sup_pre_alpha["model"].item() == cand.loc[cand["mMP@5"].idxmax(), "model"]
    assert "Fine-tuned Supervised" in set(best["type"])
    z = an.zscore_vs_size(results, "mMP@5").set_index("model")
    pre = results[results["mode"] == "pretrained"]
    exp = []
    for ds in DATASETS:
        v = pre[pre["dataset"] == ds].set_index("model")["mMP@5"]
        exp.append((v - v.mean()) / v.std(ddof=0))
    exp = pd.concat(exp, axis=1).mean(axis=1)
    for model, value in exp.items():
        assert z.loc[model, "z"] == pytest.approx(value)
    assert z.loc["test_clip", "z"] > 0 > z.loc["test_resnet", "z"]


def test_tuning_effect_and_cross_deltas(results):
    te = an.tuning_effect(results, "mMP@5")
    assert len(te) == 7  # 4 models x 2 datasets minus the missing ssl/beta cell
    r = te[(te["model"] == "test_vit") & (te["dataset"] == "alpha")].iloc[0]
    pre = results[
        (results["model"] == "test_vit")
        & (results["dataset"] == "alpha")
        & (results["mode"] == "pretrained")
    ]["mMP@5"].item()
    top = results[
        (results["model"] == "test_vit")
        & (results["dataset"] == "alpha")
        & (results["mode"] == "top-tuned")
    ]["mMP@5"].item()
    assert r["delta"] == pytest.approx(top - pre) and r["pretrained"] == pytest.approx(pre)
    ft = an.tuning_effect(results, "mMP@5", tuned="fine-tuned")  # base_model links ft to pre
    assert set(ft["model"]) == {"test_vit", "test_resnet"}
    cross = an.cross_deltas(results, "mMP@5").set_index("mode")
    ct = cross.loc["cross-tuned"]
    ref = results[
        (results["model"] == "test_resnet")
        & (results["dataset"] == "beta")
        & (results["mode"] == "pretrained")
    ]["mMP@5"].item()
    assert (ct["model"], ct["source"], ct["target"]) == ("test_resnet", "alpha", "beta")
    assert ct["delta"] == pytest.approx(ct["cross"] - ref)
    ctt = cross.loc["cross-top-tuned"]
    assert (ctt["model"], ctt["source"], ctt["target"]) == ("test_vit", "beta", "alpha")


# --------------------------------------------------------------- bootstrap and paired tests


def test_confidence_intervals_bracket_the_mean(results, runs_env):
    loader = an.PerQuery()
    ci = an.add_confidence_intervals(results, loader, k=K, n_boot=300, seed=1)
    scored = ci[ci["mMP@5"].notna()]
    for m in METRICS:
        assert (scored[f"{m} low"] <= scored[m] + 1e-12).all()
        assert (scored[m] <= scored[f"{m} high"] + 1e-12).all()
        assert (scored[f"{m} high"] - scored[f"{m} low"] > 0).all()
    missing = ci[ci["model"] == "ssl_tiny_ft_alpha"]
    assert missing["mMP@5 low"].isna().all()  # no per-query arrays: missing, not zero
    none = an.add_confidence_intervals(results, loader, k=K, n_boot=0)
    assert none["mMP@5 low"].isna().all()
    long = an.ci_table(ci, K)
    assert set(long["metric"]) == set(METRICS) and (long["low"] <= long["value"]).all()


def test_bootstrap_cache_reuses_unchanged_results(results, runs_env, tmp_path, monkeypatch):
    loader = an.PerQuery()
    cache = an.BootstrapCache(tmp_path / "boot.json")
    first = an.add_confidence_intervals(results, loader, k=K, n_boot=200, cache=cache)
    pairs = an.paired_tests(results, loader, "mMP@5", n_boot=200, cache=cache)
    cache.save()

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(an.stats, "bootstrap_ci", boom)
    monkeypatch.setattr(an.stats, "paired_bootstrap_test", boom)
    again = an.BootstrapCache(tmp_path / "boot.json")
    second = an.add_confidence_intervals(results, loader, k=K, n_boot=200, cache=again)
    pd.testing.assert_frame_equal(first, second)
    pd.testing.assert_frame_equal(
        pairs, an.paired_tests(results, loader, "mMP@5", n_boot=200, cache=again)
    )
    with pytest.raises(AssertionError, match="recomputed"):  # other settings: recomputed
        an.add_confidence_intervals(results, loader, k=K, n_boot=201, cache=again)


def test_aligned_matches_queries_by_index():
    a = {"m": np.array([0.1, 0.2, 0.3, 0.4]), "query_index": np.array([0, 1, 2, 5])}
    b = {"m": np.array([0.5, 0.3, 0.1]), "query_index": np.array([5, 2, 0])}
    x, y = an.aligned(a, b, "m")
    assert list(x) == [0.1, 0.3, 0.4] and list(y) == [0.1, 0.3, 0.5]


def _row(entry, values, order=None):
    n = len(values)
    qi = np.arange(n) if order is None else order
    return {"entry": entry, "dataset_fingerprint": "fp", "arrays": {"m": values, "query_index": qi}}


def test_paired_test_detects_a_real_difference_and_not_a_null():
    rng = np.random.default_rng(0)
    n = 400
    base = (rng.random(n) < 0.6).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:60]] = 1.0  # 60 more hits: +0.15
    null = base.copy()  # same mean: 20 hits lost, 20 gained
    null[np.flatnonzero(base == 1)[:20]] = 0.0
    null[np.flatnonzero(base == 0)[:20]] = 1.0
    loader = lambda r: r["arrays"]  # noqa: E731
    kw = {"n_boot": 2000, "seed": 0, "alpha": 0.05}
    real = an.paired_test(_row("b", better), _row("a", base), loader, "m", **kw)
    assert real["diff"] == pytest.approx(0.15) and real["p_value"] < 0.01
    assert real["low"] > 0
    nul = an.paired_test(_row("n", null), _row("a", base), loader, "m", **kw)
    assert nul["diff"] == pytest.approx(0.0) and nul["p_value"] > 0.5
    assert nul["low"] < 0 < nul["high"]
    # shuffled query order: still paired by query_index, same answer
    perm = rng.permutation(n)
    shuffled = _row("b", better[perm], order=perm)
    again = an.paired_test(shuffled, _row("a", base), loader, "m", **kw)
    assert again["diff"] == pytest.approx(0.15)
    # different datasets cannot be paired
    other = {**_row("a", base), "dataset_fingerprint": "other"}
    assert an.paired_test(_row("b", better), other, loader, "m", **kw)["note"]


def test_paired_tests_table_and_holm(results, runs_env):
    loader = an.PerQuery()
    pt = an.paired_tests(results, loader, "mMP@5", n_boot=500, seed=0)
    for ds, grp in pt.groupby("dataset"):
        scored = results[(results["dataset"] == ds) & results["mMP@5"].notna()]
        best = scored.loc[scored["mMP@5"].idxmax(), "entry"]
        assert set(grp["a"]) == {best} and len(grp) == len(scored) - 1
        assert (grp["p_holm"] >= grp["p_value"] - 1e-12).all()
    # the best text-image model beats the weakest supervised one by ~0.3: significant
    weakest = pt[(pt["dataset"] == "beta") & (pt["b"] == "test_resnet")].iloc[0]
    assert bool(weakest["significant"]) and weakest["diff"] > 0.15
    full = an.paired_tests(results, loader, "mMP@5", pairs="all", n_boot=100)
    n_alpha = int(results[(results["dataset"] == "alpha")]["mMP@5"].notna().sum())
    assert (full["dataset"] == "alpha").sum() == n_alpha * (n_alpha - 1) // 2
    assert an.paired_tests(results, loader, "mMP@5", n_boot=0).empty
    assert list(an.holm([0.01, 0.04, np.nan, 0.03])[[0, 1, 3]]) == pytest.approx([0.03, 0.06, 0.06])


# ------------------------------------------------------------------------ practical guide


def test_practical_guide_follows_the_numbers(results):
    guide = an.practical_guide(results, "mMP@5")
    search = guide[(guide["dataset"] == "alpha") & (guide["task"] == "visual search")]
    win = search[search["recommended"]].iloc[0]
    cand = results[
        (results["dataset"] == "alpha")
        & results["mode"].isin(["pretrained", "top-tuned", "fine-tuned"])
    ]
    best = cand.loc[cand["mMP@5"].idxmax()]
    assert (win["model"], win["strategy"]) == (best["model"], best["mode"])
    ft = search[search["strategy"] == "fine-tuned"].iloc[0]
    base = results[
        (results["model"] == "test_vit")
        & (results["dataset"] == "alpha")
        & (results["mode"] == "pretrained")
    ]["mMP@5"].item()
    assert ft["model"] == "test_vit"
    assert ft["gain"] == pytest.approx(ft["score"] - base)
    assert ft["gain_per_gpu_hour"] == pytest.approx(ft["gain"] / 9.6)
    pre = search[search["strategy"] == "pretrained"].iloc[0]
    assert pre["train_hours"] == 0 and math.isnan(pre["gain_per_hour"])
    tt = search[search["strategy"] == "top-tuned"].iloc[0]
    assert math.isnan(tt["gain_per_gpu_hour"])  # trained on CPU: 0 GPU-hours, no ratio
    cat = guide[(guide["dataset"] == "alpha") & (guide["task"] == "categorisation")]
    assert set(cat["strategy"]) == {"top-tuned", "fine-tuned"}
    assert set(cat["score_name"]) == {"test accuracy"}
    assert cat[cat["strategy"] == "fine-tuned"]["score"].item() == pytest.approx(0.88)
    t3 = an.table3(results, "mMP@5")
    text = an.guide_sentences(guide, table=t3)
    first = next(s for s in text if s.startswith("alpha, visual search"))
    assert f"use {win['model']} ({win['strategy']})" in first and f"{win['score']:.3f}" in first
    assert any("best model type on average" in s for s in text)
    # change the numbers, change the advice: make test_resnet's top-tuned result the best
    boosted = results.copy()
    hit = (boosted["model"] == "test_resnet") & (boosted["mode"] == "top-tuned")
    boosted.loc[hit, "mMP@5"] = 0.99
    g2 = an.practical_guide(boosted, "mMP@5")
    w2 = g2[(g2["dataset"] == "alpha") & (g2["task"] == "visual search") & g2["recommended"]]
    assert (w2["model"].item(), w2["strategy"].item()) == ("test_resnet", "top-tuned")
    assert "alpha, visual search: use test_resnet (top-tuned)" in " ".join(an.guide_sentences(g2))


def test_weights_summary_and_runs(results):
    w = an.weights_summary(results)
    assert w["counts"] == {"random": len(results)}
    assert "test_clip" in w["random_models"]
    runs = an.runs_summary(results)
    assert len(runs) == len(results) and "mlflow_run_id" in runs
    # provenance in words, from the records' lineage
    ft = runs[runs["mode"] == "fine-tuned"]["provenance"]
    assert len(ft) and all(p.startswith("fine-tuned on alpha (a2, from ") for p in ft)


def test_every_guide_sentence_on_random_weights_carries_the_caveat(results):
    guide = an.practical_guide(results, "mMP@5")
    assert set(guide["weights_kind"]) == {"random"}
    text = an.guide_sentences(guide, table=an.table3(results, "mMP@5"))
    assert len(text) > 2 and all(s.endswith(an.guide.RANDOM_CAVEAT) for s in text)
    pretrained = guide.assign(weights_kind="pretrained")
    assert not any("Random weights" in s for s in an.guide_sentences(pretrained))


# ------------------------------------------------------------------------------ figures


@pytest.mark.slow
def test_figures_draw_from_synthetic_runs(results, runs_env):
    import matplotlib

    matplotlib.use("Agg")
    from embbench.analysis import plots

    loader = an.PerQuery()
    res = an.add_confidence_intervals(results, loader, k=K, n_boot=50)
    long = an.results_long(res, "mMP@5")
    figs = {
        "2": plots.model_facts_figure(an.model_facts_table(res, facts_fn=facts_stub)),
        "2-no-facts": plots.model_facts_figure(an.model_facts_table(res, compute=False)),
        "3": plots.correlation_figure(an.metric_correlation(res, K)),
        "4a": plots.all_models_figure(long, "mMP@5"),
        "4b": plots.best_per_type_figure(an.best_per_type(res, "mMP@5"), "mMP@5"),
        "4c": plots.zscore_figure(an.zscore_vs_size(res, "mMP@5"), "mMP@5"),
        "5": plots.pretrained_figure(long, "mMP@5"),
        "6": plots.tuning_figure(
            an.tuning_effect(res, "mMP@5", loader=loader, n_boot=100), "mMP@5"
        ),
        "7": plots.cross_figure(an.cross_deltas(res, "mMP@5"), "mMP@5"),
    }
    for name, fig in figs.items():
        assert fig is not None, name
        assert fig.axes, name
    # figure 4b's axis spans the metric's range [0, 1], not beyond
    assert figs["4b"].axes[0].get_ylim()[1] == pytest.approx(1.0)
    # figure 4a has one panel per mode present
    assert len(figs["4a"].axes) == len(set(long["mode"]))
    # figure 6 marks the missing cell (ssl_tiny on beta) as not drawn: a masked cell
    heat = figs["6"].axes[0]
    texts = [t.get_text() for t in heat.texts]
    assert len([t for t in texts if t]) == 7
    # nothing to draw -> None (the notebook shows a note instead)
    empty = res.iloc[0:0]
    assert plots.cross_figure(an.cross_deltas(empty, "mMP@5"), "mMP@5") is None
    assert plots.tuning_figure(an.tuning_effect(empty, "mMP@5"), "mMP@5") is None


@pytest.mark.slow
def test_run_analysis_end_to_end(mlflow_env):
    runs_env = mlflow_env
    cfg = AnalysisConfig(
        source="mlflow",
        tracking_uri=runs_env["uri"],
        experiment=runs_env["experiment"],
        n_boot=200,
    )
    a = run_analysis(cfg, facts_fn=facts_stub)
    assert len(a.results) == len(synthetic_records()) + 1  # + the unscored fine-tuning
    assert not a.table3.empty and len(a.table2) == 3 and len(a.cross) == 2
    assert a.paired["p_value"].notna().any() and a.tuning["p_value"].notna().any()
    assert any("Model facts" in n for n in a.notes)
    assert a.sentences and all(isinstance(s, str) for s in a.sentences)
    assert os.environ["EMBBENCH_RUNS"] == str(Path(runs_env["root"]))


@pytest.mark.parametrize("n_models", [1, 2])
def test_pretrained_only_runs_give_notes_not_errors(tmp_path, monkeypatch, n_models):
    """`make demo` after 01 alone: every table and figure either draws or is left empty."""
    import matplotlib

    matplotlib.use("Agg")
    from embbench.analysis import plots

    monkeypatch.setenv("EMBBENCH_RUNS", str(tmp_path))
    store = ResultStore(tmp_path / "results")
    for i, (model, family, backbone, dim) in enumerate(MODELS[:n_models]):
        pq = per_query_values(0.4 + 0.1 * i, i)
        store.save(
            make_record(model, family, backbone, dim, "alpha", "pretrained", pq), per_query=pq
        )
    a = run_analysis(AnalysisConfig(source="records", n_boot=50), store, facts_fn=facts_stub)
    assert a.table2.empty and a.tuning.empty and a.cross.empty
    n_types = len({fam for _, fam, _, _ in MODELS[:n_models]})
    assert list(a.table3.index.get_level_values("row")).count("improvement") == n_types
    assert a.table3.xs("top-tuned", level="row").isna().all().all()
    assert any(s.startswith("alpha, visual search: use") for s in a.sentences)
    assert not any("categorisation" in s for s in a.sentences)
    long = an.results_long(a.results, "mMP@5")
    assert plots.pretrained_figure(long, "mMP@5") is not None
    assert plots.all_models_figure(long, "mMP@5") is not None
    assert plots.tuning_figure(a.tuning, "mMP@5") is None
    assert plots.cross_figure(a.cross, "mMP@5") is None
    assert plots.correlation_figure(a.correlation) is None  # fewer than three results
    z = plots.zscore_figure(an.zscore_vs_size(a.results, "mMP@5"), "mMP@5")
    assert (z is None) == (n_models == 1)  # one model per dataset: no z-score
    assert plots.best_per_type_figure(an.best_per_type(a.results, "mMP@5"), "mMP@5") is not None
    assert plots.model_facts_figure(a.facts) is not None
    assert len(a.paired) == n_models - 1
