"""The six public datasets, a user's own catalogues, and the demo, by name.

``create_catalogue("sop", "/data/Stanford_Online_Products")`` reads a dataset in the layout its
publisher ships and returns the same :class:`~embbench.catalogue.Catalogue` table as a user's
manifest, with splits ``train`` / ``val`` / ``test`` and the label columns of
``params/datasets.yaml`` (the one source of truth for defaults, protocols and published counts).

| name          | layout read                                    | default label    |
|---------------|------------------------------------------------|------------------|
| ``cars196``   | devkit (``cars_train/``...) or ``cars_annos.mat`` | ``class``      |
| ``sop``       | ``Ebay_train.txt`` / ``Ebay_test.txt``            | ``super_class_id`` |
| ``food2k``    | ``Food2k_label/*_finetune.txt``                   | ``food_id``      |
| ``rp2k``      | ``all/{train,test}/<category>/``                  | ``category``     |
| ``products10k`` | ``train.csv`` / ``test_kaggletest.csv``         | ``class``        |
| ``fashion``   | ``styles.csv`` + ``images/``                      | ``masterCategory`` |
| ``manifest``  | a CSV (``root`` = its path; options of ``from_manifest``) | ``label``  |
| ``folder``    | ``<split>/<label>/<image>`` or ``<label>/<image>`` | ``label``       |
| ``demo``      | generated (``embbench.demo``)                      |                 |

``verify(name, root)`` checks a local copy and says what to fix; ``fetch_urls`` downloads
catalogues whose paths are URLs into a content-addressed cache.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embbench._registry import Registry, UnknownNameError, did_you_mean
from embbench.catalogue import Catalogue, CatalogueError, from_image_folder, from_manifest
from embbench.datasets import cars, fashion, food2k, products10k, rp2k, sop
from embbench.datasets._common import (
    DatasetLayoutError,
    Layout,
    LoadRequest,
    check_fraction,
    find_root,
)
from embbench.datasets._params import (
    DatasetInfo,
    DatasetParamsError,
    default_params_path,
    load_dataset_params,
)
from embbench.paths import data_dir

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetEntry",
    "DatasetInfo",
    "DatasetLayoutError",
    "DatasetParamsError",
    "FetchError",
    "FetchFailure",
    "FetchReport",
    "UnknownNameError",
    "VerifyReport",
    "create_catalogue",
    "default_params_path",
    "drop_missing_files",
    "fetch_urls",
    "get_dataset_info",
    "list_datasets",
    "catalogue_kind",
    "register_catalogue",
    "register_user_catalogues",
    "resolve_root",
    "verify",
    "verify_main",
    "with_label",
]


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset.

    Attributes:
        name: Registry name.
        loader: For public datasets ``loader(folder, variant, info, *, seed, split_scheme,
            val_fraction, test_fraction, **options)``; for custom ones
            ``loader(root, *, seed, variant, **options)``.
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
    """Add a dataset to the registry (the six public ones and the custom loaders are built in)."""
    return _REGISTRY.register(entry.name, entry, overwrite=overwrite)


for _module, _name in ((cars, "cars196"), (sop, "sop"), (food2k, "food2k"), (rp2k, "rp2k"),
                       (products10k, "products10k"), (fashion, "fashion")):
    register_dataset(DatasetEntry(name=_name, loader=_module.load, layout=_module.LAYOUT))


def _need_root(name: str, root: str | Path | None, what: str) -> Path:
    if root is None:
        raise CatalogueError(f"dataset {name!r} needs root = {what}")
    return Path(root).expanduser()


def _load_manifest(root: str | Path | None, *, seed: int, variant: str | None,
                   label: str | None = None, catalogue_name: str = "manifest",
                   **options: Any) -> Catalogue:
    del seed, variant
    path = _need_root(catalogue_name, root, "the path of the CSV manifest")
    if label is not None and "label_columns" not in options:
        options["label_columns"] = (label,)
    # Named as the dataset it is loaded as, so cache, records, MLflow and report agree.
    options.setdefault("name", catalogue_name)
    return from_manifest(path, **options)


def _load_folder(root: str | Path | None, *, seed: int, variant: str | None,
                 label: str | None = None, catalogue_name: str = "folder",
                 **options: Any) -> Catalogue:
    del seed, variant, label
    options.setdefault("name", catalogue_name)
    return from_image_folder(_need_root(catalogue_name, root, "the image folder"), **options)


_USER_LOADERS = {"manifest": _load_manifest, "folder": _load_folder}


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
    if kind not in _USER_LOADERS:
        raise CatalogueError(
            f"dataset {name!r}: {root} is neither a CSV manifest nor an image folder; point "
            f"data_root.{name} at one (or use a built-in dataset: {list_datasets()})"
        )
    if name in _REGISTRY.names() and _REGISTRY.get(name).kind is None:
        raise CatalogueError(f"dataset {name!r} is built in; give your catalogue another name")
    loader = functools.partial(_USER_LOADERS[kind], catalogue_name=name)
    # A user's catalogue may be registered again (another run, another root): it replaces.
    return register_dataset(DatasetEntry(name=name, loader=loader, public=False, kind=kind),
                            overwrite=True)


def register_user_catalogues(data_root: Mapping[str, str | Path]) -> list[str]:
    """Register every ``data_root`` entry that is not a built-in dataset as a user catalogue.

    ``data_root: {my_shop: /data/shop.csv}`` with ``datasets: [my_shop]`` names the catalogue
    ``my_shop`` everywhere. Entries whose path is neither a CSV file nor a folder are left
    alone (the grid check then names them). Returns the names registered.
    """
    names = []
    for name, root in data_root.items():
        known = name in _REGISTRY.names()
        if (known and _REGISTRY.get(name).kind is None) or not root or not catalogue_kind(root):
            continue
        register_catalogue(name, root)
        names.append(name)
    return names


def _load_demo(root: str | Path | None, *, seed: int, variant: str | None,
               label: str | None = None, **options: Any) -> Catalogue:
    del variant, label
    try:
        from embbench.demo import make_demo_catalogue
    except ImportError as err:
        raise CatalogueError(f"the demo catalogue is not available: {err}") from None
    return make_demo_catalogue(root=root, seed=seed, **options)


def _load_demo_b(root: str | Path | None, *, seed: int, variant: str | None,
                 label: str | None = None, **options: Any) -> Catalogue:
    """The demo's twin: the same shapes, other products (seed + 1), for cross-tuning demos."""
    import dataclasses

    cat = _load_demo(root, seed=seed + 1, variant=variant, label=label, **options)
    return dataclasses.replace(cat, name="demo_b", source={**cat.source, "variant_of": "demo"})


