"""The catalogue table every dataset becomes, and loaders for a user's own catalogue.

A :class:`Catalogue` is one pandas table, one row per image, with these columns:

| column    | type | meaning                                                                     |
|-----------|------|-----------------------------------------------------------------------------|
| item_id   | str  | unique, stable id of the image (e.g. its path relative to the root)          |
| path      | str  | absolute file path, or an http(s) URL before fetching                        |
| split     | str  | ``train`` / ``val`` / ``test`` (or any name the source gives)                |
| <labels>  | any  | one column per label kind (e.g. ``class_id``, ``super_class_id``); ints/strs |
| <texts>   | str  | optional per-item texts (e.g. a product title); ``""`` where an item has none |

Everything downstream (embedding, retrieval, tuning) reads only this table, so the six public
datasets, the demo catalogue and a user's own catalogue share one code path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from embbench._errors import UserError
from embbench.filehash import HASH_NAME, file_hashes

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("item_id", "path", "split")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class CatalogueError(UserError, ValueError):
    """A catalogue (manifest, folder or dataset copy) is malformed; the message says where."""


@dataclass
class Catalogue:
    """A dataset as one table of images with labels and splits.

    Attributes:
        name: Dataset name used in cache keys, results and MLflow (e.g. ``"sop"``).
        items: The table described in the module docstring.
        label_columns: The label columns present in ``items``.
        default_label: The label used when a stage does not name one.
        root: The folder (or manifest) the catalogue was read from.
        source: Free-form provenance (loader name, layout variant, seed...).
        text_columns: Per-item text columns in ``items`` (:meth:`texts`; first = default).
        name_maps: Label column -> {value: class name} where the data names its classes
            (Cars196's ``class_names``, Food2K's names file), for :meth:`class_names`.
    """

    name: str
    items: pd.DataFrame
    label_columns: tuple[str, ...]
    default_label: str
    root: str = ""
    source: dict = field(default_factory=dict)
    text_columns: tuple[str, ...] = ()
    name_maps: dict[str, dict] = field(default_factory=dict)
    # content hashes and fingerprint, computed once per table (replace() starts afresh)
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the table against the schema; raise :class:`CatalogueError` naming the problem."""
        where = f"catalogue {self.name!r} ({self.root or 'in memory'})"
        wanted = (*REQUIRED_COLUMNS, *self.label_columns, *self.text_columns)
        missing = [c for c in wanted if c not in self.items]
        if missing:
            raise CatalogueError(f"{where} lacks column(s) {missing}; has {list(self.items)}")
        if self.default_label not in self.label_columns:
            raise CatalogueError(
                f"{where}: default_label {self.default_label!r} is not one of the label columns "
                f"{list(self.label_columns)}"
            )
        if len(self.items) == 0:
            raise CatalogueError(f"{where} has no images")
        if unknown := sorted(set(self.name_maps) - set(self.label_columns)):
            raise CatalogueError(f"{where}: class names for non-label column(s) {unknown}")
        dup = self.items["item_id"].duplicated()
        if dup.any():
            examples = self.items.loc[dup, "item_id"].head(3).tolist()
            raise CatalogueError(f"{where}: {int(dup.sum())} duplicate item_id(s), e.g. {examples}")

    @property
    def splits(self) -> list[str]:
        """The split names present, in a stable order (train, val, test first)."""
        order = {"train": 0, "val": 1, "test": 2}
        return sorted(self.items["split"].unique(), key=lambda s: (order.get(s, 3), s))

    def split(self, name: str) -> pd.DataFrame:
        """The rows of one split, in catalogue order; raise naming the splits that exist."""
        rows = self.items[self.items["split"] == name]
        if rows.empty:
            raise CatalogueError(
                f"catalogue {self.name!r} has no split {name!r}; it has {self.splits}"
            )
        return rows

    def labels(self, column: str | None = None) -> pd.Series:
        """The label column ``column`` (default: ``default_label``), indexed like ``items``."""
        column = column or self.default_label
        if column not in self.label_columns:
            raise CatalogueError(
                f"catalogue {self.name!r} has no label {column!r}; "
                f"labels: {list(self.label_columns)}"
            )
        return self.items[column]

    def texts(self, column: str | None = None) -> pd.Series:
        """The per-item texts of ``column`` (default: the first), stripped, ``""`` where none.

        Image tasks keep rows without text; :func:`embbench.datasets.check_texts` refuses them.

        Raises:
            CatalogueError: No such text column, or it is empty in every row (the message
                names the column, the catalogue's file and the fix).
        """
        where = f"catalogue {self.name!r} ({self.root or 'in memory'})"
        fix = (
            f"name it in data_options: {{{self.name}: {{text_column: <column>}}}} (a manifest "
            "column named 'title' or 'text' is found by itself)"
        )
        column = column or (self.text_columns[0] if self.text_columns else None)
        if column not in self.text_columns:
            raise CatalogueError(
                f"{where} has no text column {column!r} (text columns: "
                f"{list(self.text_columns)}); a text task needs one: {fix}"
            )
        texts = self.items[column].fillna("").astype(str).str.strip()
        if (texts == "").all():
            raise CatalogueError(
                f"{where}: text column {column!r} is empty in every row; fill it in, or {fix}"
            )
        return texts

    def class_names(self, label: str | None = None) -> dict:
        """``{label value: human-readable name}`` for every class of ``label``, sorted by value.

        The dataset's own names (:attr:`name_maps`), else the value with ``_`` and ``-`` as
        spaces (``coffee_maker`` -> ``coffee maker``; an id stays the id), for class prompts.
        """
        given = self.name_maps.get(label or self.default_label, {})
        values = sorted(
            self.labels(label).dropna().unique().tolist(), key=lambda v: (isinstance(v, str), v)
        )
        return {v: str(given.get(v) or "").strip() or readable_name(v) for v in values}

    def texts_fingerprint(self, column: str | None = None) -> str:
        """The identity of the ids and texts of ``column``, for text-embedding caches.

        Apart from :meth:`fingerprint` (images and labels only): adding or editing texts leaves
        image caches valid; a text cache is keyed by both.
        """
        table = pd.DataFrame({"k": self.items["item_id"].astype(str), "t": self.texts(column)})
        h = hashlib.sha256(f"{column or self.text_columns[0]}\x1f".encode())
        h.update(pd.util.hash_pandas_object(table, index=False).values.tobytes())
        return h.hexdigest()[:16]

    def content_hashes(self, progress: bool = True) -> pd.Series:
        """The xxh3-128 hash of each row's image bytes, indexed like ``items``.

        Computed once per file and remembered by its stat signature (size, mtime, inode,
        ctime) in an index under the cache folder (:mod:`embbench.filehash`): a later run only
        stats the files. A path that is not a readable file gives ``"missing"``, an http(s) row
        not fetched yet ``"url"``.
        """
        key = (id(self.items), self.items.shape, self.root)
        if self._memo.get("hashes_key") != key:
            digests = file_hashes(
                self.items["path"].astype(str).tolist(), base=self._folder(), progress=progress
            )
            self._memo.clear()
            self._memo.update(hashes_key=key, hashes=pd.Series(digests, index=self.items.index))
        return self._memo["hashes"]

    def _folder(self) -> str | None:
        """The folder the images are expected under (the manifest's folder, the root folder)."""
        if not self.root:
            return None
        root = Path(self.root).expanduser()
        return str(root.parent if root.suffix.lower() == ".csv" or root.is_file() else root)

    def fingerprint(self) -> str:
        """The content identity of the catalogue: what its images are, how they are labelled.

        A hash of the bytes of every image (:meth:`content_hashes`), the resolved root, the
        ids, splits and labels, and the loader's options (e.g. the demo generator's seed, a
        split scheme). It changes when an image is replaced (even under the same name, size and
        mtime), added, removed, relabelled or moved between splits, or when the catalogue is
        read from another folder, so embedding caches, cell hashes and results keyed by it are
        never reused for other data. The first call on a large catalogue reads every image
        once (with a progress bar); later runs only stat them.
        """
        hashes = self.content_hashes()
        if "fingerprint" not in self._memo:
            cols = ["item_id", "split", *self.label_columns]
            table = self.items[cols].astype(str).assign(_content=hashes.to_numpy())
            root = str(Path(self.root).expanduser().resolve()) if self.root else ""
            h = hashlib.sha256()
            h.update(json.dumps(self.source, sort_keys=True, default=str).encode())
            h.update(f"root={root}\x1fhash={HASH_NAME}\x1f".encode())
            h.update("\x1f".join(cols).encode())
            h.update(pd.util.hash_pandas_object(table, index=False).values.tobytes())
            self._memo["fingerprint"] = h.hexdigest()[:16]
        return self._memo["fingerprint"]

    def subset(self, max_per_split: int = 0, seed: int = 0) -> Catalogue:
        """A seeded subsample of at most ``max_per_split`` images per split (0 = all).

        Sampling is by label groups where possible so that retrieval still has positives: whole
        classes are drawn in a random order until the budget is reached.
        """
        if max_per_split <= 0:
            return self
        rng = np.random.default_rng(seed)
        parts = []
        for name in self.splits:
            rows = self.split(name)
            if len(rows) <= max_per_split:
                parts.append(rows)
                continue
            groups = rows.groupby(self.default_label, sort=True).indices
            keys = list(groups)
            rng.shuffle(keys)
            take: list[int] = []
            for key in keys:
                idx = groups[key]
                take.extend(idx[: max_per_split - len(take)])
                if len(take) >= max_per_split:
                    break
            parts.append(rows.iloc[sorted(take)])
        items = pd.concat(parts).reset_index(drop=True)
        return Catalogue(
            name=self.name,
            items=items,
            label_columns=self.label_columns,
            default_label=self.default_label,
            root=self.root,
            source={**self.source, "subset": {"max_per_split": max_per_split, "seed": seed}},
            text_columns=self.text_columns,
            name_maps=self.name_maps,
        )


def readable_name(value: object) -> str:
    """A label value as words, ``_`` and ``-`` as spaces: ``coffee_maker`` -> ``coffee maker``."""
    return " ".join(re.split(r"[\s_\-]+", str(value))).strip()


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
