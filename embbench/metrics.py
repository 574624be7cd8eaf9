"""Retrieval and classification metrics, vectorised with numpy.

The project's own definitions, following the reference evaluation code of the UnED benchmark
(Ypsilantis et al. 2023, ``universal_embedding/knn_utils.py``) and the Google Universal Image
Embedding challenge. Embeddings are L2-normalised and searched by L2 distance (ranked as the
inner product); ties in distance are broken by index id, ascending. Protocol ``within``: queries
= index (one split), each query removed from its own results by id (not by dropping rank 1:
datasets hold duplicate images); ``cross``: queries from one split, index from another. An index
item is relevant when its label equals the query's. For a query with ``n_q`` relevant index items
(the query itself excluded), ``rel_j`` the relevance of the j-th result and ``m = min(n_q, k)``:

- ``MP@k`` (modified precision): ``sum_{j<=m} rel_j / m`` (only the first ``m`` results count).
- ``R@1``: ``rel_1``.
- ``AP@k``: ``sum_{j<=k} P@j * rel_j / m`` (UnED ``map_k``; pytrec_eval's ``map_cut`` divides by
  ``n_q`` instead, we divide by ``min(n_q, k)``).
- ``RR@k``: ``1 / rank`` of the first relevant result within ``k``, 0 if none.
- ``NDCG@k``: binary gains, ``DCG = sum_j rel_j / log2(j + 1)`` over the ideal DCG of ``m``
  relevant items first (pytrec_eval ``ndcg_cut``).

Queries with ``n_q = 0`` ("lone" queries, e.g. singleton classes under the ``within`` protocol)
are excluded from every mean and counted in :attr:`RetrievalResult.n_lone` (pytorch-metric-learning
behaviour; UnED divides by zero there, UDON scores 0).

Classification metrics use scikit-learn's definitions with ``zero_division=0``. The bootstrap
confidence intervals of per-query means live in :mod:`embbench.bootstrap` (re-exported here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embbench.bootstrap import bootstrap_ci, paired_bootstrap_test

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSIFICATION_KEYS",
    "RetrievalResult",
    "accuracy",
    "bootstrap_ci",
    "classification_metrics",
    "confusion_matrix",
    "evaluate_rankings",
    "metric_names",
    "paired_bootstrap_test",
    "retrieval_metrics",
]

# The keys of :func:`classification_metrics`, in its order (the columns of stage tables).
CLASSIFICATION_KEYS = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
)


def metric_names(k: int) -> list[str]:
    """The summary keys for cut-off ``k``, in report order.

    Args:
        k: The cut-off.

    Returns:
        ``["mMP@k", "mR@1", "MAP@k", "MRR@k", "NDCG@k"]``.
    """
    return [f"mMP@{k}", "mR@1", f"MAP@{k}", f"MRR@{k}", f"NDCG@{k}"]


@dataclass
class RetrievalResult:
    """Retrieval metrics over the evaluated (non-lone) queries.

    Attributes:
        summary: Mean of each metric over the evaluated queries (keys from :func:`metric_names`);
            NaN when no query could be evaluated.
        per_query: Per-query values of each metric for the evaluated queries, aligned with
            ``query_index`` (kept for bootstrap confidence intervals and paired tests).
        n_queries: Number of evaluated queries.
        n_lone: Number of queries excluded because no index item shares their label.
        k: The cut-off.
        query_index: Positions (in the original query order) of the evaluated queries.
        topk_ids: The ranking scored (index positions, ``-1`` padding), one row per evaluated
            query aligned with ``query_index``, when built from rankings (galleries show it).
    """

    summary: dict[str, float]
    per_query: dict[str, np.ndarray]
    n_queries: int
    n_lone: int
    k: int
    query_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    topk_ids: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self, *, per_query: bool = False) -> dict[str, Any]:
        """A JSON-serialisable view.

        Args:
            per_query: Also include the per-query values and ``query_index`` as lists.

        Returns:
            ``{"summary": ..., "n_queries": ..., "n_lone": ..., "k": ...}`` (plus per-query lists).
        """
        out: dict[str, Any] = {
            "summary": {name: float(v) for name, v in self.summary.items()},
            "n_queries": int(self.n_queries),
            "n_lone": int(self.n_lone),
            "k": int(self.k),
        }
        if per_query:
            out["per_query"] = {name: v.tolist() for name, v in self.per_query.items()}
            out["query_index"] = self.query_index.tolist()
        return out


def retrieval_metrics(
    ranked_labels_relevance: np.ndarray, n_relevant: np.ndarray, k: int = 5
) -> RetrievalResult:
    """Compute mMP@k, mR@1, MAP@k, MRR@k and NDCG@k from a relevance matrix.

    Args:
        ranked_labels_relevance: Boolean ``(nq, >=k)`` matrix; entry ``[i, j]`` says whether the
            j-th result of query ``i`` is relevant (padding slots must be ``False``). Only the
            first ``k`` columns are used; fewer columns are padded with ``False``.
        n_relevant: ``(nq,)`` number of relevant items in the index for each query, the query
            itself excluded. Queries with 0 are "lone" and excluded from the means.
        k: The cut-off.

    Returns:
        The summary, per-query values and counts.

    Raises:
        ValueError: On bad shapes, ``k < 1``, negative counts, or a query with more relevant
            results in its top k than ``n_relevant`` (which means the counts or the ranking
            are wrong, e.g. the query was not removed from its own list).
    """
    if int(k) != k or k < 1:
        raise ValueError(f"retrieval_metrics: k must be a positive integer, got {k!r}")
    k = int(k)
    rel = np.asarray(ranked_labels_relevance)
    if rel.ndim != 2:
        raise ValueError(
            f"retrieval_metrics: ranked_labels_relevance must be 2-D (nq, k), got shape {rel.shape}"
        )
    rel = rel.astype(bool, copy=False)
    n_rel = np.asarray(n_relevant)
    if n_rel.shape != (rel.shape[0],):
        raise ValueError(
            f"retrieval_metrics: n_relevant must have shape ({rel.shape[0]},) to match "
            f"ranked_labels_relevance, got {n_rel.shape}"
        )
    if n_rel.size and n_rel.min() < 0:
        raise ValueError("retrieval_metrics: n_relevant has negative counts")
    if rel.shape[1] < k:
        pad = np.zeros((rel.shape[0], k - rel.shape[1]), dtype=bool)
        rel = np.concatenate([rel, pad], axis=1)
    rel = rel[:, :k]
    hits = rel.sum(axis=1)
    too_many = hits > n_rel
    if too_many.any():
        i = int(np.flatnonzero(too_many)[0])
        raise ValueError(
            f"retrieval_metrics: query {i} has {int(hits[i])} relevant results in its top {k} "
            f"but n_relevant={int(n_rel[i])}; {int(too_many.sum())} queries are inconsistent. "
            "Check that each query was removed from its own result list (protocol 'within') "
            "and that n_relevant counts the index items sharing the query's label."
        )

    lone = n_rel <= 0
    query_index = np.flatnonzero(~lone).astype(np.int64)
    rel = rel[query_index]
    n_rel = n_rel[query_index].astype(np.int64)
    nq = rel.shape[0]

    relf = rel.astype(np.float64)
    m = np.minimum(n_rel, k).astype(np.float64)  # >= 1 for evaluated queries
    ranks = np.arange(1, k + 1, dtype=np.float64)
    in_cap = ranks[None, :] <= m[:, None]

    mp = (relf * in_cap).sum(axis=1) / m if nq else np.zeros(0)
    r1 = relf[:, 0] if nq else np.zeros(0)
    precision_at_j = np.cumsum(relf, axis=1) / ranks[None, :]
    ap = (precision_at_j * relf).sum(axis=1) / m if nq else np.zeros(0)
    any_hit = rel.any(axis=1)
    first = np.argmax(rel, axis=1) if nq else np.zeros(0, dtype=np.int64)
    rr = np.where(any_hit, 1.0 / (first + 1.0), 0.0)
    discount = 1.0 / np.log2(ranks + 1.0)
    dcg = relf @ discount if nq else np.zeros(0)
    ideal = np.cumsum(discount)[m.astype(np.int64) - 1] if nq else np.zeros(0)
    ndcg = dcg / ideal if nq else np.zeros(0)

    names = metric_names(k)
    per_query = dict(zip(names, (mp, r1, ap, rr, ndcg), strict=True))
    summary = {name: (float(v.mean()) if nq else float("nan")) for name, v in per_query.items()}
    if not nq:
        logger.warning("retrieval_metrics: all %d queries are lone; metrics are NaN", len(lone))
    return RetrievalResult(
        summary=summary,
        per_query=per_query,
        n_queries=int(nq),
        n_lone=int(lone.sum()),
        k=k,
        query_index=query_index,
    )


def _factorize_jointly(
    a: np.ndarray, b: np.ndarray, what: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer codes for two label arrays over their joint set of values (+ number of values)."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"{what}: labels must be 1-D, got shapes {a.shape} and {b.shape}")
    kinds = {a.dtype.kind, b.dtype.kind}
    numeric = set("biuf")
    if len(kinds) > 1 and not kinds <= numeric:
        raise ValueError(
            f"{what}: the two label arrays have incompatible types ({a.dtype} and {b.dtype}); "
            "convert both to strings or both to integers so equal labels compare equal."
        )
    if "f" in kinds and (np.isnan(a.astype(float)).any() or np.isnan(b.astype(float)).any()):
        raise ValueError(f"{what}: labels contain NaN; drop or fill the missing labels first.")
    try:
        uniq, codes = np.unique(np.concatenate([a, b]), return_inverse=True)
    except TypeError as err:
        raise ValueError(
            f"{what}: labels could not be compared ({err}); use one type (str or int)."
        ) from err
    codes = codes.reshape(-1)
    return codes[: len(a)], codes[len(a) :], len(uniq)


def evaluate_rankings(
    ranked_ids: np.ndarray,
    query_labels: np.ndarray,
    index_labels: np.ndarray,
    k: int = 5,
    *,
    exclude_self: bool,
    query_ids: np.ndarray | None = None,
) -> RetrievalResult:
    """Retrieval metrics from ranked index positions and labels.

    Args:
        ranked_ids: ``(nq, >=k)`` int positions into the index, best first, ``-1`` for padding.
        query_labels: ``(nq,)`` labels of the queries (ints or strings).
        index_labels: ``(n,)`` labels of the index items (same kind as ``query_labels``).
        k: The cut-off.
        exclude_self: Protocol ``within``: each query is itself an index item with its own label,
            so one is subtracted from its relevant count (the ranking must not contain it).
        query_ids: With ``exclude_self``, the index position of each query; when given, a query
            found in its own list raises instead of silently inflating the metrics.

    Returns:
        The metrics; see :func:`retrieval_metrics`.

    Raises:
        ValueError: On shape mismatches, ids out of range, or a query in its own list.
    """
    ids = np.asarray(ranked_ids)
    if ids.ndim != 2:
        raise ValueError(f"evaluate_rankings: ranked_ids must be 2-D (nq, k), got {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"evaluate_rankings: ranked_ids must be integers, got {ids.dtype}")
    q_codes, i_codes, n_codes = _factorize_jointly(query_labels, index_labels, "evaluate_rankings")
    if len(q_codes) != ids.shape[0]:
        raise ValueError(
            f"evaluate_rankings: {ids.shape[0]} ranked lists but {len(q_codes)} query labels"
        )
    n_index = len(i_codes)
    if ids.size and (ids.max() >= n_index or ids.min() < -1):
        raise ValueError(
            f"evaluate_rankings: ranked_ids must lie in [-1, {n_index - 1}] (positions into the "
            f"index of {n_index} items, -1 = padding); got [{ids.min()}, {ids.max()}]"
        )
    ids = ids[:, :k].astype(np.int64, copy=False)
    valid = ids >= 0
    rel = valid & (i_codes[np.where(valid, ids, 0)] == q_codes[:, None])
    counts = np.bincount(i_codes, minlength=n_codes)
    n_rel = counts[q_codes].astype(np.int64)
    if exclude_self:
        if query_ids is not None:
            qids = np.asarray(query_ids, dtype=np.int64)
            if qids.shape != (ids.shape[0],):
                raise ValueError(
                    f"evaluate_rankings: query_ids must have shape ({ids.shape[0]},), "
                    f"got {qids.shape}"
                )
            if (i_codes[qids] != q_codes).any():
                raise ValueError(
                    "evaluate_rankings: with exclude_self, index_labels[query_ids] must equal "
                    "query_labels (the query is an index item)"
                )
            own = (ids == qids[:, None]).any(axis=1)
            if own.any():
                raise ValueError(
                    f"evaluate_rankings: {int(own.sum())} queries appear in their own result "
                    f"list (first: query {int(np.flatnonzero(own)[0])}); search with "
                    "query_ids so the backend removes each query by id."
                )
        n_rel = n_rel - 1
        if (n_rel < 0).any():
            raise ValueError(
                "evaluate_rankings: exclude_self=True but some query labels do not occur in "
                "index_labels; under protocol 'within' every query must be an index item."
            )
    result = retrieval_metrics(rel, n_rel, k)
    result.topk_ids = ids[result.query_index]
    return result


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def _label_order(y_true: np.ndarray, y_pred: np.ndarray, labels: Any) -> np.ndarray:
    if labels is not None:
        order = np.asarray(labels)
        if order.ndim != 1 or len(order) == 0:
            raise ValueError("classification metrics: labels must be a non-empty 1-D list")
        if len(np.unique(order)) != len(order):
            raise ValueError("classification metrics: labels contains duplicates")
        return order
    return np.unique(np.concatenate([y_true, y_pred]))


def _codes(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Position of each value in ``order``; -1 where absent."""
    sorter = np.argsort(order, kind="stable")
    pos = np.searchsorted(order, values, sorter=sorter)
    pos = np.clip(pos, 0, len(order) - 1)
    found = order[sorter[pos]] == values
    return np.where(found, sorter[pos], -1)


