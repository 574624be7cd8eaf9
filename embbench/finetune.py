"""Stage 02 (notebook ``02_finetune``): full fine-tuning with the ResNet-strikes-back recipes.

For every (model, dataset) cell: train an ImageNet-initialised timm model on the dataset's
training split with recipe A1, A2 (the paper's choice) or A3 (:mod:`embbench._recipes`), built
from timm's own parts: ``create_optimizer_v2`` (LAMB, no weight decay on biases and norms),
``create_scheduler_v2`` (cosine with linear warm-up, stepped per update), ``Mixup`` (mixup and
CutMix), ``create_transform`` (random-resized crop, flip, RandAugment) and ``RepeatAugSampler``
(repeated augmentation), with the paper's two changes: cross-entropy (soft-target under mixup)
instead of BCE, and no stochastic depth.

- The learning rate is scaled to the global batch (``batch_size`` x processes x ``grad_accum``)
  from the recipe's reference batch (2048) by the linear rule; the scaled value is logged.
- CUDA: bf16/fp16 autocast (a GradScaler for fp16), channels_last, pinned memory. Several GPUs
  and nodes: ``torchrun --nproc_per_node=N -m embbench.finetune -f params/02_finetune.yaml``
  (DDP, one process per GPU, samplers split by rank).
- A checkpoint (model, optimizer, scheduler, scaler, epoch, RNG states) is written atomically
  every ``checkpoint_every`` epochs under ``runs_dir()/finetune/<model>/<dataset>/<hash>/``; a
  killed run started again with the same parameters resumes from it. It is deleted once the
  training has finished (``summary.json`` written).
- Recorded (the paper's table 2): validation accuracy, the classification metrics of the test
  split (accuracy; precision, recall, F1 macro and weighted; the confusion matrix as an
  artifact), training wall time and GPU-hours (0 on the CPU, and the record says so).
- The trained model with its classification head removed (timm ``reset_classifier(0)``) is
  saved as a state dict, logged to MLflow (and registered in its model registry when the
  tracking store has one), registered as a model named ``<model>_ft_<dataset>_<recipe>`` usable
  in ``01_embed`` (by name, and by path as ``weights``), and listed in
  ``runs_dir()/finetuned_models.json`` so later processes find it
  (:func:`register_finetuned_models`). Its embeddings are then scored exactly like stage 01's
  (mode ``fine-tuned``).

Images that cannot be decoded are skipped and listed in the run's summary, never fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from embbench._recipes import get_recipe, resolve_recipe
from embbench._utils import atomic_write_json, stable_hash
from embbench.config import StageConfig, register_stage
from embbench.models.finetuned import (
    find_finetuned,
    finetuned_index_path,
    finetuned_name,
    read_finetuned_index,
    register_finetuned,
    register_finetuned_models,
)
from embbench.paths import runs_dir
from embbench.results import ResultStore

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_FINETUNABLE_SOURCES = ("timm", "torch.hub", "checkpoint")
CLASSIFICATION_KEYS = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
)


class FinetuneError(RuntimeError):
    """Fine-tuning cannot run as configured; the message names the cause and the fix."""


@register_stage("02_finetune")
class FinetuneConfig(StageConfig):
    """Parameters of stage 02, mirrored by ``notebooks/02_finetune.ipynb`` and its params file."""

    models: list[str] = Field(default_factory=lambda: ["resnet50"])  # timm-based registry names
    weights: str = "pretrained"  # start from: pretrained | random | auto | checkpoint path
    datasets: list[str] = Field(default_factory=lambda: ["demo"])  # dataset registry names
    data_root: dict[str, str] = Field(default_factory=dict)  # dataset -> folder
    label: str = ""  # classification and relevance label; "" = the dataset's default
    protocol: Literal["", "within", "cross"] = ""  # retrieval protocol; "" = dataset default
    k: int = Field(5, ge=1, le=100)  # cut-off of the @k retrieval metrics
    max_images: int = Field(0, ge=0)  # per split, 0 = all (seeded, class-preserving)
    recipe: Literal["A1", "A2", "A3"] = "A2"  # ResNet-strikes-back procedure (paper: A2)
    epochs: int = Field(0, ge=0)  # 0 = the recipe's (A1 600, A2 300, A3 100)
    lr: float = Field(0.0, ge=0)  # lr at lr_reference_batch; 0 = the recipe's
    lr_reference_batch: int = Field(0, ge=0)  # batch the lr refers to; 0 = recipe's (2048)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"  # lr rule for other batches
    train_size: int = Field(0, ge=0)  # training crop side; 0 = the recipe's (224, A3 160)
    test_size: int = Field(0, ge=0)  # evaluation side; 0 = the recipe's (224)
    batch_size: int = Field(128, ge=1)  # images per step per GPU (paper: 4 GPUs x 128)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    num_workers: int = Field(8, ge=0)  # DataLoader decoding/augmentation processes
    device: str = "auto"  # auto | cpu | cuda | cuda:N (torchrun: one GPU per process)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast dtype on CUDA
    eval_every: int = Field(1, ge=0)  # epochs between validation passes; 0 = only at the end
    checkpoint_every: int = Field(1, ge=1)  # epochs between resumable checkpoints
    resume: bool = True  # continue a killed run from its last checkpoint
    register_mlflow: bool = True  # log the headless model to MLflow's model registry
    backend: Literal["milvus", "exact"] = "milvus"  # retrieval backend
    milvus_uri: str = ""  # "" = Milvus Lite file runs/milvus.db; or http://host:19530
    tracking_uri: str = ""  # "" = sqlite runs/mlflow.db (or $MLFLOW_TRACKING_URI)
    experiment: str = "embbench"  # MLflow experiment name
    overwrite: Literal["never", "always"] = "never"  # retrain and rescore finished cells?
    seed: int = 0  # subsampling, initialisation and augmentation seed

    hash_exclude = frozenset(
        {
            "models",
            "datasets",
            "data_root",
            "num_workers",
            "device",
            "eval_every",
            "checkpoint_every",
            "resume",
            "register_mlflow",
            "backend",
            "milvus_uri",
            "tracking_uri",
            "experiment",
            "overwrite",
        }
    )

    @field_validator("models", "datasets")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one entry")
        return v


# Fields that change the trained weights (the training hash); k, protocol and backend change
# only the retrieval evaluation and so only the record's hash.
TRAIN_FIELDS = (
    "weights",
    "label",
    "max_images",
    "recipe",
    "epochs",
    "lr",
    "lr_reference_batch",
    "lr_scaling",
    "train_size",
    "test_size",
    "batch_size",
    "grad_accum",
    "precision",
    "seed",
)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


# ------------------------------------------------------------------------------------- data
class TrainImages:
    """Catalogue rows -> (augmented tensor, class index); a bad image yields its reason.

    Args:
        paths: Image files.
        targets: Class index per image.
        transform: timm transform (training or evaluation).
    """

    def __init__(self, paths: list[str], targets: list[int], transform) -> None:
        self.paths = paths
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from embbench.images import BadImageError, load_rgb

        try:
            return self.transform(load_rgb(self.paths[i])), self.targets[i], i, None
        except BadImageError as exc:
            return None, self.targets[i], i, exc.reason
        except Exception as exc:  # an odd image breaking a transform must not stop training
            return None, self.targets[i], i, f"{type(exc).__name__}: {exc}"


def _collate(batch):
    import torch

    ok = [b for b in batch if b[3] is None]
    bad = [(b[2], b[3]) for b in batch if b[3] is not None]
    if not ok:
        return None, None, [], bad
    x = torch.stack([b[0] for b in ok])
    y = torch.tensor([b[1] for b in ok], dtype=torch.long)
    return x, y, [b[2] for b in ok], bad


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker (timm's RandAugment draws from both)."""
    import torch

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ------------------------------------------------------------------------------------ model
def build_trainable(
    model: str, weights: str, num_classes: int, sizes: tuple[int, ...], seed: int = 0
) -> tuple[Any, Any, dict[str, Any]]:
    """A timm model from the zoo with its weights and a new ``num_classes`` head.

    The backbone and its weights come from :func:`embbench.models.create_embedder` (same
    ``weights`` semantics as stage 01); the head is timm's ``reset_classifier``. ViT-like models
    whose position embeddings are fixed to another resolution than ``sizes`` are rebuilt with
    timm's ``dynamic_img_size=True`` (same parameters, interpolated position embeddings).

    Args:
        model: Registry name (a timm, torch.hub-with-arch or fine-tuned checkpoint entry) or
            ``timm:<arch>[.<tag>]``.
        weights: ``pretrained``, ``random``, ``auto`` or a checkpoint path.
        num_classes: Classes of the new head.
        sizes: Input sides the model must accept (training and evaluation).
        seed: Seed of the head's initialisation.

    Returns:
        ``(module, embedder, extra_model_kwargs)``: the trainable module (train mode), the
        embedder it came from (spec, weights used, data config) and the constructor arguments
        added here (to rebuild it for embedding).

    Raises:
        FinetuneError: The model is not a timm model, or cannot run at ``sizes``.
    """
    import torch

    from embbench.models import create_embedder, get_model_spec

    spec = get_model_spec(model)
    if spec.source not in _FINETUNABLE_SOURCES or (
        spec.source == "checkpoint" and spec.identifier.startswith("open_clip:")
    ):
        raise FinetuneError(
            f"model {model!r} ({spec.source} {spec.identifier}) is not a timm model; full "
            "fine-tuning with the RSB recipes supports timm architectures (the paper fine-tuned "
            "ResNet50, ConvNeXt-B, ViT-B/16 and ViT-L/32). Fix: pick a timm model from "
            "embbench.models.list_models(source='timm') or 'timm:<arch>'."
        )
    emb = create_embedder(model, weights=weights, device="cpu")
    net = emb.model
    if not hasattr(net, "reset_classifier"):
        raise FinetuneError(f"model {model!r} has no timm reset_classifier(); cannot add a head")
    extra: dict[str, Any] = {}
    grid = getattr(getattr(net, "patch_embed", None), "img_size", None)
    if getattr(net, "dynamic_img_size", None) is False and grid is not None:
        native = int(grid[0]) if isinstance(grid, list | tuple) else int(grid)
        if any(s != native for s in sizes):
            import timm

            arch = _timm_arch(spec)
            kwargs = {**dict(spec.model_kwargs), "dynamic_img_size": True}
            rebuilt = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
            rebuilt.load_state_dict(net.state_dict())
            net, extra = rebuilt, {"dynamic_img_size": True}
            logger.info(
                "%s: position embeddings are for %d px; rebuilt with dynamic_img_size=True "
                "to train/evaluate at %s px",
                model,
                native,
                sorted(set(sizes)),
            )
    if float(dict(spec.model_kwargs).get("drop_path_rate", 0.0) or 0.0) > 0:
        logger.warning(
            "%s: its model_kwargs set drop_path_rate; the paper trains without stochastic depth",
            model,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net.reset_classifier(num_classes)
    net.train()
    for side in sorted(set(sizes)):
        try:
            with torch.no_grad():
                net.eval()
                out = net(torch.zeros(2, *emb.input_size[:1], side, side))
            net.train()
        except Exception as exc:
            raise FinetuneError(
                f"model {model!r} cannot run at {side} px ({type(exc).__name__}: {exc}). Fix: "
                f"set train_size/test_size to a side it accepts (its default is "
                f"{emb.input_size[1]} px)."
            ) from exc
        if tuple(out.shape) != (2, num_classes):
            raise FinetuneError(
                f"model {model!r}: the new head gives {tuple(out.shape)}, expected "
                f"(2, {num_classes})"
            )
    return net, emb, extra


def _timm_arch(spec) -> str:
    if spec.source == "timm":
        return spec.identifier
    if spec.source == "torch.hub" and spec.arch:
        return spec.arch
    return spec.identifier.removeprefix("timm:")


# ------------------------------------------------------------------------------ cell set-up
@dataclass
class CellPlan:
    """Everything one (model, dataset) training needs before any model is built.

    Attributes:
        model: Model registry name.
        dataset: Dataset name.
        cat: The (subsampled) catalogue.
        plan: Retrieval plan (label, protocol, query/index splits).
        classes: Class names of the training split (the head's order).
        hp: The resolved recipe (:func:`embbench._recipes.resolve_recipe`).
        train_hash: Hash of everything that changes the trained weights.
        run_dir: Folder of checkpoints, the headless model and the summary.
        world_size: Training processes.
    """

    model: str
    dataset: str
    cat: Any
    plan: dict
    classes: list[str]
    hp: dict
    train_hash: str
    run_dir: Path
    world_size: int = 1

    @property
    def summary_path(self) -> Path:
        """``summary.json``: written last, it marks a finished training."""
        return self.run_dir / "summary.json"

    @property
    def checkpoint_path(self) -> Path:
        """``last.pt``: the resumable checkpoint."""
        return self.run_dir / "last.pt"

    @property
    def model_path(self) -> Path:
        """``model.pt``: the headless state dict."""
        return self.run_dir / "model.pt"


def plan_cell(cfg: FinetuneConfig, model: str, dataset: str, world_size: int = 1) -> CellPlan:
    """Load the catalogue, resolve the recipe and hash the training of one cell."""
    from embbench.embed_stage import load_catalogue, retrieval_plan

    cat = load_catalogue(dataset, cfg.data_root, cfg.max_images, cfg.seed)
    plan = retrieval_plan(dataset, cat, cfg.label, cfg.protocol)
    if "train" not in cat.splits:
        raise FinetuneError(
            f"dataset {dataset!r} has no 'train' split (splits: {cat.splits}); fine-tuning "
            "needs one"
        )
    classes = sorted(cat.split("train")[plan["label"]].astype(str).unique())
    if len(classes) < 2:
        raise FinetuneError(
            f"dataset {dataset!r}: the train split has {len(classes)} class(es) of label "
            f"{plan['label']!r}; classification needs at least 2"
        )
    global_batch = cfg.batch_size * world_size * cfg.grad_accum
    hp = resolve_recipe(
        get_recipe(cfg.recipe),
        global_batch=global_batch,
        epochs=cfg.epochs,
        lr=cfg.lr,
        reference_batch=cfg.lr_reference_batch,
        lr_scaling=cfg.lr_scaling,
        train_size=cfg.train_size,
        test_size=cfg.test_size,
    )
    train_hash = stable_hash(
        {
            "fields": {f: getattr(cfg, f) for f in TRAIN_FIELDS},
            "model": model,
            "dataset": dataset,
            "fingerprint": cat.fingerprint(),
            "label": plan["label"],
            "hp": hp,
            "format": CHECKPOINT_FORMAT,
        }
    )
    run_dir = runs_dir() / "finetune" / _safe(model) / _safe(dataset) / train_hash
    return CellPlan(model, dataset, cat, plan, classes, hp, train_hash, run_dir, world_size)


# ------------------------------------------------------------------------------ the trainer
@dataclass
class TrainState:
    """Progress that a checkpoint carries across restarts."""

    epoch: int = 0  # next epoch to run
    num_updates: int = 0
    train_wall_s: float = 0.0
    history: list[dict] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    resumed_at: list[int] = field(default_factory=list)


def _after_epoch(trainer: FineTuner, epoch: int) -> None:
    """Hook called after each epoch's checkpoint (tests replace it to kill a run)."""


class FineTuner:
    """One cell's training: model, data, optimizer, schedule, checkpoints.

    Args:
        cfg: The stage config.
        cell: The cell's plan (:func:`plan_cell`).
        dist_info: This process's rank (:func:`embbench.embed.init_distributed`).
    """

    def __init__(self, cfg: FinetuneConfig, cell: CellPlan, dist_info=None) -> None:
        import torch
        from timm.data import Mixup, create_transform
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        from embbench.embed import DistInfo, resolve_precision

        self.cfg = cfg
        self.cell = cell
        self.dist = dist_info or DistInfo()
        self.dev = _train_device(cfg.device, self.dist)
        self.amp_dtype = resolve_precision(cfg.precision, self.dev)
        self.hp = hp = cell.hp
        self.state = TrainState()
        self.class_index = {c: i for i, c in enumerate(cell.classes)}

        _seed_all(cfg.seed)
        net, self.embedder, self.extra_model_kwargs = build_trainable(
            cell.model,
            cfg.weights,
            len(cell.classes),
            (hp["train_size"], hp["test_size"]),
            seed=cfg.seed,
        )
        if self.dist.rank:  # same initial weights (DDP broadcasts rank 0's); own mixup draws
            _seed_all(cfg.seed + 7919 * self.dist.rank)
        net.to(self.dev)
        if self.dev.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.model = net
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                net, device_ids=[self.dev.index] if self.dev.type == "cuda" else None
            )

        dc = self.embedder.data_config
        self.mean, self.std = tuple(dc["mean"]), tuple(dc["std"])
        self.interpolation = dc.get("interpolation") or "bicubic"
        self.train_transform = create_transform(
            input_size=(3, hp["train_size"], hp["train_size"]),
            is_training=True,
            auto_augment=hp["auto_augment"] or None,
            interpolation=hp["train_interpolation"],
            mean=self.mean,
            std=self.std,
            hflip=hp["hflip"],
            re_prob=hp["re_prob"],
        )
        self.eval_data_config = {
            "input_size": [3, hp["test_size"], hp["test_size"]],
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": hp["test_crop_pct"],
            "crop_mode": "center",
        }
        self.eval_transform = create_transform(
            input_size=(3, hp["test_size"], hp["test_size"]),
            is_training=False,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=hp["test_crop_pct"],
            crop_mode="center",
        )

        label = cell.plan["label"]
        rows = cell.cat.split("train")
        self.train_paths = rows["path"].astype(str).tolist()
        self.train_ids = rows["item_id"].astype(str).tolist()
        targets = [self.class_index[str(v)] for v in rows[label]]
        self.train_set = TrainImages(self.train_paths, targets, self.train_transform)
        if hp["aug_repeats"]:
            from timm.data.distributed_sampler import RepeatAugSampler

            self.sampler = RepeatAugSampler(
                self.train_set,
                num_replicas=self.dist.world_size,
                rank=self.dist.rank,
                shuffle=True,
                num_repeats=hp["aug_repeats"],
            )
        else:
            from torch.utils.data import DistributedSampler

            self.sampler = DistributedSampler(
                self.train_set,
                num_replicas=self.dist.world_size,
                rank=self.dist.rank,
                shuffle=True,
                seed=cfg.seed,
            )
        self.generator = torch.Generator()
        n_per_rank = len(self.sampler)
        self.loader = torch.utils.data.DataLoader(
            self.train_set,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
            collate_fn=_collate,
            pin_memory=self.dev.type == "cuda",
            drop_last=n_per_rank > cfg.batch_size,
            worker_init_fn=_seed_worker,
            generator=self.generator,
            prefetch_factor=4 if cfg.num_workers > 0 else None,
            persistent_workers=False,
        )
        self.updates_per_epoch = max(1, math.ceil(len(self.loader) / cfg.grad_accum))

        self.mixup = None
        if hp["mixup"] > 0 or hp["cutmix"] > 0:
            self.mixup = Mixup(
                mixup_alpha=hp["mixup"],
                cutmix_alpha=hp["cutmix"],
                prob=hp["mixup_prob"],
                switch_prob=hp["mixup_switch_prob"],
                mode="batch",
                label_smoothing=hp["smoothing"],
                num_classes=len(cell.classes),
            )
            self.criterion = SoftTargetCrossEntropy()
        elif hp["smoothing"] > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=hp["smoothing"])
        else:
            self.criterion = torch.nn.CrossEntropyLoss()

        self.optimizer = create_optimizer_v2(
            net,
            opt=hp["opt"],
            lr=hp["lr"],
            weight_decay=hp["weight_decay"],
            filter_bias_and_bn=True,
        )
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched=hp["sched"],
            num_epochs=hp["epochs"],
            warmup_epochs=hp["warmup_epochs"],
            warmup_lr=hp["warmup_lr"],
            min_lr=hp["min_lr"],
            step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch,
        )
        self.scaler = torch.amp.GradScaler(
            self.dev.type, enabled=self.amp_dtype == torch.float16 and self.dev.type == "cuda"
        )

    # ---- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``last.pt`` atomically (rank 0); every rank waits for it."""
        import torch

        path = self.cell.checkpoint_path
        if self.dist.is_main:
            s = self.state
            payload = {
                "format": CHECKPOINT_FORMAT,
                "train_hash": self.cell.train_hash,
                "classes": list(self.cell.classes),
                "epoch": s.epoch,
                "num_updates": s.num_updates,
                "train_wall_s": s.train_wall_s,
                "history": s.history,
                "failed": s.failed,
                "mlflow_run_id": s.mlflow_run_id or "",
                "resumed_at": s.resumed_at,
                "model": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": _rng_state(self.dev),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save(payload, tmp)
            tmp.replace(path)
        _barrier(self.dist)
        return path

    def resume(self) -> int:
        """Load ``last.pt`` if it exists; return the epoch training continues at (0 if none).

        Raises:
            FinetuneError: The checkpoint belongs to another training (hash or classes differ).
        """
        import torch

        path = self.cell.checkpoint_path
        if not path.is_file():
            return 0
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("train_hash") != self.cell.train_hash or ckpt.get("classes") != list(
            self.cell.classes
        ):
            raise FinetuneError(
                f"checkpoint {path} belongs to another training (hash {ckpt.get('train_hash')} "
                f"!= {self.cell.train_hash}); delete it or set resume=False"
            )
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.dist.is_main:
            _set_rng_state(ckpt["rng"], self.dev)
        else:  # the checkpoint holds rank 0's streams; other ranks draw their own
            _seed_all(self.cfg.seed + 7919 * self.dist.rank + int(ckpt["epoch"]))
        self.state = TrainState(
            epoch=int(ckpt["epoch"]),
            num_updates=int(ckpt["num_updates"]),
            train_wall_s=float(ckpt["train_wall_s"]),
            history=list(ckpt["history"]),
            failed=dict(ckpt["failed"]),
            mlflow_run_id=ckpt.get("mlflow_run_id") or None,
            resumed_at=[*ckpt.get("resumed_at", []), int(ckpt["epoch"])],
        )
        self.scheduler.step_update(self.state.num_updates)
        logger.info(
            "%s on %s: resuming from %s at epoch %d (%d updates done)",
            self.cell.model,
            self.cell.dataset,
            path,
            self.state.epoch,
            self.state.num_updates,
        )
        return self.state.epoch

    # ---- training --------------------------------------------------------------------------
    def _autocast(self):
        import torch

        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.dev.type, dtype=self.amp_dtype)

    def batches(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        """The epoch's training batches on the device, mixed, with bad images recorded."""
        import torch

        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch + 1_000_003 * self.cfg.seed)
        self.generator.manual_seed(self.cfg.seed * 100_003 + epoch)
        for x, y, _, bad in self.loader:
            for i, reason in bad:
                if self.train_paths[i] not in self.state.failed:
                    logger.warning("skipping unreadable image %s: %s", self.train_paths[i], reason)
                self.state.failed[self.train_paths[i]] = reason
            if x is None:
                continue
            if self.mixup is not None and len(x) % 2:
                x, y = x[:-1], y[:-1]  # timm's batch mixup pairs images with the flipped batch
            if len(x) == 0:
                continue
            x = x.to(self.dev, non_blocking=True)
            y = y.to(self.dev, non_blocking=True)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            if self.dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def train_step(self, x, y, *, sync: bool = True):
        """Forward, backward and (when ``sync``) one optimizer step; returns the loss tensor."""
        ddp = self.model is not self.net
        ctx = self.model.no_sync() if ddp and not sync else nullcontext()
        with ctx:
            with self._autocast():
                loss = self.criterion(self.model(x), y)
            self.scaler.scale(loss / self.cfg.grad_accum).backward()
        if sync:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.num_updates += 1
            self.scheduler.step_update(self.state.num_updates)
        return loss

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the sampler; returns mean loss, lr, images and images/s."""
        self.model.train()
        n_batches = len(self.loader)
        total, n_images, micro = 0.0, 0, 0
        t0 = time.perf_counter()
        for b, (x, y) in enumerate(self.batches(epoch)):
            micro += 1
            sync = micro % self.cfg.grad_accum == 0 or b == n_batches - 1
            loss = self.train_step(x, y, sync=sync)
            total += float(loss.detach()) * len(x)
            n_images += len(x)
        if micro % self.cfg.grad_accum:  # the loader ended early (bad images): flush
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.num_updates += 1
            self.scheduler.step_update(self.state.num_updates)
        wall = time.perf_counter() - t0
        return {
            "train_loss": total / max(n_images, 1),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "train_images": n_images,
            "train_images_per_s": n_images / wall if wall > 0 else 0.0,
        }

    # ---- evaluation ------------------------------------------------------------------------
    def predict(self, split: str) -> dict[str, Any]:
        """Classify ``split`` (rows whose label the head knows); gathered over all ranks.

        Returns:
            ``y_true``, ``y_pred`` (class names), ``failed`` (path -> reason) and
            ``n_unknown`` (rows whose label is not a training class, left out).
        """
        import torch

        label = self.cell.plan["label"]
        rows = self.cell.cat.split(split)
        labels = rows[label].astype(str).tolist()
        known = [i for i, v in enumerate(labels) if v in self.class_index]
        mine = known[self.dist.rank :: self.dist.world_size]
        paths = rows["path"].astype(str).tolist()
        ds = TrainImages(
            [paths[i] for i in mine],
            [self.class_index[labels[i]] for i in mine],
            self.eval_transform,
        )
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=self.cfg.batch_size,
            shuffle=False,
            num_workers=self.cfg.num_workers,
            collate_fn=_collate,
            pin_memory=self.dev.type == "cuda",
        )
        out_true: list[int] = []
        out_pred: list[int] = []
        failed: dict[str, str] = {}
        self.net.eval()
        with torch.inference_mode():
            for x, y, _, bad in loader:
                for j, reason in bad:
                    failed[ds.paths[j]] = reason
                if x is None:
                    continue
                x = x.to(self.dev, non_blocking=True)
                if self.dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    logits = self.net(x)
                out_pred.extend(logits.argmax(1).cpu().tolist())
                out_true.extend(y.tolist())
        self.net.train()
        part = (out_true, out_pred, failed)
        if self.dist.world_size > 1:
            import torch.distributed as dist

            parts: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(parts, part)
        else:
            parts = [part]
        classes = self.cell.classes
        y_true = [classes[t] for p in parts for t in p[0]]
        y_pred = [classes[t] for p in parts for t in p[1]]
        failed_all = {k: v for p in parts for k, v in p[2].items()}
        return {
            "y_true": y_true,
            "y_pred": y_pred,
            "failed": failed_all,
            "n_unknown": len(labels) - len(known),
        }

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train (resuming if a checkpoint exists and ``cfg.resume``), evaluate, save.

        Returns:
            The training summary (also written to ``summary.json`` on rank 0).
        """
        from embbench.metrics import classification_metrics, confusion_matrix

        cfg, cell, hp = self.cfg, self.cell, self.hp
        start = self.resume() if cfg.resume else 0
        val_split = "val" if "val" in cell.cat.splits else "test"
        test_split = "test" if "test" in cell.cat.splits else val_split
        run = self._mlflow_start()
        try:
            for epoch in range(start, hp["epochs"]):
                t0 = time.perf_counter()
                stats = self.train_epoch(epoch)
                last = epoch == hp["epochs"] - 1
                if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0) and not last:
                    pred = self.predict(val_split)
                    stats["val_accuracy"] = _accuracy(pred["y_true"], pred["y_pred"])
                stats["epoch_wall_s"] = time.perf_counter() - t0
                self.state.train_wall_s += stats["epoch_wall_s"]
                self.state.history.append({"epoch": epoch, **stats})
                self.state.epoch = epoch + 1
                if run is not None:
                    import mlflow

                    mlflow.log_metrics(
                        {k: float(v) for k, v in stats.items()}, step=epoch, run_id=run
                    )
                (logger.info if self.dist.is_main else logger.debug)(
                    "%s on %s, epoch %d/%d: %s",
                    cell.model,
                    cell.dataset,
                    epoch + 1,
                    hp["epochs"],
                    ", ".join(f"{k}={v:.4g}" for k, v in stats.items()),
                )
                if (epoch + 1) % cfg.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                _after_epoch(self, epoch)

            t0 = time.perf_counter()
            val = self.predict(val_split)
            test = val if test_split == val_split else self.predict(test_split)
            eval_wall = time.perf_counter() - t0
            if test["y_true"]:
                test_metrics = classification_metrics(test["y_true"], test["y_pred"])
            else:  # class-disjoint split (e.g. SOP products): no test image has a known class
                logger.warning(
                    "%s on %s: no %s image has a training class of label %r (class-disjoint "
                    "split); classification metrics are undefined",
                    cell.model,
                    cell.dataset,
                    test_split,
                    cell.plan["label"],
                )
                test_metrics = {}
            if self.state.history and "val_accuracy" not in self.state.history[-1]:
                self.state.history[-1]["val_accuracy"] = _accuracy(val["y_true"], val["y_pred"])
            summary = self._summary(val_split, val, test_split, test, test_metrics, eval_wall)
            if self.dist.is_main:
                self._save_outputs(summary, test)
                if run is not None:
                    self._mlflow_finish(run, summary, test, confusion_matrix)
            _barrier(self.dist)
        except BaseException:
            if run is not None:
                import mlflow

                with contextlib.suppress(Exception):
                    mlflow.MlflowClient().set_terminated(run, status="KILLED")
            raise
        return summary

    def _summary(self, val_split, val, test_split, test, test_metrics, eval_wall) -> dict:
        import torch

        s = self.state
        gpu = self.dev.type == "cuda"
        gpu_hours = s.train_wall_s * self.dist.world_size / 3600 if gpu else 0.0
        return {
            "model": self.cell.model,
            "dataset": self.cell.dataset,
            "recipe": self.hp["name"],
            "train_hash": self.cell.train_hash,
            "label": self.cell.plan["label"],
            "n_classes": len(self.cell.classes),
            "n_train": len(self.train_paths),
            "epochs": self.hp["epochs"],
            "num_updates": s.num_updates,
            "resumed_at": s.resumed_at,
            "hyperparameters": self.hp,
            "lr_base": self.hp["lr_base"],
            "lr_scaled": self.hp["lr"],
            "lr_scaling": self.hp["lr_scaling"],
            "reference_batch": self.hp["reference_batch"],
            "global_batch": self.hp["global_batch"],
            "world_size": self.dist.world_size,
            "device": str(self.dev),
            "device_name": torch.cuda.get_device_name(self.dev)
            if gpu
            else (platform.processor() or platform.machine()),
            "autocast": str(self.amp_dtype) if self.amp_dtype is not None else "fp32",
            "train_wall_s": round(s.train_wall_s, 3),
            "eval_wall_s": round(eval_wall, 3),
            "gpu_hours": round(gpu_hours, 6),
            "gpu_hours_note": (
                f"{self.dist.world_size} GPU(s) x training wall time"
                if gpu
                else "CPU run: no GPU time (gpu_hours = 0)"
            ),
            "val_split": val_split,
            "val_accuracy": _accuracy(val["y_true"], val["y_pred"]),
            "val_n": len(val["y_true"]),
            "val_n_unknown_label": val["n_unknown"],
            "classification_split": test_split,
            "classification": test_metrics,
            "classification_n": len(test["y_true"]),
            "classification_n_unknown_label": test["n_unknown"],
            "failed_images": [
                {"path": p, "reason": r}
                for p, r in sorted({**s.failed, **val["failed"], **test["failed"]}.items())
            ],
            "history": s.history,
            "embedder_weights": self.embedder.weights_used,
            "eval_data_config": self.eval_data_config,
            "extra_model_kwargs": self.extra_model_kwargs,
            "mlflow_run_id": s.mlflow_run_id,
            "model_path": str(self.cell.model_path),
        }

    def _save_outputs(self, summary: dict, test: dict) -> None:
        import torch

        cell = self.cell
        self.net.reset_classifier(0)  # headless: pooled features, as stage 01 embeds them
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        tmp = cell.model_path.with_name(f".{cell.model_path.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        tmp.replace(cell.model_path)
        summary["model_sha256"] = _sha256(cell.model_path)
        atomic_write_json(cell.run_dir / "classes.json", list(cell.classes))
        pd.DataFrame({"y_true": test["y_true"], "y_pred": test["y_pred"]}).to_csv(
            cell.run_dir / "test_predictions.csv", index=False
        )
        atomic_write_json(cell.summary_path, summary)
        # finished: the resumable checkpoint (weights + optimizer state, ~3x the model) has
        # served its purpose; the headless model.pt and summary.json are what later stages use
        cell.checkpoint_path.unlink(missing_ok=True)

    # ---- MLflow ------------------------------------------------------------------------------
    def _mlflow_start(self) -> str | None:
        """Open (or reopen, when resuming) the training's MLflow run on rank 0; its id."""
        if not self.dist.is_main:
            return None
        import mlflow

        from embbench.tracking import log_params, provenance_tags

        cell = self.cell
        run_id = self.state.mlflow_run_id
        if run_id:
            try:
                mlflow.MlflowClient().update_run(run_id, status="RUNNING")
                return run_id
            except Exception as exc:  # deleted run, or another tracking store
                logger.warning("cannot reopen MLflow run %s (%s); starting a new one", run_id, exc)
        tags = {
            **provenance_tags(),
            "stage": "finetune",
            "mode": "training",
            "model": cell.model,
            "dataset": cell.dataset,
            "recipe": self.hp["name"],
            "train_hash": cell.train_hash,
        }
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            raise FinetuneError(
                f"MLflow experiment {self.cfg.experiment!r} does not exist; call "
                "embbench.tracking.setup_mlflow first (run_finetune does)"
            )
        run = client.create_run(
            experiment.experiment_id,
            tags=tags,
            run_name=f"finetune-train:{cell.model}:{cell.dataset}",
        )
        run_id = run.info.run_id
        with mlflow.start_run(run_id=run_id):
            log_params(
                {
                    "config": self.cfg.model_dump(mode="json"),
                    "hp": self.hp,
                    "n_classes": len(cell.classes),
                    "n_train": len(self.train_paths),
                    "world_size": self.dist.world_size,
                    "device": str(self.dev),
                    "label": cell.plan["label"],
                    "weights_used": self.embedder.weights_used,
                }
            )
        client.update_run(run_id, status="RUNNING")
        self.state.mlflow_run_id = run_id
        logger.info(
            "training %s on %s: lr %.4g (recipe %s: %.4g at batch %d, %s rule, global batch %d)",
            cell.model,
            cell.dataset,
            self.hp["lr"],
            self.hp["name"],
            self.hp["lr_base"],
            self.hp["reference_batch"],
            self.hp["lr_scaling"],
            self.hp["global_batch"],
        )
        return run_id

    def _mlflow_finish(self, run_id: str, summary: dict, test: dict, confusion_matrix) -> None:
        import mlflow

        from embbench.tracking import log_json_artifact

        metrics = {
            "train_wall_s": summary["train_wall_s"],
            "gpu_hours": summary["gpu_hours"],
            "lr_scaled": summary["lr_scaled"],
            **{f"test_{k}": v for k, v in summary["classification"].items()},
        }
        client = mlflow.MlflowClient()
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            mlflow.log_metric(
                "val_accuracy", float(summary["val_accuracy"]), step=max(summary["epochs"] - 1, 0)
            )
            log_json_artifact(summary, "summary.json")
            mlflow.log_artifact(str(self.cell.model_path), artifact_path="headless")
            if test["y_true"]:
                matrix, order = confusion_matrix(test["y_true"], test["y_pred"])
                rows, cols = np.nonzero(matrix)
                cm = pd.DataFrame(
                    {
                        "true": [order[i] for i in rows],
                        "pred": [order[j] for j in cols],
                        "count": matrix[rows, cols],
                    }
                )
                cm_path = self.cell.run_dir / "confusion_matrix.csv"
                cm.to_csv(cm_path, index=False)  # sparse: (true, pred, count) of non-zero cells
                mlflow.log_artifact(str(cm_path))
        client.set_terminated(run_id, status="FINISHED")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _accuracy(y_true: list, y_pred: list) -> float:
    if not y_true:
        return float("nan")
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def _train_device(device: str, dist_info):
    import torch

    from embbench.embed import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"device={device!r} but CUDA is not available; use device='auto'")
    return dev


