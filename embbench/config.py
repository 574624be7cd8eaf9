"""Typed, validated stage configurations and layered params files.

Each pipeline stage has one pydantic config (``extra="forbid"``) whose fields are mirrored, name
for name, by its notebook's ``parameters`` cell and by ``params/<notebook>.yaml``. Params files
are layered: later files win (``-f params/01_embed.yaml -f params/demo/01_embed.yaml``). An
unknown key fails with the file, the key and a did-you-mean suggestion, because papermill alone
only warns on one and silently runs the default.

Stage configs register themselves under their notebook's name with :func:`register_stage`;
:func:`embbench.stages.config_for` imports every stage and finds the class by notebook name, and
the tests check every notebook against it. The fields shared by the stages that embed and score
a grid of (model, dataset) cells are declared once, in :class:`GridConfig`.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from embbench._errors import UserError
from embbench._registry import Registry
from embbench._utils import stable_hash

logger = logging.getLogger(__name__)

C = TypeVar("C", bound="StageConfig")

_STAGES: Registry[type[StageConfig]] = Registry("stage")


class ConfigError(UserError, ValueError):
    """A params file or parameter value is invalid; the message names the key and the fix."""


def register_stage(notebook: str):
    """Class decorator: register a :class:`StageConfig` subclass for ``notebook``."""

    def wrap(cls: type[C]) -> type[C]:
        cls.notebook = notebook
        _STAGES.register(notebook, cls, overwrite=True)
        return cls

    return wrap


def registered_stage(notebook: str) -> type[StageConfig]:
    """The config class registered for ``notebook``.

    Stages register themselves when :mod:`embbench.stages` is imported; this module imports no
    stage (configs sit below the stages). Use :func:`embbench.stages.config_for`, which imports
    them all first.
    """
    return _STAGES.get(notebook)


def registered_stage_names() -> list[str]:
    """The notebook names registered so far."""
    return _STAGES.names()


# Params files are a few dozen keys; anchors and aliases beyond these bounds are a mistake or an
# "alias bomb" (9 anchors of 9 aliases each expand to 9**9 nodes when validated or logged).
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 100_000


def load_yaml(text: str, source: str | Path) -> Any:
    """Parse YAML safely (``yaml.SafeLoader``), refusing alias bombs before anything expands them.

    PyYAML builds an alias as a shared reference, so a small file can stand for billions of
    nodes that validation, hashing or logging would then walk. The node graph is measured
    first: more than :data:`MAX_YAML_ALIASES` aliases, an expanded size above
    :data:`MAX_YAML_NODES` nodes, or a recursive alias is refused.

    Raises:
        ConfigError: The text is not valid YAML or exceeds the bounds (naming ``source``).
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problem = _alias_problem(node)
        if problem:
            raise ConfigError(
                f"params file {source}: {problem}; write the values out (params files need no "
                "anchors) or split the file"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file {source} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"params file {source} is nested too deeply to be read") from None
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _alias_problem(root: yaml.Node) -> str:
    """Why the composed YAML graph is refused ("" if it is not): aliases, size, recursion."""
    size: dict[int, int] = {}
    on_path = {id(root)}
    stack = [(root, iter(_children(root)))]
    aliases = 0
    while stack:
        node, todo = stack[-1]
        child = next(todo, None)
        if child is None:
            stack.pop()
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in _children(node))
            if size[id(node)] > MAX_YAML_NODES:
                return (
                    f"its anchors and aliases expand to more than {MAX_YAML_NODES:,} values "
                    f"(line {node.start_mark.line + 1})"
                )
        elif id(child) in on_path:
            return f"a recursive alias at line {child.start_mark.line + 1}"
        elif id(child) in size:  # a node reached again: an alias
            aliases += 1
            if aliases > MAX_YAML_ALIASES:
                return f"more than {MAX_YAML_ALIASES} aliases (*name)"
        else:
            on_path.add(id(child))
            stack.append((child, iter(_children(child))))
    return ""


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
        data = load_yaml(path.read_text(encoding="utf-8"), path) or {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"params file {path} must be a mapping of name: value, got {type(data).__name__}"
            )
        for key, value in data.items():
            merged[str(key)] = value
            origin[str(key)] = str(path)
        if "datasets" in data:
            _drop_overridden_entries(merged, origin, str(path))
    return merged, origin


def _drop_overridden_entries(merged: dict[str, Any], origin: dict[str, str], path: str) -> None:
    """Forget earlier files' ``data_root`` / ``data_options`` entries of datasets ``path`` removed.

    Layering ``-f params/demo/01_embed.yaml -f my.yaml`` where ``my.yaml`` sets ``datasets:
    [my_shop]`` leaves the demo overlay's ``data_options: {demo: ...}`` behind: that entry
    belonged to the grid the later file replaced, so it is dropped with an INFO line. Entries
    written in the same file as ``datasets`` (or later) are the user's own and stay, so a typo
    there (``my_sohp``) is still refused by :class:`GridConfig`.
    """
    datasets = merged.get("datasets")
    if not isinstance(datasets, list):
        return
    grid = {str(d) for d in datasets}
    for key in ("data_root", "data_options"):
        entries = merged.get(key)
        if not isinstance(entries, dict) or origin.get(key) == path:
            continue
        stale = [name for name in entries if str(name) not in grid]
        if stale:
            logger.info(
                "%s.%s (from %s) left out: %s replaced the grid's datasets with %s",
                key,
                ", ".join(map(str, stale)),
                origin.get(key, "?"),
                path,
                sorted(grid),
            )
            merged[key] = {k: v for k, v in entries.items() if k not in stale}


_SHARED_FILES: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "embbench_shared_params_files", default=frozenset()
)


