"""The cell engine's vocabulary: a cell, its inputs, what a stage produces, the stage's steps.

:class:`Cell` names one (stage, mode, model, dataset[, source, variant, task]) cell;
:class:`CellInputs` is a dataset loaded and planned once for every cell that reads it;
:class:`Produced` is what a stage's ``produce`` step returns; :class:`StageSteps` is the base
class of every stage's steps (grid, checks, identity, optional ``expand``, ``produce``), which
the loop in :mod:`embbench.cells` runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embbench.cache import EmbeddingSet
from embbench.catalogue import Catalogue
from embbench.datasets.prepare import RetrievalPlan
from embbench.metrics import RetrievalResult
from embbench.models import ModelSpec
from embbench.records import Lineage

__all__ = ["Cell", "CellInputs", "Produced", "StageSteps"]


@dataclass(frozen=True)
class Cell:
    """One cell of a stage's grid.

    Attributes:
        stage: The record's stage name (``embed``, ``finetune``, ``toptune``, ``crosstune``).
        mode: ``pretrained``, ``top-tuned``, ``fine-tuned``, ``cross-tuned`` or
            ``cross-top-tuned``.
        model: The zoo model name.
        dataset: The dataset scored (for cross-tuning: the target).
        source: The dataset the model was tuned on, for cross-tuning cells.
        variant: A deployment variant of the cell (a compression or an index setting).
        task: What the cell scores (:data:`embbench.vocab.TASKS`).
    """

    stage: str
    mode: str
    model: str
    dataset: str
    source: str | None = None
    variant: str | None = None
    task: str = "image-image"

    def __str__(self) -> str:
        origin = f" (tuned on {self.source})" if self.source else ""
        variant = f" [{self.variant}]" if self.variant else ""
        task = "" if self.task == "image-image" else f" {self.task}"
        return f"{self.stage} {self.mode}{task} {self.model} on {self.dataset}{origin}{variant}"


@dataclass
class CellInputs:
    """What the engine hands a stage's steps for one dataset: the catalogue and its plan."""

    dataset: str
    catalogue: Catalogue
    plan: RetrievalPlan


@dataclass
class Produced:
    """What a stage's ``produce`` step returns for one cell.

    Attributes:
        query: The query split's embeddings.
        index: The index split's embeddings (the same object as ``query`` under ``within``).
        lineage: Where the vectors come from.
        spec: The model's spec (``family``, ``backbone``, ``paper_name``).
        classification: Test-split classification metrics, when the cell trained a classifier.
        val_accuracy: Validation accuracy, when the cell trained a classifier.
        pretrained_metrics: The pretrained baseline's metrics on the same data (tuned modes).
        timings: ``embed_s``, ``train_s``, ``gpu_hours`` as measured by the stage.
        toptune_model_path: The top-tuned MLP the cell trained or applied (stages 03, 04).
        details: Stage-specific facts for the record (read by people and the analysis, never
            by another stage).
        tags: Extra MLflow tags for the cell's run.
        baseline: The pretrained embeddings ``(query, index)`` of the same data, scored by the
            engine with the same backend into ``pretrained_metrics`` (tuned modes).
        result: The retrieval result of a variant that searches with its own index (an ANN
            index variant), computed by the same metric code; the engine then records it
            instead of searching ``query``/``index`` with its backend.
        searched_with: What searched for ``result`` (the index variant's engine), recorded as
            the record's backend; ``None``: the engine's backend.
        per_query: Extra per-query arrays saved with the record (e.g. ``query_text``).
        record_fields: Record fields the stage sets itself (e.g. a text gallery's ``n_index``).
    """

    query: EmbeddingSet
    index: EmbeddingSet
    lineage: Lineage
    spec: ModelSpec
    classification: dict[str, float] = field(default_factory=dict)
    val_accuracy: float | None = None
    pretrained_metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float | None] = field(default_factory=dict)
    toptune_model_path: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    baseline: tuple[EmbeddingSet, EmbeddingSet] | None = None
    result: RetrievalResult | None = None
    searched_with: str | None = None
    per_query: dict[str, np.ndarray] = field(default_factory=dict)
    record_fields: dict[str, Any] = field(default_factory=dict)


class StageSteps:
    """What a stage supplies to the engine (subclass it; ``check`` and ``expand`` are optional)."""

    def grid(self) -> list[Cell]:
        """The cells, in run order."""
        raise NotImplementedError

    def check(self, cells: Sequence[Cell], inputs: Mapping[str, CellInputs]) -> list[str]:
        """Stage-specific problems found before any cell runs (empty when none)."""
        return []

    def expand(self, cells: Sequence[Cell], inputs: Mapping[str, CellInputs]) -> list[Cell]:
        """The cells with those known only once the data is loaded (e.g. an index sweep)."""
        return list(cells)

    def identity(self, cell: Cell, inputs: CellInputs) -> dict[str, Any]:
        """Everything beyond the config and the plan that changes the cell's result.

        Typically the embedding cache keys of the vectors the cell will score, the training
        hash of a fine-tuned model, or the hash of the top-tuned head applied.
        """
        raise NotImplementedError

    def produce(self, cell: Cell, inputs: CellInputs) -> Produced:
        """Compute the cell's query and index embeddings (and any training) with lineage."""
        raise NotImplementedError
