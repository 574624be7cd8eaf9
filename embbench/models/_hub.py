"""Builder for torch.hub entries: the published state dict loaded into the timm architecture.

The hub repository's code is never run, except for a spec with ``trust_remote_code=True``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from embbench._utils import sha256_file
from embbench.models._builder import Built, offline, unavailable
from embbench.models._checkpoints import load_state_dict_into
from embbench.models._timm import build_timm, timm_transform
from embbench.models._zoo import ModelError, ModelSpec

logger = logging.getLogger(__name__)


def build_torch_hub(spec: ModelSpec, *, pretrained: bool) -> Built:
    import torch

    if not spec.weights_url:
        return _build_torch_hub_remote(spec, pretrained=pretrained)
    inner = dataclasses.replace(
        spec, source="timm", identifier=spec.arch or "", pretrained=None, embed_dim=None
    )
    built = build_timm(inner, pretrained=False)
    built.info = {"kind": "random", "id": spec.full_id}
    if not pretrained:
        return built
    url = spec.weights_url
    filename = Path(url.split("?")[0]).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if offline() and not cached.is_file():
        raise unavailable(spec, f"{url} is not in the torch hub cache ({cached})")
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", weights_only=True, check_hash=False, progress=False
        )
    except OSError as e:
        raise unavailable(spec, e) from e
    load_state_dict_into(built, state, source=url)
    built.info = {
        "kind": "pretrained",
        "id": spec.full_id,
        "tag": spec.pretrained,
        "url": url,
        "sha256": sha256_file(cached) if cached.is_file() else None,
    }
    return built


def _build_torch_hub_remote(spec: ModelSpec, *, pretrained: bool) -> Built:
    """torch.hub.load of the repo's own code: only for specs with trust_remote_code."""
    import torch

    if not spec.trust_remote_code:  # ModelSpec validation already refuses this; belt and braces
        raise ModelError(
            f"Model {spec.name!r} would run code from {spec.identifier}; set "
            "trust_remote_code=True in its spec only if you trust that repository."
        )
    logger.warning("Model %r: running remote code from torch.hub %s", spec.name, spec.identifier)
    try:
        model = torch.hub.load(
            spec.identifier,
            spec.pretrained,
            pretrained=pretrained,
            trust_repo=True,
            **dict(spec.model_kwargs),
        )
    except OSError as e:
        raise unavailable(spec, e) from e
    transform, cfg = timm_transform(model, spec.data_config, spec.model_kwargs)
    input_size = tuple(int(x) for x in cfg["input_size"])
    with torch.no_grad():
        model.eval()
        embed_dim = int(model(torch.zeros(1, *input_size)).shape[-1])
    return Built(
        model=model,
        transform=transform,
        data_config=cfg,
        input_size=input_size,
        embed_dim=embed_dim,
        info={"kind": "pretrained" if pretrained else "random", "id": spec.full_id},
        head_prefixes=("fc.", "head."),
    )
