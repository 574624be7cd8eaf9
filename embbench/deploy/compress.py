"""Compression variants of an embedding, scored with the same protocol as float32.

A variant is a typed, hashable :class:`CompressionSpec` (its :meth:`~CompressionSpec.params`
go into the cell hash). It is fitted on the *train* split only (int8 ranges, PCA basis), then the
query and index vectors are encoded and decoded and scored exactly as float32 vectors are: through
:func:`embbench.retrieval.search_and_evaluate` (exact backend by default), so L2 normalisation,
ties by id and self-exclusion by id are the protocol's own. Binary (sign) codes are searched by
Hamming distance here (Milvus Lite 3.2.2 rejects ``BINARY_VECTOR`` fields: "MilvusLite does not
support BinaryVector"; a Milvus server's ``BIN_FLAT`` + ``HAMMING`` is the deployment path), with
the same rules: ranked by (distance ascending, index id ascending), the query removed by id.

Variants (input vectors are L2-normalised first, as retrieval does):

- ``float32``: the reference, 4 bytes per dimension.
- ``float16``: IEEE half precision, 2 bytes per dimension.
- ``int8``: per-dimension scalar quantisation to 256 levels over the train split's
  ``[min, max]`` of that dimension (values outside are clipped), 1 byte per dimension plus a
  shared ``2 * d`` float32 table (not counted per vector).
- ``binary``: one sign bit per dimension (``x > 0``), ``ceil(d / 8)`` bytes, Hamming search.
- ``pca``: projection on the train split's top ``dim`` principal axes (train mean removed),
  optionally whitened (each axis divided by its standard deviation), stored as float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from embbench.deploy.indexes import variant_row
from embbench.metrics import RetrievalResult, evaluate_rankings
from embbench.retrieval import RetrievalTask, SearchBackend, l2_normalize

logger = logging.getLogger(__name__)

__all__ = [
    "CompressionKind",
    "CompressionResult",
    "CompressionSpec",
    "FittedCompression",
    "compare_compressions",
    "default_compressions",
    "evaluate_compression",
    "fit_compression",
    "hamming_search",
]

CompressionKind = Literal["float32", "float16", "int8", "binary", "pca"]
_KINDS = ("float32", "float16", "int8", "binary", "pca")
_HAMMING_BLOCK_BYTES = 128 * 2**20  # one block's (queries x index) distance matrix


@dataclass(frozen=True)
class CompressionSpec:
    """One compression variant (hashable; :meth:`params` enters the cell hash).

    Attributes:
        kind: ``float32``, ``float16``, ``int8``, ``binary`` or ``pca``.
        dim: Output dimensions of ``pca`` (``None`` for the other kinds).
        whiten: ``pca`` only: divide each principal axis by its standard deviation.
    """

    kind: CompressionKind
    dim: int | None = None
    whiten: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"CompressionSpec: kind {self.kind!r} is not one of {_KINDS}")
        if self.kind == "pca":
            if self.dim is None or int(self.dim) != self.dim or self.dim < 1:
                raise ValueError(f"CompressionSpec: pca needs a positive int dim, got {self.dim}")
        elif self.dim is not None or self.whiten:
            raise ValueError(f"CompressionSpec: dim/whiten apply to pca only, not {self.kind!r}")

    @property
    def name(self) -> str:
        """Short label, e.g. ``int8``, ``pca128``, ``pca64w`` (whitened)."""
        if self.kind == "pca":
            return f"pca{self.dim}{'w' if self.whiten else ''}"
        return self.kind

    def params(self) -> dict[str, Any]:
        """The JSON-able parameters recorded in the lineage and hashed into the cell hash."""
        return {"compression": self.kind, "dim": self.dim, "whiten": self.whiten}

    def bytes_per_vector(self, d: int) -> int:
        """Stored bytes of one encoded vector of input dimension ``d``."""
        return {
            "float32": 4 * d,
            "float16": 2 * d,
            "int8": d,
            "binary": (d + 7) // 8,
            "pca": 4 * int(self.dim or 0),
        }[self.kind]


def default_compressions(d: int, *, whiten: bool = False) -> list[CompressionSpec]:
    """The standard grid for dimension ``d``: float32, float16, int8, binary, PCA variants.

    PCA goes to ``d/2``, ``d/4``, ``d/8``, 128 and 64 dimensions (those below ``d``, each once).

    Args:
        d: The embedding's dimension.
        whiten: Also add a whitened twin of each PCA variant.

    Returns:
        The specs, float32 (the reference) first.
    """
    specs = [CompressionSpec(k) for k in ("float32", "float16", "int8", "binary")]
    dims = sorted({m for m in (d // 2, d // 4, d // 8, 128, 64) if 1 <= m < d}, reverse=True)
    for m in dims:
        specs.append(CompressionSpec("pca", dim=m))
        if whiten:
            specs.append(CompressionSpec("pca", dim=m, whiten=True))
    return specs


@dataclass
class FittedCompression:
    """A compression fitted on a train split: ``encode`` to codes, ``decode`` to float32.

    Attributes:
        spec: The variant.
        d: Input dimension.
        state: Fitted arrays (``lo``/``step`` for int8; ``mean``/``components``/``scale`` for pca).
    """

    spec: CompressionSpec
    d: int
    state: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def bytes_per_vector(self) -> int:
        """Stored bytes of one encoded vector."""
        return self.spec.bytes_per_vector(self.d)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes of the (L2-normalised here) rows of ``x``: the array a deployment would store."""
        x = l2_normalize(x, f"{self.spec.name} input")
        if x.shape[1] != self.d:
            raise ValueError(
                f"{self.spec.name}: fitted on dim {self.d}, got vectors of dim {x.shape[1]}"
            )
        kind = self.spec.kind
        if kind == "float32":
            return x
        if kind == "float16":
            return x.astype(np.float16)
        if kind == "int8":
            q = np.rint((x - self.state["lo"]) / self.state["step"])
            return (np.clip(q, 0, 255) - 128).astype(np.int8)
        if kind == "binary":
            return np.packbits(x > 0, axis=1)
        proj = (x.astype(np.float64) - self.state["mean"]) @ self.state["components"].T
        return (proj / self.state["scale"]).astype(np.float32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """float32 vectors searched in place of the originals (binary: ``+-1`` per bit)."""
        kind = self.spec.kind
        if kind in ("float32", "float16", "pca"):
            return np.ascontiguousarray(codes, dtype=np.float32)
        if kind == "int8":
            levels = codes.astype(np.float32) + 128.0
            return (levels * self.state["step"] + self.state["lo"]).astype(np.float32)
        bits = np.unpackbits(codes, axis=1, count=self.d)
        return bits.astype(np.float32) * 2.0 - 1.0


def fit_compression(spec: CompressionSpec, train: np.ndarray) -> FittedCompression:
    """Fit ``spec`` on the train split (rows are L2-normalised first).

    Args:
        spec: The variant.
        train: ``(n_train, d)`` train-split embeddings; never the query or index vectors.

    Returns:
        The fitted compression.

    Raises:
        ValueError: When PCA asks for more dimensions than the train split can give.
    """
    x = l2_normalize(train, "compression train split")
    n, d = x.shape
    state: dict[str, np.ndarray] = {}
    if spec.kind == "int8":
        lo, hi = x.min(axis=0), x.max(axis=0)
        state["lo"] = lo.astype(np.float32)
        state["step"] = (np.maximum(hi - lo, 1e-12) / 255.0).astype(np.float32)
    elif spec.kind == "pca":
        m = int(spec.dim or 0)
        if m > min(n, d):
            raise ValueError(
                f"{spec.name}: PCA to {m} dims needs at least {m} train vectors and input dims; "
                f"got {n} x {d}. Use a smaller dim or a larger train split."
            )
        mean = x.mean(axis=0, dtype=np.float64)
        centred = x.astype(np.float64) - mean
        _, sing, vt = np.linalg.svd(centred, full_matrices=False)
        comps = vt[:m]
        # Sign convention: largest-magnitude loading positive, so the basis is deterministic.
        flip = np.sign(comps[np.arange(m), np.abs(comps).argmax(axis=1)])
        comps = comps * np.where(flip == 0, 1.0, flip)[:, None]
        std = sing[:m] / np.sqrt(max(n - 1, 1))
        state["mean"] = mean
        state["components"] = comps
        state["scale"] = np.where(std > 1e-12, std, 1.0) if spec.whiten else np.ones(m)
    return FittedCompression(spec=spec, d=d, state=state)


def hamming_search(
    index_codes: np.ndarray,
    query_codes: np.ndarray,
    k: int,
    *,
    query_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Hamming k-NN over packed bit codes, ties by index id, self excluded by id.

    Args:
        index_codes: ``(n, bytes)`` uint8 packed bits (``np.packbits``).
        query_codes: ``(nq, bytes)`` uint8 packed bits.
        k: Results per query.
        query_ids: Protocol ``within``: query ``i`` is index item ``query_ids[i]`` and is dropped
            from its own list by id (not by rank).

    Returns:
        ``(ids, dists)``: ``(nq, k)`` int64 positions (``-1`` padding) and int64 Hamming
        distances (``-1`` padding), best first.
    """

    def plus_minus(codes: np.ndarray) -> np.ndarray:
        # +-1 per bit: dot = nbits - 2 * hamming, exact in float32 (one float matrix product)
        bits = np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=1)
        return bits.astype(np.float32) * np.float32(2) - np.float32(1)

    x_pm, q_pm = plus_minus(index_codes), plus_minus(query_codes)
    n, nq, nbits = x_pm.shape[0], q_pm.shape[0], x_pm.shape[1]
    kk = min(n, k + (1 if query_ids is not None else 0))
    ids = np.full((nq, k), -1, dtype=np.int64)
    dists = np.full((nq, k), -1, dtype=np.int64)
    block = max(1, _HAMMING_BLOCK_BYTES // max(1, 8 * n))
    pos = np.arange(n, dtype=np.int64)
    for start in range(0, nq, block):
        stop = min(nq, start + block)
        ham = np.rint((nbits - q_pm[start:stop] @ x_pm.T) / 2).astype(np.int64)
        if query_ids is not None:  # drop the query's own item by id
            ham[np.arange(stop - start), np.asarray(query_ids)[start:stop]] = np.iinfo(np.int64).max
        key = np.where(ham == np.iinfo(np.int64).max, ham, ham * n + pos[None, :])
        part = (
            np.argpartition(key, kk - 1, axis=1)[:, :kk]
            if kk < n
            else np.tile(pos, (stop - start, 1))
        )
        order = np.take_along_axis(key, part, axis=1).argsort(axis=1, kind="stable")
        top = np.take_along_axis(part, order, axis=1)
        top_d = np.take_along_axis(ham, top, axis=1)
        top = np.where(top_d == np.iinfo(np.int64).max, -1, top)[:, :k]
        top_d = np.where(top < 0, -1, top_d[:, :k])
        ids[start:stop, : top.shape[1]] = top
        dists[start:stop, : top_d.shape[1]] = top_d
    return ids, dists


@dataclass
class CompressionResult:
    """Quality and cost of one compression variant.

    Attributes:
        spec: The variant.
        bytes_per_vector: Stored bytes per vector.
        memory_ratio: ``bytes_per_vector`` over float32's ``4 * d``.
        search: How it was searched: ``exact`` (decoded vectors, the protocol's backend) or
            ``hamming`` (binary codes).
        retrieval: The metrics (summary, per-query values, lone count).
        delta: Change of each summary metric against ``reference`` (NaN without one).
    """

    spec: CompressionSpec
    bytes_per_vector: int
    memory_ratio: float
    search: str
    retrieval: RetrievalResult
    delta: dict[str, float]

    @property
    def metrics(self) -> dict[str, float]:
        """The summary metrics (``mMP@5``, ``mR@1``, ...)."""
        return self.retrieval.summary

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able row for records and tables."""
        return {
            **variant_row(self, ("bytes_per_vector", "memory_ratio", "search", "metrics", "delta")),
            "n_queries": self.retrieval.n_queries,
            "n_lone": self.retrieval.n_lone,
        }


def evaluate_compression(
    spec: CompressionSpec,
    train: np.ndarray,
    task: RetrievalTask,
    *,
    k: int = 5,
    backend: SearchBackend | str = "exact",
    reference: dict[str, float] | None = None,
) -> CompressionResult:
    """Fit ``spec`` on ``train``, encode queries and index, and score them like float32.

    Args:
        spec: The variant.
        train: Train-split embeddings used for fitting only.
        task: The float32 queries, index and protocol (encoded and decoded here).
        k: The cut-off.
        backend: Backend for the decoded float vectors (binary codes use Hamming search).
        reference: Summary metrics of float32 to compute ``delta`` against.

    Returns:
        The variant's result.
    """
    fitted = fit_compression(spec, train)
    q_codes = fitted.encode(task.query_vectors)
    same = task.index_vectors is None
    x_codes = q_codes if same else fitted.encode(task.index_vectors)
    if spec.kind == "binary":
        q_lab, x_lab, qids = task.relevance()
        ids, _ = hamming_search(x_codes, q_codes, k, query_ids=qids)
        res = evaluate_rankings(ids, q_lab, x_lab, k, exclude_self=task.within, query_ids=qids)
        how = "hamming"
    else:
        decoded = task.with_vectors(
            fitted.decode(q_codes), None if same else fitted.decode(x_codes)
        )
        res = decoded.search(k=k, backend=backend)
        how = "exact" if isinstance(backend, str) else getattr(backend, "name", "backend")
    delta = {
        key: (value - reference[key]) if reference and key in reference else float("nan")
        for key, value in res.summary.items()
    }
    bpv = fitted.bytes_per_vector
    return CompressionResult(
        spec=spec,
        bytes_per_vector=bpv,
        memory_ratio=bpv / (4.0 * fitted.d),
        search=how,
        retrieval=res,
        delta=delta,
    )


def compare_compressions(
    specs: list[CompressionSpec],
    train: np.ndarray,
    task: RetrievalTask,
    **kwargs: Any,
) -> list[CompressionResult]:
    """Evaluate each spec; deltas are against float32 (evaluated first if not in ``specs``).

    Args:
        specs: The variants (e.g. :func:`default_compressions`).
        train: Train-split embeddings (fitting only).
        task: The float32 queries, index and protocol.
        **kwargs: ``k``, ``backend`` for :func:`evaluate_compression`.

    Returns:
        One result per spec, in the order given.
    """
    args = (train, task)
    ref_spec = CompressionSpec("float32")
    ref = evaluate_compression(ref_spec, *args, **kwargs)
    ref.delta = {key: 0.0 for key in ref.metrics}
    out = []
    for spec in specs:
        if spec == ref_spec:
            out.append(ref)
            continue
        out.append(evaluate_compression(spec, *args, reference=ref.metrics, **kwargs))
        logger.info("compression %s: %s", spec.name, out[-1].metrics)
    return out