for _name, _loader in (("manifest", _load_manifest), ("folder", _load_folder),
                       ("demo", _load_demo), ("demo_b", _load_demo_b)):
    register_dataset(DatasetEntry(name=_name, loader=_loader, public=False))


def list_datasets(*, public_only: bool = False) -> list[str]:
    """Registered dataset names, sorted.

    Args:
        public_only: Only the six public datasets (not ``manifest``, ``folder``, ``demo``).
    """
    return [n for n in _REGISTRY.names() if not public_only or _REGISTRY.get(n).public]


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


def resolve_root(
    name: str, root: str | Path | None = None, *, variant: str | None = None
) -> tuple[Path, str]:
    """Find a public dataset's folder and layout variant at or below ``root``.

    With ``root=None`` the default is ``data_dir()/<name>`` (or ``data_dir()/<usual folder>``,
    e.g. ``data/Stanford_Online_Products``, when that exists instead).

    Returns:
        ``(folder, variant)``.

    Raises:
        DatasetLayoutError: The layout is not found; the message says what is expected where.
    """
    entry = _REGISTRY.get(name)
    if entry.layout is None:
        raise CatalogueError(f"dataset {name!r} has no published layout to look for")
    default = root is None
    if root is None:
        base = data_dir()
        options = [base / name, *(base / s for s in entry.layout.subdirs)]
        root = next((p for p in options if p.is_dir()), options[0])
    return find_root(entry.layout, Path(root).expanduser(), variant=variant,
                     default_root=default)


def with_label(catalogue: Catalogue, label: str) -> Catalogue:
    """The catalogue with ``label`` as default label; rows without that label are dropped.

    Raises:
        CatalogueError: ``label`` is not a label column (with close matches).
    """
    if label not in catalogue.label_columns:
        raise CatalogueError(
            did_you_mean(label, list(catalogue.label_columns), f"label column of {catalogue.name}")
        )
    items = catalogue.items
    absent = items[label].isna()
    source = dict(catalogue.source)
    if absent.any():
        logger.warning("%s: %d rows have no %r value and are left out", catalogue.name,
                       int(absent.sum()), label)
        items = items[~absent].reset_index(drop=True)
        source["dropped_without_label"] = {label: int(absent.sum())}
    return dataclasses.replace(catalogue, items=items, default_label=label, source=source)


