"""The transfer recipe's parts: LP freezes the backbone, LLRD lr decays layer by layer, batch norm
stays frozen, the best-val-mMP epoch is the one kept, and the lineage names each source.

A tiny timm model (``test_resnet``, random weights) on a tiny demo catalogue, as in
tests/test_finetune.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_finetune import TINY_FINETUNE

import embbench.cells as cells
import embbench.train.trainer as trainer_mod
import embbench.train.transfer as transfer
from embbench.analysis.guide import recommend
from embbench.cli import _params_for
from embbench.records import ResultStore
from embbench.stages.finetune import FinetuneConfig, FinetuneSteps, finetune_job, make_trainer
from embbench.train.recipes import (
    RECIPES,
    TRANSFER,
    TRANSFER_FIELDS,
    RecipeOptionError,
    get_recipe,
    resolve_recipe,
    with_options,
)
from embbench.train.transfer import (
    CosFaceLoss,
    CosineHead,
    best_epoch,
    freeze_batchnorm,
    linear_probe,
    pooled_features,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {**TINY_FINETUNE, "recipe": "transfer"}


def _trainer(**over):
    cfg = FinetuneConfig(**{**TINY, **over})
    return make_trainer(cfg, finetune_job(cfg, "test_resnet", "demo"))


def test_rsb_recipes_resolve_as_before_and_transfer_names_its_sources():
    for name in ("A1", "A2", "A3"):
        hp = resolve_recipe(RECIPES[name], global_batch=512)
        assert not set(TRANSFER_FIELDS) & set(hp), f"{name} carries transfer-only fields"
    hp = resolve_recipe(get_recipe("Transfer"), global_batch=32)
    assert hp["name"] == "transfer" and hp["mixup"] == hp["cutmix"] == 0 and not hp["auto_augment"]
    for choice in ("lp_steps", "layer_decay", "augmentation", "schedule", "freeze_bn", "head"):
        assert choice in hp["sources"] and hp["sources"][choice]
    assert "Kumar" in hp["sources"]["lp_steps"] and "BEiT" in hp["sources"]["layer_decay"]
    with pytest.raises(RecipeOptionError, match="did you mean 'lp_steps'"):
        with_options(TRANSFER, {"lp_step": 0})
    with pytest.raises(ValueError, match="did you mean 'lp_steps'"):
        FinetuneConfig(**{**TINY, "recipe_options": {"lp_step": 0}})
    assert with_options(TRANSFER, {"lp_steps": 0}).lp_steps == 0


def test_transfer_trainer_parts(use_tiny):
    trainer = _trainer(recipe_options={"layer_decay": 0.75})
    assert isinstance(trainer.net.get_classifier(), CosineHead)
    assert isinstance(trainer.criterion, CosFaceLoss) and trainer.mixup is None
    assert type(trainer.optimizer).__name__ == "AdamW"
    # layer-wise decay: the groups' lr scales grow from the stem to the head, which gets 1
    scales = sorted({g["lr_scale"] for g in trainer.optimizer.param_groups})
    assert len(scales) >= 3 and scales[-1] == pytest.approx(1.0)
    assert all(a / b == pytest.approx(0.75) for a, b in zip(scales, scales[1:], strict=False))
    head_ids = {id(p) for p in trainer.net.get_classifier().parameters()}
    for g in trainer.optimizer.param_groups:
        if any(id(p) in head_ids for p in g["params"]):
            assert g["lr_scale"] == pytest.approx(1.0)
    trainer.scheduler.step_update(trainer.updates_per_epoch)
    lrs = {g["lr_scale"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert [lrs[s] for s in scales] == sorted(lrs.values())  # the lr itself decays too
    # without layer decay: one lr for all
    flat = _trainer(recipe_options={"head": "linear"})  # the recipe's default: no decay
    assert {g.get("lr_scale", 1.0) for g in flat.optimizer.param_groups} == {1.0}
    assert isinstance(flat.criterion, torch.nn.CrossEntropyLoss)


def test_batchnorm_stays_frozen_while_training(use_tiny):
    trainer = _trainer()
    bns = [m for m in trainer.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    trainer.train_epoch(0)
    assert all(not m.training for m in bns)
    for m, (mean, var) in zip(bns, stats, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    thawed = _trainer(recipe_options={"freeze_bn": False})
    before = [
        m.running_mean.clone() for m in thawed.net.modules() if isinstance(m, torch.nn.BatchNorm2d)
    ]
    thawed.train_epoch(0)
    after = [m.running_mean for m in thawed.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert freeze_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.ReLU())) == 1


def test_linear_probe_trains_the_head_only(use_tiny):
    trainer = _trainer()
    net = trainer.net
    head = net.get_classifier()
    backbone = {n: p.detach().clone() for n, p in net.named_parameters() if "fc" not in n}
    assert len(backbone) < len(list(net.parameters()))
    head_before = head.weight.detach().clone()
    feats, ok = pooled_features(
        net,
        trainer.train_paths,
        trainer.eval_transform,
        device=trainer.dev,
        batch_size=8,
        num_workers=0,
    )
    targets = torch.as_tensor([trainer.train_set.targets[i] for i in ok])
    out = linear_probe(
        net, feats, targets, trainer.criterion, steps=60, lr=0.05, weight_decay=0.0, seed=0
    )
    assert out["lp_loss_last"] < out["lp_loss_first"]
    assert not torch.equal(head.weight, head_before)
    for n, p in net.named_parameters():
        if n in backbone:
            assert torch.equal(p, backbone[n]), f"the probe changed backbone parameter {n}"


def test_best_epoch_rule():
    hist = [
        {"epoch": 0, "val_mMP@5": 0.5, "val_mR@1": 0.6},
        {"epoch": 1, "val_mMP@5": 0.7, "val_mR@1": 0.6},
        {"epoch": 2, "val_mMP@5": 0.7, "val_mR@1": 0.8},  # tie on mMP@5: mR@1 decides
        {"epoch": 3, "val_mMP@5": 0.6, "val_mR@1": 0.9},
        {"epoch": 4, "train_loss": 0.1},  # no validation this epoch
    ]
    assert best_epoch(hist, 5)["epoch"] == 2
    assert best_epoch(hist[:2], 5)["epoch"] == 1
    assert best_epoch([{"epoch": 0}], 5) is None


def test_fit_keeps_the_best_validation_epoch(use_tiny, monkeypatch):
    """Validation scores 0.3, 0.9, 0.4: epoch 1's weights are the ones saved and recorded."""
    scores = iter([0.2, 0.3, 0.9, 0.4])  # the start (before training), then epochs 0, 1, 2
    snapshots = {}

    def fake_retrieval(trainer, split):
        return {"val_mMP@5": next(scores), "val_mR@1": 0.5}

    def snapshot(trainer, epoch):
        snapshots[epoch] = {k: v.clone() for k, v in trainer.net.state_dict().items()}

    monkeypatch.setattr(trainer_mod, "epoch_retrieval", fake_retrieval)
    monkeypatch.setattr(trainer_mod, "before_training", _before_with(fake_retrieval))
    monkeypatch.setattr(trainer_mod, "_after_epoch", snapshot)
    trainer = _trainer(epochs=3, experiment="")
    summary = trainer.fit()
    assert summary["selection"]["epoch"] == 1
    assert summary["selection"]["val_mMP@5"] == pytest.approx(0.9)
    assert summary["selection"]["start"]["val_mMP@5"] == pytest.approx(0.2)
    assert [h.get("val_mMP@5") for h in summary["history"]] == [0.3, 0.9, 0.4]
    saved = torch.load(trainer.job.model_path, weights_only=True)
    for k, v in saved.items():
        assert torch.equal(v, snapshots[1][k]), f"{k} is not epoch 1's"
    assert any(not torch.equal(saved[k], snapshots[2][k]) for k in saved)
    start = json.loads((trainer.job.run_dir / "pretrained_val.json").read_text())
    assert start["val_mMP@5"] == pytest.approx(0.2) and "lp_loss_last" in start


