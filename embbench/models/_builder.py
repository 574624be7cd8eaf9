"""What every builder returns (:class:`Built`) and the errors builders share.

A builder (one module per source: :mod:`._timm`, :mod:`._open_clip`, :mod:`._hub`,
:mod:`._packaged`) turns a :class:`ModelSpec` into a :class:`Built`: the headless model, its own
eval transform and data config, the embedding size and what weights were loaded.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from embbench.models._zoo import ModelSpec, WeightsUnavailableError


@dataclass
class Built:
    """A built model before it becomes an :class:`~embbench.models.Embedder`.

    Attributes:
        model: The headless module (images -> pooled features).
        transform: The model's own eval transform (``PIL.Image -> (C, H, W)`` tensor).
        data_config: Preprocessing parameters (input_size, mean, std, interpolation, ...).
        input_size: ``(C, H, W)`` of the transform's output.
        embed_dim: Embedding dimension.
        info: What weights were loaded (becomes ``Embedder.weights_used``).
        head_prefixes: Checkpoint keys to ignore (classifier heads).
        keep_prefix: Checkpoint keys to keep, prefix stripped (e.g. ``"visual."``).
    """

    model: Any
    transform: Any
    data_config: dict[str, Any]
    input_size: tuple[int, int, int]
    embed_dim: int
    info: dict[str, Any]
    head_prefixes: tuple[str, ...] = ()
    keep_prefix: str | None = None


def no_published_weights(spec: ModelSpec) -> WeightsUnavailableError:
    """The error for ``weights='pretrained'`` on a model that has no published weights."""
    return WeightsUnavailableError(
        f"Model {spec.name!r} ({spec.source} {spec.full_id}) has no published pretrained "
        "weights (no pretrained tag). Fix: pass weights='random' (or 'auto') for a smoke run, "
        "a checkpoint path, or register the model with a pretrained tag."
    )


def unavailable(spec: ModelSpec, err: BaseException | str) -> WeightsUnavailableError:
    """The error for published weights that could not be fetched; names caches and fixes."""
    offline = os.environ.get("HF_HUB_OFFLINE", "")
    where = _cache_locations()
    detail = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return WeightsUnavailableError(
        f"Could not fetch the pretrained weights of model {spec.name!r} ({spec.source} "
        f"{spec.full_id}): {detail}. The machine may be offline (HF_HUB_OFFLINE={offline!r}) "
        f"and the weights are not in the local caches ({where}). Fix: run once with network "
        "access (unset HF_HUB_OFFLINE) to fill the cache, copy the weights into that cache, or "
        "pass weights='/path/to/state_dict.pt'; use weights='auto' or 'random' only for smoke "
        "runs (random-weight embeddings are meaningless)."
    )


def _cache_locations() -> str:
    parts = []
    with contextlib.suppress(Exception):
        from huggingface_hub import constants

        parts.append(f"HF cache {constants.HF_HUB_CACHE}")
    with contextlib.suppress(Exception):
        import torch.hub

        parts.append(f"torch hub {torch.hub.get_dir()}")
    return ", ".join(parts) or "unknown"


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (no downloads at all)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
