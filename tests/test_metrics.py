"""Retrieval, classification and bootstrap metrics against plain references."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from embbench.metrics import (
    RetrievalResult,
    bootstrap_ci,
    classification_metrics,
    confusion_matrix,
    evaluate_rankings,
    metric_names,
    paired_bootstrap_test,
    retrieval_metrics,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

K = 5


# ---------------------------------------------------------------------------------------------
# Plain references, written from docs/protocol.md with loops, no vectorisation
# ---------------------------------------------------------------------------------------------


def ref_query_metrics(rel: list[bool], n_q: int, k: int) -> dict[str, float]:
    m = min(n_q, k)
    mp = sum(rel[j] for j in range(m)) / m
    r1 = float(rel[0])
    ap = 0.0
    for j in range(k):
        if rel[j]:
            ap += sum(rel[: j + 1]) / (j + 1)
    ap /= m
    rr = 0.0
    for j in range(k):
        if rel[j]:
            rr = 1.0 / (j + 1)
            break
    dcg = sum(rel[j] / math.log2(j + 2) for j in range(k))
    idcg = sum(1.0 / math.log2(j + 2) for j in range(m))
    return dict(zip(metric_names(k), (mp, r1, ap, rr, dcg / idcg), strict=True))


def ref_search(index: np.ndarray, queries: np.ndarray, k: int, self_ids=None) -> np.ndarray:
    """Full sort by (score desc, id asc); the query's own id removed."""
    scores = (queries.astype(np.float64) @ index.astype(np.float64).T).astype(np.float32)
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for i in range(len(queries)):
        order = sorted(range(len(index)), key=lambda j, i=i: (-scores[i, j], j))
        if self_ids is not None:
            order = [j for j in order if j != self_ids[i]]
        out[i, : min(k, len(order))] = order[:k]
    return out


def ref_evaluate(ids, q_lab, x_lab, k, within):
    per = {name: [] for name in metric_names(k)}
    n_lone = 0
    for i in range(len(ids)):
        n_q = sum(1 for lab in x_lab if lab == q_lab[i]) - (1 if within else 0)
        if n_q == 0:
            n_lone += 1
            continue
        rel = [bool(j >= 0 and x_lab[j] == q_lab[i]) for j in ids[i][:k]]
        for name, v in ref_query_metrics(rel, n_q, k).items():
            per[name].append(v)
    return per, n_lone


