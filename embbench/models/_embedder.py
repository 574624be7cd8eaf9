"""The :class:`Embedder`: a built model with its own preprocessing, ready to embed images."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embbench._utils import jsonable
from embbench.models._zoo import ModelSpec

if TYPE_CHECKING:
    import torch
    from PIL import Image


def spec_identity(spec: ModelSpec, weights_used: dict[str, Any]) -> dict[str, Any]:
    """The model and weights part of a cache identity (an image embedder's or a text tower's).

    The weights' volatile notes (why they fell back, the local path) are left out.
    """
    volatile = {"reason", "fell_back", "path"}
    return {
        "model": spec.name,
        "source": spec.source,
        "identifier": spec.identifier,
        "pretrained": spec.pretrained,
        "arch": spec.arch,
        "model_kwargs": jsonable(spec.model_kwargs),
        "weights": {k: v for k, v in weights_used.items() if k not in volatile},
    }


@dataclass
class Embedder:
    """A model that maps images to embeddings, with its own preprocessing.

    Attributes:
        spec: The model's registry entry.
        model: Eval-mode module: ``(B, C, H, W)`` float tensor -> ``(B, embed_dim)`` embeddings
            (pooled penultimate features; the image tower's output for text-image models).
        transform: ``PIL.Image -> (C, H, W)`` tensor, the model's own evaluation preprocessing.
        weights_used: What weights were loaded: ``kind`` (pretrained | random | checkpoint),
            ``id``, ``tag``, ``sha256`` (checkpoints), ``seed`` (random), ``fell_back``,
            ``reason``.
        embed_dim: Embedding dimension.
        input_size: ``(C, H, W)`` of the transform's output.
        data_config: Preprocessing parameters (mean, std, interpolation, crop_pct, ...).
        device: Device the model sits on.
        text: The model's text tower and tokenizer (:class:`~embbench.models.TextTower`), only
            when built with ``create_embedder(..., with_text=True)``; ``None`` otherwise.
    """

    spec: ModelSpec
    model: torch.nn.Module
    transform: Any
    weights_used: dict[str, Any]
    embed_dim: int
    input_size: tuple[int, int, int]
    data_config: dict[str, Any]
    device: str = "cpu"
    text: Any = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of preprocessed images.

        Args:
            images: ``(B, C, H, W)`` tensor made by :attr:`transform`.

        Returns:
            ``(B, embed_dim)`` float tensor on :attr:`device`.
        """
        import torch

        if images.ndim != 4:
            raise ValueError(
                f"{self.spec.name}: expected a (B, C, H, W) batch, got shape {tuple(images.shape)}"
            )
        with torch.inference_mode():
            out = self.model(images.to(self.device, dtype=torch.float32))
        return out

    def embed_pil(self, images: list[Image.Image]) -> torch.Tensor:
        """Preprocess and embed a list of PIL images (convenience for small batches)."""
        import torch

        batch = torch.stack([self.transform(im.convert("RGB")) for im in images])
        return self(batch)

    def preprocessing_fingerprint(self) -> str:
        """A stable hash of the preprocessing (transform and its parameters)."""
        text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(self.transform))
        payload = json.dumps(
            {"transform": text, "data_config": jsonable(self.data_config)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def cache_identity(self) -> dict[str, Any]:
        """Everything that changes the vectors; embedding caches key on it."""
        return {
            **spec_identity(self.spec, self.weights_used),
            "preprocessing": self.preprocessing_fingerprint(),
            "embed_dim": self.embed_dim,
            "input_size": list(self.input_size),
        }