@contextlib.contextmanager
def shared_params_files(files: Iterable[str | Path]) -> Iterator[None]:
    """Within the block, ``files`` are shared by several notebooks (``embbench demo -f my.yaml``).

    A key of a shared file that is not a parameter of the notebook being configured, but is
    one of another stage's, is left out for that notebook (an INFO line) instead of refused:
    ``data_root`` and ``label`` mean nothing to the analysis notebook. A key no stage knows is
    still refused with a did-you-mean.
    """
    token = _SHARED_FILES.set(frozenset(str(Path(f)) for f in files))
    try:
        yield
    finally:
        _SHARED_FILES.reset(token)


def current_shared_params_files() -> frozenset[str]:
    """The files :func:`shared_params_files` marks shared here (to carry into another thread)."""
    return _SHARED_FILES.get()


def _other_stages_fields(notebook: str) -> set[str]:
    """The parameter names of every registered stage but ``notebook``."""
    names: set[str] = set()
    for other in registered_stage_names():
        if other != notebook:
            names |= set(registered_stage(other).model_fields)
    return names


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
        shared = _SHARED_FILES.get()
        if unknown and shared:
            elsewhere = _other_stages_fields(cls.notebook)
            left = [k for k in unknown if origin.get(k) in shared and k in elsewhere]
            if left:
                logger.info(
                    "%s: %s (from %s) left out: not parameters of this notebook",
                    cls.notebook or cls.__name__,
                    ", ".join(left),
                    ", ".join(sorted({origin[k] for k in left})),
                )
                params = {k: v for k, v in params.items() if k not in left}
                unknown = [k for k in unknown if k not in left]
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
                if not err["loc"]:  # a check across fields: its message names them
                    msg = err["msg"].removeprefix("Value error, ")
                    files = sorted({f for k, f in origin.items() if f"{k}." in msg})
                    parts.append(msg + (f" (in {', '.join(files)})" if files else ""))
                    continue
                key = ".".join(str(p) for p in err["loc"])
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


class GridConfig(StageConfig):
    """Fields shared by every stage that runs a grid of (model, dataset) cells (01-04).

    Declared once here, mirrored name for name by each notebook's parameters cell and params
    file, so one overlay (e.g. ``params/smoke/``) shrinks every stage. ``backend`` is checked
    against the backend registry by the cell engine before the first cell runs.
    """

    models: list[str] = Field(default_factory=lambda: ["resnet50"])  # model registry names
    weights: str = "pretrained"  # pretrained | random | auto (pretrained, else random) | ckpt path
    datasets: list[str] = Field(default_factory=lambda: ["demo"])  # dataset registry names
    data_root: dict[str, str] = Field(default_factory=dict)  # dataset -> folder or manifest
    # dataset -> loader options, e.g. {manifest: {allow_outside_root: true, allow_private: true}}
    data_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    label: str = ""  # label column for relevance (and classification); "" = dataset default
    protocol: Literal["", "within", "cross"] = ""  # retrieval protocol; "" = dataset default
    k: int = Field(5, ge=1, le=100)  # cut-off of the @k retrieval metrics
    max_images: int = Field(0, ge=0)  # per split, 0 = all (seeded, class-preserving subsample)
    batch_size: int = Field(64, ge=1)  # images per forward pass (per GPU)
    # DataLoader decoding processes and torch intra-op threads; "auto" splits the cores between
    # them so they never exceed the cores (embbench._threads: measured rule, logged per cell)
    num_workers: int | Literal["auto"] = "auto"
    threads: int | Literal["auto"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast dtype on CUDA
    backend: str = "milvus"  # retrieval backend: milvus | exact (the backend registry's names)
    milvus_uri: str = ""  # "" = Milvus Lite file runs/milvus.db; or http://host:19530
    tracking_uri: str = ""  # "" = sqlite runs/mlflow.db (or $MLFLOW_TRACKING_URI)
    experiment: str = "embbench"  # MLflow experiment name
    overwrite: Literal["never", "always"] = "never"  # recompute finished cells?
    seed: int = 0  # subsampling, initialisation and search seed

    # Fields that do not change a cell's numbers. ``backend`` is NOT here: a record names the
    # backend that searched, so switching backends scores again (from the cached vectors).
    hash_exclude = frozenset(
        {
            "models",
            "datasets",
            "data_root",
            "data_options",
            "batch_size",
            "num_workers",
            "threads",
            "device",
            "milvus_uri",
            "tracking_uri",
            "experiment",
            "overwrite",
        }
    )

    def grid_datasets(self) -> list[str]:
        """The datasets the grid reads (``data_root`` and ``data_options`` may name only these)."""
        return list(self.datasets)

    @model_validator(mode="after")
    def _entries_name_grid_datasets(self) -> GridConfig:
        # a typo (my_sohp for my_shop) would silently drop the entry: its options, its folder
        grid = self.grid_datasets()
        stray = []
        for name in ("data_root", "data_options"):
            for key in getattr(self, name):
                if key not in grid:
                    close = difflib.get_close_matches(key, grid, n=1, cutoff=0.6)
                    stray.append(
                        f"{name}.{key}" + (f" (did you mean {close[0]!r}?)" if close else "")
                    )
        if stray:
            raise ValueError(
                f"{', '.join(stray)}: no dataset of the grid {grid} has that name; correct "
                "it, add the dataset to datasets, or remove the entry"
            )
        return self

    @field_validator("models", "datasets")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one entry")
        return v

    @field_validator("num_workers", "threads")
    @classmethod
    def _count(cls, v: int | str, info: Any) -> int | str:
        low = 1 if info.field_name == "threads" else 0
        if v != "auto" and v < low:
            raise ValueError(f"must be 'auto' or an integer >= {low}")
        return v
