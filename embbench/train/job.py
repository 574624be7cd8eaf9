"""What one training learns from (:class:`TrainJob`) and how it runs (:class:`TrainSettings`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TrainJob", "TrainSettings"]


@dataclass(frozen=True)
class TrainSettings:
    """How one training runs (the recipe's hyper-parameters are in :class:`TrainJob`)."""

    weights: str = "pretrained"  # start from: pretrained | random | auto | checkpoint path
    seed: int = 0  # initialisation, augmentation and sampling seed
    batch_size: int = 128  # images per step per process
    grad_accum: int = 1  # micro-batches per optimizer step
    num_workers: int = 8  # DataLoader decoding/augmentation processes
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # autocast dtype on CUDA: auto | fp32 | bf16 | fp16
    eval_every: int = 1  # epochs between validation passes; 0 = only at the end
    checkpoint_every: int = 1  # epochs between resumable checkpoints
    resume: bool = True  # continue from the last checkpoint when there is one
    experiment: str = "embbench"  # MLflow experiment of the training run; "" = no MLflow run


@dataclass
class TrainJob:
    """What one training learns from, with what recipe, and where it writes.

    Attributes:
        model: Model registry name.
        dataset: Dataset name.
        cat: The catalogue (its ``train`` split is learned; ``val``/``test`` are evaluated).
        label: The label column classified.
        classes: Class names of the training split (the head's order).
        hp: The resolved recipe (:func:`embbench.train.recipes.resolve_recipe`).
        train_hash: Hash of everything that changes the trained weights.
        run_dir: Folder of checkpoints, the headless model and the summary.
        world_size: Training processes.
    """

    model: str
    dataset: str
    cat: Any
    label: str
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
