"""Cars196 (Stanford Cars), in both layouts in use.

``devkit`` (classification layout, what torchvision's ``StanfordCars`` reads)::

    stanford_cars/
      cars_train/00001.jpg ... 08144.jpg      # test reuses the same 5-digit names
      cars_test/00001.jpg ... 08041.jpg
      cars_test_annos_withlabels.mat          # NOT inside devkit/ (devkit/ is accepted too)
      devkit/cars_meta.mat  cars_train_annos.mat  cars_test_annos.mat (no class field)

``metric`` (deep-metric-learning layout)::

    cars_annos.mat      # annotations: relative_im_path, bbox_*, class (1..196), test (0/1)
    car_ims/000001.jpg ... 016185.jpg

The ``.mat`` struct fields are read by name, so their stored order (``bbox_x1, bbox_y1, bbox_x2,
bbox_y2, class, fname``; the devkit README lists another) does not matter. Class ids are 1-based.
Labels: ``class`` (1..196) and ``class_name`` (one contains a slash: "Ram C/V Cargo Van Minivan
2012"; names are labels, never used as paths).

Split schemes: ``classification`` = the published train/test (8,144 / 8,041, all classes);
``dml`` = classes 1-98 train, 99-196 test (8,054 / 8,131).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

from embbench.catalogue import Catalogue
from embbench.datasets._common import (
    DatasetLayoutError,
    Layout,
    LoadRequest,
    join_paths,
    label_and_name_maps,
    nested_image_dir,
    require_file,
)
from embbench.datasets._registry import DatasetEntry, register_dataset

logger = logging.getLogger(__name__)

TITLE = "Cars196"

LAYOUT = Layout(
    title=TITLE,
    variants={
        "devkit": ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat"),
        "metric": ("cars_annos.mat",),
    },
    subdirs=("stanford_cars", "cars196", "car_devkit"),
    archives=(
        "car_ims.tgz",
        "cars_train.tgz",
        "cars_test.tgz",
        "car_devkit.tgz",
        "stanford_cars.zip",
        "stanford-cars-dataset.zip",
    ),
    tree=(
        "  devkit layout:  <root>/cars_train/00001.jpg, <root>/cars_test/00001.jpg,\n"
        "                  <root>/cars_test_annos_withlabels.mat,\n"
        "                  <root>/devkit/{cars_meta,cars_train_annos,cars_test_annos}.mat\n"
        "  metric layout:  <root>/cars_annos.mat, <root>/car_ims/000001.jpg"
    ),
)

DML_TRAIN_CLASSES = 98


def _loadmat(path: Path) -> dict:
    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as err:  # scipy raises many types for a damaged file
        raise DatasetLayoutError(
            f"{TITLE}: cannot read {path} ({type(err).__name__}: {err}); the file is damaged or "
            "not a MATLAB file: download it again",
            root=path.parent,
        ) from None


def _annotations(path: Path, needed: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The ``annotations`` struct array of a ``.mat`` file as ``{field: 1-D array}``."""
    mat = _loadmat(path)
    if "annotations" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetLayoutError(
            f"{TITLE}: {path} has no 'annotations' variable (it has {keys}); is it the right file?",
            root=path.parent,
        )
    ann = np.atleast_1d(mat["annotations"])
    fields = ann.dtype.names or ()
    missing = [f for f in needed if f not in fields]
    if missing:
        hint = ""
        if "class" in missing and path.name == "cars_test_annos.mat":
            hint = (
                " The devkit's cars_test_annos.mat has no labels: get "
                "cars_test_annos_withlabels.mat (Kaggle mirrors and the torchvision docs link it) "
                f"and put it in {path.parent.parent}."
            )
        raise DatasetLayoutError(
            f"{TITLE}: {path} lacks field(s) {missing} in 'annotations' (fields: {list(fields)})."
            + hint,
            root=path.parent,
        )
    return {f: np.atleast_1d(ann[f]) for f in fields}


def _class_names(path: Path) -> list[str]:
    mat = _loadmat(path)
    if "class_names" not in mat:
        raise DatasetLayoutError(
            f"{TITLE}: {path} has no 'class_names' variable; is it the right file?",
            root=path.parent,
        )
    names = np.atleast_1d(mat["class_names"])
    return [str(n).strip() for n in names.ravel()]


def _ints(values: np.ndarray) -> np.ndarray:
    return np.array([int(np.asarray(v).ravel()[0]) for v in values], dtype=np.int64)


def _strs(values: np.ndarray) -> list[str]:
    return [str(v).strip() for v in values]


