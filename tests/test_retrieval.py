"""Search backends (exact, Milvus Lite) and search_and_evaluate against a brute-force sort."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from embbench._registry import UnknownNameError
from embbench.metrics import evaluate_rankings
from embbench.retrieval import (
    ExactBackend,
    MilvusBackend,
    create_backend,
    l2_normalize,
    list_backends,
    search_and_evaluate,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def ref_search(index, queries, k, self_ids=None):
    """Brute force: full sort of float64-accumulated scores by (score desc, id asc)."""
    scores = (queries.astype(np.float64) @ index.astype(np.float64).T).astype(np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    dists = np.full((len(queries), k), np.inf, dtype=np.float32)
    for i in range(len(queries)):
        order = sorted(range(len(index)), key=lambda j, i=i: (-scores[i, j], j))
        if self_ids is not None:
            order = [j for j in order if j != self_ids[i]]
        order = order[:k]
        ids[i, : len(order)] = order
        dists[i, : len(order)] = np.maximum(0, 2 - 2 * scores[i, order])
    return ids, dists


def clustered(seed, n=300, d=32, n_classes=12, dups=40, noise=0.35):
    """Clustered unit vectors with exact duplicates (ties) at random positions."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    x = rng.standard_normal((n_classes, d))[labels] + noise * rng.standard_normal((n, d))
    for a, b in rng.integers(0, n, (dups, 2)):
        x[b] = x[a]
        labels[b] = labels[a]
    return l2_normalize(x), labels


def one_hot(seed, n=200, d=6):
    """Massive exact ties: every score is 0 or 1, so the k-th boundary always cuts a tie."""
    rng = np.random.default_rng(seed)
    return np.eye(d, dtype=np.float32)[rng.integers(0, d, n)]


# ---------------------------------------------------------------------------------------------
# Exact backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 7, None])
@pytest.mark.parametrize("margin", [0, 8])
def test_exact_matches_full_sort_with_ties_by_id(block_size, margin):
    x, _ = clustered(0, n=517)  # 517: a size where GEMM gave duplicates unequal float32 scores
    be = ExactBackend(block_size=block_size, margin=margin, threads=1)
    ids, dists = be.search(x, x, 5, query_ids=np.arange(len(x)))
    ref_ids, ref_d = ref_search(x, x, 5, self_ids=np.arange(len(x)))
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dists, ref_d, atol=1e-6)
    # Cross search (nothing excluded), queries not in the index.
    q, _ = clustered(1, n=60)
    ids, _ = be.search(x, q, 7)
    np.testing.assert_array_equal(ids, ref_search(x, q, 7)[0])


@pytest.mark.parametrize("margin", [0, 3])
def test_exact_boundary_ties_resolved_by_id(margin):
    x = one_hot(1)
    be = ExactBackend(block_size=16, margin=margin)
    ids, dists = be.search(x, x, 5, query_ids=np.arange(len(x)))
    np.testing.assert_array_equal(ids, ref_search(x, x, 5, self_ids=np.arange(len(x)))[0])
    assert be.n_widened > 0  # the widening path ran
    # Within a tie, ids ascend.
    same = dists[:, 1:] == dists[:, :-1]
    assert (ids[:, 1:][same] > ids[:, :-1][same]).all()


def test_duplicates_tie_exactly_and_rank_by_id():
    x, _ = clustered(2, n=300, d=32, dups=40)
    n = len(x)
    ids, dists = ExactBackend().search(x, x, n)
    pos = np.argsort(ids, axis=1)  # pos[i, j] = rank of item j for query i
    groups = {}
    for j, row in enumerate(x):
        groups.setdefault(row.tobytes(), []).append(j)
    dup_groups = [g for g in groups.values() if len(g) > 1]
    assert len(dup_groups) > 10
    rows = np.arange(n)
    for g in dup_groups:
        d = dists[rows[:, None], pos[:, g]]
        assert (d == d[:, :1]).all()  # bit-identical distances for identical vectors
        assert (np.diff(pos[:, g], axis=1) > 0).all()  # and ranked by id
    same = dists[:, 1:] == dists[:, :-1]
    assert (ids[:, 1:][same] > ids[:, :-1][same]).all()


