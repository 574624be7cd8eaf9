"""Stage 01 (notebook ``01_embed``): pretrained embeddings -> retrieval metrics.

For every (model, dataset) cell, the cell engine loads the catalogue and plans retrieval; this
stage's ``produce`` step embeds the splits the plan needs (cached, resumable) with the model's
own preprocessing. The engine scores them with the chosen backend (Milvus by default, built from
the cache; or the exact in-process backend), writes the record and logs one MLflow run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from embbench.cells import Cell, CellInputs, Produced, run_grid
from embbench.config import GridConfig, register_stage
from embbench.embed import embed_splits, embedding_cache
from embbench.models import create_embedder
from embbench.records import Lineage, ResultStore, record_row

logger = logging.getLogger(__name__)

STAGE = "embed"
MODE = "pretrained"


@register_stage("01_embed")
class EmbedConfig(GridConfig):
    """Parameters of stage 01, mirrored by ``notebooks/01_embed.ipynb`` and its params file.

    Every field is shared with stages 02-04 and declared in :class:`~embbench.config.GridConfig`.
    """


def weights_problem(weights: str) -> str | None:
    """Why ``weights`` is not a valid weights setting, or ``None`` when it is."""
    if weights in ("pretrained", "random", "auto") or Path(weights).expanduser().is_file():
        return None
    return (
        f"weights {weights!r} is neither pretrained, random, auto nor an existing checkpoint "
        "file. Fix: choose one of those, or give the checkpoint's full path."
    )


def lineage_of(embedder: Any, base_model: str) -> Lineage:
    """The lineage of a model's embeddings as the embedder built them."""
    used = dict(embedder.weights_used)
    return Lineage(
        base_model=base_model,
        weights=used,
        weights_kind=str(used.get("kind", "unknown")),
        control=bool(getattr(embedder.spec, "control", False)),
    )


def embed_options(cfg: GridConfig) -> dict[str, Any]:
    """A stage config's embedding settings, as :func:`embbench.embed.embed_splits` takes them."""
    return {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "device": cfg.device,
            "precision": cfg.precision}


class PretrainedEmbedder:
    """One embedder per model for a run (created once, shared by identity and produce)."""

    def __init__(self, cfg: GridConfig) -> None:
        self.cfg = cfg
        self._embedders: dict[str, Any] = {}

    def __call__(self, model: str) -> Any:
        """The embedder of ``model`` with the configured weights."""
        if model not in self._embedders:

            self._embedders[model] = create_embedder(model, weights=self.cfg.weights)
        return self._embedders[model]

    def cache_keys(self, model: str, inputs: CellInputs, splits: Sequence[str]) -> dict:
        """The embedding cache keys of ``splits`` of ``inputs``' catalogue."""
        emb = self(model)
        return {s: embedding_cache(emb, inputs.catalogue, s).key for s in sorted(set(splits))}

    def embed(self, model: str, inputs: CellInputs, splits: Sequence[str]) -> dict:
        """``{split: EmbeddingSet}``, computed or read from the cache."""
        return embed_splits(self(model), inputs.catalogue, sorted(set(splits)),
                            **embed_options(self.cfg))


class EmbedSteps:
    """Stage 01's steps for the cell engine."""

    def __init__(self, cfg: EmbedConfig) -> None:
        self.cfg = cfg
        self.embedders = PretrainedEmbedder(cfg)

    def grid(self) -> list[Cell]:
        """Every (model, dataset) pair, dataset by dataset."""
        return [Cell(STAGE, MODE, m, d) for d in self.cfg.datasets for m in self.cfg.models]

    def check(self, cells: Sequence[Cell], inputs: Mapping[str, CellInputs]) -> list[str]:
        """The weights setting must be usable."""
        problem = weights_problem(self.cfg.weights)
        return [problem] if problem else []

    def identity(self, cell: Cell, inputs: CellInputs) -> dict[str, Any]:
        """The cache keys of the vectors this cell scores."""
        return {"caches": self.embedders.cache_keys(cell.model, inputs, inputs.plan.splits)}

    def produce(self, cell: Cell, inputs: CellInputs) -> Produced:
        """Embed the plan's splits with the pretrained model."""
        t0 = time.perf_counter()
        sets = self.embedders.embed(cell.model, inputs, inputs.plan.splits)
        emb = self.embedders(cell.model)
        return Produced(
            query=sets[inputs.plan.query_split],
            index=sets[inputs.plan.index_split],
            lineage=lineage_of(emb, cell.model),
            spec=emb.spec,
            timings={"embed_s": round(time.perf_counter() - t0, 3)},
        )


def run_embed(cfg: EmbedConfig, store: ResultStore | None = None) -> pd.DataFrame:
    """Run every (model, dataset) cell of ``cfg``; return one row per cell with its metrics."""
    records = run_grid(cfg, EmbedSteps(cfg), store=store)
    return pd.DataFrame([record_row(r) for r in records])


__all__ = ["EmbedConfig", "EmbedSteps", "PretrainedEmbedder", "embed_options", "lineage_of",
           "run_embed", "weights_problem"]