def drop_missing_files(catalogue: Catalogue) -> Catalogue:
    """The catalogue without rows whose image file does not exist (URLs are kept)."""
    from embbench.datasets._verify import existing_mask

    present = existing_mask(catalogue.items["path"])
    if present.all():
        return catalogue
    n = int((~present).sum())
    logger.warning("%s: %d of %d images are missing and are left out (first: %s)",
                   catalogue.name, n, len(present), catalogue.items["path"][~present].iloc[0])
    source = {**catalogue.source, "dropped_missing_files": n}
    return dataclasses.replace(
        catalogue, items=catalogue.items[present].reset_index(drop=True), source=source
    )


_COMMON_OPTIONS = ("split_scheme", "val_fraction", "test_fraction", "drop_missing")


def _loader_options(entry: DatasetEntry) -> list[str]:
    params = inspect.signature(entry.loader).parameters
    fixed = {"folder", "variant", "info", "seed", "split_scheme", "val_fraction", "test_fraction"}
    return [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in fixed]


def create_catalogue(
    name: str,
    root: str | Path | None = None,
    *,
    label: str | None = None,
    variant: str | None = None,
    seed: int = 0,
    **options: Any,
) -> Catalogue:
    """Read a dataset by name into a catalogue.

    Args:
        name: A registered name (:func:`list_datasets`).
        root: The dataset folder (default ``data_dir()/<name>``); for ``manifest`` the CSV
            path, for ``folder`` the image folder.
        label: Label column to make the default (rows without it are dropped); default from
            ``params/datasets.yaml``.
        variant: Force a layout variant (Cars196: ``devkit`` or ``metric``) instead of
            detecting it.
        seed: Seed of the splits that are carved (val, and test where none is published).
        **options: ``split_scheme`` (``classification`` / ``dml``), ``val_fraction``,
            ``test_fraction``, ``drop_missing`` (leave out rows whose file is missing), and
            loader-specific options (Fashion: ``skip_malformed``); for ``manifest`` and
            ``folder`` the options of ``from_manifest`` / ``from_image_folder``. ``None``
            values are ignored.

    Returns:
        The catalogue.

    Raises:
        UnknownNameError: Unknown dataset name (with close matches).
        DatasetLayoutError: The folder does not hold the dataset's layout (the message says
            what is expected where).
        CatalogueError: Another problem with the copy or the arguments.
        ValueError: An option has an invalid value.
    """
    if name not in _REGISTRY.names() and root is not None and catalogue_kind(root):
        register_catalogue(name, root)  # a user's catalogue, named by the user
    entry = _REGISTRY.get(name)
    options = {k: v for k, v in options.items() if v is not None}
    drop_missing = bool(options.pop("drop_missing", False))
    if not entry.public:
        catalogue = entry.loader(root, seed=seed, variant=variant, label=label, **options)
    else:
        info = get_dataset_info(name)
        scheme = options.pop("split_scheme", None) or info.split_scheme
        if scheme not in info.split_schemes:
            raise ValueError(
                f"{name}: split_scheme {scheme!r} is not available; choose one of "
                f"{list(info.split_schemes)}"
            )
        val_fraction = check_fraction("val_fraction",
                                      options.pop("val_fraction", info.val_fraction))
        test_fraction = check_fraction("test_fraction",
                                       options.pop("test_fraction", info.test_fraction),
                                       allow_zero=False)
        allowed = _loader_options(entry)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            known = sorted([*_COMMON_OPTIONS, *allowed])
            raise TypeError(
                f"create_catalogue({name!r}): unknown option(s) {unknown}; options for {name}: "
                f"{known} (plus label, variant, seed)"
            )
        extra = {k: v for k, v in info.options.items() if k in allowed}
        extra.update(options)
        folder, found = resolve_root(name, root, variant=variant)
        request = LoadRequest(folder, found, info, seed, scheme, val_fraction, test_fraction)
        catalogue = entry.loader(request, **extra)
    if drop_missing:
        catalogue = drop_missing_files(catalogue)
    if label is not None:
        catalogue = with_label(catalogue, label)
    logger.info("%s: %d images, splits %s, label %r", catalogue.name, len(catalogue.items),
                catalogue.items["split"].value_counts().to_dict(), catalogue.default_label)
    return catalogue


from embbench.datasets._verify import VerifyReport, verify, verify_main  # noqa: E402
from embbench.datasets.fetch import FetchError, FetchFailure, FetchReport, fetch_urls  # noqa: E402
