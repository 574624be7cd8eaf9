"""Compression variants: quality equals an independent brute-force computation of protocol.md."""

from __future__ import annotations

import numpy as np
import pytest

from embbench.deploy.compress import (
    CompressionSpec,
    compare_compressions,
    default_compressions,
    evaluate_compression,
    fit_compression,
    hamming_search,
)
from embbench.retrieval import RetrievalTask

K = 5


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_metrics(q, x, q_lab, x_lab, k, within):
    """protocol.md by loops: rank by (score desc, id asc), self removed by id, lone excluded."""
    q, x = _unit(q), _unit(x)
    rows = {"mMP": [], "mR1": [], "MAP": [], "MRR": [], "NDCG": []}
    for i in range(len(q)):
        scores = x @ q[i]
        order = sorted(range(len(x)), key=lambda j: (-scores[j], j))
        if within:
            order = [j for j in order if j != i]
        n_rel = sum(1 for j in range(len(x)) if x_lab[j] == q_lab[i] and not (within and j == i))
        if n_rel == 0:
            continue
        rel = [1.0 if x_lab[j] == q_lab[i] else 0.0 for j in order[:k]]
        m = min(n_rel, k)
        rows["mMP"].append(sum(rel[:m]) / m)
        rows["mR1"].append(rel[0])
        hits, ap = 0.0, 0.0
        for j, r in enumerate(rel, 1):
            hits += r
            ap += hits / j * r
        rows["MAP"].append(ap / m)
        first = next((j for j, r in enumerate(rel, 1) if r), None)
        rows["MRR"].append(1.0 / first if first else 0.0)
        dcg = sum(r / np.log2(j + 1) for j, r in enumerate(rel, 1))
        rows["NDCG"].append(dcg / sum(1 / np.log2(j + 1) for j in range(1, m + 1)))
    return {
        f"mMP@{k}": np.mean(rows["mMP"]),
        "mR@1": np.mean(rows["mR1"]),
        f"MAP@{k}": np.mean(rows["MAP"]),
        f"MRR@{k}": np.mean(rows["MRR"]),
        f"NDCG@{k}": np.mean(rows["NDCG"]),
    }


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    cents = rng.standard_normal((6, 16))

    def draw(n):
        lab = rng.integers(0, 6, n)
        return (cents[lab] + 1.2 * rng.standard_normal((n, 16))).astype(np.float32), lab

    train, _ = draw(80)
    x, lab = draw(40)
    q, q_lab = draw(15)
    return train, x, lab, q, q_lab


def _assert_same(summary, ref):
    assert summary.keys() == ref.keys()
    for key in ref:
        assert summary[key] == pytest.approx(ref[key], abs=1e-12), key


def test_int8_equals_independent_quantisation(data):
    train, x, lab, _, _ = data
    t = _unit(train).astype(np.float32)
    lo, hi = t.min(axis=0), t.max(axis=0)
    step = (hi - lo) / 255.0
    xn = _unit(x).astype(np.float32)
    codes = np.clip(np.round((xn - lo) / step), 0, 255)
    decoded = codes * step + lo
    ref = _brute_metrics(decoded, decoded, lab, lab, K, within=True)
    res = evaluate_compression(CompressionSpec("int8"), train, RetrievalTask(x, lab), k=K)
    _assert_same(res.metrics, ref)
    assert res.bytes_per_vector == 16 and res.memory_ratio == 0.25
    # the codes a deployment stores are int8 and round-trip to within half a step
    fitted = fit_compression(CompressionSpec("int8"), train)
    enc = fitted.encode(x)
    assert enc.dtype == np.int8
    inside = (xn >= lo) & (xn <= hi)
    err = np.abs(fitted.decode(enc) - xn)
    assert (err[inside] <= step[None, :].repeat(len(x), 0)[inside] / 2 + 1e-6).all()


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("protocol", ["within", "cross"])
def test_pca_equals_sklearn(data, whiten, protocol):
    from sklearn.decomposition import PCA

    train, x, lab, q, q_lab = data
    pca = PCA(n_components=4, whiten=whiten, svd_solver="full").fit(_unit(train))
    px = pca.transform(_unit(x))
    if protocol == "within":
        ref = _brute_metrics(px, px, lab, lab, K, within=True)
        res = evaluate_compression(
            CompressionSpec("pca", dim=4, whiten=whiten), train, RetrievalTask(x, lab), k=K
        )
    else:
        pq = pca.transform(_unit(q))
        ref = _brute_metrics(pq, px, q_lab, lab, K, within=False)
        res = evaluate_compression(
            CompressionSpec("pca", dim=4, whiten=whiten),
            train,
            RetrievalTask(q, q_lab, x, lab, protocol="cross"),
            k=K,
        )
    _assert_same(res.metrics, ref)
    assert res.bytes_per_vector == 16


