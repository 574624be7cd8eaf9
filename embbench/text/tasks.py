"""Text tasks of text-image models: text->image and image->text retrieval, zero-shot tagging.

Retrieval is scored exactly as image->image retrieval: the exact search backend ranks the
gallery (:func:`embbench.retrieval.search_and_evaluate`, protocol ``cross``) and
:func:`embbench.metrics.evaluate_rankings` turns the rankings into mMP@k, mR@1, MAP@k, MRR@k and
NDCG@k, with the same lone-query rule (a query whose label has no gallery item is excluded and
counted in ``n_lone``) and per-query values for the same bootstrap confidence intervals
(:func:`retrieval_cis`). Queries and gallery per task:

- ``text-image`` with class prompts: one query per class (its templates averaged,
  :func:`~embbench.text.embed_class_prompts`), the gallery is a split's images; relevant = the
  images of that class.
- ``text-image`` with item texts: one query per item text (e.g. a title), the gallery is the
  split's images; relevant = the images with the item's label (its own image included).
- ``image-text``: one query per image, the gallery is the items' texts; relevant = the texts
  whose item has the image's label.
- ``zero-shot``: each image is classified by its most similar class prompt vector
  (:func:`zero_shot_classify`: top-1, top-5 and balanced accuracy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from embbench._errors import UserError
from embbench.metrics import RetrievalResult, bootstrap_ci, metric_names
from embbench.retrieval import SearchBackend, l2_normalize, search_and_evaluate

logger = logging.getLogger(__name__)

__all__ = [
    "cross_modal_retrieval",
    "ItemTexts",
    "TextColumnError",
    "ZeroShotResult",
    "item_texts",
    "retrieval_cis",
    "zero_shot_classify",
]


class TextColumnError(UserError, ValueError):
    """A catalogue's text column is missing or holds no text."""


@dataclass
class ItemTexts:
    """The texts of one split's items, with their ids and labels (empty texts dropped).

    Attributes:
        ids: ``(n,)`` item ids.
        texts: ``(n,)`` texts.
        labels: ``(n,)`` labels (the relevance column).
        n_empty: Items of the split left out because their text was empty or missing.
    """

    ids: np.ndarray
    texts: list[str]
    labels: np.ndarray
    n_empty: int = 0


def item_texts(
    items: pd.DataFrame,
    text_column: str,
    label: str,
    *,
    split: str | None = None,
    where: str = "catalogue",
) -> ItemTexts:
    """Read a per-item text column (e.g. ``title``) of a catalogue's items table.

    Args:
        items: The catalogue's items table (``Catalogue.items``).
        text_column: The column holding one text per item.
        label: The label column that decides relevance.
        split: Keep only this split's rows (``None``: all rows).
        where: The catalogue's name/root, named in errors.

    Returns:
        The non-empty texts with their ids and labels.

    Raises:
        TextColumnError: The column is missing, or holds no non-empty text (one line naming the
            catalogue, the column and the fix).
    """
    if text_column not in items:
        raise TextColumnError(
            f"{where} has no text column {text_column!r} (columns: {list(items)}). Fix: add a "
            f"{text_column!r} column with one text (e.g. a product title) per item, or name an "
            "existing column as the text column."
        )
    if label not in items:
        raise TextColumnError(f"{where} has no label column {label!r} (columns: {list(items)})")
    rows = items if split is None else items[items["split"] == split]
    raw = rows[text_column]
    texts = raw.astype("string").str.strip()
    keep = texts.notna() & (texts != "")
    if not keep.any():
        in_split = f" in split {split!r}" if split is not None else ""
        raise TextColumnError(
            f"{where}: text column {text_column!r} is empty{in_split} ({len(rows)} rows, no "
            "text). Fix: fill it with one text per item, or run only image tasks on this data."
        )
    n_empty = int((~keep).sum())
    if n_empty:
        logger.warning(
            "%s: %d of %d item(s) have an empty %r and are left out of text queries",
            where,
            n_empty,
            len(rows),
            text_column,
        )
    kept = rows[keep.to_numpy()]
    return ItemTexts(
        ids=kept["item_id"].astype(str).to_numpy(),
        texts=[str(t) for t in texts[keep].tolist()],
        labels=kept[label].to_numpy(),
        n_empty=n_empty,
    )


def cross_modal_retrieval(
    query_vectors: np.ndarray,
    query_labels: np.ndarray,
    gallery_vectors: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    k: int = 5,
    backend: SearchBackend | str = "exact",
) -> RetrievalResult:
    """Queries of one modality ranked against a gallery of the other (relevant: same label).

    text->image: class prompts or item texts query a split's images; image->text: the split's
    images query the items' texts. Both are the ``cross`` protocol of the image-retrieval code.

    Args:
        query_vectors: ``(nq, d)`` query embeddings (normalised here if not yet).
        query_labels: ``(nq,)`` the label each query stands for (a class, an item's label).
        gallery_vectors: ``(n, d)`` gallery embeddings (a split's cached image vectors, or the
            items' text vectors).
        gallery_labels: ``(n,)`` their labels.
        k: The cut-off.
        backend: A search backend or a registered name (``exact`` by default).

    Returns:
        The five metrics over the non-lone queries, per-query values, ``n_lone`` and the
        top-k gallery positions (``topk_ids``, for galleries of text queries).
    """
    return search_and_evaluate(
        query_vectors,
        query_labels,
        gallery_vectors,
        gallery_labels,
        k=k,
        protocol="cross",
        backend=backend,
    )


