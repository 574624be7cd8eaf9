"""A record's task and its classification columns, for the analysis frame.

Every record measures one task (:data:`embbench.vocab.Task`); records written before tasks
existed measured image->image. Classification tasks (zero-shot, probe, kNN) carry their test
metrics in ``classification`` and the bootstrap CI of their accuracy in ``details["ci"]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from embbench.analysis._common import num as _num

IMAGE_TASK = "image-image"  # the task of every record written before tasks existed
# a classification result's test metrics, as columns (NaN when the record has none)
CLASSIFICATION_COLUMNS = (
    "accuracy", "top5_accuracy", "balanced_accuracy", "f1_macro", "precision_macro",
    "recall_macro",
)  # fmt: skip


def record_task(record: Any) -> str:
    """What ``record`` measures; a record without a task is image->image.

    Reads the record's typed ``task`` field (or a ``task`` in its details); absent means
    ``image-image``, as the records' migration says.
    """
    details = getattr(record, "details", None) or {}
    task = getattr(record, "task", None) or details.get("task")
    return str(task) if task else IMAGE_TASK


def task_columns(record: Any) -> dict[str, Any]:
    """The ``task`` column, the templates in one string and the classification columns.

    Returns:
        ``task``; ``templates`` (joined with `` | ``) when the details list them; one column per
        :data:`CLASSIFICATION_COLUMNS` entry and ``accuracy low`` / ``accuracy high`` (the
        bootstrap CI of the test accuracy, ``NaN`` when not stored).
    """
    details = getattr(record, "details", None) or {}
    classification = getattr(record, "classification", None) or {}
    row: dict[str, Any] = {"task": record_task(record)}
    templates = details.get("templates")
    if isinstance(templates, list | tuple):
        row["templates"] = " | ".join(str(t) for t in templates)
    for col in CLASSIFICATION_COLUMNS:
        row[col] = _num(classification.get(col))
    ci = details.get("ci")
    bounds = ci.get("accuracy") if isinstance(ci, Mapping) else None
    ok = isinstance(bounds, list | tuple) and len(bounds) == 2
    row["accuracy low"] = _num(bounds[0]) if ok else _num(None)
    row["accuracy high"] = _num(bounds[1]) if ok else _num(None)
    return row