def test_results_do_not_depend_on_block_size_or_threads():
    # A query scored alone (gemv) or in a block (gemm) gets float32 scores that differ in the
    # last bits; canonical re-scoring makes ids AND distances identical for any blocking.
    x, _ = clustered(8, n=400, d=48)
    runs = [
        ExactBackend(block_size=b, threads=t).search(x, x, 10, query_ids=np.arange(len(x)))
        for b, t in ((1, 1), (3, 2), (64, 1), (None, 2))
    ]
    for ids, dists in runs[1:]:
        np.testing.assert_array_equal(ids, runs[0][0])
        np.testing.assert_array_equal(dists, runs[0][1])


def test_self_exclusion_is_by_id_not_rank_one():
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.standard_normal((20, 8)))
    x[7] = x[3]  # item 7 duplicates item 3: for query 7, rank 1 overall is item 3 (lower id)
    x[12] = x[3]
    ids, dists = ExactBackend().search(x, x, 4, query_ids=np.arange(20))
    assert ids[7, 0] == 3 and 7 not in ids[7] and dists[7, 0] < 1e-6
    assert list(ids[7, :2]) == [3, 12]
    assert list(ids[3, :2]) == [7, 12] and 3 not in ids[3]
    # Dropping rank 1 instead would have kept the query itself: the metrics layer refuses it.
    wrong = np.stack([row[1:5] for row in ExactBackend().search(x, x, 5)[0]])
    assert 7 in wrong[7]
    with pytest.raises(ValueError, match="own result"):
        evaluate_rankings(
            wrong,
            np.arange(20) % 5,
            np.arange(20) % 5,
            4,
            exclude_self=True,
            query_ids=np.arange(20),
        )


def test_padding_when_fewer_items_than_k():
    x = l2_normalize(np.random.default_rng(0).standard_normal((4, 5)))
    ids, dists = ExactBackend().search(x, x, 6, query_ids=np.arange(4))
    assert ids.shape == (4, 6) and (ids[:, 3:] == -1).all() and np.isinf(dists[:, 3:]).all()
    assert (ids[:, :3] >= 0).all()
    ids, _ = ExactBackend().search(x, x[:2], 6)
    assert (ids[:, 4:] == -1).all()


