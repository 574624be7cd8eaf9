"""Stage 02 fine-tuning on the CPU: recipes, one epoch of each, kill-and-resume, the headless model.

A tiny timm model (``test_resnet``, random weights) on a tiny demo catalogue (4 products, 16
training images of 40 px) at 32 px, batch 4.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_finetune import TINY_FINETUNE

import embbench.cells as cells
import embbench.stages.finetune as ft
import embbench.train.trainer as trainer_mod
from embbench.models.finetuned import (
    finetuned_index_path,
    read_finetuned_index,
    register_finetuned_models,
)
from embbench.records import ResultStore
from embbench.stages.finetune import FinetuneConfig, finetune_job, make_trainer, run_finetune
from embbench.train import FinetuneError, build_trainable
from embbench.train.recipes import RECIPES, get_recipe, resolve_recipe, scale_lr

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = TINY_FINETUNE


def test_lr_scaling_arithmetic():
    assert scale_lr(5e-3, 512, 2048) == pytest.approx(1.25e-3)  # the paper: 512 on 4 GPUs
    assert scale_lr(5e-3, 4096, 2048) == pytest.approx(1e-2)
    assert scale_lr(5e-3, 512, 2048, "sqrt") == pytest.approx(2.5e-3)
    assert scale_lr(5e-3, 512, 2048, "none") == pytest.approx(5e-3)
    with pytest.raises(ValueError, match="global_batch=0"):
        scale_lr(5e-3, 0, 2048)
    with pytest.raises(ValueError, match="cubic"):
        scale_lr(5e-3, 8, 2048, "cubic")
    hp = resolve_recipe(get_recipe("a2"), global_batch=512)
    assert (hp["lr_base"], hp["reference_batch"], hp["lr"]) == (5e-3, 2048, pytest.approx(1.25e-3))
    # overrides: lr at another reference batch; a shortened run keeps the warm-up's share
    hp = resolve_recipe(get_recipe("A3"), global_batch=256, lr=1e-3, reference_batch=128, epochs=10)
    assert hp["lr"] == pytest.approx(2e-3) and hp["epochs"] == 10
    assert hp["warmup_epochs"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="A1"):
        get_recipe("B2")


def test_config_lr_is_scaled_to_the_global_batch(use_tiny):
    cfg = FinetuneConfig(**{**TINY, "batch_size": 8, "grad_accum": 2})
    cell = finetune_job(cfg, "test_resnet", "demo", world_size=4)
    assert cell.hp["global_batch"] == 64
    assert cell.hp["lr"] == pytest.approx(5e-3 * 64 / 2048)
    assert cell.classes == sorted(use_tiny.split("train")["product"].unique())
    # what changes training changes the hash; the retrieval backend does not
    other = finetune_job(cfg.model_copy(update={"backend": "milvus"}), "test_resnet", "demo", 4)
    assert other.train_hash == cell.train_hash
    assert finetune_job(cfg, "test_resnet", "demo", 2).train_hash != cell.train_hash


def test_recipes_follow_the_protocol():
    a1, a2, a3 = RECIPES["A1"], RECIPES["A2"], RECIPES["A3"]
    assert (a1.epochs, a1.lr, a1.weight_decay, a1.mixup) == (600, 5e-3, 0.01, 0.2)
    assert (a2.epochs, a2.lr, a2.weight_decay, a2.mixup) == (300, 5e-3, 0.02, 0.1)
    assert (a3.epochs, a3.lr, a3.weight_decay, a3.mixup) == (100, 8e-3, 0.02, 0.1)
    assert a1.auto_augment == a2.auto_augment == "rand-m7-mstd0.5-inc1"
    assert a3.auto_augment == "rand-m6-mstd0.5-inc1"
    assert (a3.train_size, a3.test_size, a3.aug_repeats) == (160, 224, 0)
    for r in (a1, a2, a3):
        assert r.opt == "lamb" and r.sched == "cosine" and r.warmup_epochs == 5
        assert r.cutmix == 1.0 and r.batch_size == 2048
        assert r.loss == "ce" and r.drop_path_rate == 0.0  # the paper's two changes


@pytest.mark.parametrize("recipe", ["A1", "A2", "A3"])
def test_one_short_epoch_of_each_recipe(use_tiny, recipe):
    from timm.data.distributed_sampler import RepeatAugSampler
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import Lamb

    cfg = FinetuneConfig(**{**TINY, "recipe": recipe})
    cell = finetune_job(cfg, "test_resnet", "demo")
    trainer = make_trainer(cfg, cell)
    assert isinstance(trainer.optimizer, Lamb)
    assert isinstance(trainer.criterion, SoftTargetCrossEntropy)
    assert trainer.mixup.mixup_alpha == RECIPES[recipe].mixup and trainer.mixup.cutmix_alpha == 1
    assert isinstance(trainer.sampler, RepeatAugSampler) == (recipe != "A3")
    decay = {g["weight_decay"] for g in trainer.optimizer.param_groups}
    assert decay == {0.0, RECIPES[recipe].weight_decay}  # no decay on biases and norms
    no_decay = [g for g in trainer.optimizer.param_groups if g["weight_decay"] == 0][0]
    assert all(p.ndim <= 1 for p in no_decay["params"])
    assert "rand" in repr(trainer.train_transform).lower()  # RandAugment in the pipeline
    before = [p.detach().clone() for p in trainer.net.parameters()]
    stats = trainer.train_epoch(0)
    assert math.isfinite(stats["train_loss"]) and stats["train_images"] > 0
    assert stats["lr"] > 0 and trainer.state.num_updates == trainer.updates_per_epoch
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.net.parameters(), strict=True))
    pred = trainer.predict("val")
    assert len(pred["y_true"]) == len(use_tiny.split("val")) and pred["n_unknown"] == 0


def test_unreadable_training_image_is_skipped_and_recorded(use_tiny, tmp_path, monkeypatch):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    items = use_tiny.items.copy()
    first = items.index[items["split"] == "train"][0]
    items.loc[first, "path"] = str(bad)
    cat = dataclasses.replace(use_tiny, items=items)
    monkeypatch.setattr(cells, "load_catalogue", lambda *a, **k: cat)
    cfg = FinetuneConfig(**{**TINY, "recipe": "A3"})
    trainer = make_trainer(cfg, finetune_job(cfg, "test_resnet", "demo"))
    stats = trainer.train_epoch(0)
    assert list(trainer.state.failed) == [str(bad)]
    # 15 readable images; the bad one's batch keeps 3, trimmed to 2 (mixup pairs images)
    assert stats["train_images"] == 14


def test_non_timm_models_are_refused_clearly():
    with pytest.raises(FinetuneError, match="not a timm model"):
        build_trainable("test_clip", "random", 3, (32,))


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_killed_run_resumes_and_the_headless_model_is_usable(use_tiny, monkeypatch, caplog):
    import mlflow

    from embbench.models import create_embedder, get_model_spec, unregister_model

    caplog.set_level(logging.INFO)
    cfg = FinetuneConfig(**{**TINY, "epochs": 2, "register_mlflow": True})

    def kill_after_first(trainer, epoch):
        if epoch == 0:
            raise _Killed

    monkeypatch.setattr(trainer_mod, "_after_epoch", kill_after_first)
    with pytest.raises(_Killed):
        run_finetune(cfg)
    cell = finetune_job(cfg, "test_resnet", "demo")
    ckpt = torch.load(cell.checkpoint_path, weights_only=True)
    assert ckpt["epoch"] == 1 and not cell.summary_path.exists()

    # a new trainer restores the optimizer, scheduler and progress from the checkpoint
    trainer = make_trainer(cfg, cell)
    assert trainer.resume() == 1
    restored = trainer.optimizer.state_dict()
    assert restored["state"] and restored["state"].keys() == ckpt["optimizer"]["state"].keys()
    for key, state in ckpt["optimizer"]["state"].items():
        assert torch.equal(restored["state"][key]["exp_avg"], state["exp_avg"])
    assert trainer.state.num_updates == ckpt["num_updates"] > 0
    assert trainer.scheduler.state_dict() == ckpt["scheduler"]
    del trainer

    seen = []
    monkeypatch.setattr(trainer_mod, "_after_epoch", lambda trainer, epoch: seen.append(epoch))
    table = run_finetune(cfg)
    assert seen == [1]  # started at the second epoch
    summary = json.loads(cell.summary_path.read_text())
    assert not cell.checkpoint_path.exists()  # finished: only the headless model is kept
    assert summary["resumed_at"] == [1]
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    assert summary["gpu_hours"] == 0 and "CPU" in summary["gpu_hours_note"]
    assert summary["train_wall_s"] > 0
    assert summary["lr_scaled"] == pytest.approx(5e-3 * 4 / 2048)
    row = table.iloc[0]
    assert row["finetuned_model"] == "test_resnet_ft_demo_a2"
    assert 0 <= row["mMP@5"] <= 1 and 0 <= row["val_accuracy"] <= 1
    assert {"test_accuracy", "test_f1_macro", "test_precision_weighted"} <= set(table.columns)
    record = ResultStore().records("finetune")[0]
    assert record.mode == "fine-tuned" and record.classification["accuracy"] >= 0
    assert record.lineage.weights_kind == "checkpoint"
    # the training started from random weights, and the record says so in words
    assert record.lineage.finetune_start == "random" and record.lineage.finetuned_on == "demo"
    assert "from random init" in record.lineage.describe()
    assert set(record.pretrained_metrics) == set(record.metrics)  # baseline on the same data

    # the model is registered in MLflow's registry and its training run is finished
    versions = mlflow.MlflowClient().search_model_versions("name='test_resnet_ft_demo_a2'")
    assert len(versions) == 1
    # logged in the safe graph format (torch.export), so MLflow has no pickle warning to give
    assert not [r for r in caplog.records if "Pickle" in r.getMessage()]
    assert not [r for r in caplog.records if "torch.export failed" in r.getMessage()]
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "val_accuracy" in run.data.metrics

    # headless state dict: no classifier keys; loads by name and by path, and embeds
    state = torch.load(cell.model_path, weights_only=True)
    assert not any(k.startswith("fc.") for k in state)
    image = [__import__("PIL.Image").Image.open(use_tiny.split("test")["path"].iloc[0])]
    by_name = create_embedder("test_resnet_ft_demo_a2")
    assert by_name.weights_used["kind"] == "checkpoint" and by_name.input_size == (3, 32, 32)
    by_path = create_embedder("test_resnet", weights=str(cell.model_path))
    for emb in (by_name, by_path):
        out = emb.embed_pil(image)
        assert out.shape == (1, 96) and torch.isfinite(out).all()
    # a fresh process finds it through the index
    unregister_model("test_resnet_ft_demo_a2")
    assert "test_resnet_ft_demo_a2" in read_finetuned_index(finetuned_index_path())
    assert register_finetuned_models() == ["test_resnet_ft_demo_a2"]
    assert get_model_spec("test_resnet_ft_demo_a2").checkpoint_path == str(cell.model_path)

    # a rerun skips the finished cell
    n_runs = len(mlflow.search_runs(experiment_names=["embbench"]))
    again = run_finetune(cfg)
    assert seen == [1] and len(mlflow.search_runs(experiment_names=["embbench"])) == n_runs
    pd.testing.assert_series_equal(again["mMP@5"], table["mMP@5"])
    assert np.isfinite(again["val_accuracy"]).all()


def test_bf16_autocast_path_runs_on_the_cpu(use_tiny):
    cfg = FinetuneConfig(**{**TINY, "recipe": "A3", "precision": "bf16", "device": "cpu"})
    trainer = make_trainer(cfg, finetune_job(cfg, "test_resnet", "demo"))
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    assert math.isfinite(trainer.train_epoch(0)["train_loss"])


def test_trainer_takes_explicit_settings_not_the_stage_config(use_tiny):
    from embbench.train import FineTuner, TrainJob, TrainSettings
    from embbench.train.recipes import get_recipe, resolve_recipe

    cfg = FinetuneConfig(**{**TINY, "recipe": "A3", "batch_size": 8, "seed": 3})
    cell = finetune_job(cfg, "test_resnet", "demo")
    settings = ft.train_settings(cfg)
    assert isinstance(settings, TrainSettings) and isinstance(cell, TrainJob)
    assert (settings.batch_size, settings.seed, settings.weights) == (8, 3, "random")
    job = TrainJob(
        model="test_resnet",
        dataset="demo",
        cat=use_tiny,
        label="product",
        classes=cell.classes,
        hp=resolve_recipe(get_recipe("A3"), global_batch=8, epochs=1, train_size=32, test_size=32),
        train_hash="x",
        run_dir=cell.run_dir,
    )
    trainer = FineTuner(TrainSettings(weights="random", batch_size=8, num_workers=0), job)
    assert not hasattr(trainer, "cfg") and trainer.settings.batch_size == 8
    assert math.isfinite(trainer.train_epoch(0)["train_loss"])


def test_building_blocks_import_no_stage():
    """embbench.train and embbench.toptune import neither a stage module nor keras eagerly."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    stages = {"embbench.stages", "embbench.cells", "embbench.config"}
    root = Path(__file__).resolve().parent.parent / "embbench"
    for pkg in ("train", "toptune"):
        for path in (root / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                assert not stages & set(names), f"{path.name} imports {stages & set(names)}"
    code = "import sys, embbench.train, embbench.toptune; print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_checkpoint_bytes_do_not_depend_on_the_writing_process(tmp_path, monkeypatch):
    """The sha256 of a checkpoint keys cross-tuned cells: a retried task (another process)
    writing the same weights must write the same bytes."""
    import hashlib
    import os

    import torch

    from embbench.train.checkpointing import atomic_torch_save

    state = {"w": torch.arange(6.0).reshape(2, 3)}
    digests = []
    for pid in (101, 202):
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        path = atomic_torch_save(state, tmp_path / str(pid) / "model.pt")
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.slow
def test_a_resumed_run_reuses_the_model_version_it_registered(tmp_path):
    """A cell retried on another node reopens its MLflow run: registering again must not add
    a second version of the same model."""
    import mlflow

    from embbench.stages._finetune_register import register_in_mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        mlflow.set_experiment("registry")  # not the experiment id an earlier test left active
        with mlflow.start_run() as run:
            first = register_in_mlflow("efficientnet_lite0")
        with mlflow.start_run(run_id=run.info.run_id):  # the retry
            again = register_in_mlflow("efficientnet_lite0")
        assert first is not None and first["version"] in ("1", 1)
        assert again["version"] in ("1", 1)
        versions = mlflow.MlflowClient().search_model_versions("name='efficientnet_lite0'")
        assert len(versions) == 1
    finally:
        mlflow.set_tracking_uri("")
