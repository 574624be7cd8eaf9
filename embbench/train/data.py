"""Training data: images with their class index, timm transforms, samplers and loaders.

An image that cannot be decoded (or breaks a transform) is never fatal: the dataset yields its
reason instead of a tensor, :func:`collate` drops it from the batch and reports it, and the
trainer lists it in the run's summary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from embbench._torch_utils import DistInfo, seed_worker
from embbench.images import BadImageError, load_rgb

__all__ = [
    "TrainImages",
    "collate",
    "eval_data_config",
    "eval_loader",
    "eval_transform",
    "train_loader",
    "train_sampler",
    "train_transform",
]


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
        try:
            return self.transform(load_rgb(self.paths[i])), self.targets[i], i, None
        except BadImageError as exc:
            return None, self.targets[i], i, exc.reason
        except Exception as exc:  # an odd image breaking a transform must not stop training
            return None, self.targets[i], i, f"{type(exc).__name__}: {exc}"


def collate(batch):
    """Stack the readable items; return ``(x, y, indices, [(index, reason), ...])``.

    ``x`` and ``y`` are ``None`` when no item of the batch could be read.
    """
    ok = [b for b in batch if b[3] is None]
    bad = [(b[2], b[3]) for b in batch if b[3] is not None]
    if not ok:
        return None, None, [], bad
    x = torch.stack([b[0] for b in ok])
    y = torch.tensor([b[1] for b in ok], dtype=torch.long)
    return x, y, [b[2] for b in ok], bad


# ------------------------------------------------------------------------------- transforms
def train_transform(hp: dict[str, Any], mean: tuple, std: tuple):
    """The timm training pipeline of a resolved recipe: random-resized crop, flip, RandAugment.

    Without RandAugment timm applies its colour jitter (0.4); ``crop_scale`` (when the recipe
    sets one) bounds the crop's area.
    """
    from timm.data import create_transform

    return create_transform(
        input_size=(3, hp["train_size"], hp["train_size"]),
        is_training=True,
        auto_augment=hp["auto_augment"] or None,
        interpolation=hp["train_interpolation"],
        mean=mean,
        std=std,
        hflip=hp["hflip"],
        re_prob=hp["re_prob"],
        scale=tuple(hp["crop_scale"]) if hp.get("crop_scale") else None,
    )


def eval_data_config(hp: dict[str, Any], mean: tuple, std: tuple, interpolation: str) -> dict:
    """The evaluation preprocessing as a timm data config (saved with the headless model)."""
    return {
        "input_size": [3, hp["test_size"], hp["test_size"]],
        "interpolation": interpolation,
        "mean": list(mean),
        "std": list(std),
        "crop_pct": hp["test_crop_pct"],
        "crop_mode": "center",
    }


def eval_transform(data_config: dict):
    """The timm evaluation pipeline (resize, centre crop, normalise) of ``data_config``."""
    from timm.data import create_transform

    return create_transform(
        input_size=tuple(data_config["input_size"]),
        is_training=False,
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config["crop_mode"],
    )


# ---------------------------------------------------------------------------------- loaders
def train_sampler(dataset: TrainImages, dist: DistInfo, aug_repeats: int, seed: int) -> Sampler:
    """Repeated augmentation (timm ``RepeatAugSampler``) or a plain shuffle, split by rank."""
    if aug_repeats:
        from timm.data.distributed_sampler import RepeatAugSampler

        return RepeatAugSampler(
            dataset,
            num_replicas=dist.world_size,
            rank=dist.rank,
            shuffle=True,
            num_repeats=aug_repeats,
        )
    return DistributedSampler(
        dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed
    )


def train_loader(
    dataset: TrainImages,
    sampler: Sampler,
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    generator: torch.Generator,
) -> DataLoader:
    """The training loader: seeded workers, last partial batch dropped when there are others."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=len(sampler) > batch_size,
        worker_init_fn=seed_worker,
        generator=generator,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )


def eval_loader(
    dataset: TrainImages, *, batch_size: int, num_workers: int, pin_memory: bool
) -> DataLoader:
    """An evaluation loader in catalogue order."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
    )
