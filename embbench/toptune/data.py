"""Top-tuning inputs: cached embeddings and catalogue labels, checked and encoded for Keras.

Also the two steps on the outputs that need no Keras: giving all-zero top-tuned vectors a
direction (:func:`fill_zero_rows`) and the test-split classification metrics
(:func:`test_classification`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from embbench.cache import CacheError, EmbeddingSet
from embbench.metrics import classification_metrics, confusion_matrix
from embbench.toptune.backend import TopTuneError
from embbench.vectors import l2_normalize

logger = logging.getLogger(__name__)

__all__ = [
    "TEST",
    "TRAIN",
    "VAL",
    "TopTuneData",
    "fill_zero_rows",
    "prepare_data",
    "required_splits",
    "test_classification",
]

TRAIN, VAL, TEST = "train", "val", "test"


@dataclass
class TopTuneData:
    """Normalised embeddings and encoded labels of every split, ready for Keras.

    Attributes:
        x: Split -> (n, dim) float32, L2-normalised once, shared by every trial.
        y: Split -> (n,) int32 class index; -1 for a label never seen in train.
        labels: Split -> the original label values.
        classes: The train split's classes (index -> label value), sorted.
        label: The label column.
        sets: Split -> the source :class:`EmbeddingSet` (pretrained vectors).
        n_unseen: Split -> how many items carry a label absent from train.
    """

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    classes: np.ndarray
    label: str
    sets: dict[str, EmbeddingSet]
    n_unseen: dict[str, int] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """Input embedding dimension."""
        return int(self.x[TRAIN].shape[1])

    def seen(self, split: str) -> np.ndarray:
        """Boolean mask of the split's items whose class exists in train."""
        return self.y[split] >= 0


def required_splits(cat, plan: Mapping[str, str], dataset: str) -> list[str]:
    """Splits top-tuning needs: train (fit), val (selection), test (report), the retrieval ones.

    Raises:
        TopTuneError: The catalogue lacks one, naming the dataset, the split and the fix.
    """
    need = [TRAIN, VAL, TEST]
    need += [s for s in (plan["query_split"], plan["index_split"]) if s not in need]
    missing = [s for s in need if s not in cat.splits]
    if missing:
        raise TopTuneError(
            f"dataset {dataset!r}: top-tuning needs the splits {need} (train to fit, val to "
            f"select, test to report), but the catalogue has {cat.splits}, missing {missing}. "
            "Fix: give the catalogue a val split (the dataset loaders carve one from train; a "
            "manifest needs rows with split=val) or a test split."
        )
    return [*need, *[s for s in cat.splits if s not in need]]


