"""Shared pieces of the dataset loaders: the load request, layout errors, roots, seeded splits."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embbench.catalogue import IMAGE_SUFFIXES, Catalogue, CatalogueError
from embbench.datasets._params import DatasetInfo

# The seeded splits live in _splits; the loaders import them from here with the rest.
from embbench.datasets._splits import (  # noqa: F401 (re-exported)
    assign_test,
    carve_val,
    check_fraction,
    group_pick,
    stratified_pick,
)

logger = logging.getLogger(__name__)

_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".7z", ".rar")


class DatasetLayoutError(CatalogueError):
    """A dataset copy does not have the published layout; the message says what is expected where.

    Args:
        message: The full message (what was expected, where, what was found, the fix).
        root: The folder that was examined.
    """

    def __init__(self, message: str, *, root: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.root = str(root) if root is not None else None


@dataclass
class LoadNotes:
    """What a loader noticed while reading (kept in ``Catalogue.source`` for ``verify``).

    Attributes:
        notes: Human-readable remarks that are not problems of the copy.
        problems: Remarks that are problems of the copy (each names the path and the fix).
        missing: Item paths the annotation lists but the loader dropped (no image file).
    """

    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """A JSON-friendly dict for ``Catalogue.source``."""
        return {
            "notes": list(self.notes),
            "problems": list(self.problems),
            "missing": list(self.missing),
        }


@dataclass(frozen=True)
class LoadRequest:
    """What the factory asks a dataset loader to read: every loader is ``load(request, **options)``.

    Attributes:
        name: The name the catalogue is loaded as (the registry name, or a user's own name).
        folder: The dataset folder the factory found (public datasets); the path the user gave
            (a manifest's CSV, an image folder, the demo's parent folder) or ``None``.
        variant: The layout variant found (or forced), e.g. Cars196 ``devkit`` / ``metric``.
        seed: Seed of the splits the loader carves (val; test where none is published).
        label: The label column asked for (a manifest reads it), or ``None``.
        info: The dataset's defaults (``params/datasets.yaml``; public datasets).
        split_scheme: ``classification`` (closed set) or ``dml`` (class-disjoint), if offered.
        val_fraction: Share moved to val (a loader that reads a published val ignores it).
        test_fraction: Share put in test (a loader that reads a published test ignores it).
        notes: What the loader notices while reading (it appends; :meth:`finish` records them
            in the catalogue's source).
    """

    name: str
    folder: Path | None
    variant: str | None
    seed: int
    label: str | None = None
    info: DatasetInfo | None = None
    split_scheme: str = ""
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    notes: LoadNotes = field(default_factory=LoadNotes, compare=False)

    def carve_val(self, items: pd.DataFrame, stratify: str) -> pd.DataFrame:
        """:func:`carve_val` with this request's fraction and seed (whole classes under ``dml``)."""
        return carve_val(
            items,
            stratify=stratify,
            fraction=self.val_fraction,
            seed=self.seed,
            by_class=self.split_scheme == "dml",
        )

    def assign_test(self, items: pd.DataFrame, stratify: str) -> pd.DataFrame:
        """:func:`assign_test` with this request's test fraction and seed."""
        return assign_test(items, stratify=stratify, fraction=self.test_fraction, seed=self.seed)

    def carved_val_source(self) -> dict[str, Any]:
        """The provenance of a val split carved from train with this request's seed and fraction."""
        return {"seed": self.seed, "val_fraction": self.val_fraction, "val_from": "train"}

    def finish(
        self,
        items: pd.DataFrame,
        label_columns: tuple[str, ...],
        *,
        extra_columns: tuple[str, ...] = (),
        text_columns: tuple[str, ...] = (),
        name_maps: dict[str, dict] | None = None,
        **source: Any,
    ) -> Catalogue:
        """The catalogue a public dataset's loader read, named, rooted and with its provenance.

        Args:
            items: The table; ``item_id``, ``path``, ``split``, the label columns and
                ``extra_columns`` are kept, in that order.
            label_columns: The label columns (the default label comes from ``info``); the
                request's ``notes`` are appended to ``source``.
            extra_columns: Further columns to keep after the labels.
            text_columns: Per-item text columns (kept too; ``Catalogue.texts``).
            name_maps: Label column -> {value: class name} (``Catalogue.class_names``).
            **source: Loader-specific provenance, after ``loader``, ``variant`` and
                ``split_scheme``.
        """
        if self.info is None or self.folder is None:
            raise ValueError(
                f"LoadRequest.finish({self.name!r}) needs the dataset's info and "
                "folder (public datasets only)"
            )
        columns = list(
            dict.fromkeys(
                ["item_id", "path", "split", *label_columns, *extra_columns, *text_columns]
            )
        )
        return Catalogue(
            name=self.name,
            items=items[columns],
            label_columns=tuple(label_columns),
            default_label=self.info.default_label,
            root=str(self.folder),
            source={
                "loader": self.name,
                "variant": self.variant,
                "split_scheme": self.split_scheme,
                **source,
                **self.notes.as_dict(),
            },
            text_columns=tuple(text_columns),
            name_maps=dict(name_maps or {}),
        )


def label_and_name_maps(items: pd.DataFrame, label: str, names: str) -> dict[str, dict]:
    """``name_maps`` for a label and its name column: ``label`` -> name, ``names`` -> itself."""
    by_value = names_by_value(items, label, names)
    return {label: by_value, names: {n: n for n in by_value.values()}}


def names_by_value(items: pd.DataFrame, label: str, names: str) -> dict:
    """``{value of label: its name in column names}`` over the rows (names missing: skipped)."""
    rows = items[[label, names]].dropna().drop_duplicates(label)
    return dict(zip(rows[label].tolist(), rows[names].astype(str).tolist(), strict=True))


@dataclass(frozen=True)
class Layout:
    """How one dataset looks on disk, for finding its root and for error messages.

    Attributes:
        title: Human-readable dataset name.
        variants: Layout variant -> marker paths (relative to the root) that must all exist.
        subdirs: Folder names below the given root to look in too (the archive's top folder;
            matched ignoring case, so one spelling serves ``Food2K`` and ``food2k``).
        archives: Archive file names the publisher ships (to spot an unextracted download).
        tree: The expected tree, shown in error messages.
    """

    title: str
    variants: dict[str, tuple[str, ...]]
    subdirs: tuple[str, ...] = ()
    archives: tuple[str, ...] = ()
    tree: str = ""

    def candidates(self, root: Path) -> list[Path]:
        """``root`` and the usual sub-folders below it (each spelling found on disk), in order."""
        found = [root]
        for sub in self.subdirs:
            for path in _ignoring_case(root, sub):
                if path not in found:
                    found.append(path)
        return found


def _ignoring_case(root: Path, rel: str) -> list[Path]:
    """The folders below ``root`` whose path is ``rel`` but for case (else ``root/rel`` alone)."""
    paths = [root]
    for part in Path(rel).parts:
        below = []
        for folder in paths:
            if folder.is_dir():
                below += [p for p in folder.iterdir() if p.name.lower() == part.lower()]
        paths = sorted(below)
    return paths or [root / rel]


def _listing(folder: Path, limit: int = 12) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError as err:
        return f"(cannot list: {err})"
    if not names:
        return "(empty)"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _archives_in(folders: Iterable[Path], known: Sequence[str]) -> list[Path]:
    found = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            name = p.name.lower()
            if p.is_file() and (p.name in known or name.endswith(_ARCHIVE_SUFFIXES)):
                found.append(p)
    return found


def find_root(
    layout: Layout,
    root: Path,
    *,
    variant: str | None = None,
    default_root: bool = False,
) -> tuple[Path, str]:
    """Find the folder holding the dataset at or below ``root`` and detect its layout variant.

    Args:
        layout: The dataset's layout description.
        root: The folder the user gave (or the default).
        variant: Force one layout variant instead of detecting it.
        default_root: ``root`` was not given by the user but derived from ``data_dir()``.

    Returns:
        ``(folder, variant)``.

    Raises:
        DatasetLayoutError: No candidate folder has the layout; the message lists the expected
            files, where they were looked for, what the root holds, and the fix.
    """
    variants = layout.variants
    if variant is not None and variant not in variants:
        raise DatasetLayoutError(
            f"{layout.title}: unknown layout variant {variant!r}; choose one of {list(variants)}",
            root=root,
        )
    wanted = {variant: variants[variant]} if variant else variants
    if not root.exists():
        how = (
            "No root was given, so the default (data_dir()/<name>, set EMBBENCH_DATA to move "
            "it) was used. "
            if default_root
            else ""
        )
        raise DatasetLayoutError(
            f"{layout.title}: root folder {root} does not exist. {how}Download and extract the "
            f"dataset, then pass the folder that holds it as root. Expected layout:\n"
            f"{layout.tree}",
            root=root,
        )
    if not root.is_dir():
        raise DatasetLayoutError(
            f"{layout.title}: root {root} is a file, not a folder"
            + (
                " (an archive: extract it first and pass the extracted folder)"
                if root.name.lower().endswith(_ARCHIVE_SUFFIXES)
                else ""
            )
            + f". Expected layout:\n{layout.tree}",
            root=root,
        )
    candidates = layout.candidates(root)
    for folder in candidates:
        for name, markers in wanted.items():
            if all((folder / m).exists() for m in markers):
                if folder != root:
                    logger.info(
                        "%s: using %s (below the given root %s)", layout.title, folder, root
                    )
                return folder, name
    # Nothing matched: say what was expected, what is there, and what to do.
    looked = [str(c) for c in candidates if c.is_dir()]
    partial = []
    for folder in candidates:
        for name, markers in wanted.items():
            have = [m for m in markers if (folder / m).exists()]
            if have:
                lacking = [m for m in markers if m not in have]
                partial.append(
                    f"{folder} has {have} but lacks {lacking} ({name} layout): the archive "
                    "looks partly extracted or partly downloaded; extract it again completely"
                )
    expected = "; or ".join(
        f"{' + '.join(m)} ({n} layout)" if len(wanted) > 1 else " + ".join(m)
        for n, m in wanted.items()
    )
    parts = [
        f"{layout.title}: expected {expected} in the root folder, but found none.",
        f"Looked in: {', '.join(looked)}.",
        f"{root} holds: {_listing(root)}.",
    ]
    parts.extend(partial)
    archives = _archives_in(candidates, layout.archives)
    if archives:
        parts.append(
            f"Found the archive {archives[0]}: extract it first (e.g. `unzip {archives[0].name}` "
            f"or `tar xf {archives[0].name}` inside {archives[0].parent})."
        )
    parts.append(
        "Fix: pass as root the folder that directly holds the files above. Expected layout:\n"
        + layout.tree
    )
    raise DatasetLayoutError("\n".join(parts), root=root)


def require_file(path: Path, title: str, what: str) -> Path:
    """Return ``path`` or raise a DatasetLayoutError naming the file and what it is for."""
    if not path.is_file():
        where = path.parent
        have = _listing(where) if where.is_dir() else f"the folder {where} does not exist"
        raise DatasetLayoutError(
            f"{title}: {what} {path} not found ({where} holds: {have}). Extract it from the "
            "published archive into that folder.",
            root=path.parent,
        )
    return path


def read_text_lines(path: Path, title: str) -> list[str]:
    """Read a UTF-8 text file (BOM tolerated, CRLF tolerated) into lines."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetLayoutError(
            f"{title}: {path} is not UTF-8 text ({err}); re-download it", root=path.parent
        ) from None
    return text.splitlines()


def existing_mask(paths: pd.Series) -> np.ndarray:
    """Which paths exist as files (URLs count as present), listing each folder once."""
    values = paths.astype(str).tolist()
    listing: dict[str, set[str] | None] = {}
    out = np.ones(len(values), dtype=bool)
    for i, p in enumerate(values):
        if p.startswith(("http://", "https://")):
            continue
        parent, name = os.path.split(p)
        if parent not in listing:
            try:
                with os.scandir(parent or ".") as it:
                    listing[parent] = {e.name for e in it}
            except OSError:
                listing[parent] = None
        names = listing[parent]
        out[i] = names is not None and name in names
    return out


def join_paths(base: Path, relative: Iterable[str]) -> list[str]:
    """``str(base / rel)`` for many POSIX-style relative paths, by string concatenation.

    Path arithmetic costs seconds for a million images; this does not.
    """
    prefix = str(base) + os.sep
    if os.sep == "/":
        return [prefix + r for r in relative]
    return [prefix + r.replace("/", os.sep) for r in relative]


def suffix(name: str) -> str:
    """The lower-case suffix of a file name (``".jpg"``), cheaper than ``Path(name).suffix``."""
    i = name.rfind(".")
    return name[i:].lower() if i > 0 else ""


def list_images(folder: Path) -> list[str]:
    """Names of the image files directly in ``folder`` (sorted); ``[]`` if it does not exist."""
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if e.is_file() and suffix(e.name) in IMAGE_SUFFIXES]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(names)


def nested_image_dir(folder: Path) -> Path:
    """``folder/<folder.name>`` when a mirror nested the image folder in itself, else ``folder``.

    Kaggle mirrors of Cars196 and Products-10K ship ``cars_train/cars_train/00001.jpg``.
    """
    inner = folder / folder.name
    if inner.is_dir() and not list_images(folder):
        logger.info("using nested image folder %s", inner)
        return inner
    return folder
