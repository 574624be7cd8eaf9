"""The ResNet-strikes-back training procedures A1, A2 and A3 as data, with the paper's changes.

Values follow timm's own RSB hyper-parameter files and the RSB paper (Wightman, Touvron and
Jegou 2021, table 1), as ported by timm and mmpretrain; :data:`RECIPES` below lists them. The
e-commerce paper changed two things, and so do these recipes:

- cross-entropy instead of RSB's binary cross-entropy (soft-target cross-entropy under
  mixup/cutmix, timm ``SoftTargetCrossEntropy``);
- no stochastic depth (``drop_path_rate=0``; RSB used 0.05 for A1 and A2).

:data:`TRANSFER` (``recipe: transfer``) is not the paper's: a recipe for small catalogues (a few
thousand images, one GPU or a CPU) that RSB's from-scratch procedures do not serve; each of its
choices and its source is in :data:`TRANSFER_SOURCES`, which records carry in their lineage.

Every recipe was tuned for a global batch of 2048 images. When the global batch differs, the
learning rate is scaled explicitly (:func:`scale_lr`, linear rule by default) and the scaled
value is what the optimizer gets and what is logged.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from embbench._errors import UserError

LR_SCALING = ("linear", "sqrt", "none")


class RecipeOptionError(UserError, ValueError):
    """``recipe_options`` names a field the recipes do not have."""


@dataclass(frozen=True)
class Recipe:
    """One training procedure.

    Attributes:
        name: ``A1``, ``A2`` or ``A3``.
        epochs: Training epochs.
        lr: Peak learning rate at ``batch_size``.
        batch_size: Global batch the learning rate was tuned for.
        weight_decay: Decoupled weight decay (not applied to biases and norm parameters).
        opt: timm optimizer name (``create_optimizer_v2``).
        sched: timm scheduler name (``create_scheduler_v2``).
        warmup_epochs: Linear warm-up epochs.
        warmup_lr: Learning rate at the start of the warm-up.
        min_lr: Floor of the cosine decay.
        auto_augment: timm RandAugment string (``create_transform(auto_augment=...)``).
        mixup: Mixup alpha (0 = off).
        cutmix: CutMix alpha (0 = off).
        mixup_prob: Probability of mixing a batch.
        mixup_switch_prob: Probability of CutMix instead of mixup when both are on.
        smoothing: Label smoothing.
        aug_repeats: Repeated augmentation (timm ``RepeatAugSampler``): copies of each image
            per epoch, 0 = off.
        train_size: Training resolution (random-resized-crop side).
        test_size: Evaluation resolution.
        test_crop_pct: Centre-crop fraction at evaluation.
        hflip: Horizontal flip probability.
        train_interpolation: Resize interpolation of the training crops (timm's training
            default ``random``: bilinear or bicubic per image).
        re_prob: Random-erasing probability.
        drop_path_rate: Stochastic depth (the paper: none).
        loss: ``ce`` (the paper) instead of RSB's ``bce``.
        crop_scale: Area range of the random-resized crop (timm's default ``(0.08, 1)``).
        lp_steps: Linear probe before fine-tuning (LP-FT): full-batch optimizer steps of the
            head alone on the frozen backbone's features (0 = no probe, the head starts random).
        lp_lr: Learning rate of the probe (AdamW).
        layer_decay: Layer-wise learning-rate decay (timm ``param_groups_layer_decay``): the
            head gets ``lr``, each earlier layer group ``layer_decay`` times the next one's
            (0 = off, all parameters get ``lr``).
        freeze_bn: Batch-norm layers of the backbone stay in eval mode while training (their
            ImageNet running statistics are used and not updated; their affine weights train).
        head: ``linear`` (timm's classifier) or ``cosine`` (normalised features and class
            weights, logits ``head_scale`` x cosine; with ``head_margin`` > 0 the CosFace loss).
        head_scale: Scale of the cosine head's logits.
        head_margin: CosFace additive margin subtracted from the target cosine while training.
        select: ``last`` (the final epoch's weights) or ``val_retrieval`` (the epoch with the
            best validation mMP@k, ties by mR@1, is the one kept).
        changed_from_rsb: What differs from the original RSB procedure, and why.
        sources: Where each choice of a non-RSB recipe comes from (recorded in the lineage).
    """

    name: str
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int = 2048
    opt: str = "lamb"
    sched: str = "cosine"
    warmup_epochs: float = 5
    warmup_lr: float = 1e-4
    min_lr: float = 1e-6
    auto_augment: str = "rand-m7-mstd0.5-inc1"
    mixup: float = 0.1
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.0
    aug_repeats: int = 3
    train_size: int = 224
    test_size: int = 224
    test_crop_pct: float = 0.95
    hflip: float = 0.5
    train_interpolation: str = "random"
    re_prob: float = 0.0
    drop_path_rate: float = 0.0
    loss: str = "ce"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    lp_steps: int = 0
    lp_lr: float = 0.0
    layer_decay: float = 0.0
    freeze_bn: bool = False
    head: str = "linear"
    head_scale: float = 0.0
    head_margin: float = 0.0
    select: str = "last"
    changed_from_rsb: dict[str, str] = field(default_factory=dict, hash=False)
    sources: dict[str, str] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (for logs, hashes and records).

        The transfer-only fields (:data:`TRANSFER_FIELDS`) are left out while they hold their
        defaults, so A1/A2/A3 resolve (and hash) exactly as before those fields existed.
        """
        out = dataclasses.asdict(self)
        for name in TRANSFER_FIELDS:
            if out[name] == _DEFAULTS[name]:
                del out[name]
        if "crop_scale" in out:
            out["crop_scale"] = list(out["crop_scale"])
        return out


TRANSFER_FIELDS = (
    "crop_scale",
    "lp_steps",
    "lp_lr",
    "layer_decay",
    "freeze_bn",
    "head",
    "head_scale",
    "head_margin",
    "select",
    "sources",
)
_DEFAULTS = {
    f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
    for f in dataclasses.fields(Recipe)
    if f.name in TRANSFER_FIELDS
}


_PAPER_CHANGES = {
    "loss": "cross-entropy instead of BCE (target threshold 0.2)",
    "drop_path_rate": "no stochastic depth",
}


def _rsb_long(name: str, *, epochs: int, weight_decay: float, mixup: float) -> Recipe:
    """RSB A1 / A2: the long schedules, lr 5e-3 at batch 2048, no stochastic depth here."""
    return Recipe(
        name=name,
        epochs=epochs,
        lr=5e-3,
        weight_decay=weight_decay,
        mixup=mixup,
        changed_from_rsb={**_PAPER_CHANGES, "drop_path_rate": f"RSB {name}: 0.05; here 0"},
    )


RECIPES: dict[str, Recipe] = {
    "A1": _rsb_long("A1", epochs=600, weight_decay=0.01, mixup=0.2),
    "A2": _rsb_long("A2", epochs=300, weight_decay=0.02, mixup=0.1),
    "A3": Recipe(
        name="A3",
        epochs=100,
        lr=8e-3,
        weight_decay=0.02,
        auto_augment="rand-m6-mstd0.5-inc1",
        mixup=0.1,
        aug_repeats=0,
        train_size=160,
        test_size=224,
        changed_from_rsb=dict(_PAPER_CHANGES),
    ),
}


TRANSFER_SOURCES = {
    "lp_steps": "LP-FT: Kumar et al. 2022, Fine-Tuning can Distort Pretrained Features and "
    "Underperform Out-of-Distribution (ICLR): train the head on frozen features first, then "
    "fine-tune everything",
    "layer_decay": "layer-wise lr decay: Clark et al. 2020 (ELECTRA), Bao et al. 2022 (BEiT); "
    "timm param_groups_layer_decay. Off by default: on the emoji set's validation split "
    "(benchmarks/bench_transfer.py, Lite0, 5 epochs) best val mMP@5 was 0.681 at decay 0.75, "
    "0.744 at 0.9 and 0.778 off (timm groups EfficientNet per block, ~17 groups, so 0.75 all "
    "but freezes the stem)",
    "augmentation": "light augmentation (random-resized crop, flip, colour jitter; no "
    "RandAugment, mixup, CutMix or repeated augmentation): Kornblith et al. 2019, Do Better "
    "ImageNet Models Transfer Better? (fine-tuning with crop and flip only)",
    "schedule": "AdamW (Loshchilov and Hutter 2019), linear warm-up then cosine decay over the "
    "run's real number of optimizer steps (timm create_scheduler_v2, per-update)",
    "freeze_bn": "batch norm in eval mode at small batch: Ioffe 2017, Batch Renormalization "
    "(small minibatches make BN statistics unreliable); Kornblith et al. 2019 (frozen BN "
    "statistics when fine-tuning)",
    "head": "normalised-softmax proxy head with a CosFace margin: Zhai and Wu 2019, "
    "Classification is a Strong Baseline for Deep Metric Learning (BMVC); Wang et al. 2018, "
    "CosFace (CVPR)",
    "select": "model selection on the validation split's retrieval metric (mMP@k, then mR@1), "
    "as deep-metric-learning evaluations select checkpoints: Musgrave et al. 2020, A Metric "
    "Learning Reality Check (ECCV)",
}

# Small catalogues: a few thousand images, a CPU or one GPU, tens of epochs at most.
TRANSFER = Recipe(
    name="transfer",
    epochs=10,
    lr=1e-3,
    batch_size=64,
    weight_decay=0.05,
    opt="adamw",
    warmup_epochs=1,
    warmup_lr=1e-5,
    min_lr=1e-6,
    auto_augment="",
    mixup=0.0,
    cutmix=0.0,
    mixup_prob=0.0,
    aug_repeats=0,
    train_size=224,
    test_size=224,
    crop_scale=(0.25, 1.0),
    lp_steps=300,
    lp_lr=1e-2,
    layer_decay=0.0,  # measured: see TRANSFER_SOURCES["layer_decay"]
    freeze_bn=True,
    head="cosine",
    head_scale=16.0,
    head_margin=0.1,
    select="val_retrieval",
    changed_from_rsb={
        "purpose": "transfer to a small catalogue, not ImageNet training from scratch",
        "opt": "AdamW 1e-3 at batch 64 instead of LAMB 5e-3 at 2048",
        "augmentation": "no RandAugment, mixup, CutMix or repeated augmentation",
    },
    sources=dict(TRANSFER_SOURCES),
)


def get_recipe(name: str) -> Recipe:
    """The recipe ``name`` (case-insensitive); raise naming the recipes that exist."""
    key = str(name).upper()
    if key == TRANSFER.name.upper():
        return TRANSFER
    if key not in RECIPES:
        raise ValueError(
            f"unknown recipe {name!r}; choose one of {[*sorted(RECIPES), TRANSFER.name]}"
        )
    return RECIPES[key]


def with_options(recipe: Recipe, options: dict[str, Any]) -> Recipe:
    """``recipe`` with some fields changed (e.g. an ablation: ``{"lp_steps": 0}``).

    Raises:
        RecipeOptionError: A name is not a field of :class:`Recipe` (did-you-mean in the text).
    """
    if not options:
        return recipe
    names = [f.name for f in dataclasses.fields(Recipe) if f.name != "name"]
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeOptionError(
                f"recipe_options: {key!r} is not a recipe field{hint} (fields: {names})"
            )
    values = dict(options)
    if "crop_scale" in values:
        values["crop_scale"] = tuple(values["crop_scale"])
    return dataclasses.replace(recipe, **values)


def scale_lr(lr: float, global_batch: int, reference_batch: int, rule: str = "linear") -> float:
    """Scale a learning rate tuned at ``reference_batch`` to ``global_batch``.

    Args:
        lr: The learning rate at the reference batch.
        global_batch: Images per optimizer step over all processes (and accumulation steps).
        reference_batch: The batch ``lr`` was tuned for.
        rule: ``linear`` (Goyal et al.: lr * B / B_ref), ``sqrt`` (lr * sqrt(B / B_ref), timm's
            default for adaptive optimizers such as LAMB) or ``none``.

    Returns:
        The learning rate to use.
    """
    if global_batch <= 0 or reference_batch <= 0:
        raise ValueError(
            f"global_batch={global_batch} and reference_batch={reference_batch} must be positive"
        )
    if rule == "none":
        return float(lr)
    ratio = global_batch / reference_batch
    if rule == "linear":
        return float(lr * ratio)
    if rule == "sqrt":
        return float(lr * math.sqrt(ratio))
    raise ValueError(f"lr scaling rule {rule!r} is not one of {LR_SCALING}")


def resolve_recipe(
    recipe: Recipe,
    *,
    global_batch: int,
    epochs: int = 0,
    lr: float = 0.0,
    reference_batch: int = 0,
    lr_scaling: str = "linear",
    train_size: int = 0,
    test_size: int = 0,
) -> dict[str, Any]:
    """The recipe's values with the run's overrides applied and the learning rate scaled.

    Args:
        recipe: The procedure.
        global_batch: Images per optimizer step over all processes.
        epochs: Override of the epochs (0 = the recipe's). A shorter run keeps the recipe's
            share of warm-up epochs (5 of 300 epochs -> 1/60 of the run).
        lr: Override of the learning rate at ``reference_batch`` (0 = the recipe's).
        reference_batch: Batch the learning rate refers to (0 = the recipe's, 2048).
        lr_scaling: ``linear``, ``sqrt`` or ``none``.
        train_size: Override of the training resolution (0 = the recipe's).
        test_size: Override of the evaluation resolution (0 = the recipe's).

    Returns:
        Every value the trainer uses: the recipe's fields plus ``lr_base``,
        ``reference_batch``, ``global_batch``, ``lr_scaling`` and the scaled ``lr``.
    """
    out = recipe.to_dict()
    n_epochs = int(epochs or recipe.epochs)
    warmup = float(recipe.warmup_epochs)
    if n_epochs < recipe.epochs:
        warmup = recipe.warmup_epochs * n_epochs / recipe.epochs
    ref = int(reference_batch or recipe.batch_size)
    base = float(lr or recipe.lr)
    out.update(
        epochs=n_epochs,
        warmup_epochs=warmup,
        lr_base=base,
        reference_batch=ref,
        global_batch=int(global_batch),
        lr_scaling=lr_scaling,
        lr=scale_lr(base, global_batch, ref, lr_scaling),
        train_size=int(train_size or recipe.train_size),
        test_size=int(test_size or recipe.test_size),
    )
    return out


__all__ = [
    "LR_SCALING",
    "RECIPES",
    "TRANSFER",
    "TRANSFER_FIELDS",
    "TRANSFER_SOURCES",
    "Recipe",
    "RecipeOptionError",
    "get_recipe",
    "resolve_recipe",
    "scale_lr",
    "with_options",
]
