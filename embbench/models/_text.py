"""Text towers of text-image models: which models have one, their tokenizers, and the factory.

A :class:`TextTower` is the whole open_clip model (image and text towers) with open_clip's own
tokenizer (``open_clip.get_tokenizer(arch)``; ``get_tokenizer("hf-hub:org/repo")`` for models on
the Hub). SigLIP and Marqo tokenizers are Hugging Face tokenizers loaded through
``transformers``; when they are not in the local cache and the hub cannot be reached the error
is one line naming the model and the fix, like missing weights
(:class:`~embbench.models.WeightsUnavailableError`). Image-only tasks never build a text tower:
:func:`~embbench.models.create_embedder` keeps only the image tower unless ``with_text=True``.

>>> from embbench.models import create_text_embedder
>>> tower = create_text_embedder("test_clip", weights="random")  # tiny, offline
>>> tower.context_length, tower.embed_dim
(16, 32)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from embbench.models._builder import _cache_locations
from embbench.models._embedder import spec_identity
from embbench.models._zoo import ModelError, ModelSpec, WeightsUnavailableError, get_model_spec

# This module imports no builder (like _zoo): the open_clip builder loads the tokenizer
# (:func:`embbench.models._open_clip.load_tokenizer`) and the factory builds the tower
# (:func:`embbench.models._factory.create_text_embedder`).

TEXT_SOURCES = ("open_clip", "hf-hub")  # sources whose models carry a text tower


class TextUnsupportedError(ModelError):
    """A text task was asked of a model without a text tower (an image-only model)."""


def text_capable(spec: ModelSpec) -> bool:
    """Whether the model has a text tower aligned with its image tower (text tasks can run).

    open_clip and hf-hub (open_clip on the Hub) models have one. timm and torch.hub models are
    image-only; a fine-tuned checkpoint changed the image tower only, so its text tower no longer
    matches and it counts as image-only too.

    Args:
        spec: The model's registry entry (:func:`~embbench.models.get_model_spec`).

    Returns:
        True when text->image, image->text and zero-shot tasks can run on it.
    """
    return spec.source in TEXT_SOURCES


def check_text_capable(spec: ModelSpec | str, task: str = "text") -> ModelSpec:
    """Raise one clear line unless ``spec`` can run the text task ``task`` (pre-work check).

    Args:
        spec: The model's spec or name.
        task: The task asked for (named in the message), e.g. ``"text-image"``.

    Returns:
        The spec.

    Raises:
        TextUnsupportedError: The model is image-only.
    """
    spec = get_model_spec(spec) if isinstance(spec, str) else spec
    if not text_capable(spec):
        why = (
            "a fine-tuned checkpoint (its image tower moved away from the text tower)"
            if spec.source == "checkpoint"
            else f"an image-only {spec.source} model"
        )
        raise TextUnsupportedError(
            f"Model {spec.name!r} cannot run the {task!r} task: it is {why} with no text tower. "
            f"Fix: run {task!r} only with text-image models (open_clip or hf-hub sources, e.g. "
            "list_models(family='text-image')), and give image-only models the image-image, "
            "probe and knn tasks."
        )
    return spec


def tokenizer_unavailable(spec: ModelSpec, tokenizer_id: str, err: BaseException) -> Exception:
    """The one-line error for a tokenizer that could not be loaded (offline, not cached)."""
    detail = " ".join(f"{type(err).__name__}: {err}".split()).rstrip(".")
    if len(detail) > 300:
        detail = detail[:297] + "..."
    offline = os.environ.get("HF_HUB_OFFLINE", "")
    return WeightsUnavailableError(
        f"Could not load the tokenizer {tokenizer_id!r} of model {spec.name!r} ({spec.source} "
        f"{spec.full_id}): {detail}. The machine may be offline (HF_HUB_OFFLINE={offline!r}) "
        f"and the tokenizer is not in the local caches ({_cache_locations()}). Fix: run once "
        "with network access (unset HF_HUB_OFFLINE) to fill the Hugging Face cache, or copy "
        "the tokenizer files into it; the tiny 'test_clip' needs no download (smoke runs)."
    )


@dataclass
class TextTower:
    """A text-image model's text side: the whole open_clip model and its own tokenizer.

    Attributes:
        spec: The model's registry entry.
        model: The open_clip model (``encode_text``; its ``visual`` is the image tower).
        tokenizer: open_clip's tokenizer for this model (``list[str] -> token tensor``).
        tokenizer_id: The name the tokenizer was looked up by (architecture or hf-hub id).
        context_length: Tokens per text (longer texts are truncated by the tokenizer).
        embed_dim: Dimension of the text embeddings (= the image embeddings').
        weights_used: What weights were loaded (as :attr:`Embedder.weights_used`).
        device: Device the model sits on.
    """

    spec: ModelSpec
    model: Any
    tokenizer: Any
    tokenizer_id: str
    context_length: int
    embed_dim: int
    weights_used: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    def tokenizer_fingerprint(self) -> str:
        """A stable hash of what the tokenizer is (class, source, context length, options)."""
        tok = self.tokenizer
        payload = {
            "class": f"{type(tok).__module__}.{type(tok).__qualname__}",
            "id": self.tokenizer_id,
            "context_length": self.context_length,
            "vocab": len(getattr(tok, "encoder", {}) or {}) or None,
            "clean": str(getattr(tok, "clean_fn", "")).split(" at 0x")[0],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def cache_identity(self) -> dict[str, Any]:
        """Everything about the tower that changes text vectors; text caches key on it."""
        return {
            **spec_identity(self.spec, self.weights_used),
            "tokenizer": self.tokenizer_id,
            "tokenizer_fingerprint": self.tokenizer_fingerprint(),
            "context_length": self.context_length,
            "embed_dim": self.embed_dim,
        }
