"""Texts in the data: which manifest column holds item texts, and the check before a text task.

A catalogue carries per-item texts in :attr:`~embbench.catalogue.Catalogue.text_columns` (a
manifest's ``title``/``text`` column, Fashion's ``productDisplayName``, the demo's ``title``)
and class names in :attr:`~embbench.catalogue.Catalogue.name_maps` (Cars196, Food2K, SOP, RP2K,
the demo). Image tasks never read them; a text task calls :func:`check_texts` before any work.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from embbench.catalogue import Catalogue, CatalogueError

logger = logging.getLogger(__name__)

AUTO_TEXT_COLUMNS = ("title", "text")  # manifest columns taken as item texts when none is named


def detect_text_column(path: Path, name: str) -> str | None:
    """The manifest's column literally named ``title`` or ``text`` (in that order), or ``None``.

    Logs which column was taken, and how to name another one.
    """
    try:
        header = list(pd.read_csv(path, dtype=str, nrows=0).columns)
    except (OSError, ValueError):
        return None  # from_manifest reports an unreadable file with its own message
    found = next((c for c in AUTO_TEXT_COLUMNS if c in header), None)
    if found:
        logger.info(
            "manifest %s: item texts from its %r column (auto-detected; name another with"
            " data_options: {%s: {text_column: <column>}})",
            path,
            found,
            name,
        )
    return found


def check_texts(
    catalogue: Catalogue, column: str | None = None, splits: tuple[str, ...] | None = None
) -> None:
    """Refuse a text task on ``catalogue`` before any work unless every item has a text.

    Args:
        catalogue: The catalogue.
        column: The text column (default: the catalogue's first).
        splits: Only check the rows of these splits (default: all rows).

    Raises:
        CatalogueError: No such text column, it is empty in every row, or rows (named by
            ``item_id``) have an empty text; one line naming the column and the file.
    """
    texts = catalogue.texts(column)
    empty = texts == ""
    if splits is not None:
        empty &= catalogue.items["split"].isin(splits)
    if empty.any():
        ids = catalogue.items.loc[empty, "item_id"].astype(str).tolist()
        shown = ", ".join(repr(i) for i in ids[:5]) + (" ..." if len(ids) > 5 else "")
        raise CatalogueError(
            f"catalogue {catalogue.name!r} ({catalogue.root or 'in memory'}): {len(ids)} row(s) "
            f"have an empty {column or catalogue.text_columns[0]!r} text ({shown}); a text task "
            "needs a text for every item: fill them in or remove those rows (image tasks keep "
            "them)"
        )
