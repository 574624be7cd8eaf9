"""Loaders for a user's own catalogue: a CSV manifest or an image-folder tree.

Both return a :class:`~embbench.catalogue.Catalogue`; the manifest's options for odd splits and
empty labels (``split_case``, ``empty_split``, ``empty_label``) are checked here, and every
problem is one :class:`~embbench.catalogue.CatalogueError` line naming the file and the fix.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from embbench.catalogue import IMAGE_SUFFIXES, Catalogue, CatalogueError

logger = logging.getLogger(__name__)


def from_manifest(
    path: str | Path,
    *,
    name: str | None = None,
    path_column: str = "path",
    label_columns: list[str] | tuple[str, ...] = ("label",),
    split_column: str | None = "split",
    default_split: str = "test",
    id_column: str | None = None,
    allow_outside_root: bool = False,
    split_case: str = "exact",
    empty_split: str = "error",
    empty_label: str = "error",
    text_column: str | None = None,
) -> Catalogue:
    """Read a user's catalogue from a CSV manifest.

    Relative image paths are resolved against the manifest's folder and must stay under it
    (``..`` escapes and absolute paths elsewhere are refused unless ``allow_outside_root``;
    the check is on the written path, so a symlink placed under the folder is trusted).
    http(s) URLs are kept as they are (fetch them with :func:`embbench.datasets.fetch_urls`
    before embedding); ``file://`` and other schemes are refused.

    Every row must have a split of ``train``, ``val`` or ``test`` (only those are ever scored)
    and a non-empty value in each label column (an empty label would make all such rows one
    class, relevant to each other). Rows that break this are refused, naming the file and the
    rows, unless an option says what to do with them: ``split_case``, ``empty_split``,
    ``empty_label`` (given as ``data_options: {<name>: {...}}`` in a params file).

    Args:
        path: The CSV file.
        name: Catalogue name (default: the file's stem).
        path_column: Column holding image paths or URLs.
        label_columns: Label columns; the first is the default label.
        split_column: Column holding the split, or ``None`` when the manifest has none.
        default_split: Split given to every row when ``split_column`` is absent.
        id_column: Column holding a unique id (default: the path column's value).
        allow_outside_root: Accept image paths outside the manifest's folder.
        split_case: ``exact`` (split values must be written ``train``/``val``/``test``) or
            ``lower`` (blanks around them are stripped and they are lower-cased: ``Test`` ->
            ``test``).
        empty_split: What a row with an empty split gets: ``error`` (refuse), ``train``,
            ``val``, ``test``, or ``drop`` (leave the row out, with a WARNING).
        empty_label: ``error`` (refuse rows with an empty value in a label column) or ``drop``
            (leave them out, with a WARNING).
        text_column: Column of per-item texts (a product title; empty cells are kept as "").

    Returns:
        The catalogue.

    Raises:
        CatalogueError: The file is missing, lacks a named column, a row's path escapes the
            manifest's folder or uses an unsupported scheme, or rows have an empty label or a
            split other than train/val/test (the message names the rows and the option).
    """
    _check_choice("split_case", split_case, SPLIT_CASES)
    _check_choice("empty_split", empty_split, EMPTY_SPLITS)
    _check_choice("empty_label", empty_label, EMPTY_LABELS)
    path = Path(path)
    if not path.is_file():
        raise CatalogueError(f"manifest {path} does not exist")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    wanted = [path_column, *label_columns, *[c for c in (id_column, text_column) if c]]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise CatalogueError(
            f"manifest {path}: column(s) {missing} not found; its columns are {list(df.columns)}"
        )
    if split_column and split_column not in df.columns:
        logger.info(
            "manifest %s has no %r column; every row goes to split %r",
            path,
            split_column,
            default_split,
        )
        split_column = None
    base = path.parent.resolve()
    resolved = [_resolve_row(p, base) for p in df[path_column]]
    bad = [(i, p, why) for i, (p, why) in enumerate(resolved) if why == "scheme"]
    if bad:
        i, p, _ = bad[0]
        raise CatalogueError(
            f"manifest {path}, row {i + 2} ({path_column}={df[path_column].iloc[i]!r}): only "
            f"local paths and http(s) URLs are supported ({len(bad)} row(s) use another scheme, "
            "e.g. file://); write the path itself, relative to the manifest's folder"
        )
    outside = [(i, p) for i, (p, why) in enumerate(resolved) if why == "outside"]
    if outside and not allow_outside_root:
        i, p = outside[0]
        raise CatalogueError(
            f"manifest {path}, row {i + 2} ({path_column}={df[path_column].iloc[i]!r}): resolves "
            f"to {p}, outside the manifest's folder {base} ({len(outside)} row(s) do); move the "
            "images under that folder, or pass allow_outside_root=True (dataset option) to "
            "accept other roots"
        )

    items = pd.DataFrame(
        {
            "item_id": df[id_column] if id_column else df[path_column],
            "path": [p for p, _ in resolved],
            "split": df[split_column] if split_column else default_split,
        }
    )
    for col in dict.fromkeys([*label_columns, *([text_column] if text_column else [])]):
        items[col] = df[col]
    rules = _ManifestRules(path, name or path.stem, split_case, empty_split, empty_label)
    if split_column:
        items = rules.splits(items, split_column)
    items = rules.labels(items, tuple(label_columns)).reset_index(drop=True)
    return Catalogue(
        name=name or path.stem,
        items=items,
        label_columns=tuple(label_columns),
        default_label=label_columns[0],
        root=str(path),
        source={"loader": "manifest", "path_column": path_column},
        text_columns=(text_column,) if text_column else (),
    )


SPLITS = ("train", "val", "test")
SPLIT_CASES = ("exact", "lower")
EMPTY_SPLITS = ("error", *SPLITS, "drop")
EMPTY_LABELS = ("error", "drop")


def _check_choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CatalogueError(f"manifest option {option}={value!r} is not one of {list(allowed)}")


def _rows_text(mask: pd.Series) -> str:
    """``rows 3, 7, 9 ... (12 row(s))``: CSV lines of ``mask`` (indexed like the file's rows)."""
    lines = [str(i + 2) for i in mask.index[mask.to_numpy()]]
    shown = ", ".join(lines[:5]) + (" ..." if len(lines) > 5 else "")
    return f"row{'s' if len(lines) > 1 else ''} {shown} ({len(lines)} row(s))"


@dataclass(frozen=True)
class _ManifestRules:
    """What a manifest's rows with an odd split or an empty label become (or the one-line error)."""

    path: Path
    name: str
    split_case: str
    empty_split: str
    empty_label: str

    def _option(self, text: str) -> str:
        return f"data_options: {{{self.name}: {{{text}}}}}"

    def splits(self, items: pd.DataFrame, column: str) -> pd.DataFrame:
        """The rows with their split checked (and mapped or dropped as the options say)."""
        given = items["split"].astype(str)
        split = given.str.strip().str.lower() if self.split_case == "lower" else given
        empty = split.str.strip() == ""
        keep = pd.Series(True, index=items.index)
        if empty.any() and self.empty_split == "drop":
            logger.warning(
                "manifest %s: %s with an empty %r left out (empty_split: drop)",
                self.path,
                _rows_text(empty),
                column,
            )
            keep &= ~empty
        elif empty.any() and self.empty_split in SPLITS:
            split = split.where(~empty, self.empty_split)
        odd = ~split.isin(SPLITS) & keep
        if odd.any():
            values = sorted(set(given[odd]))
            hints = []
            if self.split_case == "exact" and any(v.strip().lower() in SPLITS for v in values):
                hints.append(self._option("split_case: lower") + " (' Test' -> 'test')")
            if any(not v.strip() for v in values):
                hints.append(self._option("empty_split: test") + " (or train, val, drop)")
            fix = "; or set " + " and ".join(hints) if hints else ""
            raise CatalogueError(
                f"manifest {self.path}: {_rows_text(odd)} have a {column!r} value other than "
                f"{'/'.join(SPLITS)} ({', '.join(repr(v) for v in values[:5])}) and would never "
                f"be scored; write train, val or test{fix}"
            )
        return items.assign(split=split)[keep.to_numpy()]

    def labels(self, items: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
        empty = pd.Series(False, index=items.index)
        for col in columns:
            empty |= items[col].astype(str).str.strip() == ""
        if not empty.any():
            return items
        cols = [c for c in columns if (items[c].astype(str).str.strip() == "").any()]
        if self.empty_label == "error":
            raise CatalogueError(
                f"manifest {self.path}: {_rows_text(empty)} have an empty label in {cols} (they "
                "would form one class '' whose rows count as relevant to each other); fill "
                f"them in, or set {self._option('empty_label: drop')} to leave those rows out"
            )
        logger.warning(
            "manifest %s: %s with an empty label in %s left out (empty_label: drop)",
            self.path,
            _rows_text(empty),
            cols,
        )
        return items[~empty.to_numpy()]


def _resolve_row(p: str, base: Path) -> tuple[str, str]:
    """``(absolute path or URL, problem)`` of one manifest row; problem is "", scheme, outside."""
    if p.startswith(("http://", "https://")):
        return p, ""
    if "://" in p or p.lower().startswith("file:"):
        return p, "scheme"
    q = Path(os.path.normpath(base / Path(p).expanduser()))
    return str(q), "" if q == base or base in q.parents else "outside"


def from_image_folder(root: str | Path, *, name: str | None = None) -> Catalogue:
    """Read an image-folder tree: ``root/<split>/<label>/<image>`` or ``root/<label>/<image>``.

    The first form is recognised when every top-level folder is named ``train``, ``val`` or
    ``test``; otherwise all images go to split ``test``. The label column is ``label``.

    Raises:
        CatalogueError: The folder does not exist or holds no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise CatalogueError(f"image folder {root} does not exist")
    tops = sorted(p.name for p in root.iterdir() if p.is_dir())
    split_layout = bool(tops) and all(t in {"train", "val", "test"} for t in tops)
    rows = []
    for file in sorted(root.rglob("*")):
        if not file.is_file() or file.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = file.relative_to(root)
        if split_layout:
            if len(rel.parts) < 3:
                continue
            split, label = rel.parts[0], rel.parts[1]
        else:
            if len(rel.parts) < 2:
                continue
            split, label = "test", rel.parts[0]
        rows.append((rel.as_posix(), str(file), split, label))
    if not rows:
        raise CatalogueError(
            f"image folder {root} holds no images in <label>/<image> or <split>/<label>/<image> "
            f"folders (suffixes {sorted(IMAGE_SUFFIXES)})"
        )
    items = pd.DataFrame(rows, columns=["item_id", "path", "split", "label"])
    return Catalogue(
        name=name or root.name,
        items=items,
        label_columns=("label",),
        default_label="label",
        root=str(root),
        source={"loader": "image_folder", "split_layout": split_layout},
    )