def test_pca_fitted_on_train_only(data):
    train, x, lab, _, _ = data
    task = RetrievalTask(x, lab)
    a = evaluate_compression(CompressionSpec("pca", dim=4), train, task, k=K)
    b = evaluate_compression(CompressionSpec("pca", dim=4), train[::-1] * 3.0, task, k=K)
    _assert_same(a.metrics, b.metrics)  # same train set (order, scale) -> same basis
    c = evaluate_compression(CompressionSpec("pca", dim=4), train[:20], task, k=K)
    assert c.metrics != a.metrics  # another train split changes the basis
    with pytest.raises(ValueError, match="train"):
        fit_compression(CompressionSpec("pca", dim=8), train[:5])


def test_hamming_ties_by_id_and_self_by_id():
    bits = np.array(
        [
            [1, 1, 1, 1, 0, 0, 0, 0],  # 0
            [1, 1, 1, 1, 0, 0, 0, 1],  # 1: distance 1 from 0
            [1, 1, 1, 1, 0, 0, 0, 0],  # 2: duplicate of 0
            [1, 1, 1, 1, 0, 0, 0, 1],  # 3: duplicate of 1
            [0, 0, 0, 0, 1, 1, 1, 1],  # 4: far
        ],
        dtype=bool,
    )
    codes = np.packbits(bits, axis=1)
    ids, dist = hamming_search(codes, codes, 4, query_ids=np.arange(5))
    # query 2 is a duplicate of 0: 0 comes first (lower id), 2 itself is removed by id, not rank
    assert ids[2].tolist() == [0, 1, 3, 4]
    assert dist[2].tolist() == [0, 1, 1, 8]
    assert ids[0].tolist() == [2, 1, 3, 4]
    assert ids[3].tolist() == [1, 0, 2, 4]
    # without self-exclusion the query ranks among its ties by id
    ids, _ = hamming_search(codes, codes[[2]], 3)
    assert ids[0].tolist() == [0, 2, 1]
    # fewer items than k: padded with -1
    ids, dist = hamming_search(codes[:2], codes[:1], 4, query_ids=np.array([0]))
    assert ids[0].tolist() == [1, -1, -1, -1] and dist[0].tolist() == [1, -1, -1, -1]


def test_binary_equals_brute_force_on_signs(data):
    train, x, lab, _, _ = data
    signs = np.where(_unit(x) > 0, 1.0, -1.0)
    res = evaluate_compression(CompressionSpec("binary"), train, RetrievalTask(x, lab), k=K)
    assert res.search == "hamming" and res.bytes_per_vector == 2
    # Hamming = (d - s.s') / 2: same order as the inner product of sign vectors, ties by id
    ref = _brute_metrics(signs, signs, lab, lab, K, within=True)
    _assert_same(res.metrics, ref)


def test_float16_and_default_grid(data):
    train, x, lab, _, _ = data
    specs = default_compressions(512, whiten=True)
    names = [s.name for s in specs]
    assert names[:4] == ["float32", "float16", "int8", "binary"]
    assert {"pca256", "pca128", "pca64", "pca128w"} <= set(names)
    assert len(names) == len(set(names))
    assert [s.bytes_per_vector(512) for s in specs[:4]] == [2048, 1024, 512, 64]
    assert len({hash(s) for s in specs}) == len(specs)  # hashable, distinct
    results = compare_compressions(
        [CompressionSpec("float32"), CompressionSpec("float16")], train, RetrievalTask(x, lab), k=K
    )
    assert results[0].delta == {key: 0.0 for key in results[0].metrics}
    assert all(abs(v) < 0.05 for v in results[1].delta.values())
    assert results[1].to_dict()["variant"] == "float16"


def test_spec_validation():
    with pytest.raises(ValueError, match="pca"):
        CompressionSpec("pca")
    with pytest.raises(ValueError, match="pca only"):
        CompressionSpec("int8", dim=4)
    with pytest.raises(ValueError, match="kind"):
        CompressionSpec("int4")  # type: ignore[arg-type]
    assert CompressionSpec("pca", dim=64, whiten=True).params() == {
        "compression": "pca",
        "dim": 64,
        "whiten": True,
    }
