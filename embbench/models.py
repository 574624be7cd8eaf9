"""The model zoo: a registry of the paper's embedding models and a factory for embedders.

Every model of the study is a :class:`ModelSpec` (data, in ``embbench/model_configs/zoo.yaml``)
with its real identifier in timm, open_clip, the Hugging Face Hub or torch.hub.
:func:`create_embedder` turns a name into an :class:`Embedder`: the model in eval mode (images
to pooled penultimate features, shape ``(B, D)``) together with ITS OWN preprocessing (timm's
``resolve_model_data_config`` + ``create_transform``; open_clip's validation transform), never
a hand-copied one.

>>> from embbench.models import create_embedder, list_models
>>> list_models(family="ssl")
['dino_resnet50', 'dino_vitb16', 'dinov2_vitb14', 'mae_vitb16', 'maws_vitb16']
>>> emb = create_embedder("test_vit", weights="random")  # tiny, offline
>>> emb.embed_dim, emb.input_size
(64, (3, 160, 160))

Names: a registered name (``list_models()``), or for anything else ``timm:<arch>[.<tag>]``,
``open_clip:<arch>[/<tag>]`` or ``hf-hub:<org>/<repo>`` (an open_clip model on the Hub).

Weights (``weights=``):

- ``"pretrained"``: the published weights; if they cannot be fetched a
  :class:`WeightsUnavailableError` names the model and the fix (no silent fallback).
- ``"random"``: random initialisation, seeded (:data:`RANDOM_SEED`) so vectors are repeatable.
- ``"auto"``: pretrained, else random with a WARNING; ``weights_used["fell_back"]`` says so.
- a path to a checkpoint (``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=True)``, or
  ``.safetensors``): loaded into the architecture; classifier-head keys (and an open_clip text
  tower) are ignored, any other missing or unexpected key is an error.

torch.hub entries never run the hub repository's code: their published state dict is loaded
into the equivalent timm architecture (``arch``) from the torch hub cache (``HF_HUB_OFFLINE=1``
also stops these URL downloads). Remote code runs only for a spec with
``trust_remote_code=True``. Access tokens are read by huggingface_hub from the environment
(``HF_TOKEN``) and are never passed or logged here.

:func:`model_facts` computes parameters and FLOPs (cached in ``cache_dir()/model_facts.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from embbench._registry import Registry, UnknownNameError
from embbench.paths import cache_dir

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
ZOO_FILE = CONFIG_DIR / "zoo.yaml"

SOURCES = ("timm", "open_clip", "hf-hub", "torch.hub", "checkpoint")
FAMILIES = ("supervised", "ssl", "text-image", "unknown")
BACKBONES = ("convolutional", "transformer", "unknown")
WEIGHT_MODES = ("pretrained", "random", "auto")
RANDOM_SEED = 0  # seed of every random initialisation (so random-weight vectors are repeatable)
FACTS_VERSION = 1  # bump when model_facts changes what it counts

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_DATA_CONFIG_KEYS = (
    "input_size",
    "interpolation",
    "mean",
    "std",
    "crop_pct",
    "crop_mode",
    "resize_mode",
)
_TORCH_HUB_REQUIRED = ("input_size", "interpolation", "mean", "std", "crop_pct")


class ModelError(ValueError):
    """A model spec, name or weights argument is invalid; the message says what and how to fix."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched (offline, not cached, or none published)."""


class CheckpointError(ValueError):
    """A checkpoint file does not fit the model's architecture."""


