"""Torch utilities shared by embedding and training: device, precision, distributed, seeding.

Bottom layer: imports nothing from embbench. ``device="auto"`` and ``precision="auto"`` are
resolved here and only here.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "DistInfo",
    "barrier",
    "channels_last_for",
    "init_distributed",
    "resolve_device",
    "resolve_precision",
    "rng_state",
    "seed_all",
    "seed_worker",
    "set_rng_state",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> this rank's CUDA device when available, else the CPU.

    Raises:
        ValueError: A CUDA device is asked for on a machine without CUDA.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available; use device='auto'")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``.

    ``auto`` is bf16 on CUDA that supports it, fp16 on older CUDA, none (fp32) on the CPU;
    ``fp32``/``bf16``/``fp16`` force a choice.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {list(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def channels_last_for(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether ``model`` runs in channels_last (NHWC) memory format on ``device``.

    Always on CUDA (tensor cores want NHWC). On a CPU for convolutional networks: oneDNN's
    NHWC convolutions and batch norms avoid the reorders of NCHW; measured on 2 cores for
    EfficientNet-Lite0 (README "Performance on CPU"): inference 1.13-1.7x, training steps
    1.4-2.2x, embeddings equal to NCHW's within 1e-5 (max abs; cosine >= 0.9999997). A model
    with at most one 2-d convolution (a ViT's patch embedding) stays as it is.
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    convs = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            convs += 1
            if convs > 1:
                return True
    return False


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the consolidated outputs."""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())


def barrier(dist_info: DistInfo) -> None:
    """Wait for every rank (no-op outside torchrun)."""
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def seed_all(seed: int) -> None:
    """Seed torch, numpy and random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker (timm's RandAugment draws from both)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_state(dev: torch.device) -> dict[str, Any]:
    """RNG states as tensors and plain lists (so checkpoints load with ``weights_only``)."""
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


def set_rng_state(state: dict[str, Any], dev: torch.device) -> None:
    """Restore the states saved by :func:`rng_state`."""
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
