"""The kNN classification baseline on frozen embeddings.

:mod:`embbench.probe` re-exports it, shares its input checks and scores its predictions.

**kNN** (:func:`knn_classify`), as DINO's ``eval_knn.py`` (``knn_classifier``): cosine
similarity to every train embedding, the ``k`` (20) most similar vote for their class with
weight ``exp(sim / temperature)`` (T = 0.07), votes summed per class, the largest sum wins.
Ties decide exact results, so: among train items of equal similarity the lower train index is
nearer; among classes of equal vote the first in sorted label order wins. Similarities are
computed in blocks of test rows (about ``block_bytes`` each), top-k per block.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embbench._errors import UserError
from embbench.vectors import l2_normalize

KNN_K = 20  # DINO eval_knn defaults
KNN_TEMPERATURE = 0.07


class ProbeError(UserError, ValueError):
    """Unusable probe input (shapes, too few classes, an empty grid): one line naming it."""


def _unit(x: np.ndarray) -> np.ndarray:
    """Frozen embeddings as unit rows (all-zero rows kept as zeros)."""
    return l2_normalize(x, "probe inputs", zero_rows="keep")


def _device(device: str) -> Any:
    from embbench._torch_utils import resolve_device  # imports torch: only when used

    return resolve_device(device)


def _check_xy(x: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2 or len(x) == 0:
        raise ProbeError(f"{what}: embeddings must be a non-empty 2-D array, got shape {x.shape}")
    if y.shape != (len(x),):
        raise ProbeError(f"{what}: labels must be 1-D with one per row ({len(x)}), got {y.shape}")
    return x, y


def knn_votes(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    normalize: bool = True,
    block_bytes: int = 256 * 2**20,
    device: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Temperature-weighted kNN votes (DINO's ``knn_classifier``), computed in blocks.

    Args:
        train_x: ``(n_train, dim)`` train embeddings.
        train_y: Train labels.
        test_x: ``(n_test, dim)`` embeddings to classify.
        k: Neighbours that vote (at most ``n_train``).
        temperature: Vote weight ``exp(sim / temperature)``.
        normalize: L2-normalise rows first (cosine similarity); False uses raw dot products.
        block_bytes: Memory for one block of similarities (float32), which sets the block rows.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        ``(votes, classes)``: ``(n_test, n_classes)`` float64 summed weights and the sorted
        train classes they refer to.
    """
    import torch

    train_x, train_y = _check_xy(train_x, train_y, "kNN train split")
    test_x = np.asarray(test_x)
    if test_x.ndim != 2 or test_x.shape[1] != train_x.shape[1]:
        raise ProbeError(
            f"kNN: test embeddings must be 2-D of dim {train_x.shape[1]}, got {test_x.shape}"
        )
    if k < 1 or temperature <= 0:
        raise ProbeError(f"kNN: k must be >= 1 and temperature > 0, got k={k}, T={temperature}")
    prep = _unit if normalize else (lambda a: np.asarray(a, dtype=np.float32))
    xtr, xte = prep(train_x), prep(test_x)
    classes, ytr = np.unique(train_y, return_inverse=True)
    n = len(xtr)
    k = min(k, n)
    dev = _device(device)
    tr = torch.as_tensor(np.ascontiguousarray(xtr), device=dev)
    rows = max(1, min(len(xte), block_bytes // (4 * n)))
    votes = np.zeros((len(xte), len(classes)), dtype=np.float64)
    for lo in range(0, len(xte), rows):
        q = torch.as_tensor(np.ascontiguousarray(xte[lo : lo + rows]), device=dev)
        sims = q @ tr.T
        # k+1 candidates: if the (k+1)-th equals the k-th, the boundary is a tie -> full sort.
        vals, idx = torch.topk(sims, min(k + 1, n), dim=1)
        vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
        tie = (vals[:, k - 1] == vals[:, k]) if n > k else np.zeros(len(vals), dtype=bool)
        vals, idx = vals[:, :k], idx[:, :k]
        if tie.any():  # the k nearest by (-sim, train index) from the full rows
            sims_np = sims[torch.as_tensor(np.flatnonzero(tie), device=dev)].cpu().numpy()
            for r, row in zip(np.flatnonzero(tie), sims_np, strict=True):
                idx[r] = np.lexsort((np.arange(n), -row))[:k]
                vals[r] = row[idx[r]]
        # canonical order (by -sim, then train index) so the float sums are reproducible
        o = np.lexsort((idx, -vals), axis=-1)
        vals, idx = np.take_along_axis(vals, o, 1), np.take_along_axis(idx, o, 1)
        w = np.exp(vals.astype(np.float64) / temperature)
        block = votes[lo : lo + len(vals)]
        np.add.at(block, (np.repeat(np.arange(len(vals)), k), ytr[idx].ravel()), w.ravel())
    return votes, classes


def knn_classify(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, **options: Any
) -> np.ndarray:
    """Predictions of the kNN classifier: the class with the largest summed vote.

    Ties between classes go to the first in sorted label order. Args: see :func:`knn_votes`
    (``options`` are its keyword arguments: ``k``, ``temperature``, ``normalize``,
    ``block_bytes``, ``device``).

    Returns:
        ``(n_test,)`` predicted label values.
    """
    votes, classes = knn_votes(train_x, train_y, test_x, **options)
    return classes[votes.argmax(axis=1)]
