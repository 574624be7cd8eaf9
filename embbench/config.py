"""Typed, validated stage configurations and layered params files.

Each pipeline stage has one pydantic config (``extra="forbid"``) whose fields are mirrored, name
for name, by its notebook's ``parameters`` cell and by ``params/<notebook>.yaml``. Params files
are layered: later files win (``-f params/01_embed.yaml -f params/demo/01_embed.yaml``). An
unknown key fails with the file, the key and a did-you-mean suggestion, because papermill alone
only warns on one and silently runs the default.

Stage configs register themselves under their notebook's name with :func:`register_stage`, so
``config_for("01_embed")`` finds the class and the tests can check every notebook against it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from embbench._registry import Registry
from embbench._utils import stable_hash

C = TypeVar("C", bound="StageConfig")

_STAGES: Registry[type[StageConfig]] = Registry("stage")


class ConfigError(ValueError):
    """A params file or parameter value is invalid; the message names the key and the fix."""


def register_stage(notebook: str):
    """Class decorator: register a :class:`StageConfig` subclass for ``notebook``."""

    def wrap(cls: type[C]) -> type[C]:
        cls.notebook = notebook
        _STAGES.register(notebook, cls, overwrite=True)
        return cls

    return wrap


def config_for(notebook: str) -> type[StageConfig]:
    """The config class registered for ``notebook``; importing the stage modules registers them."""
    import embbench.stages  # noqa: F401  (registers every stage)

    return _STAGES.get(notebook)


def stage_names() -> list[str]:
    """All registered notebook names."""
    import embbench.stages  # noqa: F401

    return _STAGES.names()


def read_params_files(files: Iterable[str | Path]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge YAML params files, later ones winning.

    Returns:
        The merged mapping and, for each key, the file it last came from (for error messages).

    Raises:
        ConfigError: A file is missing, is not YAML, or is not a mapping of names to values.
    """
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"params file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"params file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"params file {path} must be a mapping of name: value, got {type(data).__name__}"
            )
        for key, value in data.items():
            merged[str(key)] = value
            origin[str(key)] = str(path)
    return merged, origin


class StageConfig(BaseModel):
    """Base of every stage's config: strict fields, layered loading, a stable hash.

    Subclasses declare fields with a comment each; ``hash_exclude`` names fields that do not
    change results (paths, URIs, worker counts, overwrite policy) and so stay out of the hash.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    notebook: ClassVar[str] = ""
    hash_exclude: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_params(
        cls: type[C], params: Mapping[str, Any], origin: Mapping[str, str] | None = None
    ) -> C:
        """Build and validate from a mapping of parameter names to values.

        Raises:
            ConfigError: Naming every unknown key (with suggestions) or invalid value, and the
                file it came from when known.
        """
        origin = origin or {}
        fields = list(cls.model_fields)
        unknown = [k for k in params if k not in cls.model_fields]
        if unknown:
            lines = []
            for key in unknown:
                close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                src = f" in {origin[key]}" if key in origin else ""
                lines.append(f"unknown parameter {key!r}{src}{hint}")
            raise ConfigError(
                f"{cls.__name__} ({cls.notebook or 'stage'}): "
                + "; ".join(lines)
                + f". Allowed parameters: {', '.join(fields)}."
            )
        try:
            return cls(**params)
        except ValidationError as exc:
            parts = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"]) or "(config)"
                src = (
                    f" (from {origin[err['loc'][0]]})"
                    if err["loc"] and err["loc"][0] in origin
                    else ""
                )
                value = err.get("input")
                parts.append(f"{key}={value!r}{src}: {err['msg']}")
            raise ConfigError(
                f"{cls.__name__}: invalid parameter(s): " + "; ".join(parts)
            ) from None

    @classmethod
    def from_files(cls: type[C], *files: str | Path, **overrides: Any) -> C:
        """Load layered params files (later wins), then apply keyword overrides."""
        params, origin = read_params_files(files)
        params.update(overrides)
        return cls.from_params(params, origin)

    @classmethod
    def from_namespace(cls: type[C], namespace: Mapping[str, Any]) -> C:
        """Build from a notebook's globals, taking exactly this config's field names.

        The notebook's parameters cell defines every field; papermill-injected values override.
        """
        missing = [f for f in cls.model_fields if f not in namespace]
        if missing:
            raise ConfigError(f"{cls.__name__}: the notebook's parameters cell lacks {missing}")
        return cls.from_params({f: namespace[f] for f in cls.model_fields})

    def config_hash(self) -> str:
        """A stable 12-hex-digit hash of the fields that change results."""
        data = self.model_dump(mode="json", exclude=set(self.hash_exclude))
        return stable_hash(data)