def _barrier(dist_info) -> None:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _seed_all(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state(dev) -> dict[str, Any]:
    """RNG states as tensors and plain lists (so checkpoints load with ``weights_only``)."""
    import torch

    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss": py_state[2],
        },
    }
    if dev.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(dev)
    return out


def _set_rng_state(state: dict[str, Any], dev) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if dev.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], dev)


# ---------------------------------------------------------------------- fine-tuned models
def register_finetuned_checkpoint(cell: CellPlan, summary: dict, registry: dict | None) -> Any:
    """Register the headless model of a finished training by name, and list it in the index.

    Returns:
        The registered :class:`embbench.models.ModelSpec`.
    """
    from embbench.models import get_model_spec

    base = get_model_spec(cell.model)
    return register_finetuned(
        finetuned_name(cell.model, cell.dataset, summary["recipe"]),
        cell.model,
        cell.model_path,
        paper_name=f"{base.paper_name} (fine-tuned on {cell.dataset}, {summary['recipe']})",
        notes=(
            f"fine-tuned from {base.name} on {cell.dataset} with recipe {summary['recipe']} "
            f"(training {cell.train_hash}, MLflow run {summary.get('mlflow_run_id')})"
        ),
        data_config=summary["eval_data_config"],
        extra_model_kwargs=summary.get("extra_model_kwargs", {}),
        index_entry={
            "dataset": cell.dataset,
            "recipe": summary["recipe"],
            "label": summary["label"],
            "train_hash": cell.train_hash,
            "sha256": summary.get("model_sha256"),
            "val_accuracy": summary["val_accuracy"],
            "mlflow_run_id": summary.get("mlflow_run_id"),
            "mlflow_registry": registry,
        },
        overwrite=True,
    )