@dataclass(frozen=True)
class ModelSpec:
    """One model of the zoo: where it comes from and how the paper labels it.

    Attributes:
        name: Short registry name used in params files, caches and result records.
        source: ``timm``, ``open_clip``, ``hf-hub`` (an open_clip model on the Hugging Face
            Hub), ``torch.hub`` or ``checkpoint`` (a local fine-tuned state dict).
        identifier: The real id: timm or open_clip architecture, ``hf-hub:org/repo``, torch.hub
            repo (``owner/repo[:ref]``), or for ``checkpoint`` the architecture
            (``resnet50``, ``timm:resnet50`` or ``open_clip:ViT-B-16``).
        pretrained: timm or open_clip pretrained tag, torch.hub entrypoint, or None. For a
            ``checkpoint`` spec, the base tag whose preprocessing the fine-tuning used.
        family: ``supervised``, ``ssl``, ``text-image`` (``unknown`` for ad-hoc names).
        backbone: ``convolutional`` or ``transformer`` (``unknown`` for ad-hoc names).
        paper_name: Label used in the paper's tables and figures.
        trust_remote_code: Allow running code from the model's repository (torch.hub entries
            without ``weights_url``). Never needed by the registered models.
        notes: Why this identifier, and caveats.
        embed_dim: Expected embedding dimension; checked against the built model.
        arch: Architecture built locally when ``identifier`` is not buildable offline: a timm
            architecture for torch.hub entries, an open_clip one for hf-hub entries.
        weights_url: Published state dict loaded into ``arch`` (torch.hub entries).
        data_config: Preprocessing for sources that do not ship one (``input_size``,
            ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``,
            ``resize_mode``); ignored when the source provides its own.
        model_kwargs: Extra constructor keyword arguments (e.g. ``{"img_size": 224}``).
        checkpoint_path: Weights file of a ``checkpoint`` spec.
        tiny: A tiny random-weight model for tests and smoke runs, not part of the paper.
    """

    name: str
    source: str
    identifier: str
    pretrained: str | None
    family: str
    backbone: str
    paper_name: str
    trust_remote_code: bool = False
    notes: str = ""
    embed_dim: int | None = None
    arch: str | None = None
    weights_url: str | None = None
    data_config: Mapping[str, Any] | None = field(default=None, hash=False)
    model_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    checkpoint_path: str | None = None
    tiny: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ModelError(f"Invalid model spec {self.name!r}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency of this spec, as readable sentences (empty when valid)."""
        out: list[str] = []

        def bad(key: str, value: Any, allowed: Any) -> None:
            out.append(f"{key}={value!r} is not one of {allowed}")

        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            out.append(
                f"name={self.name!r} must be letters, digits, '_', '.', '-' (no ':', which "
                "marks the timm:/open_clip:/hf-hub: prefixes)"
            )
        if self.source not in SOURCES:
            bad("source", self.source, SOURCES)
        if self.family not in FAMILIES:
            bad("family", self.family, FAMILIES)
        if self.backbone not in BACKBONES:
            bad("backbone", self.backbone, BACKBONES)
        if not self.identifier or not isinstance(self.identifier, str):
            out.append("identifier must be a non-empty string")
        if not self.paper_name:
            out.append("paper_name must be a non-empty string")
        if self.embed_dim is not None and (
            not isinstance(self.embed_dim, int) or self.embed_dim <= 0
        ):
            out.append(f"embed_dim={self.embed_dim!r} must be a positive integer or null")
        if self.data_config is not None:
            unknown = sorted(set(self.data_config) - set(_DATA_CONFIG_KEYS))
            if unknown:
                out.append(f"data_config has unknown keys {unknown}; allowed: {_DATA_CONFIG_KEYS}")
        if not isinstance(self.model_kwargs, Mapping):
            out.append("model_kwargs must be a mapping")
        if self.source == "hf-hub" and not str(self.identifier).startswith("hf-hub:"):
            out.append(f"hf-hub identifier {self.identifier!r} must start with 'hf-hub:'")
        if self.source == "torch.hub":
            if not self.pretrained:
                out.append("a torch.hub spec needs `pretrained` = the hub entrypoint")
            if self.weights_url and not self.arch:
                out.append("a torch.hub spec with weights_url needs `arch` (a timm architecture)")
            if not self.weights_url and not self.trust_remote_code:
                out.append(
                    "a torch.hub spec without weights_url would run the hub repo's code: give "
                    "`arch` + `weights_url`, or set trust_remote_code: true deliberately"
                )
            missing = [k for k in _TORCH_HUB_REQUIRED if k not in (self.data_config or {})]
            if missing:
                out.append(f"a torch.hub spec needs data_config with {missing}")
        if self.source == "checkpoint" and not self.checkpoint_path:
            out.append("a checkpoint spec needs checkpoint_path")
        return out

    @property
    def full_id(self) -> str:
        """The identifier with its tag, as its library spells it (e.g. ``resnet50.a1_in1k``)."""
        if self.source == "timm" and self.pretrained:
            return f"{self.identifier}.{self.pretrained}"
        if self.source == "open_clip" and self.pretrained:
            return f"{self.identifier}/{self.pretrained}"
        if self.source == "torch.hub":
            return f"{self.identifier}/{self.pretrained}"
        return self.identifier

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-able data."""
        d = dataclasses.asdict(self)
        d["data_config"] = _jsonable(self.data_config)
        d["model_kwargs"] = _jsonable(self.model_kwargs)
        return d


# ----------------------------------------------------------------------------------- registry

_MODELS: Registry[ModelSpec] = Registry("model")


def register_model(spec: ModelSpec, *, overwrite: bool = False) -> ModelSpec:
    """Add a model to the registry (e.g. a fine-tuned checkpoint) so it can be used by name.

    Args:
        spec: The model.
        overwrite: Replace an entry of the same name instead of raising.

    Returns:
        The registered spec.
    """
    return _MODELS.register(spec.name, spec, overwrite=overwrite)


def unregister_model(name: str) -> None:
    """Remove a registered model (tests and notebooks that register temporary entries)."""
    _MODELS.get(name)  # raises with suggestions when unknown
    del _MODELS._entries[name]


def register_finetuned(
    name: str,
    base: str,
    checkpoint_path: str | Path,
    *,
    paper_name: str | None = None,
    notes: str = "",
    overwrite: bool = False,
) -> ModelSpec:
    """Register a headless fine-tuned checkpoint of a zoo model under ``name``.

    The new spec builds ``base``'s architecture with ``base``'s preprocessing and loads the
    checkpoint (classifier-head keys ignored). Supported bases: timm, open_clip, hf-hub (with
    ``arch``) and torch.hub (with ``arch``) entries.

    Args:
        name: New registry name (e.g. ``"resnet50_ft_cars196"``).
        base: Registered name (or ``timm:``/``open_clip:`` name) it was fine-tuned from.
        checkpoint_path: The state dict file.
        paper_name: Label for tables (default: ``"<base label> (fine-tuned)"``).
        notes: Free text (dataset, recipe, run id).
        overwrite: Replace an existing entry of the same name.

    Returns:
        The registered spec.
    """
    b = get_model_spec(base)
    if b.source == "timm":
        identifier, tag, data_config = f"timm:{b.identifier}", b.pretrained, b.data_config
    elif b.source == "open_clip":
        identifier, tag, data_config = f"open_clip:{b.identifier}", b.pretrained, b.data_config
    elif b.source == "hf-hub" and b.arch:
        identifier, tag, data_config = f"open_clip:{b.arch}", None, b.data_config
    elif b.source == "torch.hub" and b.arch:
        identifier, tag, data_config = f"timm:{b.arch}", None, b.data_config
    elif b.source == "checkpoint":
        identifier, tag, data_config = b.identifier, b.pretrained, b.data_config
    else:
        raise ModelError(
            f"Cannot register a fine-tuned checkpoint of {base!r} (source {b.source}): its "
            "architecture is not buildable locally; give the base spec an `arch`."
        )
    spec = ModelSpec(
        name=name,
        source="checkpoint",
        identifier=identifier,
        pretrained=tag,
        family=b.family,
        backbone=b.backbone,
        paper_name=paper_name or f"{b.paper_name} (fine-tuned)",
        notes=notes or f"fine-tuned from {b.name}",
        embed_dim=b.embed_dim,
        data_config=data_config,
        model_kwargs=dict(b.model_kwargs),
        checkpoint_path=str(Path(checkpoint_path).expanduser().resolve()),
        tiny=b.tiny,
    )
    return register_model(spec, overwrite=overwrite)


def list_models(
    family: str | None = None, source: str | None = None, *, include_tiny: bool = False
) -> list[str]:
    """Registered model names, sorted, optionally filtered.

    Args:
        family: Keep only this family (``supervised``, ``ssl``, ``text-image``).
        source: Keep only this source (``timm``, ``open_clip``, ``hf-hub``, ``torch.hub``,
            ``checkpoint``).
        include_tiny: Also list the tiny test models.

    Returns:
        The matching names.
    """
    if family is not None and family not in FAMILIES:
        raise ModelError(f"Unknown family {family!r}; choose one of {FAMILIES}.")
    if source is not None and source not in SOURCES:
        raise ModelError(f"Unknown source {source!r}; choose one of {SOURCES}.")
    out = []
    for name in _MODELS.names():
        spec = _MODELS.get(name)
        if spec.tiny and not include_tiny:
            continue
        if family is not None and spec.family != family:
            continue
        if source is not None and spec.source != source:
            continue
        out.append(name)
    return out


def get_model_spec(name: str) -> ModelSpec:
    """The spec of a registered name, or an ad-hoc spec for a prefixed name.

    Args:
        name: A registered name, or ``timm:<arch>[.<tag>]``, ``open_clip:<arch>[/<tag>]``,
            ``hf-hub:<org>/<repo>``.

    Returns:
        The spec.

    Raises:
        UnknownNameError: Unknown name; the message suggests close registered names.
    """
    if name in _MODELS:
        return _MODELS.get(name)
    adhoc = _adhoc_spec(name)
    if adhoc is not None:
        return adhoc
    # Fine-tuned models (stage 02) are listed in runs/finetuned_models.json: load them on demand.
    from embbench.finetune import register_finetuned_models

    register_finetuned_models()
    try:
        return _MODELS.get(name)
    except UnknownNameError as e:
        raise UnknownNameError(
            f"{e} Any timm or open_clip model also works as 'timm:<arch>[.<tag>]', "
            "'open_clip:<arch>[/<tag>]' or 'hf-hub:<org>/<repo>'."
        ) from None


def _adhoc_spec(name: str) -> ModelSpec | None:
    common = {"family": "unknown", "backbone": "unknown", "paper_name": name}
    safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    if name.startswith("timm:") and len(name) > 5:
        arch, _, tag = name[5:].partition(".")
        return ModelSpec(
            name=safe, source="timm", identifier=arch, pretrained=tag or None, **common
        )
    if name.startswith("open_clip:") and len(name) > 10:
        arch, _, tag = name[10:].partition("/")
        return ModelSpec(
            name=safe, source="open_clip", identifier=arch, pretrained=tag or None, **common
        )
    if name.startswith("hf-hub:") and "/" in name:
        return ModelSpec(name=safe, source="hf-hub", identifier=name, pretrained=None, **common)
    return None


def load_model_file(path: str | Path) -> list[ModelSpec]:
    """Read model specs from a YAML file with a top-level ``models:`` list.

    Args:
        path: The YAML file.

    Returns:
        The specs, validated (unknown keys and invalid values raise, naming file and entry).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ModelError(f"Cannot read model file {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ModelError(f"{path}: expected a top-level 'models:' list of model entries.")
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    specs = []
    for i, entry in enumerate(data["models"]):
        where = f"{path}, models[{i}]" + (
            f" ({entry.get('name')!r})" if isinstance(entry, dict) else ""
        )
        if not isinstance(entry, dict):
            raise ModelError(f"{where}: each entry must be a mapping of ModelSpec fields.")
        unknown = sorted(set(entry) - fields)
        if unknown:
            close = {k: _close(k, fields) for k in unknown}
            hint = ", ".join(
                f"{k!r}" + (f" (did you mean {v!r}?)" if v else "") for k, v in close.items()
            )
            raise ModelError(f"{where}: unknown key(s) {hint}. Allowed keys: {sorted(fields)}.")
        entry = dict(entry)
        entry.setdefault("pretrained", None)
        if entry.get("model_kwargs") is None:
            entry.pop("model_kwargs", None)
        try:
            specs.append(ModelSpec(**entry))
        except (ModelError, TypeError) as e:
            raise ModelError(f"{where}: {e}") from None
    return specs


def register_models_from_yaml(path: str | Path, *, overwrite: bool = False) -> list[str]:
    """Register every model of a YAML file (same format as ``model_configs/zoo.yaml``).

    Args:
        path: The YAML file.
        overwrite: Replace entries with the same names.

    Returns:
        The registered names.
    """
    specs = load_model_file(path)
    for spec in specs:
        register_model(spec, overwrite=overwrite)
    return [s.name for s in specs]


def _close(key: str, choices: set[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(key, sorted(choices), n=1, cutoff=0.6)
    return m[0] if m else None


register_models_from_yaml(ZOO_FILE)


# ------------------------------------------------------------------------------------ embedder


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
    """

    spec: ModelSpec
    model: torch.nn.Module
    transform: Any
    weights_used: dict[str, Any]
    embed_dim: int
    input_size: tuple[int, int, int]
    data_config: dict[str, Any]
    device: str = "cpu"

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
            {"transform": text, "data_config": _jsonable(self.data_config)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def cache_identity(self) -> dict[str, Any]:
        """Everything that changes the vectors; embedding caches key on it."""
        volatile = {"reason", "fell_back", "path"}
        return {
            "model": self.spec.name,
            "source": self.spec.source,
            "identifier": self.spec.identifier,
            "pretrained": self.spec.pretrained,
            "arch": self.spec.arch,
            "model_kwargs": _jsonable(self.spec.model_kwargs),
            "weights": {k: v for k, v in self.weights_used.items() if k not in volatile},
            "preprocessing": self.preprocessing_fingerprint(),
            "embed_dim": self.embed_dim,
            "input_size": list(self.input_size),
        }


def create_embedder(
    name: str,
    *,
    weights: str | Path = "pretrained",
    device: str = "cpu",
    checkpoint: str | Path | None = None,
) -> Embedder:
    """Build a model with its own preprocessing, ready to embed images.

    Args:
        name: Registered name (``list_models()``), ``timm:<arch>[.<tag>]``,
            ``open_clip:<arch>[/<tag>]`` or ``hf-hub:<org>/<repo>``.
        weights: ``"pretrained"``, ``"random"``, ``"auto"`` (pretrained, else random with a
            warning) or a path to a checkpoint file.
        device: Where to put the model (``cpu``, ``cuda``, ``cuda:1``, ``auto``...).
        checkpoint: A checkpoint file (same as passing its path as ``weights``).

    Returns:
        The :class:`Embedder`.

    Raises:
        WeightsUnavailableError: ``weights="pretrained"`` and they cannot be fetched.
        CheckpointError: The checkpoint does not fit the architecture.
        UnknownNameError: Unknown model name (the message suggests close names).
    """
    spec = get_model_spec(name)
    mode, ckpt = _parse_weights(weights, checkpoint, spec)
    if mode == "auto":
        try:
            built = _build(spec, pretrained=True)
        except WeightsUnavailableError as e:
            logger.warning(
                "Model %r: pretrained weights unavailable, FALLING BACK TO RANDOM WEIGHTS "
                "(embeddings are not meaningful): %s",
                spec.name,
                e,
            )
            built = _build(spec, pretrained=False)
            built.info.update(fell_back=True, reason=str(e))
    else:
        built = _build(spec, pretrained=(mode == "pretrained"))
    if ckpt is not None:
        _load_checkpoint(built, ckpt)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = built.model.eval()
    model.to(device)
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


# ------------------------------------------------------------------------------------ builders


@dataclass
class _Built:
    model: Any
    transform: Any
    data_config: dict[str, Any]
    input_size: tuple[int, int, int]
    embed_dim: int
    info: dict[str, Any]
    head_prefixes: tuple[str, ...] = ()  # checkpoint keys to ignore
    keep_prefix: str | None = None  # checkpoint keys to keep (prefix stripped), e.g. "visual."


def _build(spec: ModelSpec, *, pretrained: bool) -> _Built:
    import torch

    if spec.source == "checkpoint":
        inner = _checkpoint_inner_spec(spec)
        return _build(inner, pretrained=False)
    if pretrained:
        return _dispatch(spec, pretrained=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        built = _dispatch(spec, pretrained=False)
    built.info.update(kind="random", seed=RANDOM_SEED)
    return built


def _dispatch(spec: ModelSpec, *, pretrained: bool) -> _Built:
    if spec.source == "timm":
        return _build_timm(spec, pretrained=pretrained)
    if spec.source in ("open_clip", "hf-hub"):
        return _build_open_clip(spec, pretrained=pretrained)
    if spec.source == "torch.hub":
        return _build_torch_hub(spec, pretrained=pretrained)
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


def _no_published_weights(spec: ModelSpec) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"Model {spec.name!r} ({spec.source} {spec.full_id}) has no published pretrained "
        "weights (no pretrained tag). Fix: pass weights='random' (or 'auto') for a smoke run, "
        "a checkpoint path, or register the model with a pretrained tag."
    )


def _unavailable(spec: ModelSpec, err: BaseException | str) -> WeightsUnavailableError:
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


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _timm_embed_dim(model: Any) -> int:
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _timm_transform(
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


def _head_prefixes(model: Any) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    if isinstance(classifier, str):
        classifier = (classifier,)
    return tuple(f"{c}." for c in classifier)


def _build_timm(spec: ModelSpec, *, pretrained: bool) -> _Built:
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
        raise _no_published_weights(spec)  # timm would silently initialise randomly
    kwargs = dict(spec.model_kwargs)
    try:
        model = timm.create_model(full, pretrained=pretrained, num_classes=0, **kwargs)
    except OSError as e:  # hub/URL download failures and cache misses are OSErrors
        raise _unavailable(spec, e) from e
    transform, cfg = _timm_transform(model, spec.data_config, kwargs)
    info: dict[str, Any] = {"kind": "pretrained" if pretrained else "random", "id": full}
    if pretrained:
        pcfg = model.pretrained_cfg
        info.update(
            tag=pcfg.get("tag"),
            hub_id=pcfg.get("hf_hub_id") or pcfg.get("url") or None,
        )
    return _Built(
        model=model,
        transform=transform,
        data_config=cfg,
        input_size=tuple(int(x) for x in cfg["input_size"]),
        embed_dim=_timm_embed_dim(model),
        info=info,
        head_prefixes=_head_prefixes(model),
    )


_OPEN_CLIP_READY = False


def _open_clip() -> Any:
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


def _build_open_clip(spec: ModelSpec, *, pretrained: bool) -> _Built:
    oc = _open_clip()
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
            raise _no_published_weights(spec)
        if not pretrained and tag:
            # Random weights still get the preprocessing of the tag (mean/std/interpolation).
            pcfg = oc.get_pretrained_cfg(arch, tag)
            force_pp = {
                k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg
            }
        force_pp.update(_open_clip_preprocess_overrides(spec.data_config))
    kwargs = dict(spec.model_kwargs)
    try:
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
            raise _unavailable(spec, e) from e
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
    del clip  # the text tower is not needed; only the image tower is kept
    full = spec.identifier if spec.source == "hf-hub" else (f"{arch}/{tag}" if tag else arch)
    info: dict[str, Any] = {"kind": "pretrained" if pretrained else "random", "id": full}
    if pretrained:
        info["tag"] = tag
    return _Built(
        model=visual,
        transform=transform,
        data_config=data_config,
        input_size=data_config["input_size"],
        embed_dim=embed_dim,
        info=info,
        keep_prefix="visual.",
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


def _build_torch_hub(spec: ModelSpec, *, pretrained: bool) -> _Built:
    import torch

    if not spec.weights_url:
        return _build_torch_hub_remote(spec, pretrained=pretrained)
    inner = dataclasses.replace(
        spec, source="timm", identifier=spec.arch or "", pretrained=None, embed_dim=None
    )
    built = _build_timm(inner, pretrained=False)
    built.info = {"kind": "random", "id": spec.full_id}
    if not pretrained:
        return built
    url = spec.weights_url
    filename = Path(url.split("?")[0]).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if _offline() and not cached.is_file():
        raise _unavailable(spec, f"{url} is not in the torch hub cache ({cached})")
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", weights_only=True, check_hash=False, progress=False
        )
    except OSError as e:
        raise _unavailable(spec, e) from e
    _load_state_dict_into(built, state, source=url)
    built.info = {
        "kind": "pretrained",
        "id": spec.full_id,
        "tag": spec.pretrained,
        "url": url,
        "sha256": _sha256(cached) if cached.is_file() else None,
    }
    return built


def _build_torch_hub_remote(spec: ModelSpec, *, pretrained: bool) -> _Built:
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
        raise _unavailable(spec, e) from e
    transform, cfg = _timm_transform(model, spec.data_config, spec.model_kwargs)
    input_size = tuple(int(x) for x in cfg["input_size"])
    with torch.no_grad():
        model.eval()
        embed_dim = int(model(torch.zeros(1, *input_size)).shape[-1])
    return _Built(
        model=model,
        transform=transform,
        data_config=cfg,
        input_size=input_size,
        embed_dim=embed_dim,
        info={"kind": "pretrained" if pretrained else "random", "id": spec.full_id},
        head_prefixes=("fc.", "head."),
    )


# --------------------------------------------------------------------------------- checkpoints


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"Cannot read checkpoint {path}: {type(e).__name__}: {e}. It must be a state dict "
            "saved with torch.save(model.state_dict(), path) (loaded with weights_only=True; "
            "pickled objects such as argparse.Namespace are refused) or a .safetensors file."
        ) from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(
            f"Checkpoint {path} does not hold a state dict (a mapping of parameter names to "
            "tensors). Save it with torch.save(model.state_dict(), path)."
        )
    return dict(obj)


def _load_checkpoint(built: _Built, path: Path) -> None:
    state = _read_state_dict(path)
    _load_state_dict_into(built, state, source=str(path))
    built.info = {
        "kind": "checkpoint",
        "id": built.info.get("id"),
        "sha256": _sha256(path),
        "path": str(Path(path).resolve()),
    }


def _load_state_dict_into(built: _Built, state: Mapping[str, Any], *, source: str) -> None:
    """Load ``state`` strictly, except classifier-head keys (and an open_clip text tower)."""
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    ignored: list[str] = []
    if built.keep_prefix and any(k.startswith(built.keep_prefix) for k in state):
        n = len(built.keep_prefix)
        ignored = [k for k in state if not k.startswith(built.keep_prefix)]
        state = {k[n:]: v for k, v in state.items() if k.startswith(built.keep_prefix)}
    expected = set(built.model.state_dict())
    for k in list(state):
        if k not in expected and any(k.startswith(p) for p in built.head_prefixes):
            ignored.append(k)
            del state[k]
    try:
        result = built.model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(
            f"Checkpoint {source} does not fit the architecture of "
            f"{built.info.get('id')}: {e}. Fix: load it into the architecture it was trained "
            "with (same timm/open_clip name and model_kwargs such as img_size)."
        ) from e
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {source} does not match {built.info.get('id')}: "
            f"{len(missing)} missing key(s) {missing[:8]}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:8]}. Only classifier-head keys {list(built.head_prefixes)} are "
            "ignored. Fix: pass the checkpoint of this architecture (saved from the model "
            "without DDP/EMA wrappers), or register it with the right base model."
        )
    if ignored:
        logger.info("checkpoint %s: ignored %d head/text key(s)", source, len(ignored))


# ---------------------------------------------------------------------------------- model facts


def model_facts(name: str, weights: str = "random", *, refresh: bool = False) -> dict[str, Any]:
    """Parameters, FLOPs, embedding size and input size of a model, computed (not typed in).

    ``params_m`` counts the parameters of the image encoder (the text tower of text-image
    models excluded) in millions. FLOPs are counted with ``torch.utils.flop_counter`` on one
    image at the model's input size: convolutions and matrix multiplications, attention's
    included (one multiply-add = 2 FLOPs); element-wise ops, norms and softmax are not counted.
    ``gmacs`` = ``gflops`` / 2 is the number timm's tables (and most papers' "GFLOPs") quote:
    ViT-B/16 at 224 px gives 35.1 GFLOPs = 17.6 GMACs. Results are cached in
    ``cache_dir()/model_facts.json`` keyed by name and checked against the spec.

    Args:
        name: Model name (as for :func:`create_embedder`).
        weights: Weights to build with (do not change the counts; ``random`` needs no network).
        refresh: Recompute even when cached.

    Returns:
        ``{"params", "params_m", "gflops", "gmacs", "embed_dim", "input_size"}``.
    """
    spec = get_model_spec(name)
    identity = {
        "version": FACTS_VERSION,
        "source": spec.source,
        "identifier": spec.identifier,
        "pretrained": spec.pretrained,
        "arch": spec.arch,
        "model_kwargs": _jsonable(spec.model_kwargs),
    }
    path = cache_dir() / "model_facts.json"
    cache = _read_json(path)
    hit = cache.get(spec.name)
    if not refresh and isinstance(hit, dict) and hit.get("identity") == identity:
        return {k: v for k, v in hit.items() if k != "identity"}
    emb = create_embedder(name, weights=weights)
    params = sum(p.numel() for p in emb.model.parameters())
    flops, out = _count_flops(emb.model, emb.input_size)
    facts = {
        "params": int(params),
        "params_m": round(params / 1e6, 3),
        "gflops": round(flops / 1e9, 6),
        "gmacs": round(flops / 2e9, 6),
        "embed_dim": int(out.shape[-1]),
        "input_size": list(emb.input_size),
    }
    cache = _read_json(path)  # re-read: another process may have added entries meanwhile
    cache[spec.name] = {**facts, "identity": identity}
    _write_json_atomic(path, cache)
    return facts


def _count_flops(model: Any, input_size: tuple[int, int, int]) -> tuple[int, Any]:
    """FLOPs of one forward pass on one zero image, attention included.

    The fused kernels hide work from ``FlopCounterMode`` on the CPU (nn.MultiheadAttention's
    fast path skips its in/out projections; the CPU flash SDPA kernel is not counted), so the
    count runs with the MHA fast path off and the math SDPA backend, which decompose into
    counted matmuls. Parameters are frozen meanwhile (the counter's module tracker trips on
    parameters that require grad inside attention pools).
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *input_size, device=next(model.parameters()).device)
    flags = [p.requires_grad for p in model.parameters()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        for p in model.parameters():
            p.requires_grad_(False)
        with (
            torch.no_grad(),
            sdpa_kernel([SDPBackend.MATH]),
            FlopCounterMode(display=False) as counter,
        ):
            out = model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return int(counter.get_total_flops()), out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("ignoring unreadable %s (%s); it will be rewritten", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)


__all__ = [
    "BACKBONES",
    "FAMILIES",
    "RANDOM_SEED",
    "SOURCES",
    "CheckpointError",
    "Embedder",
    "ModelError",
    "ModelSpec",
    "WeightsUnavailableError",
    "create_embedder",
    "get_model_spec",
    "list_models",
    "load_model_file",
    "model_facts",
    "register_finetuned",
    "register_model",
    "register_models_from_yaml",
    "unregister_model",
]
