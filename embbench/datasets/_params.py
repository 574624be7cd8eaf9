"""Read and validate ``params/datasets.yaml`` into :class:`DatasetInfo` records."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from embbench._errors import UserError
from embbench.paths import params_dir

Source = Literal["paper", "uned", "publisher", "ours"]
Protocol = Literal["within", "cross"]
Scheme = Literal["classification", "dml"]

_FOLLOWABLE = ("label", "split_scheme", "val_fraction", "test_fraction", "protocol", "k")


class DatasetParamsError(UserError, ValueError):
    """``params/datasets.yaml`` is malformed; the message names the file, key and value."""


class _Published(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: int = Field(gt=0)  # images the loader returns from a complete copy
    classes: dict[str, int] = Field(default_factory=dict)  # classes per label column
    splits: dict[Scheme, dict[Literal["train", "val", "test"], int]] = Field(default_factory=dict)


class _Protocol(BaseModel):
    model_config = ConfigDict(extra="forbid")

    protocol: Protocol  # within: queries = index = one split; cross: query -> index split
    query_split: Literal["train", "val", "test"]
    index_split: Literal["train", "val", "test"]
    k: int = Field(gt=0)  # metric cut-off

    @model_validator(mode="after")
    def _splits_match_protocol(self) -> _Protocol:
        same = self.query_split == self.index_split
        if self.protocol == "within" and not same:
            raise ValueError(
                f"protocol 'within' needs query_split == index_split, got "
                f"{self.query_split!r} and {self.index_split!r}; use protocol 'cross'"
            )
        if self.protocol == "cross" and same:
            raise ValueError(
                f"protocol 'cross' needs two different splits, got {self.query_split!r} twice; "
                "use protocol 'within'"
            )
        return self


class _DatasetParams(_Protocol):
    title: str
    homepage: str
    licence: str
    label: str  # default label column
    labels: list[str] = Field(min_length=1)
    split_scheme: Scheme
    split_schemes: list[Scheme] = Field(min_length=1)
    val_fraction: float = Field(ge=0.0, lt=1.0)
    test_fraction: float = Field(gt=0.0, lt=1.0)
    published: _Published
    paper_table: dict[Literal["train", "test", "val", "categories"], int]
    follows: dict[str, Source]
    exclude: dict[str, list[str]] = Field(default_factory=dict)
    known_missing: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> _DatasetParams:
        if self.label not in self.labels:
            raise ValueError(f"label {self.label!r} is not one of labels {self.labels}")
        if self.split_scheme not in self.split_schemes:
            raise ValueError(
                f"split_scheme {self.split_scheme!r} is not one of split_schemes "
                f"{self.split_schemes}"
            )
        unknown = sorted(set(self.follows) - set(_FOLLOWABLE))
        if unknown:
            raise ValueError(f"follows has unknown key(s) {unknown}; allowed: {list(_FOLLOWABLE)}")
        bad_cls = sorted(set(self.published.classes) - set(self.labels))
        if bad_cls:
            raise ValueError(f"published.classes names {bad_cls} that are not labels {self.labels}")
        bad_ex = sorted(set(self.exclude) - set(self.labels))
        if bad_ex:
            raise ValueError(f"exclude names column(s) {bad_ex} that are not labels {self.labels}")
        return self


class _CustomParams(_Protocol):
    label: str
    labels: list[str] = Field(default_factory=list)  # default: [label]


# The plain fields a dataset's params and its DatasetInfo name alike (copied as they are).
_SAME_NAMED = {
    "title", "homepage", "licence", "split_scheme", "protocol", "query_split", "index_split",
    "k", "val_fraction", "test_fraction",
}  # fmt: skip


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    datasets: dict[str, _DatasetParams]
    custom: dict[str, _CustomParams]


@dataclass(frozen=True)
class DatasetInfo:
    """What embbench knows about a dataset: defaults, protocol, published counts, licence.

    Attributes:
        name: Registry name (``"sop"``).
        title: Human-readable name.
        default_label: Label column used when none is named.
        label_columns: All label columns the loader returns.
        split_scheme: Default split scheme (``classification`` or ``dml``; ``as_given`` for
            custom catalogues).
        split_schemes: Schemes available.
        protocol: ``within`` or ``cross`` retrieval (see the :mod:`embbench.metrics` docstring).
        query_split: Split the queries come from.
        index_split: Split searched (equal to ``query_split`` under ``within``).
        k: Metric cut-off.
        val_fraction: Share of train carved into val when the publisher has no val split.
        test_fraction: Share of all images put in test when the publisher has no split.
        published: Counts as published: ``images``, ``classes`` (per label column) and
            ``splits`` (images per split, per scheme).
        paper_table: The paper's table 1 row (train, test, val, categories).
        licence: Licence as far as known.
        homepage: Where the dataset is published.
        follows: For each default, whether it follows ``paper``, ``uned`` (UnED / DML
            standard), the ``publisher`` or is ``ours``.
        exclude: Label values dropped on load, per label column.
        known_missing: Item ids the publisher lists without an image.
        options: Loader-specific keyword defaults.
        public: One of the six public datasets (custom catalogues choose their own labels:
            prefer the catalogue's ``default_label`` for them).
    """

    name: str
    title: str
    default_label: str
    label_columns: tuple[str, ...]
    split_scheme: str
    split_schemes: tuple[str, ...]
    protocol: str
    query_split: str
    index_split: str
    k: int
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    published: dict = field(default_factory=dict)
    paper_table: dict = field(default_factory=dict)
    licence: str = ""
    homepage: str = ""
    follows: dict = field(default_factory=dict)
    exclude: dict = field(default_factory=dict)
    known_missing: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    public: bool = True

    def published_splits(self, scheme: str | None = None) -> dict[str, int]:
        """Published image counts per split for ``scheme`` (default scheme); ``{}`` if none."""
        return dict(self.published.get("splits", {}).get(scheme or self.split_scheme, {}))


def default_params_path() -> Path:
    """``<project>/params/datasets.yaml``."""
    return params_dir() / "datasets.yaml"


def _format_validation(path: Path, err: ValidationError) -> str:
    lines = [f"{path} is not valid:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (value: {value!r})"
        lines.append(f"  - {loc or '<top>'}: {e['msg']}{shown}")
    lines.append(f"Fix the key(s) above in {path}; the header comment documents every key.")
    return "\n".join(lines)


@functools.lru_cache(maxsize=8)
def _load(path_str: str, mtime: float) -> tuple[dict[str, DatasetInfo], dict[str, DatasetInfo]]:
    path = Path(path_str)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DatasetParamsError(f"{path} is not valid YAML: {err}") from None
    try:
        parsed = _File.model_validate(raw)
    except ValidationError as err:
        raise DatasetParamsError(_format_validation(path, err)) from None
    infos = {}
    for name, p in parsed.datasets.items():
        infos[name] = DatasetInfo(
            name=name,
            **p.model_dump(include=_SAME_NAMED),
            default_label=p.label,
            label_columns=tuple(p.labels),
            split_schemes=tuple(p.split_schemes),
            published=p.published.model_dump(),
            paper_table=dict(p.paper_table),
            follows=dict(p.follows),
            exclude={k: tuple(v) for k, v in p.exclude.items()},
            known_missing=tuple(p.known_missing),
            options=dict(p.options),
        )
    custom = {
        name: DatasetInfo(
            name=name,
            title=f"{name} catalogue",
            default_label=c.label,
            label_columns=tuple(c.labels) or (c.label,),
            split_scheme="as_given",
            split_schemes=("as_given",),
            protocol=c.protocol,
            query_split=c.query_split,
            index_split=c.index_split,
            k=c.k,
            licence="yours" if name != "demo" else "generated (MIT)",
            follows={"protocol": "uned", "k": "paper"},
            public=False,
        )
        for name, c in parsed.custom.items()
    }
    return infos, custom


def load_dataset_params(
    path: str | Path | None = None,
) -> tuple[dict[str, DatasetInfo], dict[str, DatasetInfo]]:
    """Read and validate the datasets params file (cached until the file changes).

    Args:
        path: The YAML file (default :func:`default_params_path`).

    Returns:
        ``(infos, custom)``: one :class:`DatasetInfo` per public dataset, and one per custom
        catalogue kind (manifest, folder, demo).

    Raises:
        DatasetParamsError: The file is missing, not YAML, or a key or value is invalid.
    """
    path = Path(path) if path is not None else default_params_path()
    if not path.is_file():
        raise DatasetParamsError(
            f"dataset params file {path} not found; it ships with the project in params/ "
            "(set EMBBENCH_ROOT to the checkout if embbench runs from elsewhere)"
        )
    return _load(str(path.resolve()), path.stat().st_mtime)
