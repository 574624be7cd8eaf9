"""Stage 01's text cells: text->image, image->text and zero-shot for text-image models.

The cells sit beside the image->image cells of the same grid and share their image vectors:
the gallery is the plan's index split embedded by the same :class:`~embbench.stagekit.
EmbedderPool` (one embedder per model, built with its text tower only when the model has text
cells), so the images come from the same embedding cache and are never embedded twice.

- ``text-image`` (class prompts): one query per class, the templates embedded, averaged and
  re-normalised (:func:`embbench.text.class_prompt_tasks`).
- ``text-image`` variant ``item-text``: one query per item text of the split (the catalogue's
  text column, or ``text_column``), added once the data is loaded.
- ``image-text``: each image queries the split's item texts (cells dropped, with one INFO line,
  for a dataset without item texts).
- ``zero-shot``: each image classified among the class prompts (top-1, top-k, balanced
  accuracy, with top-tuning's classification keys).

Text retrieval is searched exactly in process (the gallery of texts is small) and scored by the
image-retrieval metric code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from embbench.bootstrap import bootstrap_ci
from embbench.cells import Cell, CellInputs, Produced
from embbench.datasets import check_texts
from embbench.metrics import RetrievalResult
from embbench.models import get_model_spec, text_capable
from embbench.probe import score_predictions
from embbench.stagekit import EmbedderPool, lineage_of
from embbench.text import class_prompt_tasks, item_text_tasks, retrieval_cis
from embbench.vocab import TEXT_TASKS

logger = logging.getLogger(__name__)

ITEM_TEXT = "item-text"  # the variant of a text-image cell whose queries are item texts
TEXT_SEARCH = "exact"  # text galleries are searched in process


def text_models(models: Sequence[str], tasks: Sequence[str]) -> list[str]:
    """The models of ``models`` that get text cells (text-capable, and text tasks asked)."""
    if not any(t in TEXT_TASKS for t in tasks):
        return []
    return [m for m in models if text_capable(get_model_spec(m))]


def text_cells(cell: Cell, tasks: Sequence[str], capable: Sequence[str]) -> list[Cell]:
    """The text cells of an image->image cell's (model, dataset), in ``tasks`` order."""
    if cell.model not in capable:
        return []
    return [
        Cell(cell.stage, cell.mode, cell.model, cell.dataset, task=t)
        for t in tasks
        if t in TEXT_TASKS
    ]


def log_image_only(models: Sequence[str], tasks: Sequence[str], capable: Sequence[str]) -> None:
    """One INFO line naming the image-only models that get no text cells."""
    asked = [t for t in tasks if t in TEXT_TASKS]
    left = [m for m in models if m not in capable]
    if asked and left:
        logger.info(
            "no %s cells for %s: image-only model(s) without a text tower (they keep the "
            "image-image task; stage 03 gives them probe and kNN rows)",
            "/".join(asked),
            ", ".join(left),
        )


def item_column(text_column: str, inputs: CellInputs) -> str:
    """The item-text column of a dataset: ``text_column``, else the catalogue's first ("")."""
    cols = inputs.catalogue.text_columns
    return text_column or (cols[0] if cols else "")


def check_text_grid(
    models: Sequence[str],
    tasks: Sequence[str],
    text_column: str,
    inputs: Mapping[str, CellInputs],
) -> list[str]:
    """Pre-work problems of the text tasks: no model can run them, a bad text column."""
    asked = [t for t in tasks if t in TEXT_TASKS]
    if not asked:
        return []
    problems = []
    if not text_models(models, tasks):
        problems.append(
            f"tasks {asked} need a text-image model, and none of models {list(models)} has a "
            "text tower. Fix: add a text-image model (list_models(family='text-image')) or "
            "remove the text tasks from `tasks`"
        )
    if text_column:
        for name, inp in inputs.items():
            try:
                check_texts(inp.catalogue, text_column, splits=(inp.plan.index_split,))
            except ValueError as exc:
                problems.append(f"text_column {text_column!r}, dataset {name!r}: {exc}")
    return problems


def expand_text(
    cells: Sequence[Cell], text_column: str, inputs: Mapping[str, CellInputs]
) -> list[Cell]:
    """Add the item-text text->image cells; drop image->text where a dataset has no texts."""
    out: list[Cell] = []
    for cell in cells:
        column = item_column(text_column, inputs[cell.dataset]) if cell.task in TEXT_TASKS else ""
        if cell.task == "image-text" and not cell.variant and not column:
            logger.info(
                "no image-text cell for %s on %s: the catalogue has no item-text column (set "
                "text_column, or a `title`/`text` column in the manifest)",
                cell.model,
                cell.dataset,
            )
            continue
        out.append(cell)
        if cell.task == "text-image" and not cell.variant and column:
            out.append(
                Cell(
                    cell.stage,
                    cell.mode,
                    cell.model,
                    cell.dataset,
                    variant=ITEM_TEXT,
                    task="text-image",
                )
            )
    return out