def _check_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    yt = np.asarray(y_true)
    yp = np.asarray(y_pred)
    if yt.ndim != 1 or yp.shape != yt.shape:
        raise ValueError(
            f"classification metrics: y_true and y_pred must be 1-D of equal length, got "
            f"{yt.shape} and {yp.shape}"
        )
    if yt.size == 0:
        raise ValueError("classification metrics: y_true is empty")
    return yt, yp


def confusion_matrix(y_true: Any, y_pred: Any, labels: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Confusion matrix with rows = true label, columns = predicted label (scikit-learn layout).

    Args:
        y_true: True labels.
        y_pred: Predicted labels.
        labels: Label order; default the sorted union of ``y_true`` and ``y_pred``. Samples whose
            true or predicted label is not listed are left out (as scikit-learn does).

    Returns:
        ``(matrix, labels)``: the ``(L, L)`` int64 counts and the label order.
    """
    yt, yp = _check_pair(y_true, y_pred)
    order = _label_order(yt, yp, labels)
    t = _codes(yt, order)
    p = _codes(yp, order)
    keep = (t >= 0) & (p >= 0)
    n_lab = len(order)
    flat = np.bincount(t[keep] * n_lab + p[keep], minlength=n_lab * n_lab)
    return flat.reshape(n_lab, n_lab).astype(np.int64), order


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of ``y_pred`` equal to ``y_true``; NaN when there is nothing to score."""
    if len(y_true) == 0:
        return float("nan")
    yt, yp = _check_pair(y_true, y_pred)
    return float(np.mean(yt == yp))


def classification_metrics(y_true: Any, y_pred: Any, labels: Any = None) -> dict[str, float]:
    """Accuracy and macro/weighted precision, recall and F1 (scikit-learn, ``zero_division=0``).

    Args:
        y_true: True labels.
        y_pred: Predicted labels.
        labels: Labels to average over; default the sorted union of ``y_true`` and ``y_pred``
            (as ``sklearn.metrics.precision_recall_fscore_support``). Accuracy uses all samples.

    Returns:
        ``accuracy, precision_macro, recall_macro, f1_macro, precision_weighted,
        recall_weighted, f1_weighted`` as floats.
    """
    yt, yp = _check_pair(y_true, y_pred)
    order = _label_order(yt, yp, labels)
    n_lab = len(order)
    t = _codes(yt, order)
    p = _codes(yp, order)
    tp = np.bincount(t[(t >= 0) & (t == p)], minlength=n_lab).astype(np.float64)
    true_sum = np.bincount(t[t >= 0], minlength=n_lab).astype(np.float64)
    pred_sum = np.bincount(p[p >= 0], minlength=n_lab).astype(np.float64)
    precision = _safe_div(tp, pred_sum)
    recall = _safe_div(tp, true_sum)
    f1 = _safe_div(2.0 * tp, pred_sum + true_sum)
    total = true_sum.sum()
    weights = true_sum / total if total > 0 else np.zeros(n_lab)
    return {
        "accuracy": float(np.mean(yt == yp)),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "precision_weighted": float((precision * weights).sum()),
        "recall_weighted": float((recall * weights).sum()),
        "f1_weighted": float((f1 * weights).sum()),
    }
