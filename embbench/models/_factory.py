"""The factory: :func:`create_embedder` and the weights policy.

``weights=`` is ``"pretrained"`` (the published weights, or an error that names the fix),
``"random"`` (seeded by :data:`RANDOM_SEED`), ``"auto"`` (pretrained, else random with a
WARNING and ``weights_used["fell_back"]``) or a checkpoint path. A spec marked ``control`` is
always random. The factory picks the builder of the spec's source; builders live one per source
(:mod:`._timm`, :mod:`._open_clip`, :mod:`._hub`, :mod:`._packaged`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from embbench.models._builder import Built, go_offline_if_unreachable
from embbench.models._checkpoints import load_checkpoint
from embbench.models._embedder import Embedder
from embbench.models._hub import build_torch_hub
from embbench.models._open_clip import build_open_clip
from embbench.models._packaged import build_packaged
from embbench.models._text import TextTower, check_text_capable
from embbench.models._timm import build_timm
from embbench.models._zoo import (
    ZOO_FILE,
    ModelError,
    ModelSpec,
    WeightsUnavailableError,
    get_model_spec,
)
from embbench.vocab import RANDOM_SEED, WEIGHT_MODES

logger = logging.getLogger(__name__)


def create_embedder(
    name: str,
    *,
    weights: str | Path = "pretrained",
    device: str = "cpu",
    checkpoint: str | Path | None = None,
    with_text: bool = False,
    context_length: int | None = None,
) -> Embedder:
    """Build a model with its own preprocessing, ready to embed images.

    Args:
        name: Registered name (``list_models()``), ``timm:<arch>[.<tag>]``,
            ``open_clip:<arch>[/<tag>]`` or ``hf-hub:<org>/<repo>``.
        weights: ``"pretrained"``, ``"random"``, ``"auto"`` (pretrained, else random with a
            warning) or a path to a checkpoint file.
        device: Where to put the model (``cpu``, ``cuda``, ``cuda:1``, ``auto``...).
        checkpoint: A checkpoint file (same as passing its path as ``weights``).
        with_text: Also keep the text tower and open_clip's tokenizer (``Embedder.text``, a
            :class:`~embbench.models.TextTower`) for text tasks; image-only tasks leave it off
            and keep only the image tower in memory.
        context_length: With ``with_text``, override the tokenizer's context length.

    Returns:
        The :class:`Embedder`.

    Raises:
        WeightsUnavailableError: ``weights="pretrained"`` and they cannot be fetched.
        CheckpointError: The checkpoint does not fit the architecture.
        UnknownNameError: Unknown model name (the message suggests close names).
        TextUnsupportedError: ``with_text`` on an image-only model.
    """
    spec = get_model_spec(name)
    if with_text:
        check_text_capable(spec, "text")
    mode, ckpt = _parse_weights(weights, checkpoint, spec)
    if with_text and ckpt is not None:
        raise ModelError(
            f"Model {spec.name!r}: a checkpoint replaces the image tower only, so its text tower "
            "would not match. Fix: run text tasks on the published (or random) weights, without "
            "a checkpoint."
        )
    text = {"with_text": True, "context_length": context_length} if with_text else {}
    if mode == "auto":
        try:
            built = _build(spec, pretrained=True, **text)
        except WeightsUnavailableError as e:
            # weights="auto" documents this fallback: one INFO line; records and report say so.
            logger.info(
                "Model %r: pretrained weights unavailable, FALLING BACK TO RANDOM WEIGHTS "
                "(embeddings are not meaningful): %s",
                spec.name,
                e,
            )
            built = _build(spec, pretrained=False, **text)
            built.info.update(fell_back=True, reason=str(e))
    else:
        built = _build(spec, pretrained=(mode == "pretrained"), **text)
    if ckpt is not None:
        load_checkpoint(built, ckpt)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = built.model.eval()
    model.to(device)
    if built.text is not None:  # the whole model (its visual is ``model``) on the same device
        built.text.model.eval().to(device)
        built.text.device = str(device)
    embed_dim = built.embed_dim
    if spec.embed_dim is not None and embed_dim != spec.embed_dim:
        raise ModelError(
            f"Model {spec.name!r}: the built model gives {embed_dim}-d embeddings but the spec "
            f"says embed_dim={spec.embed_dim}. Fix embed_dim in {ZOO_FILE} (or your spec)."
        )
    built.info.setdefault("fell_back", False)
    return Embedder(
        spec=spec,
        model=model,
        transform=built.transform,
        weights_used=built.info,
        embed_dim=embed_dim,
        input_size=built.input_size,
        data_config=built.data_config,
        device=str(device),
        text=built.text,
    )


def _parse_weights(
    weights: str | Path, checkpoint: str | Path | None, spec: ModelSpec
) -> tuple[str, Path | None]:
    """Split ``weights``/``checkpoint`` into (mode, checkpoint path)."""
    ckpt = Path(checkpoint).expanduser() if checkpoint is not None else None
    if isinstance(weights, Path) or (isinstance(weights, str) and weights not in WEIGHT_MODES):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelError(
                f"weights={str(weights)!r} for model {spec.name!r} is neither one of "
                f"{WEIGHT_MODES} nor an existing checkpoint file. Fix: pass 'pretrained', "
                "'random', 'auto' or the path of a saved state dict."
            )
        if ckpt is not None and ckpt.resolve() != path.resolve():
            raise ModelError(
                f"Model {spec.name!r}: weights={str(weights)!r} and checkpoint={str(checkpoint)!r} "
                "name different files; pass only one."
            )
        ckpt = path
    elif ckpt is not None and weights != "pretrained":
        raise ModelError(
            f"Model {spec.name!r}: checkpoint= was given together with weights={weights!r}; "
            "a checkpoint replaces the weights, so leave weights at its default."
        )
    if ckpt is not None:
        if not ckpt.is_file():
            raise ModelError(f"Checkpoint file {ckpt} for model {spec.name!r} does not exist.")
        return "random", ckpt
    if spec.source == "checkpoint" and weights in ("pretrained", "auto"):
        path = Path(spec.checkpoint_path or "").expanduser()
        if not path.is_file():
            raise ModelError(
                f"Model {spec.name!r} is a fine-tuned checkpoint but its file {path} does not "
                "exist. Fix: re-run the fine-tuning stage or register the right path."
            )
        return "random", path
    return str(weights), None


def _build(spec: ModelSpec, *, pretrained: bool, **text: Any) -> Built:
    import torch

    if spec.source == "checkpoint":
        inner = _checkpoint_inner_spec(spec)
        return _build(inner, pretrained=False)
    if pretrained and not spec.control:
        return _dispatch(spec, pretrained=True, **text)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        built = _dispatch(spec, pretrained=False, **text)
    built.info.update(kind="random", seed=RANDOM_SEED)
    if spec.control:
        built.info["control"] = True
    return built


def _dispatch(spec: ModelSpec, *, pretrained: bool, **text: Any) -> Built:
    if spec.source == "timm" and pretrained and spec.packaged_weights:
        return build_packaged(spec)
    if pretrained:  # an offline machine fails at once from the caches, not after retries
        go_offline_if_unreachable()
    if spec.source == "timm":
        return build_timm(spec, pretrained=pretrained)
    if spec.source in ("open_clip", "hf-hub"):
        return build_open_clip(spec, pretrained=pretrained, **text)
    if spec.source == "torch.hub":
        return build_torch_hub(spec, pretrained=pretrained)
    raise ModelError(f"Model {spec.name!r}: unsupported source {spec.source!r}.")


def _checkpoint_inner_spec(spec: ModelSpec) -> ModelSpec:
    ident = spec.identifier
    if ident.startswith("open_clip:"):
        source, ident = "open_clip", ident[len("open_clip:") :]
    elif ident.startswith("timm:"):
        source, ident = "timm", ident[len("timm:") :]
    else:
        source = "timm"
    return dataclasses.replace(
        spec, source=source, identifier=ident, checkpoint_path=None, embed_dim=None
    )


def create_text_embedder(
    name: str,
    *,
    weights: str | Path = "pretrained",
    device: str = "cpu",
    context_length: int | None = None,
) -> TextTower:
    """Build a text-image model with its text tower and tokenizer, ready to embed texts.

    The same weights policy as :func:`~embbench.models.create_embedder` (``pretrained``,
    ``random``, ``auto``); the returned tower's ``model.visual`` is the image tower, so one build
    serves both sides (``create_embedder(name, with_text=True)`` gives the image
    :class:`~embbench.models.Embedder` with this tower as its ``text``).

    Args:
        name: A text-image model (``open_clip`` or ``hf-hub`` source), e.g. ``"test_clip"``.
        weights: ``"pretrained"``, ``"random"`` or ``"auto"``.
        device: Where to put the model.
        context_length: Override the tokenizer's context length (default: the model's).

    Returns:
        The :class:`TextTower`.

    Raises:
        TextUnsupportedError: The model is image-only (checked before anything is built).
        WeightsUnavailableError: The weights or the tokenizer cannot be fetched.
    """
    check_text_capable(get_model_spec(name), "text")
    emb = create_embedder(
        name, weights=weights, device=device, with_text=True, context_length=context_length
    )
    assert emb.text is not None  # with_text on a text-capable spec always builds it
    return emb.text
