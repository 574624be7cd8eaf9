"""Builder for timm models: the headless model with timm's own eval transform."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from embbench.models._builder import Built, no_published_weights, unavailable
from embbench.models._zoo import ModelError, ModelSpec


def timm_embed_dim(model: Any) -> int:
    """The pooled feature size of a headless timm model."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def timm_transform(
    model: Any, data_config: Mapping[str, Any] | None, model_kwargs: Mapping[str, Any]
) -> tuple[Any, dict]:
    """The model's own eval transform; ``data_config`` overrides, ``img_size`` kwarg respected."""
    from timm.data import create_transform, resolve_data_config

    args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (data_config or {}).items()}
    args.pop("resize_mode", None)
    img_size = model_kwargs.get("img_size")
    if img_size is not None and "input_size" not in args:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        args["input_size"] = (3, int(h), int(w))  # timm keeps the tag's size in pretrained_cfg
    cfg = dict(resolve_data_config(args=args, model=model))
    transform = create_transform(**cfg, is_training=False)
    return transform, cfg


def head_prefixes(model: Any) -> tuple[str, ...]:
    """Key prefixes of a timm model's classifier (``('fc.',)``...): ignored in checkpoints."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    if isinstance(classifier, str):
        classifier = (classifier,)
    return tuple(f"{c}." for c in classifier)


def build_timm(spec: ModelSpec, *, pretrained: bool) -> Built:
    import timm

    full = spec.full_id
    if not timm.is_model(spec.identifier):
        raise ModelError(
            f"Model {spec.name!r}: {spec.identifier!r} is not a timm architecture. See "
            "timm.list_models() (e.g. timm.list_models('resnet*'))."
        )
    if spec.pretrained and full not in timm.list_pretrained(f"{spec.identifier}.*"):
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{spec.identifier}.*")]
        raise ModelError(
            f"Model {spec.name!r}: timm has no pretrained tag {spec.pretrained!r} for "
            f"{spec.identifier!r}. Known tags: {tags}."
        )
    if pretrained and not timm.list_pretrained(f"{spec.identifier}.*"):
        raise no_published_weights(spec)  # timm would silently initialise randomly
    kwargs = dict(spec.model_kwargs)
    try:
        model = timm.create_model(full, pretrained=pretrained, num_classes=0, **kwargs)
    except OSError as e:  # hub/URL download failures and cache misses are OSErrors
        raise unavailable(spec, e) from e
    transform, cfg = timm_transform(model, spec.data_config, kwargs)
    info: dict[str, Any] = {"kind": "pretrained" if pretrained else "random", "id": full}
    if pretrained:
        pcfg = model.pretrained_cfg
        info.update(
            tag=pcfg.get("tag"),
            hub_id=pcfg.get("hf_hub_id") or pcfg.get("url") or None,
        )
    return timm_built(model, transform, cfg, info, head_prefixes(model))


def timm_built(
    model: Any, transform: Any, cfg: dict, info: dict, prefixes: tuple[str, ...]
) -> Built:
    """A timm model with its preprocessing as a :class:`Built` (shared by the timm builders)."""
    return Built(
        model=model,
        transform=transform,
        data_config=cfg,
        input_size=tuple(int(x) for x in cfg["input_size"]),
        embed_dim=timm_embed_dim(model),
        info=info,
        head_prefixes=prefixes,
    )