def clustered(seed: int, n: int = 240, d: int = 24, n_classes: int = 30, dups: int = 25):
    """Unit vectors around class centres, with duplicates and singleton classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    labels[:4] = np.arange(1000, 1004)  # four singleton classes -> lone queries
    centres = rng.standard_normal((n_classes + 1004, d))
    x = centres[labels] + 0.9 * rng.standard_normal((n, d))
    for a, b in rng.integers(4, n, (dups, 2)):
        x[b] = x[a]
        labels[b] = labels[a]
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x, labels


# ---------------------------------------------------------------------------------------------
# Retrieval metrics
# ---------------------------------------------------------------------------------------------


def test_hand_computed_example_where_mp_differs_from_precision():
    # n_q = 2 < k: MP@5 only looks at the first 2 results.
    rel = np.array([[False, True, True, False, False]])
    res = retrieval_metrics(rel, np.array([2]), k=5)
    assert res.summary["mMP@5"] == pytest.approx(0.5)  # OML precision@5 would give 1.0
    assert res.summary["mR@1"] == 0.0
    assert res.summary["MAP@5"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert res.summary["MRR@5"] == pytest.approx(0.5)
    ideal = 1 + 1 / math.log2(3)
    assert res.summary["NDCG@5"] == pytest.approx((1 / math.log2(3) + 1 / 2) / ideal)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_rankings_matches_plain_reference_within(seed):
    x, labels = clustered(seed)
    ids = ref_search(x, x, K, self_ids=np.arange(len(x)))
    res = evaluate_rankings(ids, labels, labels, K, exclude_self=True, query_ids=np.arange(len(x)))
    per, n_lone = ref_evaluate(ids, labels, labels, K, within=True)
    assert res.n_lone == n_lone == 4
    assert res.n_queries == len(x) - 4
    assert np.array_equal(res.query_index, np.arange(4, len(x)))
    for name in metric_names(K):
        np.testing.assert_allclose(res.per_query[name], per[name], rtol=0, atol=1e-12)
        assert res.summary[name] == pytest.approx(np.mean(per[name]), abs=1e-12)


def test_evaluate_rankings_cross_with_string_labels_and_padding():
    rng = np.random.default_rng(5)
    x_lab = rng.choice(["shoe", "bag", "hat", "sock"], 50)
    q_lab = rng.choice(["shoe", "bag", "hat", "belt"], 20)  # "belt" is not in the index
    ids = np.stack([rng.permutation(50)[:K] for _ in range(20)])
    ids[3, 3:] = -1  # fewer results than k
    res = evaluate_rankings(ids, q_lab, x_lab, K, exclude_self=False)
    per, n_lone = ref_evaluate(ids, q_lab, x_lab, K, within=False)
    assert res.n_lone == n_lone == int((q_lab == "belt").sum())
    for name in metric_names(K):
        np.testing.assert_allclose(res.per_query[name], per[name], atol=1e-12)
    # The same data with integer labels gives the same numbers.
    codes = {"shoe": 0, "bag": 1, "hat": 2, "sock": 3, "belt": 4}
    res_int = evaluate_rankings(
        ids,
        np.array([codes[v] for v in q_lab]),
        np.array([codes[v] for v in x_lab]),
        K,
        exclude_self=False,
    )
    assert res_int.summary == res.summary


def test_lone_queries_excluded_and_all_lone_gives_nan():
    rel = np.zeros((3, K), dtype=bool)
    rel[1, 0] = True
    res = retrieval_metrics(rel, np.array([0, 1, 0]), K)
    assert res.n_lone == 2 and res.n_queries == 1
    assert res.summary["mR@1"] == 1.0  # a lone query scored 0 would give 1/3
    empty = retrieval_metrics(np.zeros((2, K), dtype=bool), np.array([0, 0]), K)
    assert empty.n_queries == 0 and all(math.isnan(v) for v in empty.summary.values())


def test_query_in_its_own_list_is_rejected():
    x, labels = clustered(3)
    ids = ref_search(x, x, K)  # self NOT removed: the query is usually rank 1
    with pytest.raises(ValueError, match="own result"):
        evaluate_rankings(ids, labels, labels, K, exclude_self=True, query_ids=np.arange(len(x)))
    # Without query_ids, the count check still catches a singleton found in its own list.
    with pytest.raises(ValueError, match="relevant results"):
        evaluate_rankings(ids, labels, labels, K, exclude_self=True)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="incompatible types"):
        evaluate_rankings(
            np.zeros((2, K), int), np.array([1, 2]), np.array(["a"] * 3), K, exclude_self=False
        )
    with pytest.raises(ValueError, match=r"ranked_ids must lie in \[-1, 2\]"):
        evaluate_rankings(
            np.full((2, K), 3), np.array([1, 2]), np.array([1, 2, 2]), K, exclude_self=False
        )
    with pytest.raises(ValueError, match="k must be a positive integer"):
        retrieval_metrics(np.zeros((1, 5), bool), np.array([1]), k=0)


def test_to_dict_is_json_ready():
    import json

    res = retrieval_metrics(np.array([[True, False, False, False, False]]), np.array([3]), K)
    assert isinstance(res, RetrievalResult)
    d = res.to_dict(per_query=True)
    json.dumps(d)
    assert list(d["summary"]) == metric_names(K) and d["n_queries"] == 1


@pytest.mark.slow
def test_mr1_matches_pytorch_metric_learning_precision_at_1():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from embbench.retrieval import search_and_evaluate

    rng = np.random.default_rng(11)
    labels = rng.integers(0, 25, 300)
    labels[:3] = [900, 901, 902]  # singletons: PML excludes them as lone queries too
    x = (
        rng.standard_normal((300, 16)).astype(np.float32)
        + 1.5 * rng.standard_normal((1000, 16)).astype(np.float32)[labels % 1000]
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ours = search_and_evaluate(x, labels, k=K, protocol="within")
    calc = AccuracyCalculator(include=("precision_at_1",), k=K, device=None)
    pml = calc.get_accuracy(x, labels)  # reference=None -> ref_includes_query=True
    assert ours.summary["mR@1"] == pytest.approx(pml["precision_at_1"], abs=1e-9)
    assert ours.n_lone == 3


@pytest.mark.slow
def test_ndcg_and_mrr_match_ranx():
    from ranx import Qrels, Run, evaluate

    x, labels = clustered(7, n=150)
    ids = ref_search(x, x, K, self_ids=np.arange(len(x)))
    res = evaluate_rankings(ids, labels, labels, K, exclude_self=True)
    qrels, run = {}, {}
    for i in res.query_index:
        rel = {f"d{j}": 1 for j in range(len(x)) if j != i and labels[j] == labels[i]}
        qrels[f"q{i}"] = rel
        run[f"q{i}"] = {f"d{j}": float(K - r) for r, j in enumerate(ids[i])}
    out = evaluate(Qrels(qrels), Run(run), ["ndcg@5", "mrr@5"], return_mean=False)
    # ranx sorts queries by id string; map back.
    order = np.argsort([f"q{i}" for i in res.query_index])
    np.testing.assert_allclose(res.per_query["NDCG@5"][order], out["ndcg@5"], atol=1e-9)
    np.testing.assert_allclose(res.per_query["MRR@5"][order], out["mrr@5"], atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_labels", [False, True])
def test_classification_metrics_match_sklearn(use_labels):
    from sklearn import metrics as skm

    rng = np.random.default_rng(2)
    y_true = rng.integers(0, 7, 400)
    y_pred = np.where(rng.random(400) < 0.6, y_true, rng.integers(0, 9, 400))  # 7, 8 never true
    y_pred[y_pred == 3] = 4  # class 3 never predicted -> zero_division
    labels = [0, 1, 2, 3, 5, 8] if use_labels else None
    ours = classification_metrics(y_true, y_pred, labels=labels)
    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, average=avg, labels=labels, zero_division=0
        )
        assert ours[f"precision_{avg}"] == pytest.approx(p, abs=1e-12)
        assert ours[f"recall_{avg}"] == pytest.approx(r, abs=1e-12)
        assert ours[f"f1_{avg}"] == pytest.approx(f, abs=1e-12)
    cm, order = confusion_matrix(y_true, y_pred, labels=labels)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y_true, y_pred, labels=labels))
    if labels is None:
        np.testing.assert_array_equal(order, np.arange(9))


def test_classification_metrics_string_labels():
    from sklearn import metrics as skm

    y_true = np.array(["a", "b", "c", "a", "b", "a"])
    y_pred = np.array(["a", "c", "c", "b", "b", "a"])
    ours = classification_metrics(y_true, y_pred)
    assert ours["f1_macro"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    with pytest.raises(ValueError, match="equal length"):
        classification_metrics(y_true, y_pred[:3])


# ---------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_mean_and_is_seeded():
    rng = np.random.default_rng(0)
    values = (rng.random(500) < 0.7).astype(float)
    low, high = bootstrap_ci(values, n_boot=500, seed=1)
    assert low < values.mean() < high
    assert low > 0.6 and high < 0.8
    assert (low, high) == bootstrap_ci(values, n_boot=500, seed=1)
    wide = bootstrap_ci(values[:50], n_boot=500, seed=1)
    assert wide[1] - wide[0] > high - low
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([])))


def test_paired_bootstrap_test():
    rng = np.random.default_rng(3)
    a = rng.random(300)
    same = paired_bootstrap_test(a, a.copy(), n_boot=300, seed=0)
    assert same["diff"] == 0.0 and same["p_value"] == 1.0
    b = a - 0.1 + 0.05 * rng.standard_normal(300)
    res = paired_bootstrap_test(a, b, n_boot=300, seed=0)
    assert res["diff"] == pytest.approx(float(np.mean(a - b)))
    assert 0 < res["low"] < res["diff"] < res["high"]
    assert res["p_value"] < 0.01
    noise = paired_bootstrap_test(a, a + 0.3 * rng.standard_normal(300) * 0.01, n_boot=300)
    assert noise["p_value"] > 0.01
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap_test(a, a[:10])
