"""The dataset factory: ``create_catalogue(name, root)`` and the steps it is built from.

``create_catalogue("sop", "/data/Stanford_Online_Products")`` reads a dataset in the layout its
publisher ships and returns the same :class:`~embbench.catalogue.Catalogue` table as a user's
manifest, with splits ``train`` / ``val`` / ``test`` and the label columns of
``params/datasets.yaml`` (the one source of truth for defaults, protocols and published counts).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from pathlib import Path
from typing import Any

from embbench._registry import did_you_mean
from embbench.catalogue import Catalogue, CatalogueError
from embbench.datasets._common import LoadRequest, check_fraction, existing_mask, find_root
from embbench.datasets._registry import (
    DatasetEntry,
    catalogue_kind,
    get_dataset_info,
    get_entry,
    is_registered,
    register_catalogue,
)
from embbench.paths import data_dir

logger = logging.getLogger(__name__)

__all__ = ["create_catalogue", "drop_missing_files", "resolve_root", "with_label"]

_COMMON_OPTIONS = ("split_scheme", "val_fraction", "test_fraction", "drop_missing")


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
    entry = get_entry(name)
    if entry.layout is None:
        raise CatalogueError(f"dataset {name!r} has no published layout to look for")
    default = root is None
    if root is None:
        base = data_dir()
        options = [base / name, *(base / s for s in entry.layout.subdirs)]
        root = next((p for p in options if p.is_dir()), options[0])
    return find_root(entry.layout, Path(root).expanduser(), variant=variant, default_root=default)


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
        logger.warning(
            "%s: %d rows have no %r value and are left out",
            catalogue.name,
            int(absent.sum()),
            label,
        )
        items = items[~absent].reset_index(drop=True)
        source["dropped_without_label"] = {label: int(absent.sum())}
    return dataclasses.replace(catalogue, items=items, default_label=label, source=source)


def drop_missing_files(catalogue: Catalogue) -> Catalogue:
    """The catalogue without rows whose image file does not exist (URLs are kept)."""
    present = existing_mask(catalogue.items["path"])
    if present.all():
        return catalogue
    n = int((~present).sum())
    logger.warning(
        "%s: %d of %d images are missing and are left out (first: %s)",
        catalogue.name,
        n,
        len(present),
        catalogue.items["path"][~present].iloc[0],
    )
    source = {**catalogue.source, "dropped_missing_files": n}
    return dataclasses.replace(
        catalogue, items=catalogue.items[present].reset_index(drop=True), source=source
    )


def _loader_options(entry: DatasetEntry) -> list[str]:
    """The loader-specific keyword options of a loader (Fashion's ``skip_malformed``)."""
    params = inspect.signature(entry.loader).parameters
    return [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]


def _public_request(
    entry: DatasetEntry,
    root: str | Path | None,
    variant: str | None,
    seed: int,
    options: dict[str, Any],
) -> tuple[LoadRequest, dict[str, Any]]:
    """The request and the loader options for a public dataset (``options`` is consumed)."""
    name = entry.name
    info = get_dataset_info(name)
    scheme = options.pop("split_scheme", None) or info.split_scheme
    if scheme not in info.split_schemes:
        raise ValueError(
            f"{name}: split_scheme {scheme!r} is not available; choose one of "
            f"{list(info.split_schemes)}"
        )
    val_fraction = check_fraction("val_fraction", options.pop("val_fraction", info.val_fraction))
    test_fraction = check_fraction(
        "test_fraction", options.pop("test_fraction", info.test_fraction), allow_zero=False
    )
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
    request = LoadRequest(
        name=name,
        folder=folder,
        variant=found,
        seed=seed,
        info=info,
        split_scheme=scheme,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    return request, extra


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
        name: A registered name (:func:`~embbench.datasets.list_datasets`).
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
    if not is_registered(name) and root is not None and catalogue_kind(root):
        register_catalogue(name, root)  # a user's catalogue, named by the user
    entry = get_entry(name)
    options = {k: v for k, v in options.items() if v is not None}
    drop_missing = bool(options.pop("drop_missing", False))
    if entry.public:
        request, options = _public_request(entry, root, variant, seed, options)
    else:
        folder = None if root is None else Path(root)
        request = LoadRequest(name=name, folder=folder, variant=variant, seed=seed, label=label)
    catalogue = entry.loader(request, **options)
    if drop_missing:
        catalogue = drop_missing_files(catalogue)
    if label is not None:
        catalogue = with_label(catalogue, label)
    logger.info(
        "%s: %d images, splits %s, label %r",
        catalogue.name,
        len(catalogue.items),
        catalogue.items["split"].value_counts().to_dict(),
        catalogue.default_label,
    )
    return catalogue