def _before_with(retrieval):
    """``before_training`` with the validation retrieval replaced (the probe still runs)."""

    def before(trainer, split):
        real = transfer.epoch_retrieval
        transfer.epoch_retrieval = retrieval
        try:
            return transfer.before_training(trainer, split)
        finally:
            transfer.epoch_retrieval = real

    return before


@pytest.mark.slow
def test_lineage_carries_the_recipe_and_its_sources(use_tiny):
    cfg = FinetuneConfig(**{**TINY, "epochs": 1})
    (record,) = cells.run_grid(cfg, FinetuneSteps(cfg), store=ResultStore())
    lin = record.lineage
    assert lin.finetune_recipe == "transfer"
    assert lin.finetune_hp["head"] == "cosine" and lin.finetune_hp["lp_steps"] == TRANSFER.lp_steps
    assert set(lin.finetune_hp["sources"]) == set(TRANSFER.sources)
    assert record.details["selection"]["epoch"] == 0
    assert "val_mMP@5" in record.details["selection"]["start"]


def test_guide_recommends_tuning_only_where_the_cis_show_it_pays():
    def row(strategy, order, score, low, high):
        return {"strategy": strategy, "_order": order, "score": score, "low": low, "high": high}

    pre = row("pretrained", 0, 0.60, 0.55, 0.65)
    overlapping = row("fine-tuned", 2, 0.63, 0.58, 0.68)
    assert recommend([overlapping, pre])["strategy"] == "pretrained"
    clear = row("fine-tuned", 2, 0.75, 0.70, 0.80)
    assert recommend([pre, clear])["strategy"] == "fine-tuned"
    # a top-tuned pick that the fine-tuned one does not clearly beat stays the pick
    top = row("top-tuned", 1, 0.72, 0.67, 0.77)
    assert recommend([pre, top, clear])["strategy"] == "top-tuned"
    nan = float("nan")  # no CIs (accuracy): the higher score wins
    acc = [row("top-tuned", 1, 0.8, nan, nan), row("fine-tuned", 2, 0.81, nan, nan)]
    assert recommend(acc)["strategy"] == "fine-tuned"


