"""The catalogue table every dataset becomes (:mod:`embbench.manifest` reads a user's own).

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
