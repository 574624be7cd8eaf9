"""The catalogue table every dataset becomes, and loaders for a user's own catalogue.

A :class:`Catalogue` is one pandas table, one row per image, with these columns:

| column    | type | meaning                                                                     |
|-----------|------|-----------------------------------------------------------------------------|
| item_id   | str  | unique, stable id of the image (e.g. its path relative to the root)          |
| path      | str  | absolute file path, or an http(s) URL before fetching                        |
| split     | str  | ``train`` / ``val`` / ``test`` (or any name the source gives)                |
| <labels>  | any  | one column per label kind (e.g. ``class_id``, ``super_class_id``); ints/strs |

Everything downstream (embedding, retrieval, tuning) reads only this table, so the six public
datasets, the demo catalogue and a user's own catalogue share one code path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("item_id", "path", "split")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class CatalogueError(ValueError):
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
    """

    name: str
    items: pd.DataFrame
    label_columns: tuple[str, ...]
    default_label: str
    root: str = ""
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the table against the schema; raise :class:`CatalogueError` naming the problem."""
        where = f"catalogue {self.name!r} ({self.root or 'in memory'})"
        missing = [c for c in (*REQUIRED_COLUMNS, *self.label_columns) if c not in self.items]
        if missing:
            raise CatalogueError(f"{where} lacks column(s) {missing}; has {list(self.items)}")
        if self.default_label not in self.label_columns:
            raise CatalogueError(
                f"{where}: default_label {self.default_label!r} is not one of the label columns "
                f"{list(self.label_columns)}"
            )
        if len(self.items) == 0:
            raise CatalogueError(f"{where} has no images")
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

    def fingerprint(self) -> str:
        """A hash of the table's content (ids, splits, labels) and its source.

        It changes when images are added, removed, relabelled or moved between splits, or when
        the loader's options change (e.g. the demo generator's seed, a split scheme), so
        embedding caches and results keyed by it are never reused for different data. It does
        not read the image files: a copy whose images were replaced under the same names keeps
        its fingerprint (rerun with ``overwrite`` then).
        """
        cols = ["item_id", "split", *self.label_columns]
        table = self.items[cols].astype(str)
        h = hashlib.sha256()
        h.update(json.dumps(self.source, sort_keys=True, default=str).encode())
        h.update("\x1f".join(cols).encode())
        h.update(pd.util.hash_pandas_object(table, index=False).values.tobytes())
        return h.hexdigest()[:16]

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
        )


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
) -> Catalogue:
    """Read a user's catalogue from a CSV manifest.

    Relative image paths are resolved against the manifest's folder and must stay under it
    (``..`` escapes and absolute paths elsewhere are refused unless ``allow_outside_root``;
    the check is on the written path, so a symlink placed under the folder is trusted).
    http(s) URLs are kept as they are (fetch them with :func:`embbench.datasets.fetch_urls`
    before embedding); ``file://`` and other schemes are refused.

    Args:
        path: The CSV file.
        name: Catalogue name (default: the file's stem).
        path_column: Column holding image paths or URLs.
        label_columns: Label columns; the first is the default label.
        split_column: Column holding the split, or ``None`` when the manifest has none.
        default_split: Split given to every row when ``split_column`` is absent.
        id_column: Column holding a unique id (default: the path column's value).
        allow_outside_root: Accept image paths outside the manifest's folder.

    Returns:
        The catalogue.

    Raises:
        CatalogueError: The file is missing, lacks a named column, or a row's path escapes the
            manifest's folder or uses an unsupported scheme (the message names the row).
    """
    path = Path(path)
    if not path.is_file():
        raise CatalogueError(f"manifest {path} does not exist")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    wanted = [path_column, *label_columns] + ([id_column] if id_column else [])
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
    for col in label_columns:
        items[col] = df[col]
    return Catalogue(
        name=name or path.stem,
        items=items,
        label_columns=tuple(label_columns),
        default_label=label_columns[0],
        root=str(path),
        source={"loader": "manifest", "path_column": path_column},
    )


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
