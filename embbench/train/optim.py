"""The recipe's training objects: loss (with mixup/CutMix), optimizer and LR schedule.

Built from timm's own parts: ``Mixup`` (mixup and CutMix, soft targets), the matching
cross-entropy, ``create_optimizer_v2`` (no weight decay on biases and norms) and
``create_scheduler_v2`` (warm-up then the recipe's schedule, stepped per update).
"""

from __future__ import annotations

from typing import Any

import torch

from embbench.train.transfer import CosFaceLoss

__all__ = ["build_loss", "build_optimizer"]


def build_loss(hp: dict[str, Any], n_classes: int) -> tuple[Any, torch.nn.Module]:
    """The batch mixer (``None`` without mixup/CutMix) and the matching loss.

    Args:
        hp: The resolved recipe (``mixup``, ``cutmix``, ``mixup_prob``, ``mixup_switch_prob``,
            ``smoothing``; a ``cosine`` head with ``head_margin`` > 0 gets the CosFace loss).
        n_classes: Classes of the head.
    """
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if hp["mixup"] > 0 or hp["cutmix"] > 0:
        mixup = Mixup(
            mixup_alpha=hp["mixup"],
            cutmix_alpha=hp["cutmix"],
            prob=hp["mixup_prob"],
            switch_prob=hp["mixup_switch_prob"],
            mode="batch",
            label_smoothing=hp["smoothing"],
            num_classes=n_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if hp.get("head") == "cosine" and hp.get("head_margin", 0) > 0:
        return None, CosFaceLoss(hp["head_scale"], hp["head_margin"])
    if hp["smoothing"] > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=hp["smoothing"])
    return None, torch.nn.CrossEntropyLoss()


def build_optimizer(
    net: torch.nn.Module, hp: dict[str, Any], updates_per_epoch: int
) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer of ``net``'s parameters and its LR scheduler (stepped per update).

    Args:
        net: The bare network (not a DDP wrapper).
        hp: The resolved recipe (``opt``, ``lr``, ``weight_decay``, ``sched``, ``epochs``,
            ``warmup_epochs``, ``warmup_lr``, ``min_lr``; ``layer_decay`` > 0: timm's
            layer-wise decay groups, each scaled by its ``lr_scale``, which the scheduler keeps).
        updates_per_epoch: Optimizer steps per epoch (after gradient accumulation).
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(
        net,
        opt=hp["opt"],
        lr=hp["lr"],
        weight_decay=hp["weight_decay"],
        filter_bias_and_bn=True,
        layer_decay=hp.get("layer_decay") or None,
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=hp["sched"],
        num_epochs=hp["epochs"],
        warmup_epochs=hp["warmup_epochs"],
        warmup_lr=hp["warmup_lr"],
        min_lr=hp["min_lr"],
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return optimizer, scheduler