def _check_classes(classes: np.ndarray, names: list[str], source: Path) -> None:
    bad = classes[(classes < 1) | (classes > len(names))]
    if bad.size:
        raise DatasetLayoutError(
            f"{TITLE}: {source} has class ids {sorted(set(bad.tolist()))[:5]} outside 1.."
            f"{len(names)} (the number of class_names); the annotation files do not match",
            root=source.parent,
        )


def _read_devkit(folder: Path) -> pd.DataFrame:
    devkit = folder / "devkit"
    names = _class_names(devkit / "cars_meta.mat")
    test_annos = next(
        (
            p
            for p in (
                folder / "cars_test_annos_withlabels.mat",
                devkit / "cars_test_annos_withlabels.mat",
            )
            if p.is_file()
        ),
        None,
    )
    if test_annos is None:
        raise DatasetLayoutError(
            f"{TITLE}: {folder / 'cars_test_annos_withlabels.mat'} not found (devkit layout). "
            "The devkit's cars_test_annos.mat has no labels: get cars_test_annos_withlabels.mat "
            f"and put it in {folder}.",
            root=folder,
        )
    frames = []
    for split, ann_path, img_dir in (
        (
            "train",
            require_file(devkit / "cars_train_annos.mat", TITLE, "annotation file"),
            folder / "cars_train",
        ),
        ("test", test_annos, folder / "cars_test"),
    ):
        ann = _annotations(ann_path, ("fname", "class"))
        classes = _ints(ann["class"])
        _check_classes(classes, names, ann_path)
        fnames = _strs(ann["fname"])
        img_dir = nested_image_dir(img_dir)
        frames.append(
            pd.DataFrame(
                {
                    "item_id": [f"{folder_name(img_dir, folder)}/{f}" for f in fnames],
                    "path": join_paths(img_dir, fnames),
                    "published_split": split,
                    "class": classes,
                }
            )
        )
    items = pd.concat(frames, ignore_index=True)
    items["class_name"] = [names[c - 1] for c in items["class"]]
    return items


def folder_name(img_dir: Path, root: Path) -> str:
    """``img_dir`` relative to ``root`` as a POSIX string (the item id prefix)."""
    return img_dir.relative_to(root).as_posix()


def _read_metric(folder: Path) -> pd.DataFrame:
    path = folder / "cars_annos.mat"
    ann = _annotations(path, ("relative_im_path", "class", "test"))
    names = _class_names(path)
    classes = _ints(ann["class"])
    _check_classes(classes, names, path)
    rel = _strs(ann["relative_im_path"])
    test = _ints(ann["test"])
    items = pd.DataFrame(
        {
            "item_id": rel,
            "path": join_paths(folder, rel),
            "published_split": np.where(test == 1, "test", "train"),
            "class": classes,
        }
    )
    items["class_name"] = [names[c - 1] for c in items["class"]]
    return items


def load(req: LoadRequest) -> Catalogue:
    """Read Cars196 from ``folder`` in the ``devkit`` or ``metric`` layout.

    Args:
        req: What to read: ``folder``: The dataset folder (found by the factory);
            ``variant``: ``devkit`` or ``metric``; ``info``: The dataset's defaults;
            ``seed``: Seed of the validation split; ``split_scheme``: ``classification``
            (published train/test) or ``dml`` (classes 1-98 / 99-196); ``val_fraction``:
            Share of train moved to val (whole classes under ``dml``); ``test_fraction``:
            Unused (both schemes have published splits).

    Returns:
        The catalogue with labels ``class`` and ``class_name``.
    """
    items = _read_devkit(req.folder) if req.variant == "devkit" else _read_metric(req.folder)
    if req.split_scheme == "dml":
        items["split"] = np.where(items["class"] <= DML_TRAIN_CLASSES, "train", "test")
    else:
        items["split"] = items["published_split"]
    items = items.drop(columns="published_split")
    items = req.carve_val(items, "class")
    notes = req.notes
    notes.notes.append(
        f"{req.variant} layout; split scheme {req.split_scheme} "
        + (
            "(classes 1-98 train, 99-196 test)"
            if req.split_scheme == "dml"
            else "(published train/test)"
        )
    )
    # Class prompts use the devkit's class_names verbatim (a slash and hyphens are kept).
    name_maps = label_and_name_maps(items, "class", "class_name")
    return req.finish(
        items,
        ("class", "class_name"),
        **req.carved_val_source(),
        name_maps=name_maps,
    )


register_dataset(DatasetEntry(name="cars196", loader=load, layout=LAYOUT))
