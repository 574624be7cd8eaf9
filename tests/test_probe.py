"""Probe baselines: the linear probe against scikit-learn, kNN against a brute-force reference,
and their scoring against top-tuning's own function (issue 25 item 4)."""

from __future__ import annotations

import numpy as np
import pytest

from embbench.probe import (
    DEFAULT_C_GRID,
    ProbeError,
    fit_logistic,
    knn_classify,
    knn_votes,
    linear_probe,
    peak_search,
    score_predictions,
)
from embbench.vectors import l2_normalize


def _blobs(seed: int, n_classes: int = 6, dim: int = 24, noise: float = 1.3):
    """Gaussian class centroids + noise: separable-ish, not separable (so C matters)."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(n_classes, dim))

    def split(n: int):
        y = rng.integers(0, n_classes, n)
        return (centroids[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y

    return split(240), split(120), split(200)


@pytest.mark.parametrize(("c", "chunked"), [(0.01, False), (1.0, False), (30.0, False),
                                            (1.0, True), (30.0, True)])  # fmt: skip
def test_fit_logistic_equals_sklearn_at_the_same_c(c, chunked, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    if chunked:  # 64-row chunks: 240 rows = 3 full chunks + 1 partial
        monkeypatch.setattr("embbench.probe.CHUNK_BYTES", 4 * 6 * 64)

    (xtr, ytr), _, (xte, _) = _blobs(0)
    xtr, xte = l2_normalize(xtr, zero_rows="keep"), l2_normalize(xte, zero_rows="keep")
    ours = fit_logistic(xtr, ytr, 6, c, device="cpu")
    ref = LogisticRegression(C=c).fit(xtr, ytr)  # default lbfgs, tol 1e-4, max_iter 100
    assert ours.converged and ref.n_iter_[0] < 100
    # Same objective, same stopping rule: predictions agree on >= 99% of the test points and
    # the weights within 0.05 + 3% (float32 torch vs float64 scipy, both stopped at
    # |grad| <= 1e-4, which leaves the weakly regularised solution a little room).
    agree = np.mean(ours.decision(xte).argmax(1) == ref.predict(xte))
    assert agree >= 0.99
    np.testing.assert_allclose(ours.weight.T, ref.coef_, rtol=0.03, atol=0.05)
    np.testing.assert_allclose(ours.bias, ref.intercept_, rtol=0.03, atol=0.05)


def test_probe_is_deterministic():
    (xtr, ytr), (xva, yva), (xte, yte) = _blobs(7)
    runs = [linear_probe(xtr, ytr, xva, yva, xte, yte, grid=[0.1, 10.0], search="full",
                         device="cpu", progress=False) for _ in range(2)]  # fmt: skip
    np.testing.assert_array_equal(runs[0].predictions, runs[1].predictions)
    assert runs[0].val_accuracy == runs[1].val_accuracy and runs[0].n_iter == runs[1].n_iter
    a = fit_logistic(l2_normalize(xtr, zero_rows="keep"), ytr, 6, 3.0, device="cpu")
    b = fit_logistic(l2_normalize(xtr, zero_rows="keep"), ytr, 6, 3.0, device="cpu")
    np.testing.assert_array_equal(a.weight, b.weight)


def test_full_search_chooses_the_best_c_on_val_and_agrees_with_sklearn():
    from sklearn.linear_model import LogisticRegression

    (xtr, ytr), (xva, yva), (xte, yte) = _blobs(1)
    grid = np.logspace(-3, 3, 7)
    res = linear_probe(xtr, ytr, xva, yva, xte, yte, grid=grid, search="full", device="cpu",
                       progress=False)  # fmt: skip
    assert sorted(res.val_accuracy) == pytest.approx(grid)
    best = max(res.val_accuracy.values())
    # ties go to the larger C
    assert res.chosen_c == max(c for c, a in res.val_accuracy.items() if a == best)
    ntr, nva = l2_normalize(xtr, zero_rows="keep"), l2_normalize(xva, zero_rows="keep")
    for c, acc in res.val_accuracy.items():
        sk = LogisticRegression(C=c, max_iter=100).fit(ntr, ytr).score(nva, yva)
        assert abs(acc - sk) <= 2 / len(yva)  # at most 2 of 120 val points differ
    # the final model is refitted on train+val at the chosen C
    both = LogisticRegression(C=res.chosen_c).fit(np.vstack([ntr, nva]), np.r_[ytr, yva])
    agree = np.mean(res.predictions == both.predict(l2_normalize(xte, zero_rows="keep")))
    assert agree >= 0.99
    assert np.mean(res.predictions == yte) > 0.5  # chance is 1/6


def test_peak_search_follows_clip_benchmark():
    """Coarse sweep every 16th of 97 values, then +-8, +-4, +-2, +-1 around the peak."""
    target = 37
    seen: list[int] = []

    def score(i: int) -> float:
        seen.append(i)
        return -abs(i - target)  # unimodal, peak at 37

    assert peak_search(97, score) == target
    assert seen[:7] == [96, 80, 64, 48, 32, 16, 0]  # from the largest C down
    # coarse peak 32; +-8 -> 40; +-4 -> 36; +-2: 34/36/38, 36 and 38 tie -> 38 (larger C);
    # +-1 -> 37
    assert set(seen) == {0, 16, 32, 48, 64, 80, 96, 24, 40, 36, 44, 34, 38, 37, 39}
    # ties go to the larger C (higher index), as CLIP_benchmark keeps the first of equal scores
    assert peak_search(97, lambda i: 1.0) == 96
    assert len(DEFAULT_C_GRID) == 97 and DEFAULT_C_GRID[0] == pytest.approx(1e-6)


def test_peak_search_in_the_probe_records_every_fit():
    (xtr, ytr), (xva, yva), (xte, yte) = _blobs(2)
    res = linear_probe(xtr, ytr, xva, yva, xte, yte, device="cpu", progress=False)
    assert res.search == "peak" and 7 <= len(res.val_accuracy) <= 7 + 4 * 2
    best = max(res.val_accuracy.values())
    assert res.chosen_c == max(c for c, a in res.val_accuracy.items() if a == best)
    assert "refit" in res.n_iter and res.wall_s > 0


def _knn_reference(train_x, train_y, test_x, k, temperature):
    """Brute force: full similarity matrix, neighbours by (-sim, train index), float64 votes."""
    classes, codes = np.unique(train_y, return_inverse=True)
    sims = test_x.astype(np.float32) @ train_x.astype(np.float32).T
    votes = np.zeros((len(test_x), len(classes)))
    for r in range(len(test_x)):
        order = np.lexsort((np.arange(len(train_x)), -sims[r]))[:k]
        for j in order:  # summed in the same canonical order as knn_votes
            votes[r, codes[j]] += np.exp(np.float64(sims[r, j]) / temperature)
    return votes, classes


def test_knn_equals_brute_force_with_ties_exactly():
    """Integer vectors (exact float32 dot products), duplicated train rows (similarity ties at
    the k-th neighbour), an all-zero query that ties every train item, several blocks."""
    rng = np.random.default_rng(3)
    base = rng.integers(-2, 3, size=(30, 5)).astype(np.float32)
    train_x = np.vstack([base, base[:10]])  # duplicates: equal similarities, different labels
    train_y = np.r_[rng.integers(0, 4, 30), rng.integers(0, 4, 10)]
    test_x = np.vstack([rng.integers(-2, 3, size=(17, 5)), np.zeros((1, 5))]).astype(np.float32)
    for k, t in [(1, 0.5), (5, 1.0), (7, 3.0)]:
        votes, classes = knn_votes(
            train_x,
            train_y,
            test_x,
            k=k,
            temperature=t,
            normalize=False,
            block_bytes=4 * 40 * 5,
            device="cpu",
        )  # fmt: skip  (5 rows)
        ref, ref_classes = _knn_reference(train_x, train_y, test_x, k, t)
        np.testing.assert_array_equal(classes, ref_classes)
        np.testing.assert_array_equal(votes, ref)
        pred = knn_classify(train_x, train_y, test_x, k=k, temperature=t, normalize=False,
                            device="cpu")  # fmt: skip
        np.testing.assert_array_equal(pred, ref_classes[ref.argmax(1)])
    # the all-zero query ties every train item: the k lowest train indices vote, and equal
    # class votes go to the first class in label order
    votes, _ = knn_votes(train_x, train_y, test_x[-1:], k=5, normalize=False, device="cpu")
    expect = np.bincount(train_y[:5], minlength=4).astype(float)
    np.testing.assert_array_equal(votes[0], expect)


def test_knn_on_normalised_embeddings_matches_the_reference():
    (xtr, ytr), _, (xte, yte) = _blobs(4)
    pred = knn_classify(xtr, ytr, xte, device="cpu", block_bytes=4 * 240 * 16)
    votes, classes = knn_votes(xtr, ytr, xte, device="cpu")
    ref, _ = _knn_reference(
        l2_normalize(xtr, zero_rows="keep"), ytr, l2_normalize(xte, zero_rows="keep"), 20, 0.07
    )
    np.testing.assert_array_equal(pred, classes[ref.argmax(1)])
    np.testing.assert_allclose(votes, ref, rtol=1e-4)  # BLAS vs numpy float32 rounding
    assert np.mean(pred == yte) > 0.5


def test_scoring_is_top_tunings_own():
    """Same predictions -> identical numbers and confusion matrix as toptune's scoring."""
    from embbench.toptune.data import TEST, TopTuneData, test_classification

    rng = np.random.default_rng(5)
    classes = np.array(["bag", "cap", "mug", "shoe"])
    y_true = rng.choice(np.r_[classes, ["vase"]], 60)  # "vase" absent from train
    y_pred = rng.choice(classes, 60)
    codes = np.searchsorted(classes, y_true)
    codes[y_true == "vase"] = -1
    data = TopTuneData(x={}, y={TEST: codes}, labels={TEST: y_true}, classes=classes,
                       label="category", sets={})  # fmt: skip
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        ref, path = test_classification(data, y_pred, data.seen(TEST), Path(tmp))
        ref_matrix = np.load(path)["matrix"]
        ours, (matrix, order) = score_predictions(y_true, y_pred, classes, Path(tmp) / "p")
        assert np.load(Path(tmp) / "p" / "confusion_matrix.npz")["matrix"].tolist() == \
            ref_matrix.tolist()  # fmt: skip
    assert ours == ref  # same keys, bit-identical values
    np.testing.assert_array_equal(matrix, ref_matrix)
    np.testing.assert_array_equal(order, classes)
    assert ours["n_test_unseen_class"] == int((y_true == "vase").sum()) > 0