def retrieval_cis(
    result: RetrievalResult, *, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of each metric over the evaluated queries (as image retrieval).

    Returns:
        ``{metric: (low, high)}`` for the metrics of :func:`embbench.metrics.metric_names`.
    """
    return {
        m: bootstrap_ci(result.per_query[m], n_boot=n_boot, seed=seed, alpha=1.0 - confidence)
        for m in metric_names(result.k)
    }


@dataclass
class ZeroShotResult:
    """Zero-shot classification of images by their most similar class prompt.

    Attributes:
        summary: ``top1`` (accuracy), ``top<k>`` (true class among the k best; the key names
            the k asked for, ``top5`` by default, even when fewer classes exist) and
            ``balanced_accuracy`` (mean top-1 recall over the classes present in the images).
        predictions: ``(n,)`` the predicted class label of each image.
        topk: ``(n, k)`` class labels ranked best first.
        correct: ``{"top1": (n,), "top<k>": (n,)}`` per-image 0/1 (for bootstrap CIs).
        n_images: Images classified.
        n_classes: Candidate classes.
        k: The top-k cut-off asked for (the key of ``top<k>``).
        k_used: The cut-off applied, ``min(k, n_classes)`` (with ``n_classes <= k`` top-k is 1).
    """

    summary: dict[str, float]
    predictions: np.ndarray
    topk: np.ndarray
    correct: dict[str, np.ndarray] = field(default_factory=dict)
    n_images: int = 0
    n_classes: int = 0
    k: int = 5
    k_used: int = 5

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view of the summary and counts."""
        return {
            "summary": {m: float(v) for m, v in self.summary.items()},
            "n_images": self.n_images,
            "n_classes": self.n_classes,
            "k": self.k,
            "k_used": self.k_used,
        }


def zero_shot_classify(
    image_vectors: np.ndarray,
    image_labels: np.ndarray,
    class_vectors: np.ndarray,
    class_labels: np.ndarray,
    *,
    k: int = 5,
) -> ZeroShotResult:
    """Classify each image by ``image x class`` cosine logits; top-1, top-k, balanced accuracy.

    Args:
        image_vectors: ``(n, d)`` image embeddings (L2-normalised here).
        image_labels: ``(n,)`` true labels; each must be one of ``class_labels``.
        class_vectors: ``(C, d)`` class text embeddings (e.g. :func:`embed_class_prompts`).
        class_labels: ``(C,)`` the label of each class row.
        k: The top-k cut-off (``min(k, C)`` is applied, kept in ``k_used``; the summary key is
            ``top<k>`` whatever C, so tables line up).

    Returns:
        The :class:`ZeroShotResult`. Ties between classes go to the lower class row.

    Raises:
        ValueError: Shape mismatches, duplicate class labels, or image labels with no class.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"zero_shot_classify: k must be a positive integer, got {k!r}")
    img = l2_normalize(image_vectors, "image_vectors")
    cls = l2_normalize(class_vectors, "class_vectors")
    y = np.asarray(image_labels)
    cl = np.asarray(class_labels)
    if img.shape[1] != cls.shape[1]:
        raise ValueError(
            f"zero_shot_classify: image dim {img.shape[1]} != text dim "
            f"{cls.shape[1]}; the vectors come from different models"
        )
    if y.shape != (img.shape[0],) or cl.shape != (cls.shape[0],):
        raise ValueError("zero_shot_classify: one label per image and one per class row needed")
    if len(np.unique(cl)) != len(cl):
        raise ValueError("zero_shot_classify: class_labels contains duplicates")
    pos = {c: i for i, c in enumerate(cl.tolist())}
    missing = sorted({v for v in y.tolist() if v not in pos}, key=str)
    if missing:
        raise ValueError(
            f"zero_shot_classify: {len(missing)} image label(s) have no class prompt (e.g. "
            f"{missing[:3]}); give a class name for every label of the split"
        )
    true = np.array([pos[v] for v in y.tolist()], dtype=np.int64)
    kk = int(min(k, len(cl)))
    logits = img.astype(np.float64) @ cls.astype(np.float64).T
    order = np.argsort(-logits, axis=1, kind="stable")[:, :kk]
    top1 = order[:, 0] == true
    topk = (order == true[:, None]).any(axis=1)
    present = np.unique(true)
    recall = [float(top1[true == c].mean()) for c in present]
    summary = {
        "top1": float(top1.mean()),
        f"top{k}": float(topk.mean()),
        "balanced_accuracy": float(np.mean(recall)),
    }
    return ZeroShotResult(
        summary=summary,
        predictions=cl[order[:, 0]],
        topk=cl[order],
        correct={"top1": top1.astype(np.float64), f"top{k}": topk.astype(np.float64)},
        n_images=int(len(y)),
        n_classes=int(len(cl)),
        k=int(k),
        k_used=kk,
    )