def _register_in_mlflow(cell: CellPlan, summary: dict, spec_name: str) -> dict | None:
    """Log the headless model as an MLflow model and register it (stores with a registry)."""
    import mlflow
    import torch

    from embbench.models import create_embedder

    run_id = summary.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        model = create_embedder(spec_name, device="cpu").model
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm"],
                registered_model_name=spec_name,
            )
        mlflow.MlflowClient().set_terminated(run_id, status="FINISHED")
        version = getattr(info, "registered_model_version", None)
        return {"name": spec_name, "version": version, "model_uri": info.model_uri}
    except Exception as exc:  # file stores have no registry; a server may refuse
        logger.warning(
            "could not register %s in MLflow's model registry (%s: %s); the state dict is "
            "still logged as an artifact of run %s",
            spec_name,
            type(exc).__name__,
            exc,
            run_id,
        )
        return None


# --------------------------------------------------------------------------------- the stage
def run_finetune(cfg: FinetuneConfig, store: ResultStore | None = None) -> pd.DataFrame:
    """Fine-tune, register and score every (model, dataset) cell of ``cfg``.

    Finished cells (a result record with the same hash) are skipped unless
    ``overwrite="always"``; a finished training is not repeated when only the retrieval
    settings changed; a killed training resumes from its checkpoint.

    Returns:
        One row per cell: model, dataset, recipe, retrieval metrics, val accuracy, test
        classification metrics, training wall time, GPU-hours and the registered name (empty
        on ranks other than 0 under torchrun).
    """
    from embbench.embed import embed_splits, embedding_cache, init_distributed
    from embbench.embed_stage import score_and_record
    from embbench.models import create_embedder
    from embbench.tracking import setup_mlflow

    store = store or ResultStore()
    dist_info = init_distributed(_train_device(cfg.device, None))
    if dist_info.is_main:
        setup_mlflow(cfg.tracking_uri, cfg.experiment)
    _barrier(dist_info)
    rows = []
    for dataset in cfg.datasets:
        for model in cfg.models:
            # rank 0 first: it may have to create the catalogue (the demo is generated)
            cell = (
                plan_cell(cfg, model, dataset, dist_info.world_size) if dist_info.is_main else None
            )
            _barrier(dist_info)
            cell = cell or plan_cell(cfg, model, dataset, dist_info.world_size)
            if cfg.overwrite == "always" and dist_info.is_main:
                for p in (cell.summary_path, cell.checkpoint_path):
                    p.unlink(missing_ok=True)
            _barrier(dist_info)
            record_hash = stable_hash(
                {"train": cell.train_hash, "cfg": cfg.config_hash(), "plan": cell.plan}
            )
            done = store.get("finetune", dataset, model, "fine-tuned", record_hash)
            if done and cfg.overwrite == "never" and _record_current(done):
                logger.info("skip %s on %s: finished (%s)", model, dataset, record_hash)
                rows.append(_row(done))
                continue
            if cell.summary_path.is_file():
                summary = json.loads(cell.summary_path.read_text())
                logger.info("%s on %s: trained earlier (%s)", model, dataset, cell.run_dir)
            else:
                summary = FineTuner(cfg, cell, dist_info).fit()
            name = finetuned_name(model, dataset, summary["recipe"])
            registry = None
            if dist_info.is_main:
                register_finetuned_checkpoint(cell, summary, None)
                if cfg.register_mlflow:
                    registry = _register_in_mlflow(cell, summary, name)
                    if registry:
                        register_finetuned_checkpoint(cell, summary, registry)
            _barrier(dist_info)
            if not dist_info.is_main:
                register_finetuned_models()
            embedder = create_embedder(name, device="cpu")
            t0 = time.perf_counter()
            splits = sorted({cell.plan["query_split"], cell.plan["index_split"]})
            sets = embed_splits(
                embedder, cell.cat, splits, batch_size=cfg.batch_size,
                num_workers=cfg.num_workers, device=cfg.device, precision=cfg.precision,
                progress=False,
            )
            if not dist_info.is_main:
                continue
            keys = {s: embedding_cache(embedder, cell.cat, s).key for s in splits}
            extra = {
                "recipe": summary["recipe"],
                "train_hash": cell.train_hash,
                "finetuned_model": name,
                "checkpoint": str(cell.model_path),
                "checkpoint_sha256": summary.get("model_sha256"),
                "val_accuracy": summary["val_accuracy"],
                "val_split": summary["val_split"],
                "classification": summary["classification"],
                "classification_split": summary["classification_split"],
                "train_wall_s": summary["train_wall_s"],
                "gpu_hours": summary["gpu_hours"],
                "gpu_hours_note": summary["gpu_hours_note"],
                "device_name": summary["device_name"],
                "world_size": summary["world_size"],
                "global_batch": summary["global_batch"],
                "lr_base": summary["lr_base"],
                "lr_scaled": summary["lr_scaled"],
                "lr_scaling": summary["lr_scaling"],
                "epochs": summary["epochs"],
                "n_failed_train_images": len(summary["failed_images"]),
                "train_mlflow_run_id": summary.get("mlflow_run_id"),
                "mlflow_registry": registry,
                "caches_keys": keys,
                "embed_wall_s": round(time.perf_counter() - t0, 3),
            }
            tags = {"recipe": summary["recipe"]}
            if summary.get("mlflow_run_id"):
                tags["mlflow.parentRunId"] = summary["mlflow_run_id"]
            record = score_and_record(
                stage="finetune",
                mode="fine-tuned",
                model=model,
                dataset=dataset,
                cat=cell.cat,
                plan=cell.plan,
                query=sets[cell.plan["query_split"]],
                index=sets[cell.plan["index_split"]],
                cfg=cfg,
                config_hash=record_hash,
                spec=embedder.spec,
                weights_used=embedder.weights_used,
                extra=extra,
                store=store,
                tags=tags,
            )
            rows.append(_row(record))
    return pd.DataFrame(rows)


