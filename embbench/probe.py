"""Classification baselines on frozen embeddings: a linear probe and a kNN classifier.

Pure functions on arrays; :func:`score_predictions` scores their predictions with exactly the
code and keys of top-tuning (:func:`embbench.toptune.test_classification`), so the probe, kNN
and top-tuned rows of a report compare number for number.

**Linear probe** (:func:`linear_probe`): multinomial logistic regression on L2-normalised
embeddings, CLIP's protocol (Radford et al. 2021, appendix A.3) as LAION CLIP_benchmark runs it
(``clip_benchmark/metrics/linear_probe.py``, ``find_peak`` and ``evaluate``):

1. The L2 strength is searched on a log grid, :data:`DEFAULT_C_GRID`: ``C = 1/lambda`` from
   1e-6 to 1e6, 8 steps per decade (97 values; CLIP's range and resolution). ``search="peak"``
   (default) is CLIP_benchmark's coarse-to-fine search: every 16th grid value (1e-6, 1e-4, ...,
   1e6), then around the best at +-8, +-4, +-2, +-1 steps, each time moving to the best of
   (left, peak, right). ``search="full"`` fits every grid value.
2. Each fit is scored by validation accuracy. Ties go to the larger C (weaker regularisation),
   as ``find_peak`` keeps the first-evaluated best while sweeping from the weakest weight decay.
3. The model is refitted on train + val at the chosen C and predicts the test split.

Unlike CLIP_benchmark (a ``torch.nn.Linear`` trained with AdamW for fixed epochs, its weight
decay being the grid, GPU only), each fit here solves scikit-learn's ``LogisticRegression``
objective (CLIP's own choice): ``mean_i CE(W x_i + b, y_i) + ||W||^2 / (2 C n)``, intercept
unpenalised, by full-batch L-BFGS in float32 torch (``torch.optim.LBFGS``, strong-Wolfe line
search, history 10 as scipy), stopping when the largest absolute gradient entry is <= ``tol``
(1e-4, scikit-learn's default and criterion) or after ``max_iter`` iterations (100, ditto).
Weights start at zero (as scikit-learn) for the first C and are warm-started from the nearest
already-fitted C for the others. CUDA when present; on a CPU it uses torch's intra-op threads,
which the cell engine's thread budget (:mod:`embbench._threads`) has already set.

**kNN** (:func:`knn_classify`, DINO's ``knn_classifier``) lives in :mod:`embbench.knn`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from embbench.knn import (
    KNN_K,
    KNN_TEMPERATURE,
    ProbeError,
    _check_xy,
    _device,
    _unit,
    knn_classify,
    knn_votes,
)
from embbench.metrics import classification_metrics, confusion_matrix
from embbench.progress import progress_bar

logger = logging.getLogger(__name__)


__all__ = [
    "DEFAULT_C_GRID", "KNN_K", "KNN_TEMPERATURE", "TASK_KNN", "TASK_PROBE", "LogisticFit",
    "ProbeError", "ProbeResult", "fit_logistic", "knn_classify", "knn_votes", "linear_probe",
    "peak_search", "score_predictions",
]  # fmt: skip

TASK_PROBE = "probe"  # task names of the records (phase 2 points them at embbench.vocab)
TASK_KNN = "knn"
DEFAULT_C_GRID: np.ndarray = np.logspace(-6, 6, 97)  # C = 1/lambda, 8 steps per decade (CLIP)
PEAK_FIRST_STEP = 16  # coarse sweep: every 16th grid value (one per 2 decades)
TOL = 1e-4  # scikit-learn LogisticRegression(tol=1e-4): max |gradient| at convergence
MAX_ITER = 100  # scikit-learn LogisticRegression(max_iter=100)
CHUNK_BYTES = 32 * 2**20  # logits of one chunk of rows in fit_logistic on a CPU


@dataclass
class LogisticFit:
    """One multinomial logistic-regression fit.

    Attributes:
        weight: ``(dim, n_classes)`` float32; bias: ``(n_classes,)`` float32.
        c: The inverse L2 strength it was fitted at.
        n_iter: L-BFGS iterations run.
        n_eval: Loss+gradient evaluations (each one forward and one backward product).
        converged: ``max |gradient| <= tol`` before ``max_iter``.
    """

    weight: np.ndarray
    bias: np.ndarray
    c: float
    n_iter: int
    n_eval: int
    converged: bool

    def decision(self, x: np.ndarray) -> np.ndarray:
        """Class scores ``x @ W + b`` of (already normalised) rows."""
        return np.asarray(x, dtype=np.float32) @ self.weight + self.bias


@dataclass
class ProbeResult:
    """What :func:`linear_probe` returns.

    Attributes:
        predictions: Test predictions (label values of ``classes``).
        classes: The classes the probe knows (the train split's, sorted).
        chosen_c: The C chosen on validation (the final model is refitted at it on train+val).
        val_accuracy: C -> validation accuracy, for every C fitted during the search.
        n_iter: C -> L-BFGS iterations of that fit (the refit under key ``"refit"``).
        wall_s: Seconds for the whole search, refit and prediction.
        search: ``"peak"`` or ``"full"``.
        n_not_converged: Fits that stopped at ``max_iter``.
    """

    predictions: np.ndarray
    classes: np.ndarray
    chosen_c: float
    val_accuracy: dict[float, float]
    n_iter: dict[Any, int] = field(default_factory=dict)
    wall_s: float = 0.0
    search: str = "peak"
    n_not_converged: int = 0


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    c: float,
    *,
    init: LogisticFit | None = None,
    tol: float = TOL,
    max_iter: int = MAX_ITER,
    seed: int = 0,
    device: str = "auto",
) -> LogisticFit:
    """Multinomial logistic regression at inverse L2 strength ``c`` (full-batch L-BFGS).

    Minimises ``mean CE + ||W||^2 / (2 c n)`` (scikit-learn's objective / ``c n``).

    Args:
        x: ``(n, dim)`` rows (normalise them first).
        y: ``(n,)`` int class indices in ``[0, n_classes)``.
        n_classes: Number of classes (columns of ``W``).
        c: Inverse L2 strength (scikit-learn's ``C``).
        init: Warm start; zeros when None.
        tol: Stop when ``max |gradient| <= tol``.
        max_iter: Most L-BFGS iterations.
        seed: Torch seed (the fit itself is deterministic).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``.

    Returns:
        The fit, weights back on the CPU as float32.
    """
    import torch

    torch.manual_seed(seed)
    dev = _device(device)
    xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=dev)
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64), device=dev)
    n, dim = xt.shape
    if init is None:
        w0, b0 = torch.zeros(dim, n_classes), torch.zeros(n_classes)
    else:
        w0, b0 = torch.from_numpy(init.weight.copy()), torch.from_numpy(init.bias.copy())
    w, b = w0.to(dev), b0.to(dev)
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    l2 = 1.0 / (float(c) * n)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 15,  # line-search evaluations are bounded by the iterations
        tolerance_grad=tol,
        tolerance_change=1e-12,  # never the stop reason in float32 before the gradient test
        history_size=10,
        line_search_fn="strong_wolfe",
    )
    # ~32 MB of logits per chunk of rows on a CPU (8 MB: 1.3x slower at 60k x 1000); CUDA: one
    chunk = n if dev.type == "cuda" else min(n, max(64, CHUNK_BYTES // (4 * n_classes)))
    buf = torch.empty(chunk, n_classes, device=dev)
    rows = torch.arange(chunk, device=dev)
    f64 = torch.float64  # float32 sums cannot resolve the last loss changes (< 1e-7)
    n_eval = 0

    def closure() -> Any:
        # by hand, in place: G = (softmax(XW + b) - onehot(y)) / n, one chunk at a time
        nonlocal n_eval
        n_eval += 1
        loss = torch.zeros((), dtype=f64, device=dev)
        torch.mul(w, l2, out=w.grad)
        b.grad.zero_()
        for lo in range(0, n, chunk):
            xc, yc = xt[lo : lo + chunk], yt[lo : lo + chunk]
            rc = rows[: len(xc)]
            z = torch.addmm(b, xc, w, out=buf[: len(xc)])
            loss -= z[rc, yc].sum(dtype=f64)
            m = z.amax(dim=1, keepdim=True)
            s = z.sub_(m).exp_().sum(dim=1, keepdim=True)
            loss += m.sum(dtype=f64) + s.double().log_().sum()
            z.div_(s)[rc, yc] -= 1.0
            w.grad.addmm_(xc.T, z, alpha=1.0 / n)
            b.grad.add_(z.sum(dim=0), alpha=1.0 / n)
        return loss / n + 0.5 * l2 * (w * w).sum(dtype=f64)

    opt.step(closure)
    n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
    closure()  # the gradient at the final point (the last line-search trial may differ)
    grad_max = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    return LogisticFit(
        w.cpu().numpy(), b.cpu().numpy(), float(c), n_iter, n_eval, converged=grad_max <= tol
    )


def peak_search(n_grid: int, val_score: Any, first_step: int = PEAK_FIRST_STEP) -> int:
    """CLIP_benchmark's coarse-to-fine search over grid indices; returns the chosen index.

    ``val_score(i)`` fits and scores grid index ``i`` of a grid sorted by ascending C (the
    caller memoises it). Each round evaluates from the largest C down and keeps the first
    strict best, so ties go to the larger C (see the module docstring).

    Args:
        n_grid: Grid length.
        val_score: Callable index -> validation accuracy.
        first_step: Spacing of the coarse sweep; refinement halves it down to 1.
    """

    def best_of(idxs: Sequence[int]) -> int:
        best_i, best_s = -1, -np.inf
        for i in sorted(set(idxs), reverse=True):
            s = val_score(i)
            if s > best_s:
                best_i, best_s = i, s
        return best_i

    coarse = list(range(0, n_grid, first_step))
    if coarse[-1] != n_grid - 1:
        coarse.append(n_grid - 1)
    peak = best_of(coarse)
    span = first_step // 2
    while span > 0:
        peak = best_of([max(peak - span, 0), peak, min(peak + span, n_grid - 1)])
        span //= 2
    return peak


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray | None = None,
    *,
    grid: Sequence[float] | np.ndarray = DEFAULT_C_GRID,
    search: Literal["peak", "full"] = "peak",
    tol: float = TOL,
    max_iter: int = MAX_ITER,
    normalize: bool = True,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> ProbeResult:
    """Linear probe: C chosen on val, refitted on train+val, predictions on test.

    Args:
        train_x: ``(n_train, dim)`` train embeddings.
        train_y: Train labels (any comparable values; the classes are the train split's).
        val_x: Validation embeddings.
        val_y: Validation labels; items whose class is not in train are left out (logged).
        test_x: Test embeddings.
        test_y: Unused (the splits pass in one shape; score with :func:`score_predictions`).
        grid: Candidate C values (inverse L2 strengths); sorted ascending here.
        search: ``"peak"`` (CLIP_benchmark's coarse-to-fine) or ``"full"`` (every value).
        tol: L-BFGS gradient tolerance (max absolute entry).
        max_iter: L-BFGS iterations per fit.
        normalize: L2-normalise every split's rows first (as CLIP_benchmark's features).
        seed: Torch seed of every fit.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        progress: Show a progress bar over the fits.

    Returns:
        A :class:`ProbeResult`.

    Raises:
        ProbeError: Bad shapes, fewer than 2 train classes, no usable val item, bad grid.
    """
    del test_y  # scored by score_predictions
    start = time.perf_counter()
    train_x, train_y = _check_xy(train_x, train_y, "probe train split")
    val_x, val_y = _check_xy(val_x, val_y, "probe val split")
    test_x = np.asarray(test_x)
    dim = train_x.shape[1]
    if test_x.ndim != 2 or test_x.shape[1] != dim or val_x.shape[1] != dim:
        raise ProbeError(
            f"probe: train, val and test embeddings must share one dimension, got "
            f"{train_x.shape[1]}, {val_x.shape[1]} and {test_x.shape[-1]}"
        )
    grid_arr = np.unique(np.asarray(grid, dtype=np.float64))
    if len(grid_arr) == 0 or np.any(grid_arr <= 0):
        raise ProbeError(f"probe: grid must hold positive C values, got {list(grid)}")
    if search not in ("peak", "full"):
        raise ProbeError(f"probe: search must be 'peak' or 'full', got {search!r}")
    classes, ytr = np.unique(train_y, return_inverse=True)
    if len(classes) < 2:
        raise ProbeError(f"probe: the train split has {len(classes)} class; need at least 2")
    yva = np.searchsorted(classes, val_y)
    yva_ok = (yva < len(classes)) & (classes[np.minimum(yva, len(classes) - 1)] == val_y)
    if not yva_ok.any():
        raise ProbeError("probe: no validation item has a class present in train")
    if not yva_ok.all():
        logger.warning(
            "probe: %d val items have a class absent from train; left out", int((~yva_ok).sum())
        )
    prep = _unit if normalize else (lambda a: np.asarray(a, dtype=np.float32))
    xtr, xva, xte = prep(train_x), prep(val_x)[yva_ok], prep(test_x)
    yva = yva[yva_ok]
    k = len(classes)

    fits: dict[int, LogisticFit] = {}
    scores: dict[int, float] = {}
    total = len(grid_arr) if search == "full" else None
    bar = progress_bar(total=total, desc="linear probe (C grid)", unit="fit", disable=not progress)

    def val_score(i: int) -> float:
        if i in scores:
            return scores[i]
        near = min(fits, key=lambda j: (abs(j - i), j), default=None)
        fit = fit_logistic(
            xtr,
            ytr,
            k,
            grid_arr[i],
            init=fits.get(near),
            tol=tol,
            max_iter=max_iter,
            seed=seed,
            device=device,
        )
        fits[i] = fit
        scores[i] = float(np.mean(fit.decision(xva).argmax(axis=1) == yva))
        logger.debug(
            "probe C=%.3g: val accuracy %.4f (%d iterations)", grid_arr[i], scores[i], fit.n_iter
        )
        bar.update(1)
        return scores[i]

    try:
        if search == "full":
            for i in range(len(grid_arr)):
                val_score(i)
            best = max(scores, key=lambda i: (scores[i], i))  # ties: the larger C
        else:
            best = peak_search(len(grid_arr), val_score)
    finally:
        bar.close()
    chosen = float(grid_arr[best])
    refit = fit_logistic(
        np.concatenate([xtr, xva]),
        np.concatenate([ytr, yva]),
        k,
        chosen,
        init=fits[best],
        tol=tol,
        max_iter=max_iter,
        seed=seed,
        device=device,
    )
    pred = classes[refit.decision(xte).argmax(axis=1)]
    n_iter: dict[Any, int] = {float(grid_arr[i]): f.n_iter for i, f in sorted(fits.items())}
    n_iter["refit"] = refit.n_iter
    not_conv = sum(not f.converged for f in [*fits.values(), refit])
    if not_conv:
        logger.warning(
            "probe: %d of %d fits stopped at max_iter=%d before tol=%g",
            not_conv,
            len(fits) + 1,
            max_iter,
            tol,
        )
    wall = time.perf_counter() - start
    logger.info(
        "linear probe: C=%.3g chosen (val accuracy %.4f) from %d fits in %.1f s",
        chosen,
        scores[best],
        len(fits),
        wall,
    )
    val_acc = {float(grid_arr[i]): s for i, s in sorted(scores.items())}
    return ProbeResult(pred, classes, chosen, val_acc, n_iter, wall, search, not_conv)


def score_predictions(
    y_true: Any,
    y_pred: Any,
    classes: Any,
    out_dir: Path | None = None,
) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """Top-tuning's test classification metrics for any predictions.

    Same code and keys as :func:`embbench.toptune.test_classification`: scored on the items
    whose true class is in ``classes`` (the train split's), ``n_test`` and
    ``n_test_unseen_class`` added, the confusion matrix over ``classes``.

    Args:
        y_true: Test labels.
        y_pred: Predicted labels.
        classes: The train split's classes (sorted).
        out_dir: When given, the confusion matrix is written to ``confusion_matrix.npz`` there.

    Returns:
        ``(metrics, (matrix, labels))``.
    """
    yt = np.asarray(y_true)
    yp = np.asarray(y_pred)
    classes = np.asarray(classes)
    seen = np.isin(yt, classes)
    metrics = {k: float(v) for k, v in classification_metrics(yt[seen], yp[seen]).items()}
    metrics["n_test"] = int(seen.sum())
    metrics["n_test_unseen_class"] = int((~seen).sum())
    matrix, order = confusion_matrix(yt[seen], yp[seen], labels=classes)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            out_dir / "confusion_matrix.npz", matrix=matrix, labels=np.asarray(order).astype(str)
        )
    return metrics, (matrix, order)
