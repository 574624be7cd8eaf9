"""The trainable network: a timm model from the zoo with a new classification head."""

from __future__ import annotations

import logging
from typing import Any

import torch

from embbench.models import create_embedder, get_model_spec
from embbench.train.errors import FinetuneError

logger = logging.getLogger(__name__)

__all__ = ["FINETUNABLE_SOURCES", "build_trainable", "timm_arch"]

FINETUNABLE_SOURCES = ("timm", "torch.hub", "checkpoint")


def timm_arch(spec) -> str:
    """The timm architecture name of a timm, torch.hub-with-arch or checkpoint model spec."""
    if spec.source == "timm":
        return spec.identifier
    if spec.source == "torch.hub" and spec.arch:
        return spec.arch
    return spec.identifier.removeprefix("timm:")


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
    spec = get_model_spec(model)
    if spec.source not in FINETUNABLE_SOURCES or (
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

            kwargs = {**dict(spec.model_kwargs), "dynamic_img_size": True}
            rebuilt = timm.create_model(timm_arch(spec), pretrained=False, num_classes=0, **kwargs)
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