def test_bad_input_is_one_clear_line():
    (xtr, ytr), (xva, yva), (xte, _) = _blobs(6)
    with pytest.raises(ProbeError, match="share one dimension"):
        linear_probe(xtr, ytr, xva, yva, xte[:, :5], progress=False)
    with pytest.raises(ProbeError, match="at least 2"):
        linear_probe(xtr, np.zeros_like(ytr), xva, yva, xte, progress=False)
    with pytest.raises(ProbeError, match="positive C"):
        linear_probe(xtr, ytr, xva, yva, xte, grid=[], progress=False)
    with pytest.raises(ProbeError, match="temperature"):
        knn_classify(xtr, ytr, xte, temperature=0)
    with pytest.raises(ProbeError, match="one per row"):
        knn_classify(xtr, ytr[:-1], xte)


@pytest.mark.slow
def test_probe_and_knn_beat_chance_on_real_embeddings(small_demo):
    """Packaged pretrained EfficientNet-Lite0 on the small demo (12 products, 108 images)."""
    from embbench.embed import embed_split
    from embbench.models import create_embedder

    emb = create_embedder("efficientnet_lite0")
    xs, ys = {}, {}
    for split in ("train", "val", "test"):
        es = embed_split(emb, small_demo, split, batch_size=32, num_workers=0, device="cpu",
                         progress=False)  # fmt: skip
        xs[split], ys[split] = np.asarray(es.vectors), es.labels(small_demo.items, "product")
    chance = 1 / len(np.unique(ys["train"]))
    res = linear_probe(xs["train"], ys["train"], xs["val"], ys["val"], xs["test"], ys["test"],
                       device="cpu", progress=False)  # fmt: skip
    probe, _ = score_predictions(ys["test"], res.predictions, res.classes)
    knn = knn_classify(xs["train"], ys["train"], xs["test"], device="cpu")
    knn_m, _ = score_predictions(ys["test"], knn, res.classes)
    assert probe["n_test"] == len(ys["test"]) and probe["n_test_unseen_class"] == 0
    assert probe["accuracy"] >= 3 * chance, probe
    assert knn_m["accuracy"] >= 3 * chance, knn_m