def test_the_demo_runs_stage_02_with_the_small_catalogue_params():
    root = Path(__file__).resolve().parents[1]
    files = _params_for("02_finetune", root, [], demo=True)
    names = [f.relative_to(root).as_posix() for f in files]
    assert names == [
        "params/02_finetune.yaml",
        "params/small/02_finetune.yaml",
        "params/demo/02_finetune.yaml",
    ]
    assert len(_params_for("01_embed", root, [], demo=True)) == 2  # no params/small/01_embed
    cfg = FinetuneConfig.from_files(*files)
    assert cfg.recipe == "transfer" and cfg.lr == 0  # the recipe's lr: nothing tuned to the demo
    assert cfg.models == ["efficientnet_lite0", "efficientnet_lite0_random"]


def test_eval_every_is_part_of_a_selecting_trainings_hash(use_tiny):
    def train_hash(**over):
        cfg = FinetuneConfig(**{**TINY, **over})
        return finetune_job(cfg, "test_resnet", "demo").train_hash

    # the epochs validated are the epochs that can be kept: they change the weights
    assert train_hash(eval_every=1) != train_hash(eval_every=2)
    assert train_hash(recipe="A3", eval_every=1) == train_hash(recipe="A3", eval_every=2)
    assert train_hash(recipe_options={"lp_steps": 0}) != train_hash()
    assert train_hash(recipe_options={"sources": {}}) == train_hash()  # citations: no retraining
