"""Resumable training checkpoints and the headless model written at the end.

A checkpoint (``last.pt``) holds the model, optimizer, scheduler and scaler states, the progress
(:class:`TrainState`) and the RNG streams (:func:`embbench._torch_utils.rng_state`), as tensors
and plain data so it loads with ``torch.load(weights_only=True)``. Files are written to a
temporary sibling and renamed, so a killed process never leaves a half-written one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from embbench._torch_utils import rng_state
from embbench._utils import sha256_file
from embbench.train.errors import FinetuneError

__all__ = [
    "CHECKPOINT_FORMAT",
    "TrainState",
    "atomic_torch_save",
    "load_checkpoint",
    "restore_training",
    "save_checkpoint",
    "save_headless",
]

CHECKPOINT_FORMAT = 1


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


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary sibling, then rename over ``path``.

    Saved through an open file, not the temporary's name: ``torch.save`` names the archive's
    root folder after a file name it is given, so the bytes (and the sha256 that keys the
    cross-tuned cells and the model registry) would change with the process id.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        torch.save(obj, fh)
    tmp.replace(path)
    return path


def save_checkpoint(
    path: Path,
    *,
    train_hash: str,
    classes: list[str],
    state: TrainState,
    net,
    optimizer,
    scheduler,
    scaler,
    device: torch.device,
) -> Path:
    """Write the resumable checkpoint of a training atomically.

    Args:
        path: The checkpoint file (``last.pt``).
        train_hash: Hash of everything that changes the trained weights (checked on resume).
        classes: The head's class names, in order (checked on resume).
        state: The progress so far.
        net: The module (not a DDP wrapper).
        optimizer: Its optimizer.
        scheduler: Its timm scheduler.
        scaler: Its ``GradScaler``.
        device: The training device (its CUDA RNG is saved too).
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "train_hash": train_hash,
        "classes": list(classes),
        "epoch": state.epoch,
        "num_updates": state.num_updates,
        "train_wall_s": state.train_wall_s,
        "history": state.history,
        "failed": state.failed,
        "mlflow_run_id": state.mlflow_run_id or "",
        "resumed_at": state.resumed_at,
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(device),
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(path: Path, *, train_hash: str, classes: list[str]) -> dict | None:
    """The checkpoint at ``path`` (``None`` when there is none), checked to be this training's.

    Raises:
        FinetuneError: The checkpoint belongs to another training (hash or classes differ).
    """
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("train_hash") != train_hash or ckpt.get("classes") != list(classes):
        raise FinetuneError(
            f"checkpoint {path} belongs to another training (hash {ckpt.get('train_hash')} "
            f"!= {train_hash}); delete it or set resume=False"
        )
    return ckpt


def restore_training(ckpt: dict, *, net, optimizer, scheduler, scaler) -> TrainState:
    """Load a checkpoint's states into the training objects; return its progress.

    The RNG streams are left to the caller (only rank 0's are in the checkpoint).
    """
    net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    state = TrainState(
        epoch=int(ckpt["epoch"]),
        num_updates=int(ckpt["num_updates"]),
        train_wall_s=float(ckpt["train_wall_s"]),
        history=list(ckpt["history"]),
        failed=dict(ckpt["failed"]),
        mlflow_run_id=ckpt.get("mlflow_run_id") or None,
        resumed_at=[*ckpt.get("resumed_at", []), int(ckpt["epoch"])],
    )
    scheduler.step_update(state.num_updates)
    return state


def save_headless(net, path: Path) -> str:
    """Drop the classifier (timm ``reset_classifier(0)``) and save the state dict; its SHA-256.

    The headless model outputs pooled features, as stage 01 embeds them.
    """
    net.reset_classifier(0)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    atomic_torch_save(state, path)
    return sha256_file(path)
