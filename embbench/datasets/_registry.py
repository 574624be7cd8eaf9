"""The dataset registry: which names exist, their loaders, layouts and defaults (timm's pattern).

Each loader module registers its dataset with :func:`register_dataset` when imported
(``embbench/datasets/__init__.py`` imports them all); this module never imports a loader.
A user's own catalogue (a CSV manifest or an image folder) is registered under the user's name
with :func:`register_catalogue`, taking the loader of its kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from embbench._registry import Registry
from embbench.catalogue import Catalogue, CatalogueError
from embbench.datasets._common import Layout
from embbench.datasets._params import (
    DatasetInfo,
    DatasetParamsError,
    default_params_path,
    load_dataset_params,
)

__all__ = [
    "USER_KINDS",
    "DatasetEntry",
    "catalogue_kind",
    "get_dataset_info",
    "get_entry",
    "is_registered",
    "list_datasets",
    "register_catalogue",
    "register_dataset",
    "register_user_catalogues",
]

USER_KINDS = ("manifest", "folder")
"""The kinds of a user's own catalogue; each is also a built-in dataset whose loader it takes."""


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset.

    Attributes:
        name: Registry name.
        loader: ``loader(request, **options)``: reads the :class:`~embbench.datasets._common.
            LoadRequest` (plus loader-specific keyword options) into a catalogue.
        layout: The on-disk layout (public datasets only).
        public: One of the six public datasets (has params, published counts and a layout).
        kind: For a user's catalogue registered under its own name (:func:`register_catalogue`):
            ``manifest`` or ``folder``, whose ``custom`` defaults it takes.
    """

    name: str
    loader: Callable[..., Catalogue]
    layout: Layout | None = None
    public: bool = True
    kind: str | None = None


_REGISTRY: Registry[DatasetEntry] = Registry("dataset")


def register_dataset(entry: DatasetEntry, *, overwrite: bool = False) -> DatasetEntry:
    """Add a dataset to the registry (each loader module registers its own when imported)."""
    return _REGISTRY.register(entry.name, entry, overwrite=overwrite)


def get_entry(name: str) -> DatasetEntry:
    """The registry entry of ``name``.

    Raises:
        UnknownNameError: ``name`` is not registered (with close matches).
    """
    return _REGISTRY.get(name)


def is_registered(name: str) -> bool:
    """Whether ``name`` is a registered dataset (built in or a user's catalogue)."""
    return name in _REGISTRY


def _built_in(name: str) -> bool:
    return name in _REGISTRY and _REGISTRY.get(name).kind is None


def list_datasets(*, public_only: bool = False) -> list[str]:
    """Registered dataset names, sorted.

    Args:
        public_only: Only the six public datasets (not ``manifest``, ``folder``, ``demo``).
    """
    return [n for n in _REGISTRY.names() if not public_only or _REGISTRY.get(n).public]


def catalogue_kind(root: str | Path) -> str | None:
    """``manifest`` for a CSV file, ``folder`` for a directory, ``None`` for anything else."""
    path = Path(root).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        return "manifest"
    return "folder" if path.is_dir() else None


def register_catalogue(
    name: str, root: str | Path | None = None, *, kind: str | None = None
) -> DatasetEntry:
    """Register a user's catalogue under the user's own name (a CSV manifest or image folder).

    Its cache, result records, MLflow runs and report rows are all named ``name``. ``kind``
    (``manifest`` / ``folder``) is inferred from ``root`` when not given; the catalogue takes
    the ``custom`` defaults of that kind in ``params/datasets.yaml``.

    Raises:
        CatalogueError: ``kind`` is unknown or cannot be inferred from ``root``, or ``name`` is
            a built-in dataset.
    """
    if kind is None and root is not None:
        kind = catalogue_kind(root)
    if kind not in USER_KINDS:
        raise CatalogueError(
            f"dataset {name!r}: {root} is neither a CSV manifest nor an image folder; point "
            f"data_root.{name} at one (or use a built-in dataset: {list_datasets()})"
        )
    if _built_in(name):
        raise CatalogueError(f"dataset {name!r} is built in; give your catalogue another name")
    # The loader of the built-in entry of that kind; it names the catalogue as it is loaded.
    loader = _REGISTRY.get(kind).loader
    # A user's catalogue may be registered again (another run, another root): it replaces.
    return register_dataset(
        DatasetEntry(name=name, loader=loader, public=False, kind=kind), overwrite=True
    )


def register_user_catalogues(data_root: Mapping[str, str | Path]) -> list[str]:
    """Register every ``data_root`` entry that is not a built-in dataset as a user catalogue.

    ``data_root: {my_shop: /data/shop.csv}`` with ``datasets: [my_shop]`` names the catalogue
    ``my_shop`` everywhere. Entries whose path is neither a CSV file nor a folder are left
    alone (the grid check then names them). Returns the names registered.
    """
    names = []
    for name, root in data_root.items():
        if _built_in(name) or not root or not catalogue_kind(root):
            continue
        register_catalogue(name, root)
        names.append(name)
    return names


def get_dataset_info(name: str) -> DatasetInfo:
    """Defaults, protocol, published counts and licence of a dataset (from the params file).

    Custom catalogues (``manifest``, ``folder``, ``demo``) get their ``custom`` block (their
    ``public`` is False: prefer the catalogue's own ``default_label`` for them).

    Raises:
        UnknownNameError: ``name`` is not registered (with close matches).
    """
    entry = _REGISTRY.get(name)
    infos, custom = load_dataset_params()
    table, key = (infos, "datasets") if entry.public else (custom, "custom")
    if entry.kind is not None:  # a user's catalogue: the defaults of its kind, under its name
        return dataclasses.replace(custom[entry.kind], name=name)
    if name not in table:
        raise DatasetParamsError(
            f"{default_params_path()} has no entry {key}.{name}; add one (copy another "
            "block of that section)"
        )
    return table[name]
