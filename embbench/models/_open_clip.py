"""Builder for open_clip models (and open_clip models on the Hugging Face Hub): the image tower.

The text tower is dropped unless asked for (``with_text=True``: a
:class:`~embbench.models.TextTower` with open_clip's own tokenizer); the transform is
open_clip's own validation transform.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from embbench.models._builder import Built, no_published_weights, unavailable
from embbench.models._text import TextTower, tokenizer_unavailable
from embbench.models._zoo import CONFIG_DIR, ModelError, ModelSpec, WeightsUnavailableError

_OPEN_CLIP_READY = False


class _OpenClipExpected(logging.Filter):
    """Drop open_clip's root-logger lines for events embbench handles and reports itself.

    open_clip logs "Failed to download weights" (ERROR) before raising, which embbench turns
    into WeightsUnavailableError (or, under ``weights: auto``, one INFO line and a recorded
    fallback), "No pretrained weights loaded" (WARNING) when random weights were asked for, and
    get_tokenizer's "Could not load config from hf-hub" (WARNING) before its tokenizer error.
    """

    _EXPECTED = (
        "Failed to download weights for tag",
        "No pretrained weights loaded for model",
        "Could not load config from hf-hub:",  # get_tokenizer offline: reported as one line
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and record.getMessage().startswith(self._EXPECTED))


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Apply :class:`_OpenClipExpected` to the root logger around an open_clip call."""
    root, f = logging.getLogger(), _OpenClipExpected()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def open_clip_module() -> Any:
    """Import open_clip once, with embbench's tiny configs registered."""
    global _OPEN_CLIP_READY
    import open_clip

    if not _OPEN_CLIP_READY:
        open_clip.add_model_config(CONFIG_DIR)
        _OPEN_CLIP_READY = True
    return open_clip


def _open_clip_preprocess_overrides(data_config: Mapping[str, Any] | None) -> dict[str, Any]:
    if not data_config:
        return {}
    out: dict[str, Any] = {}
    for key in ("mean", "std", "interpolation", "resize_mode"):
        if key in data_config:
            v = data_config[key]
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def load_tokenizer(spec: ModelSpec, arch: str, context_length: int | None = None) -> Any:
    """open_clip's own tokenizer for a model (``get_tokenizer``), with the offline error.

    Args:
        spec: The model's spec.
        arch: The open_clip name the tokenizer is looked up by (the architecture, or
            ``hf-hub:org/repo``).
        context_length: Override the model's context length (default: the model config's).

    Returns:
        The tokenizer: ``list[str] -> (n, context_length)`` token tensor.

    Raises:
        WeightsUnavailableError: It needs files from the Hugging Face Hub that are not cached.
    """
    oc = open_clip_module()
    try:
        with _quiet_open_clip():
            return oc.get_tokenizer(arch, context_length=context_length)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        raise tokenizer_unavailable(spec, arch, e) from e


def build_open_clip(
    spec: ModelSpec,
    *,
    pretrained: bool,
    with_text: bool = False,
    context_length: int | None = None,
) -> Built:
    """Build an open_clip model: its image tower, and its text tower when ``with_text``.

    Args:
        spec: The model (``open_clip`` or ``hf-hub`` source).
        pretrained: Load the published weights (else random).
        with_text: Keep the text tower and load the tokenizer (``Built.text``).
        context_length: Override the tokenizer's context length.

    Returns:
        The :class:`Built` image tower (with ``text`` set when asked).
    """
    oc = open_clip_module()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    force_pp: dict[str, Any] = {}
    if spec.source == "hf-hub":
        if pretrained:
            arch, tag = spec.identifier, None
        else:
            if not spec.arch:
                raise WeightsUnavailableError(
                    f"Model {spec.name!r} ({spec.identifier}) takes its architecture from the "
                    "Hub, and this spec has no `arch` to build it offline. Fix: register it "
                    "with arch=<open_clip architecture> or use weights='pretrained' online."
                )
            arch, tag = spec.arch, None
            force_pp = _open_clip_preprocess_overrides(spec.data_config)
    else:
        arch, tag = spec.identifier, spec.pretrained
        if oc.get_model_config(arch) is None:
            raise ModelError(
                f"Model {spec.name!r}: {arch!r} is not an open_clip architecture. See "
                "open_clip.list_models()."
            )
        if tag and not oc.get_pretrained_cfg(arch, tag):
            raise ModelError(
                f"Model {spec.name!r}: open_clip has no pretrained tag {tag!r} for {arch!r}. "
                f"Known tags: {oc.list_pretrained_tags_by_model(arch)}."
            )
        if pretrained and not tag:
            raise no_published_weights(spec)
        if not pretrained and tag:
            # Random weights still get the preprocessing of the tag (mean/std/interpolation).
            pcfg = oc.get_pretrained_cfg(arch, tag)
            force_pp = {
                k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg
            }
        force_pp.update(_open_clip_preprocess_overrides(spec.data_config))
    tokenizer = None
    if with_text:  # first: a tokenizer missing offline fails before the model is built
        tokenizer = load_tokenizer(spec, arch, context_length)  # arch or hf-hub:org/repo
    kwargs = dict(spec.model_kwargs)
    try:
        with _quiet_open_clip():
            clip = oc.create_model(
                arch,
                pretrained=tag if pretrained else None,
                pretrained_text=False,
                force_preprocess_cfg=force_pp or None,
                require_pretrained=pretrained,
                **kwargs,
            )
    except (RuntimeError, OSError) as e:
        if pretrained:  # architecture and tag were validated above: this is a fetch failure
            raise unavailable(spec, e) from e
        raise
    visual = clip.visual
    pp = dict(visual.preprocess_cfg)
    transform = image_transform_v2(PreprocessCfg(**pp), is_train=False)
    size = pp["size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    data_config = {
        "input_size": (3, int(h), int(w)),
        "interpolation": pp.get("interpolation"),
        "mean": tuple(pp.get("mean", ())),
        "std": tuple(pp.get("std", ())),
        "crop_pct": 1.0,
        "crop_mode": "squash" if pp.get("resize_mode") == "squash" else "center",
        "resize_mode": pp.get("resize_mode"),
    }
    embed_dim = _open_clip_embed_dim(visual, data_config["input_size"])
    full = spec.identifier if spec.source == "hf-hub" else (f"{arch}/{tag}" if tag else arch)
    info: dict[str, Any] = {"kind": "pretrained" if pretrained else "random", "id": full}
    if pretrained:
        info["tag"] = tag
    text = None
    if with_text:
        text = TextTower(
            spec=spec,
            model=clip.eval(),
            tokenizer=tokenizer,
            tokenizer_id=arch,
            context_length=int(getattr(tokenizer, "context_length", 0) or 0),
            embed_dim=embed_dim,
            weights_used=info,
        )
    del clip  # without with_text only the image tower is kept (image-only tasks' memory)
    return Built(
        model=visual,
        transform=transform,
        data_config=data_config,
        input_size=data_config["input_size"],
        embed_dim=embed_dim,
        info=info,
        keep_prefix="visual.",
        text=text,
    )


def _open_clip_embed_dim(visual: Any, input_size: tuple[int, int, int]) -> int:
    dim = getattr(visual, "output_dim", None)
    if isinstance(dim, int) and dim > 0:
        return dim
    import torch

    with torch.no_grad():
        was_training = visual.training
        visual.eval()
        out = visual(torch.zeros(1, *input_size))
        visual.train(was_training)
    return int(out.shape[-1])