def test_distances_are_squared_l2():
    x, _ = clustered(3, n=80)
    ids, dists = ExactBackend().search(x, x[:10], 5)
    true = ((x[:10, None, :] - x[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(dists, true, atol=1e-5)


def test_search_validation_errors():
    be = ExactBackend()
    x = l2_normalize(np.random.default_rng(0).standard_normal((10, 4)))
    with pytest.raises(ValueError, match="dim 4 but queries have dim 3"):
        be.search(x, x[:, :3], 2)
    with pytest.raises(ValueError, match="L2-normalised"):
        be.search(x * 2, x, 2)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf .*row 2"):
        be.search(bad, x, 2)
    with pytest.raises(ValueError, match="vectors differ"):
        be.search(x, x[::-1], 2, query_ids=np.arange(10))
    with pytest.raises(ValueError, match="positive integer"):
        be.search(x, x, 0)


def test_registry_and_factory():
    assert {"exact", "milvus"} <= set(list_backends())
    assert isinstance(create_backend("exact", block_size=None, threads=1), ExactBackend)
    with pytest.raises(UnknownNameError, match="Did you mean 'exact'"):
        create_backend("exakt")


def test_l2_normalize_is_idempotent_bit_for_bit():
    x = np.random.default_rng(0).standard_normal((50, 9)).astype(np.float32) * 3
    once = l2_normalize(x)
    np.testing.assert_array_equal(l2_normalize(once), once)
    with pytest.raises(ValueError, match="all zeros"):
        l2_normalize(np.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------
# search_and_evaluate
# ---------------------------------------------------------------------------------------------


def test_search_and_evaluate_within_and_cross():
    x, labels = clustered(4, n=200, noise=0.9)
    scaled = x * np.linspace(0.5, 3, len(x))[:, None]  # normalised inside
    res = search_and_evaluate(scaled, labels, k=5, protocol="within")
    ids, _ = ref_search(x, x, 5, self_ids=np.arange(len(x)))
    ref = evaluate_rankings(ids, labels, labels, 5, exclude_self=True)
    assert res.summary == pytest.approx(ref.summary)
    assert 0 < res.summary["mMP@5"] < 1
    # cross: queries 0..49 against index 50..199
    res_c = search_and_evaluate(x[:50], labels[:50], x[50:], labels[50:], protocol="cross")
    ids_c, _ = ref_search(x[50:], x[:50], 5)
    ref_c = evaluate_rankings(ids_c, labels[:50], labels[50:], 5, exclude_self=False)
    assert res_c.summary == pytest.approx(ref_c.summary)
    # within with a subset of the index as queries
    sub = np.arange(0, 200, 3)
    res_s = search_and_evaluate(x[sub], labels[sub], x, labels, query_ids=sub)
    ids_s, _ = ref_search(x, x[sub], 5, self_ids=sub)
    ref_s = evaluate_rankings(ids_s, labels[sub], labels, 5, exclude_self=True)
    assert res_s.summary == pytest.approx(ref_s.summary)


def test_search_and_evaluate_errors():
    x, labels = clustered(5, n=30)
    with pytest.raises(ValueError, match="protocol must be"):
        search_and_evaluate(x, labels, protocol="both")
    with pytest.raises(ValueError, match="needs query_ids"):
        search_and_evaluate(x[:5], labels[:5], x, labels)
    with pytest.raises(ValueError, match="query_labels has shape"):
        search_and_evaluate(x, labels[:-1])
    with pytest.raises(ValueError, match="needs index_vectors"):
        search_and_evaluate(x, labels, protocol="cross")


# ---------------------------------------------------------------------------------------------
# Exact backend: product paths, blocks, chunked checks (issue 15)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", ["clustered", "one_hot"])
def test_matmul_paths_give_identical_results(data):
    # numpy (OpenBLAS) and torch (MKL) round differently; canonical re-scoring hides it.
    x = clustered(3, n=333, d=40)[0] if data == "clustered" else one_hot(4, n=150)
    qids = np.arange(len(x))
    runs = {
        (path, block): ExactBackend(matmul=path, block_size=block, threads=1).search(
            x, x, 6, query_ids=qids
        )
        for path in ("numpy", "torch")
        for block in (5, None)
    }
    ref_ids, ref_d = ref_search(x, x, 6, self_ids=qids)
    for ids, dists in runs.values():
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(dists, runs["numpy", None][1])
    np.testing.assert_allclose(runs["numpy", None][1], ref_d, atol=1e-6)
    q = clustered(5, n=40, d=x.shape[1])[0] if data == "clustered" else one_hot(6, n=30)
    cross = [ExactBackend(matmul=p).search(x, q, 9) for p in ("numpy", "torch")]
    np.testing.assert_array_equal(cross[0][0], cross[1][0])
    np.testing.assert_array_equal(cross[0][1], cross[1][1])
    np.testing.assert_array_equal(cross[0][0], ref_search(x, q, 9)[0])


@pytest.mark.parametrize("n, group", [(4096, 64), (5000, 64), (1234, 16), (300, 4), (20011, 16)])
@pytest.mark.parametrize("ties", [False, True])
def test_selection_by_levels_equals_topk(n, group, ties):
    # Group maxima by levels, then top-k inside the best groups: the same values as a full
    # top-k, each column once, including partial last groups (at 20011 x 16: 1250 groups of 16
    # plus 11 columns, then 78 groups of groups plus 2) and rows made of massive exact ties.
    from embbench.retrieval import _matmul

    rng = np.random.default_rng(n + group)
    s = rng.standard_normal((37, n)).astype(np.float32)
    if ties:
        s = np.round(s).astype(np.float32)  # a handful of distinct values per row
    for c in (1, 8, 13):
        vals, cols = _matmul.top_candidates(s, c, group)
        ref = -np.sort(-s, axis=1)[:, :c]
        np.testing.assert_array_equal(np.sort(vals, 1)[:, ::-1], ref)
        assert ((cols >= 0) & (cols < n)).all()
        assert all(len(set(row)) == c for row in cols)  # no column twice
        np.testing.assert_array_equal(np.take_along_axis(s, cols, 1), vals)


@pytest.mark.parametrize("n", [2048, 4096, 5000, 20011])
@pytest.mark.parametrize("ties", [False, True])
def test_compiled_selection_equals_topk(n, ties):
    # The numba twin of the levels: the same values as a full top-k, each column once, partial
    # groups at both levels (20011: 1250 groups + 11 columns, 78 groups of groups + 2 groups).
    from embbench.retrieval import _select_jit

    rng = np.random.default_rng(n)
    s = rng.standard_normal((37, n)).astype(np.float32)
    if ties:
        s = np.round(s).astype(np.float32)
    for c in (1, 8):
        vals, cols = _select_jit.top_candidates(s, c)
        np.testing.assert_array_equal(np.sort(vals, 1)[:, ::-1], -np.sort(-s, axis=1)[:, :c])
        assert all(len(set(row)) == c for row in cols)
        np.testing.assert_array_equal(np.take_along_axis(s, cols, 1), vals)
    # The best value placed in each region the levels treat apart: the last group (in no group
    # of groups unless 16 divides their number), the columns in no group, the last member of
    # the last group.
    g1 = n // 16
    for col in (g1 - 1, n - 1, 16 * g1 - 1):
        t = s.copy()
        t[:, col] = 100.0
        vals, cols = _select_jit.top_candidates(t, 3)
        assert (cols == col).any(axis=1).all(), col
    with pytest.raises(ValueError, match="n // 256 >= n_cand"):
        _select_jit.top_candidates(s[:, :300], 2)


def test_compiled_selection_without_a_cache_location_compiles_in_process():
    # A read-only install and home: numba refuses cache=True when the function is defined;
    # the kernel is compiled uncached instead (one warning), and selects the same values.
    import subprocess
    import sys

    code = (
        "import logging, numpy as np, numba.core.caching as c\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "c.CacheImpl._locator_classes = []\n"
        "from embbench.retrieval import _select_jit as sj\n"
        "s = np.random.default_rng(0).standard_normal((3, 4096)).astype(np.float32)\n"
        "v, _ = sj.top_candidates(s, 4)\n"
        "assert (np.sort(v, 1)[:, ::-1] == -np.sort(-s, 1)[:, :4]).all()\n"
        "print(sj._uncached)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "top_candidates_rows" in proc.stdout
    assert proc.stderr.count("no locator available") == 1, proc.stderr


def test_choose_select_loads_the_compiled_kernel_once_it_pays(monkeypatch, caplog):
    from embbench.retrieval import _matmul

    monkeypatch.setattr(_matmul, "_jit_state", {"scores": 0.0, "loaded": False, "failed": False})
    monkeypatch.setattr(_matmul, "JIT_MIN_SCORES", 1e6)
    assert _matmul.choose_select("auto", 4096, 6e5, 8) == "numpy"  # 6e5 searched so far
    assert _matmul.choose_select("auto", 100, 6e5, 8) == "numpy"  # too few columns for it
    assert _matmul.choose_select("numpy", 4096, 6e5, 8) == "numpy"  # forbidden
    assert _matmul.choose_select("auto", 4096, 6e5, 8) == "numba"  # 2.4e6 >= 1e6: loaded
    assert _matmul._jit_state["loaded"]
    assert _matmul.choose_select("auto", 4096, 10.0, 8) == "numba"  # loaded: always used
    with pytest.raises(ValueError, match="'gpu'"):
        _matmul.choose_select("gpu", 4096, 10.0, 8)
    with pytest.raises(ValueError, match="select must be"):
        ExactBackend(select="gpu")

    def broken():
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(_matmul, "_jit_state", {"scores": 0.0, "loaded": False, "failed": False})
    monkeypatch.setattr(_matmul, "_jit", broken)
    with pytest.raises(ImportError, match="select='numba' needs numba"):
        _matmul.choose_select("numba", 4096, 10.0, 8)
    with caplog.at_level("WARNING", logger="embbench.retrieval._matmul"):
        assert _matmul.choose_select("auto", 4096, 2e6, 8) == "numpy"
    assert "compiled selection unavailable" in caplog.text
    assert _matmul._jit_state["failed"]
    assert _matmul.choose_select("auto", 4096, 2e6, 8) == "numpy"  # not tried again


def test_group_maxima_are_strided_groups():
    from embbench.retrieval._matmul import group_maxima

    s = np.random.default_rng(3).standard_normal((5, 70)).astype(np.float32)
    g = 70 // 16  # 4 groups of 16; columns 64-69 in none
    ref = np.array([[max(row[j + g * i] for i in range(16)) for j in range(g)] for row in s])
    np.testing.assert_array_equal(group_maxima(s, 16), ref.astype(np.float32))


@pytest.mark.parametrize("data", ["clustered", "one_hot"])
def test_exact_with_two_stage_selection_matches_full_sort(data):
    # n > 17 groups of 64: the two-stage selection runs (the other tests' n are below it).
    x = clustered(11, n=2600, d=16, dups=300)[0] if data == "clustered" else one_hot(7, n=2600)
    sub = np.random.default_rng(0).choice(len(x), 120, replace=False)
    for path, select in (("numpy", "numpy"), ("torch", "numpy"), ("numpy", "numba")):
        be = ExactBackend(matmul=path, threads=2, select=select)
        ids, dists = be.search(x, x[sub], 5, query_ids=sub)
        assert be.last_select == select
        ref_ids, ref_d = ref_search(x, x[sub], 5, self_ids=sub)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(dists, ref_d, atol=1e-6)
        if data == "one_hot":
            assert be.n_widened > 0


@pytest.mark.parametrize("data", ["clustered", "one_hot"])
def test_exact_over_many_blocks_matches_full_sort(data):
    # Small blocks on 2 worker threads, margin 0, two levels of groups (2600 columns: 162
    # groups of 16 plus 8, then 10 groups of groups plus 2).
    x = clustered(13, n=2600, d=16, dups=300)[0] if data == "clustered" else one_hot(8, n=2600)
    sub = np.random.default_rng(1).choice(len(x), 240, replace=False)
    for path, select in (("numpy", "numpy"), ("torch", "numpy"), ("torch", "numba")):
        be = ExactBackend(matmul=path, threads=2, block_size=120, margin=0, select=select)
        ids, dists = be.search(x, x[sub], 5, query_ids=sub)
        assert be.last_select == select
        ref_ids, ref_d = ref_search(x, x[sub], 5, self_ids=sub)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(dists, ref_d, atol=1e-6)


def test_rank_rows_equals_select_top():
    # The fixed-shape ranking: the same (score desc, id asc) order and padding as the flat one,
    # with many exact ties, entries that are not candidates (-inf) and rows with fewer than k.
    from embbench.retrieval.base import rank_rows, select_top

    rng = np.random.default_rng(5)
    b, c = 60, 9
    cols = np.stack([rng.permutation(50)[:c] for _ in range(b)])
    scores = np.round(rng.standard_normal((b, c)), 1).astype(np.float32)
    scores[rng.random((b, c)) < 0.3] = -np.inf
    scores[:3] = -np.inf  # rows with no candidate at all
    for k in (1, 4, 12):
        ids, sc = rank_rows(cols, scores, k)
        rows, cpos = np.nonzero(np.isfinite(scores))
        ref_ids, ref_sc = select_top(rows, cols[rows, cpos], scores[rows, cpos], b, k, None)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(sc, ref_sc)


def test_within_never_rescores_the_query_itself(monkeypatch):
    # Under protocol within the query is masked out of its candidates: k pairs per row are
    # re-scored, not k + 1, and the results still equal the full sort.
    from embbench.retrieval import base, exact

    x, _ = clustered(4, n=400, d=16, dups=0)
    seen = []

    def counting(queries, index, cand):
        seen.append(cand.size)
        return base.candidate_scores(queries, index, cand)

    monkeypatch.setattr(exact, "candidate_scores", counting)
    be = ExactBackend(threads=1)
    ids, dists = be.search(x, x, 5, query_ids=np.arange(len(x)))
    ref_ids, ref_d = ref_search(x, x, 5, self_ids=np.arange(len(x)))
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dists, ref_d, atol=1e-6)
    assert sum(seen) == 5 * len(x)


def test_candidate_scores_equal_pair_scores_bit_for_bit():
    from embbench.retrieval.base import candidate_scores, pair_scores

    x, _ = clustered(12, n=3000, d=768, dups=100)
    cand = np.random.default_rng(1).integers(0, len(x), (2500, 7))
    rows = np.repeat(np.arange(2500), 7)
    got = candidate_scores(x[:2500], x, cand)
    np.testing.assert_array_equal(got.reshape(-1), pair_scores(x[:2500], x, rows, cand.ravel()))


def test_self_exclusion_by_id_with_duplicates_on_a_query_subset():
    # Queries are a copy of some index rows (not the same buffer): the id check compares the
    # rows chunk by chunk, and each query drops only its own id, never a duplicate.
    x, _ = clustered(7, n=200, d=24, dups=60)
    qids = np.array([5, 17, 17, 120, 199, 0])
    q = x[qids].copy()
    for path in ("numpy", "torch"):
        ids, _ = ExactBackend(matmul=path, block_size=4).search(x, q, 8, query_ids=qids)
        np.testing.assert_array_equal(ids, ref_search(x, q, 8, self_ids=qids)[0])
        assert not (ids == qids[:, None]).any()
    dup_of = {j: [i for i in range(len(x)) if i != j and (x[i] == x[j]).all()] for j in qids}
    for row, j in zip(ids, qids, strict=True):
        assert set(dup_of[j]) <= set(row[: len(dup_of[j])])  # duplicates kept, ranked first
    q_bad = q.copy()
    q_bad[3] = x[121]
    with pytest.raises(ValueError, match="vectors differ"):
        ExactBackend().search(x, q_bad, 3, query_ids=qids)


def test_block_sizes_follow_the_memory_budget():
    be = ExactBackend(max_block_bytes=4 * 1000 * 300)
    assert be.rows_per_block(1000) == 300
    assert be.rows_per_block(10**9) == 64  # never below the efficient minimum
    assert ExactBackend(max_block_bytes=2**40).rows_per_block(10) == 4096
    assert ExactBackend(block_size=7).rows_per_block(10**6) == 7
    x, _ = clustered(9, n=300, d=16)
    small = ExactBackend(max_block_bytes=4 * 300 * 64)  # 64-row blocks: 5 blocks
    np.testing.assert_array_equal(
        small.search(x, x, 5, query_ids=np.arange(300))[0],
        ExactBackend(block_size=300).search(x, x, 5, query_ids=np.arange(300))[0],
    )
    with pytest.raises(ValueError, match="matmul"):
        ExactBackend(matmul="faiss")


def test_auto_matmul_measures_once_and_caches_per_machine(monkeypatch, tmp_path):
    from embbench.retrieval import _matmul

    x, _ = clustered(10, n=120, d=16)
    be = ExactBackend()
    be.search(x, x, 3)
    assert be.last_matmul == "numpy"  # tiny product: the rule, no timing
    calls = []

    def fake_measure(dim, threads, repeats=3):
        calls.append(dim)
        return {"numpy": 1.0, "torch": 2.0}

    monkeypatch.setattr(_matmul, "AUTO_MIN_FLOP", 0.0)
    monkeypatch.setattr(_matmul, "measure_paths", fake_measure)
    monkeypatch.setattr(_matmul, "_MEMO", {})
    be.search(x, x, 3)
    assert be.last_matmul == "torch" and calls == [16]
    cached = tmp_path / "cache" / "blas_choice.json"
    assert cached.exists() and '"torch"' in cached.read_text()
    monkeypatch.setattr(_matmul, "_MEMO", {})  # a new process: read from the file
    be.search(x, x, 3)
    assert calls == [16]
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Sandybridge")  # a changed setting measures again
    be.search(x, x, 3)
    assert calls == [16, 16]


def test_validation_is_chunked():
    from embbench.retrieval.base import as_matrix, row_chunks

    assert [(s.start, s.stop) for s in row_chunks(10, 4, budget_bytes=8 * 4 * 3)] == [
        (0, 3),
        (3, 6),
        (6, 9),
        (9, 10),
    ]
    x = np.ones((50_000, 8), dtype=np.float32)
    x[-1, 3] = np.nan  # in the last chunk
    with pytest.raises(ValueError, match="first at row 49999"):
        as_matrix(x, "v")


# ---------------------------------------------------------------------------------------------
# Milvus Lite
# ---------------------------------------------------------------------------------------------


def test_milvus_lite_matches_exact(tmp_path):
    db = str(tmp_path / "milvus.db")
    x, labels = clustered(6, n=300)
    q, _ = clustered(7, n=40)
    e = one_hot(2, n=150)
    exact = ExactBackend()
    with MilvusBackend(uri=db, collection_prefix="t", margin=4) as mb:
        ids, dists = mb.search(x, x, 5, query_ids=np.arange(len(x)))
        ref_ids, ref_d = exact.search(x, x, 5, query_ids=np.arange(len(x)))
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(dists, ref_d)  # same canonical scores, bit for bit
        ids, _ = mb.search(x, q, 5)
        np.testing.assert_array_equal(ids, exact.search(x, q, 5)[0])
        # every boundary is a tie: widened by re-searching with a larger limit
        ids, _ = mb.search(e, e, 5, query_ids=np.arange(len(e)))
        np.testing.assert_array_equal(ids, exact.search(e, e, 5, query_ids=np.arange(150))[0])
        assert mb.n_widened > 0
        res = search_and_evaluate(x, labels, backend=mb)
        assert res.summary == search_and_evaluate(x, labels, backend="exact").summary
        name = mb.collection_name(x)
        assert name.startswith("t_") and name.replace("_", "").isalnum()
    # The lock is released: a new backend on the same file reuses the built collection.
    with MilvusBackend(uri=db, collection_prefix="t") as mb2:
        ids, _ = mb2.search(x, q, 5)
        assert mb2.last_build_s == 0.0
        np.testing.assert_array_equal(ids, exact.search(x, q, 5)[0])


def test_milvus_ivf_backend_names_queries_short_of_candidates(tmp_path, caplog):
    """An IVF of 8 lists probed once on 32 vectors returns fewer candidates than asked: warned,
    naming the index, the collection size and the search parameters; one list finds them all."""
    x, _ = clustered(6, n=32)
    ivf = {"uri": str(tmp_path / "m.db"), "index_type": "IVF_FLAT", "search_params": {"nprobe": 1}}
    with MilvusBackend(**ivf, index_params={"nlist": 1}) as mb:
        ids, _ = mb.search(x, x, 5, query_ids=np.arange(32))
    np.testing.assert_array_equal(ids, ExactBackend().search(x, x, 5, query_ids=np.arange(32))[0])
    assert "fewer than" not in caplog.text
    with MilvusBackend(**ivf, index_params={"nlist": 8}) as mb:
        mb.search(x, x, 5, query_ids=np.arange(32))
    assert re.search(
        r"the IVF_FLAT index of collection \S+ \(32 vectors, search params "
        r"\{'nprobe': 1\}\) returned fewer than the 8 candidates",
        caplog.text,
    )


def test_milvus_backend_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="'IP' .*'COSINE'"):
        MilvusBackend(uri=str(tmp_path / "m.db"), metric="L2")
    with pytest.raises(ValueError, match="collection_prefix"):
        MilvusBackend(uri=str(tmp_path / "m.db"), collection_prefix="my-models")
    with pytest.raises(ValueError, match="batch"):
        MilvusBackend(uri=str(tmp_path / "m.db"), batch=20_000)
    monkeypatch.setenv("MILVUS_TOKEN", "secret-token")
    monkeypatch.setenv("EMBBENCH_RUNS", str(tmp_path / "runs"))
    be = MilvusBackend()
    assert be.uri == str(tmp_path / "runs" / "milvus.db")
    assert "secret-token" not in repr(be) and be.is_local
    assert not MilvusBackend(uri="http://localhost:19530").is_local


# ---------------------------------------------------------------------------------------------
# Benchmark smoke test (no timing asserts)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_retrieval_quick_prints_the_ratios():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_retrieval.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for line in (
        "ratio exact / baseline:",
        "ratio exact / fastest bare product",
        "ratio exact_numba / fastest bare product",
        "exact (numpy selection) and exact_numba: identical ids and distances",
        "where exact's time goes",
        "re-scoring + ranking",
        "targets: exact / fastest bare product: 2000 x 128:",
        "ratio torchmetrics / ours",
        "BLAS libraries and kernels",
        "OPENBLAS_* environment",
        "load average",
    ):
        assert line in out, out
    if "faiss" in out:
        assert "x faiss" in out and "OPENBLAS_CORETYPE" in out