def prepare_data(
    sets: Mapping[str, EmbeddingSet], cat, label: str, *, dataset: str, model: str = ""
) -> TopTuneData:
    """Check the cached embeddings and labels, normalise once, encode the classes.

    Args:
        sets: Split -> the model's pretrained embeddings (at least train, val and test).
        cat: The catalogue (labels are read from ``cat.items`` by item id).
        label: The label column to classify.
        dataset: Dataset name, for messages.
        model: Model name, for messages.

    Raises:
        TopTuneError: A split's embeddings are missing; the label column is unknown; labels are
            absent (empty) for items of a split; train has fewer than two classes; val or test
            share no class with train; the splits disagree on the dimension.
    """
    where = f"top-tuning {model or 'model'} on {dataset!r}"
    for split in (TRAIN, VAL, TEST):
        if split not in sets:
            raise TopTuneError(
                f"{where}: no embeddings for split {split!r} (have {sorted(sets)}). Fix: embed "
                f"it (run 01_embed, or run_toptune, which embeds missing splits from the "
                f"catalogue), and check that the catalogue has a {split!r} split."
            )
    if label not in cat.items.columns:
        raise TopTuneError(
            f"{where}: label {label!r} is not a column of the catalogue; its labels are "
            f"{list(cat.label_columns)}. Fix: set label to one of them ('' = the default, "
            f"{cat.default_label!r})."
        )
    dims = {s: es.dim for s, es in sets.items()}
    if len(set(dims.values())) > 1:
        raise TopTuneError(
            f"{where}: the cached splits disagree on the dimension {dims}; they come from "
            "different models. Fix: delete the stale cache folders and embed again."
        )
    labels: dict[str, np.ndarray] = {}
    for split, es in sets.items():
        try:
            values = es.labels(cat.items, label)
        except CacheError as exc:
            raise TopTuneError(f"{where}, split {split!r}: {exc}") from None
        absent = pd.isna(values)
        if absent.any():
            ids = np.asarray(es.item_ids)[absent][:3].tolist()
            raise TopTuneError(
                f"{where}: {int(absent.sum())} of {len(values)} item(s) of split {split!r} "
                f"have no {label!r} label (e.g. {ids}). Fix: fill the label in the catalogue, "
                "drop those items, or choose another label column with `label`."
            )
        if len(values) == 0:
            raise TopTuneError(
                f"{where}: split {split!r} has no embedded items (all images failed or the "
                f"split is empty; cache {es.path}). Fix: check the images of that split."
            )
        labels[split] = values
    classes = np.unique(labels[TRAIN])
    if len(classes) < 2:
        raise TopTuneError(
            f"{where}: the train split has a single class ({classes.tolist()}) for label "
            f"{label!r}; a classifier needs at least two. Fix: choose a label with several "
            f"classes (catalogue labels: {list(cat.label_columns)}) or check the split."
        )
    index = pd.Index(classes)
    x, y, n_unseen = {}, {}, {}
    for split, es in sets.items():
        codes = index.get_indexer(labels[split]).astype(np.int32)
        n_unseen[split] = int((codes < 0).sum())
        if split in (VAL, TEST) and n_unseen[split] == len(codes):
            raise TopTuneError(
                f"{where}: no item of split {split!r} has a {label!r} class seen in train "
                "(class-disjoint splits, as in deep-metric-learning benchmarks); a classifier "
                "cannot be selected or tested there. Fix: use a coarser label shared by all "
                "splits (e.g. SOP super_class_id) or the dataset's closed-set split scheme."
            )
        if n_unseen[split]:
            logger.warning(
                "%s: %d of %d item(s) of split %r have a class absent from train; they are "
                "left out of validation/classification (but embedded for retrieval)",
                where,
                n_unseen[split],
                len(codes),
                split,
            )
        x[split] = l2_normalize(es.vectors, "top-tuning inputs", zero_rows="keep")
        y[split] = codes
    return TopTuneData(
        x=x, y=y, labels=labels, classes=classes, label=label, sets=dict(sets), n_unseen=n_unseen
    )


def fill_zero_rows(vectors: np.ndarray, where: str) -> int:
    """Give all-zero top-tuned rows a fixed direction; return how many there were.

    A ReLU-like last hidden layer can output exactly zero for an input (all units inactive): such
    a vector has no direction, cannot be L2-normalised and the retrieval code rejects it. Those
    rows become the constant unit vector (equidistant from nothing in particular, the same for
    every such item) and are counted in the record (``n_zero_embeddings``).
    """
    zero = ~np.any(vectors != 0, axis=1)
    n = int(zero.sum())
    if n:
        logger.warning(
            "top-tuned embeddings of %s: %d of %d row(s) are all zeros (no active unit in the "
            "last hidden layer); they get a constant direction for retrieval",
            where,
            n,
            len(vectors),
        )
        vectors[zero] = 1.0 / np.sqrt(vectors.shape[1])
    return n


def test_classification(
    data: TopTuneData, pred: np.ndarray, seen: np.ndarray, out_dir: Path
) -> tuple[dict, Path]:
    """Test metrics on the items whose class exists in train; confusion matrix to ``out_dir``."""
    y_true = data.labels[TEST][seen]
    y_pred = pred[seen]
    metrics = {k: float(v) for k, v in classification_metrics(y_true, y_pred).items()}
    metrics["n_test"] = int(seen.sum())
    metrics["n_test_unseen_class"] = int((~seen).sum())
    matrix, order = confusion_matrix(y_true, y_pred, labels=data.classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "confusion_matrix.npz"
    np.savez_compressed(path, matrix=matrix, labels=np.asarray(order).astype(str))
    return metrics, path
