"""Stage 03's baseline cells: a linear probe and a kNN classifier on the frozen embeddings.

Every model of the grid gets them, image-only ones included. They read the same cached
pretrained train/val/test embeddings as the top-tuning search (:mod:`embbench.probe` does the
work) and are scored with top-tuning's classification code and keys
(:func:`embbench.probe.score_predictions`) plus ``balanced_accuracy``; a bootstrap CI of the test
accuracy goes to ``details["ci"]``. The cells' mode is ``pretrained`` (the embeddings are not
tuned), their task ``probe`` or ``knn``; they record no retrieval metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from embbench.bootstrap import bootstrap_ci
from embbench.cells import Cell, CellInputs, Produced
from embbench.metrics import RetrievalResult
from embbench.probe import DEFAULT_C_GRID, knn_classify, linear_probe, score_predictions
from embbench.stagekit import EmbedderPool, lineage_of

logger = logging.getLogger(__name__)

MODE = "pretrained"
BASELINE_VERSION = 1  # bump when this module changes what it computes
TRAIN, VAL, TEST = "train", "val", "test"


def baseline_cells(
    stage: str, models: Sequence[str], datasets: Sequence[str], baselines: Sequence[str]
) -> list[Cell]:
    """The probe / kNN cells of every (model, dataset), dataset by dataset."""
    return [Cell(stage, MODE, m, d, task=t) for d in datasets for m in models for t in baselines]


def baseline_params(task: str, knn_k: int, knn_temperature: float) -> dict[str, Any]:
    """The method's parameters (in the cell's identity and the record's details)."""
    if task == "knn":
        return {"k": knn_k, "temperature": knn_temperature, "similarity": "cosine"}
    return {"c_grid": "DEFAULT_C_GRID", "n_c": len(DEFAULT_C_GRID), "search": "peak"}


def baseline_identity(
    pool: EmbedderPool, cell: Cell, inputs: CellInputs, splits: Sequence[str], **params: Any
) -> dict[str, Any]:
    """The cache keys of the frozen embeddings, the method's parameters and version."""
    return {
        "caches": pool.cache_keys(cell.model, inputs, splits),
        "baseline": baseline_params(cell.task, **params),
        "version": BASELINE_VERSION,
    }


def produce_baseline(
    pool: EmbedderPool,
    cell: Cell,
    inputs: CellInputs,
    splits: Sequence[str],
    *,
    knn_k: int,
    knn_temperature: float,
    device: str,
    seed: int,
) -> Produced:
    """Fit and score the cell's probe or kNN classifier on the frozen embeddings."""
    t0 = time.perf_counter()
    sets = pool.embed(cell.model, inputs, splits)
    embed_s = round(time.perf_counter() - t0, 3)
    items, label = inputs.catalogue.items, inputs.plan.label
    x = {s: np.asarray(sets[s].vectors, dtype=np.float32) for s in (TRAIN, VAL, TEST)}
    y = {s: np.asarray(sets[s].labels(items, label)) for s in (TRAIN, VAL, TEST)}
    classes = np.unique(y[TRAIN])
    details: dict[str, Any] = baseline_params(cell.task, knn_k, knn_temperature)
    val_accuracy = None
    t0 = time.perf_counter()
    if cell.task == "knn":
        pred = knn_classify(
            x[TRAIN], y[TRAIN], x[TEST], k=knn_k, temperature=knn_temperature, device=device
        )
    else:
        res = linear_probe(
            x[TRAIN], y[TRAIN], x[VAL], y[VAL], x[TEST], seed=seed, device=device, progress=False
        )
        pred, classes = res.predictions, res.classes
        val_accuracy = float(res.val_accuracy[res.chosen_c])
        details.update(
            chosen_c=float(res.chosen_c),
            c_grid=[float(c) for c in DEFAULT_C_GRID],
            val_accuracy={str(float(c)): float(a) for c, a in sorted(res.val_accuracy.items())},
            n_not_converged=res.n_not_converged,
        )
    train_s = round(time.perf_counter() - t0, 3)
    metrics, _ = score_predictions(y[TEST], pred, classes)
    seen = np.isin(y[TEST], classes)
    correct = (np.asarray(pred) == y[TEST])[seen].astype(np.float64)
    metrics["balanced_accuracy"] = _balanced(y[TEST][seen], np.asarray(pred)[seen])
    lo, hi = bootstrap_ci(correct, seed=seed)
    details.update(ci={"accuracy": [lo, hi]}, n_classes=len(classes))
    emb = pool(cell.model)
    return Produced(
        query=sets[TEST],
        index=sets[TRAIN],
        lineage=lineage_of(emb, cell.model),
        spec=emb.spec,
        classification=metrics,
        val_accuracy=val_accuracy,
        timings={"embed_s": embed_s, "train_s": train_s},
        details=details,
        result=RetrievalResult(summary={}, per_query={}, n_queries=0, n_lone=0, k=1),
        searched_with="none",
        record_fields={"query_split": TEST, "index_split": TRAIN},
        per_query={
            "prediction": np.asarray([str(p) for p in pred]),
            "label": np.asarray([str(v) for v in y[TEST]]),
        },
    )


def _balanced(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's balanced accuracy)."""
    if not len(y_true):
        return float("nan")
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in np.unique(y_true)]
    return float(np.mean(recalls))


__all__ = ["BASELINE_VERSION", "baseline_cells", "baseline_identity", "produce_baseline"]
