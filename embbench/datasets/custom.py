"""The built-in catalogues that are not public datasets: a manifest, an image folder, the demo.

``manifest`` reads a CSV (``root`` = its path; the options of
:func:`~embbench.manifest.from_manifest`), ``folder`` reads ``<split>/<label>/<image>`` or
``<label>/<image>`` (the options of :func:`~embbench.manifest.from_image_folder`), ``demo``
generates the synthetic demo (:mod:`embbench.demo`) and ``demo_b`` its twin. A user's catalogue
registered under its own name takes the ``manifest`` or ``folder`` loader.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from embbench.catalogue import Catalogue, CatalogueError
from embbench.datasets._common import LoadRequest
from embbench.datasets._registry import DatasetEntry, register_dataset
from embbench.datasets._texts import detect_text_column
from embbench.demo import make_demo_catalogue
from embbench.manifest import from_image_folder, from_manifest

__all__ = ["load_demo", "load_demo_b", "load_folder", "load_manifest"]


def _need_folder(req: LoadRequest, what: str) -> Path:
    if req.folder is None:
        raise CatalogueError(f"dataset {req.name!r} needs root = {what}")
    return req.folder.expanduser()


def load_manifest(req: LoadRequest, **options: Any) -> Catalogue:
    """Read the CSV manifest at ``req.folder`` (``req.label``: the label column to read).

    Item texts come from the ``text_column`` option, else from a column named ``title`` or
    ``text`` if the manifest has one (logged).
    """
    path = _need_folder(req, "the path of the CSV manifest")
    if req.label is not None and "label_columns" not in options:
        options["label_columns"] = (req.label,)
    if options.get("text_column") is None:
        options["text_column"] = detect_text_column(path, req.name)
    # Named as the dataset it is loaded as, so cache, records, MLflow and report agree.
    options.setdefault("name", req.name)
    return from_manifest(path, **options)


def load_folder(req: LoadRequest, **options: Any) -> Catalogue:
    """Read the image folder at ``req.folder`` (labels from the folder names)."""
    options.setdefault("name", req.name)
    return from_image_folder(_need_folder(req, "the image folder"), **options)


def load_demo(req: LoadRequest, **options: Any) -> Catalogue:
    """Generate (once) and read the synthetic demo below ``req.folder`` (default ``data_dir()``)."""
    return make_demo_catalogue(root=req.folder, seed=req.seed, **options)


def load_demo_b(req: LoadRequest, **options: Any) -> Catalogue:
    """The demo's twin: the same shapes, other products (seed + 1), for cross-tuning demos."""
    cat = load_demo(dataclasses.replace(req, seed=req.seed + 1), **options)
    return dataclasses.replace(cat, name="demo_b", source={**cat.source, "variant_of": "demo"})


for _name, _loader in (
    ("manifest", load_manifest),
    ("folder", load_folder),
    ("demo", load_demo),
    ("demo_b", load_demo_b),
):
    register_dataset(DatasetEntry(name=_name, loader=_loader, public=False))
