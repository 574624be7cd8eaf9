"""One call per text task family for the engine: class-prompt tasks and item-text tasks.

Each takes a built :class:`~embbench.models.TextTower`, a split's image vectors (e.g. an
:class:`~embbench.cache.EmbeddingSet` from :func:`embbench.embed.embed_split`) with their labels,
embeds the texts through the cache (:func:`~embbench.text.embed_texts`) and scores them
(:mod:`embbench.text.tasks`). Validation (templates, text column) happens before any text is
embedded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from embbench.metrics import RetrievalResult
from embbench.models import TextTower
from embbench.retrieval import SearchBackend
from embbench.text.encode import embed_class_prompts, embed_texts
from embbench.text.tasks import (
    ItemTexts,
    ZeroShotResult,
    cross_modal_retrieval,
    item_texts,
    zero_shot_classify,
)
from embbench.text.templates import class_prompts, validate_templates

logger = logging.getLogger(__name__)

__all__ = ["ClassPromptResults", "ItemTextResults", "class_prompt_tasks", "item_text_tasks"]


@dataclass
class ClassPromptResults:
    """Text->image retrieval with class prompts and zero-shot classification of one split.

    Attributes:
        text_image: One query per class against the split's images.
        zero_shot: Each image classified among the classes.
        class_labels: The label of each class row (query order of ``text_image``).
        class_names: The name put into the templates for each class.
        class_vectors: ``(C, d)`` the averaged, re-normalised class vectors.
        templates: The templates used.
    """

    text_image: RetrievalResult
    zero_shot: ZeroShotResult
    class_labels: np.ndarray
    class_names: list[str]
    class_vectors: np.ndarray
    templates: tuple[str, ...]


@dataclass
class ItemTextResults:
    """Text->image and image->text retrieval with per-item texts of one split.

    Attributes:
        text_image: One query per item text against the split's images.
        image_text: One query per image against the items' texts.
        texts: The item texts used (ids, texts, labels; empty ones dropped and counted).
    """

    text_image: RetrievalResult
    image_text: RetrievalResult
    texts: ItemTexts


def class_prompt_tasks(
    tower: TextTower,
    image_vectors: np.ndarray,
    image_labels: np.ndarray,
    *,
    class_names: Mapping[Any, str] | None = None,
    templates: Sequence[str] | None = None,
    where: str = "templates",
    k: int = 5,
    backend: SearchBackend | str = "exact",
    **embed_kwargs: Any,
) -> ClassPromptResults:
    """Class-prompt text->image retrieval and zero-shot classification on one split.

    Args:
        tower: The text tower (its model's image tower made ``image_vectors``).
        image_vectors: ``(n, d)`` the split's image vectors.
        image_labels: ``(n,)`` their labels.
        class_names: Label -> name put into the templates (default ``str(label)``); every
            label of the split needs one.
        templates: Prompt templates (default :data:`~embbench.text.DEFAULT_TEMPLATES`).
        where: Where the templates came from (named in errors).
        k: The cut-off (retrieval metrics and top-k accuracy).
        backend: Search backend for the retrieval.
        **embed_kwargs: Passed to :func:`~embbench.text.embed_texts` (dataset, device,
            batch_size...).

    Returns:
        The :class:`ClassPromptResults`.
    """
    tpl = validate_templates(templates, where)
    labels = np.asarray(image_labels)
    # the images' dtype (e.g. pandas' object strings), so the metric code compares them as equal
    classes = np.array(
        sorted(set(labels.tolist()), key=lambda v: (str(type(v)), v)), dtype=labels.dtype
    )
    if class_names is None:
        names = [str(c) for c in classes.tolist()]
    else:
        missing = [c for c in classes.tolist() if c not in class_names]
        if missing:
            raise ValueError(
                f"class_names has no name for {len(missing)} label(s) of the split (e.g. "
                f"{missing[:3]}); give a name for every class"
            )
        names = [str(class_names[c]) for c in classes.tolist()]
    class_prompts(names, tpl)  # empty names fail here, before any embedding
    vecs = embed_class_prompts(tower, names, tpl, where=where, **embed_kwargs)
    return ClassPromptResults(
        text_image=cross_modal_retrieval(
            vecs, classes, image_vectors, labels, k=k, backend=backend
        ),
        zero_shot=zero_shot_classify(image_vectors, labels, vecs, classes, k=k),
        class_labels=classes,
        class_names=names,
        class_vectors=vecs,
        templates=tpl,
    )


def item_text_tasks(
    tower: TextTower,
    image_vectors: np.ndarray,
    image_labels: np.ndarray,
    items: pd.DataFrame,
    *,
    text_column: str,
    label: str,
    split: str,
    where: str = "catalogue",
    k: int = 5,
    backend: SearchBackend | str = "exact",
    **embed_kwargs: Any,
) -> ItemTextResults:
    """Item-text text->image and image->text retrieval on one split.

    Args:
        tower: The text tower.
        image_vectors: ``(n, d)`` the split's image vectors.
        image_labels: ``(n,)`` their labels (column ``label``).
        items: The catalogue's items table.
        text_column: The column with one text per item (e.g. ``title``).
        label: The label column deciding relevance.
        split: The split whose items give the texts.
        where: The catalogue's name, named in errors.
        k: The cut-off.
        backend: Search backend.
        **embed_kwargs: Passed to :func:`~embbench.text.embed_texts` (dataset, device...).

    Returns:
        The :class:`ItemTextResults`.

    Raises:
        TextColumnError: The column is missing or empty (before any embedding).
    """
    texts = item_texts(items, text_column, label, split=split, where=where)
    emb = embed_texts(
        tower,
        texts.texts,
        ids=texts.ids,
        purpose=f"{text_column}-{split}",
        **embed_kwargs,
    )
    vecs = np.asarray(emb.vectors)
    return ItemTextResults(
        text_image=cross_modal_retrieval(
            vecs, texts.labels, image_vectors, image_labels, k=k, backend=backend
        ),
        image_text=cross_modal_retrieval(
            image_vectors, image_labels, vecs, texts.labels, k=k, backend=backend
        ),
        texts=texts,
    )
