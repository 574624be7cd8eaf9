"""A dataset by name, prepared to be scored: load the catalogue (fetching URLs), plan retrieval.

:func:`load_catalogue` creates a registered catalogue, subsamples it and fetches its http(s)
rows; :func:`retrieval_plan` decides the relevance label, the protocol and the query and index
splits (the six public datasets have curated defaults in ``params/datasets.yaml``; a user's
catalogue keeps its own label). The cell engine calls both once per dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from embbench.catalogue import Catalogue, CatalogueError
from embbench.config import ConfigError
from embbench.datasets._factory import create_catalogue
from embbench.datasets._registry import get_dataset_info, list_datasets
from embbench.datasets.fetch import fetch_urls

logger = logging.getLogger(__name__)

__all__ = ["RetrievalPlan", "RetrievalPlanError", "load_catalogue", "retrieval_plan"]


class RetrievalPlanError(ConfigError):
    """A dataset cannot be scored as configured (a split or the label is missing)."""


@dataclass(frozen=True)
class RetrievalPlan:
    """How a dataset is scored: relevance label, protocol, and the query and index splits."""

    label: str
    protocol: str
    query_split: str
    index_split: str

    @property
    def splits(self) -> list[str]:
        """The splits retrieval needs, sorted."""
        return sorted({self.query_split, self.index_split})

    def as_dict(self) -> dict[str, str]:
        """The plan as a plain mapping (records, hashes, MLflow params)."""
        return {
            "label": self.label,
            "protocol": self.protocol,
            "query_split": self.query_split,
            "index_split": self.index_split,
        }


def load_catalogue(
    name: str,
    data_root: Mapping[str, str],
    *,
    label: str = "",
    max_images: int = 0,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Catalogue:
    """Create catalogue ``name``, subsample it and fetch its http(s) rows.

    Args:
        name: A registered dataset name.
        data_root: Dataset -> folder (or manifest CSV); default ``data/<name>``.
        label: Label column for a user's catalogue (a manifest reads this column).
        max_images: Per-split subsample size (0 = all), seeded and class-preserving.
        seed: Subsampling and split seed.
        options: Loader options (see :func:`embbench.datasets.create_catalogue`); and
            ``allow_private``: fetch URLs on private or loopback addresses (an internal CDN).
        progress: Show a progress bar while fetching URLs.
    """
    root = data_root.get(name) or None
    options = dict(options or {})
    allow_private = bool(options.pop("allow_private", False))
    user_label = label if label and name not in list_datasets(public_only=True) else None
    try:
        cat = create_catalogue(name, root, **options)
    except CatalogueError:
        if user_label is None:
            raise
        cat = None  # e.g. a manifest without the default "label" column
    if user_label is not None and (cat is None or user_label not in cat.label_columns):
        # a user's catalogue (a manifest) reads the label column it is asked for
        cat = create_catalogue(name, root, label=user_label, **options)
    cat = cat.subset(max_images, seed=seed)
    if cat.items["path"].astype(str).str.match(r"^https?://").any():
        cat, report = fetch_urls(cat, progress=progress, allow_private=allow_private)
        if report.failed:
            logger.warning(
                "%s: %d URL(s) could not be fetched:\n%s", name, len(report.failed), report.format()
            )
    return cat


def retrieval_plan(name: str, cat: Catalogue, label: str = "", protocol: str = "") -> RetrievalPlan:
    """Label column, protocol and query/index splits for dataset ``name`` (overrides win).

    Raises:
        RetrievalPlanError: The catalogue lacks a split the protocol needs, or the label column.
    """
    info = get_dataset_info(name) if name in list_datasets() else None
    # The six public datasets have curated defaults; a user's catalogue keeps its own label.
    label = label or (info.default_label if info and info.public else cat.default_label)
    protocol = protocol or (info.protocol if info else "within")
    query_split = info.query_split if info else "test"
    index_split = info.index_split if info else query_split
    if protocol == "within":
        index_split = query_split
    elif index_split == query_split:
        index_split = "train"
    for split in sorted({query_split, index_split}):
        if split not in cat.splits:
            raise RetrievalPlanError(
                f"dataset {name!r}: protocol {protocol!r} needs split {split!r}, the catalogue "
                f"has {cat.splits}. Fix: choose protocol 'within', or give the catalogue that "
                "split."
            )
    if label not in cat.label_columns:
        raise RetrievalPlanError(
            f"dataset {name!r}: label {label!r} is not among its label columns "
            f"{list(cat.label_columns)}. Fix: set label to one of them ('' = the default)."
        )
    return RetrievalPlan(label, protocol, query_split, index_split)