def _record_current(record: dict) -> bool:
    """A record is reusable while its checkpoint still exists (the model must stay usable)."""
    ckpt = record.get("checkpoint")
    return bool(ckpt) and Path(ckpt).is_file()


def _row(record: dict) -> dict:
    cls = record.get("classification", {})
    return {
        "model": record["model"],
        "dataset": record["dataset"],
        "mode": record["mode"],
        "recipe": record.get("recipe"),
        "finetuned_model": record.get("finetuned_model"),
        **record["metrics"],
        "val_accuracy": record.get("val_accuracy"),
        **{f"test_{k}": cls.get(k) for k in CLASSIFICATION_KEYS},
        "train_wall_s": record.get("train_wall_s"),
        "gpu_hours": record.get("gpu_hours"),
        "lr_scaled": record.get("lr_scaled"),
        "global_batch": record.get("global_batch"),
        "n_failed": len(record.get("failed_images", [])) + record.get("n_failed_train_images", 0),
        "run_dir": str(Path(record["checkpoint"]).parent) if record.get("checkpoint") else None,
        "mlflow_run_id": record.get("mlflow_run_id"),
        "train_mlflow_run_id": record.get("train_mlflow_run_id"),
    }


def training_history(results: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch training curves (loss, lr, val accuracy, images/s) of the cells in ``results``.

    Args:
        results: A :func:`run_finetune` table (its ``run_dir`` column locates each summary).

    Returns:
        One row per (model, dataset, epoch).
    """
    frames = []
    for _, row in results.iterrows():
        path = Path(str(row.get("run_dir"))) / "summary.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        hist = pd.DataFrame(summary.get("history", []))
        if hist.empty:
            continue
        hist.insert(0, "dataset", row["dataset"])
        hist.insert(0, "model", row["model"])
        frames.append(hist)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ------------------------------------------------------------------------------- torchrun CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m embbench.finetune -f params/02_finetune.yaml [-f overlay] [--set k=v]``.

    The entry point for several GPUs and nodes: ``torchrun --nproc_per_node=4 -m
    embbench.finetune -f params/02_finetune.yaml``.
    """
    import yaml

    from embbench import setup_logging

    parser = argparse.ArgumentParser(prog="python -m embbench.finetune", description=__doc__)
    parser.add_argument("-f", "--params", action="append", default=[], help="params YAML")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override (YAML value)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    cfg = FinetuneConfig.from_files(*args.params, **overrides)
    table = run_finetune(cfg)
    if not table.empty:
        sys.stdout.write(table.to_string(index=False) + "\n")
    return 0


__all__ = [
    "CellPlan",
    "FineTuner",
    "FinetuneConfig",
    "FinetuneError",
    "build_trainable",
    "find_finetuned",
    "finetuned_index_path",
    "finetuned_name",
    "main",
    "plan_cell",
    "read_finetuned_index",
    "register_finetuned_checkpoint",
    "register_finetuned_models",
    "run_finetune",
    "training_history",
]

if __name__ == "__main__":  # run the imported module, so its logger is embbench.finetune
    from embbench.finetune import main as _main

    sys.exit(_main())