def text_identity(
    pool: EmbedderPool, cell: Cell, inputs: CellInputs, templates: Sequence[str], text_column: str
) -> dict[str, Any]:
    """What changes a text cell: the image cache, the text tower, the templates or texts."""
    split = inputs.plan.index_split
    tower = pool(cell.model).text
    out: dict[str, Any] = {
        "caches": pool.cache_keys(cell.model, inputs, [split]),
        "text_tower": tower.cache_identity() if tower is not None else None,
        "search": TEXT_SEARCH,
    }
    if cell.variant == ITEM_TEXT or cell.task == "image-text":
        column = item_column(text_column, inputs)
        out.update(text_column=column, texts=inputs.catalogue.texts_fingerprint(column))
    else:
        out.update(
            templates=list(templates),
            class_names=inputs.catalogue.class_names(inputs.plan.label or None),
        )
    return out


def _empty(k: int) -> RetrievalResult:
    """The retrieval result of a classification cell: no retrieval metrics."""
    return RetrievalResult(summary={}, per_query={}, n_queries=0, n_lone=0, k=k)


def produce_text(
    pool: EmbedderPool,
    cell: Cell,
    inputs: CellInputs,
    *,
    templates: Sequence[str],
    text_column: str,
    k: int,
    overwrite: bool,
    seed: int = 0,
) -> Produced:
    """Score one text cell on the plan's index split (its images from the embedding cache)."""
    plan, cat = inputs.plan, inputs.catalogue
    split = plan.index_split
    images = pool.embed(cell.model, inputs, [split])[split]
    emb = pool(cell.model)
    if emb.text is None:  # the pool builds the text tower for every model with text cells
        raise RuntimeError(f"{cell}: {cell.model} was built without its text tower")
    vecs, labels = np.asarray(images.vectors), images.labels(cat.items, plan.label)
    kw: dict[str, Any] = {
        "dataset": cell.dataset,
        "k": k,
        "backend": TEXT_SEARCH,
        "device": pool.cfg.device,
        "overwrite": overwrite,
        "progress": False,
    }
    base = Produced(
        query=images,
        index=images,
        lineage=lineage_of(emb, cell.model),
        spec=emb.spec,
        searched_with=TEXT_SEARCH,
        record_fields={"query_split": split, "index_split": split},
        details={"tokenizer": emb.text.tokenizer_id, "context_length": emb.text.context_length},
    )
    if cell.variant == ITEM_TEXT or cell.task == "image-text":
        column = item_column(text_column, inputs)
        res = item_text_tasks(
            emb.text,
            vecs,
            labels,
            cat.items,
            text_column=column,
            label=plan.label,
            split=split,
            where=cell.dataset,
            **kw,
        )
        texts = np.asarray([str(t) for t in res.texts.texts])
        base.details.update(text_source=f"{ITEM_TEXT}:{column}", n_empty_texts=res.texts.n_empty)
        if cell.task == "image-text":
            base.result = res.image_text
            base.per_query = {"index_text": texts}
            base.record_fields["n_index"] = len(texts)
        else:
            base.result = res.text_image
            base.per_query = {"query_text": texts, "query_label": _saveable(res.texts.labels)}
        base.details["ci"] = _cis(base.result, seed)
        return base
    res = class_prompt_tasks(
        emb.text,
        vecs,
        labels,
        class_names=cat.class_names(plan.label or None),
        templates=list(templates),
        where="templates",
        **kw,
    )
    base.details.update(templates=list(res.templates), n_classes=len(res.class_names))
    if cell.task == "text-image":
        base.result = res.text_image
        base.per_query = {
            "query_text": np.asarray(res.class_names),
            "query_label": _saveable(res.class_labels),
        }
        base.details.update(text_source="class-prompts", ci=_cis(base.result, seed))
        return base
    zs = res.zero_shot
    metrics, _ = score_predictions(labels, zs.predictions, res.class_labels)
    metrics["balanced_accuracy"] = float(zs.summary["balanced_accuracy"])
    metrics[f"top{k}_accuracy"] = float(zs.summary[f"top{k}"])
    lo, hi = bootstrap_ci(zs.correct["top1"], seed=seed)
    base.result = _empty(k)
    base.classification = metrics
    base.details.update(ci={"accuracy": [lo, hi]}, k=k)
    base.per_query = {
        "prediction": np.asarray([str(p) for p in zs.predictions]),
        "correct": zs.correct["top1"],
    }
    return base


def _cis(result: RetrievalResult, seed: int) -> dict[str, list[float]]:
    """Bootstrap CIs of each retrieval metric (as the analysis computes them)."""
    return {m: [float(v) for v in ci] for m, ci in retrieval_cis(result, seed=seed).items()}


__all__ = [
    "ITEM_TEXT",
    "check_text_grid",
    "expand_text",
    "log_image_only",
    "produce_text",
    "text_cells",
    "text_identity",
    "text_models",
]


def _saveable(values: Any) -> np.ndarray:
    """Labels as an array the per-query file stores without pickling (strings, not objects)."""
    out = np.asarray(values)
    return out.astype(str) if out.dtype == object else out
