"""Stage 01 (notebook ``01_embed``): pretrained embeddings -> retrieval metrics.

For every (model, dataset) cell, the cell engine loads the catalogue and plans retrieval; this
stage's ``produce`` step embeds the splits the plan needs (cached, resumable) with the model's
own preprocessing. The engine scores them with the chosen backend (Milvus by default, built from
the cache; or the exact in-process backend), writes the record and logs one MLflow run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import Field

from embbench._threads import ThreadBudget, apply_thread_budget, resolve_thread_budget
from embbench._torch_utils import resolve_device
from embbench.cells import Cell, CellInputs, Produced, run_grid
from embbench.config import GridConfig, register_stage
from embbench.embed import embed_split, embedding_cache
from embbench.models import create_embedder, model_facts
from embbench.records import Lineage, ResultStore, record_row
from embbench.stages import _variants as V

logger = logging.getLogger(__name__)

STAGE = "embed"
MODE = "pretrained"


@register_stage("01_embed")
class EmbedConfig(GridConfig):
    """Parameters of stage 01, mirrored by ``notebooks/01_embed.ipynb`` and its params file.

    The shared fields are declared in :class:`~embbench.config.GridConfig`; these add the
    deployment variants (:mod:`embbench.stages._variants`), each scored as a cell of its own.
    """

    # float16 | int8 | binary | pca_half | pca_quarter | pca_eighth | pca<N> | default (all)
    compressions: list[str] = Field(default_factory=list)
    pca_whiten: bool = False  # whiten the PCA variants
    # FLAT | IVF_FLAT | IVF_SQ8 | IVF_PQ | HNSW | SCANN | DISKANN | IVF_RABITQ | default (all)
    indexes: list[str] = Field(default_factory=list)
    deploy_timings: bool = True  # measure index latency/memory (faiss, or the Milvus server)
    variant_models: list[str] = Field(default_factory=list)  # models with variants; [] = all

    hash_exclude = GridConfig.hash_exclude | {"compressions", "indexes", "deploy_timings",
                                              "variant_models"}


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


def thread_budget(cfg: GridConfig, model: str | None = None) -> ThreadBudget:
    """Split the cores between DataLoader workers and torch threads, apply it and log it.

    With both ``threads`` and ``num_workers`` on ``auto`` on a CPU, the model's forward FLOPs
    (:func:`embbench.models.model_facts`, cached per machine) decide the split.
    """
    gflops = None
    if model and cfg.threads == "auto" and cfg.num_workers == "auto":
        try:
            gflops = float(model_facts(model)["gflops"])
        except Exception as exc:  # noqa: BLE001 - facts are advice; the rule works without
            logger.debug("no FLOP count for %s (%s); the thread rule assumes decode-bound",
                         model, exc)
    budget = resolve_thread_budget(cfg.threads, cfg.num_workers, resolve_device(cfg.device),
                                   gflops_per_image=gflops)
    apply_thread_budget(budget)
    return budget


def embed_options(cfg: GridConfig, model: str | None = None) -> dict[str, Any]:
    """A stage config's embedding settings, as :func:`embbench.embed.embed_splits` takes them.

    The thread budget is applied here (torch threads set; workers passed on).
    """
    budget = thread_budget(cfg, model)
    return {"batch_size": cfg.batch_size, "num_workers": budget.workers, "device": cfg.device,
            "precision": cfg.precision}


class PretrainedEmbedder:
    """One embedder per model for a run (created once, shared by identity and produce)."""

    def __init__(self, cfg: GridConfig) -> None:
        self.cfg = cfg
        self._embedders: dict[str, Any] = {}
        self._recomputed: set[str] = set()  # cache keys embedded again by this run

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
        """``{split: EmbeddingSet}``, computed or read from the cache.

        Under ``overwrite: always`` each split's vectors are embedded again, once per run (the
        cells that share them, e.g. deployment variants or the top-tuning baseline, reuse the
        fresh ones).
        """
        emb, options = self(model), embed_options(self.cfg, model)
        out = {}
        for split in sorted(set(splits)):
            key = embedding_cache(emb, inputs.catalogue, split).key
            again = self.cfg.overwrite == "always" and key not in self._recomputed
            out[split] = embed_split(emb, inputs.catalogue, split, overwrite=again, **options)
            self._recomputed.add(key)
        return out


class EmbedSteps:
    """Stage 01's steps for the cell engine."""

    def __init__(self, cfg: EmbedConfig) -> None:
        self.cfg = cfg
        self.embedders = PretrainedEmbedder(cfg)
        self.variants: dict[tuple[str, str, str], Any] = {}

    def grid(self) -> list[Cell]:
        """Every (model, dataset) pair, dataset by dataset (variants follow in :meth:`expand`)."""
        return [Cell(STAGE, MODE, m, d) for d in self.cfg.datasets for m in self.cfg.models]

    def check(self, cells: Sequence[Cell], inputs: Mapping[str, CellInputs]) -> list[str]:
        """The weights setting must be usable; variants need known names and a train split."""
        problems = [weights_problem(self.cfg.weights)]
        try:
            V.compression_specs(self.cfg.compressions, 1024, self.cfg.pca_whiten)
            V.index_specs(self.cfg.indexes, 1000, 64, self.cfg.k)
        except ValueError as exc:
            problems.append(str(exc))
        if self.cfg.compressions:
            problems += [
                f"dataset {name!r}: compression variants are fitted on a 'train' split, the "
                f"catalogue has {inp.catalogue.splits}" for name, inp in inputs.items()
                if "train" not in inp.catalogue.splits
            ]
        if "DISKANN" in self.cfg.indexes and not self.cfg.milvus_uri.startswith("http"):
            problems.append("index DISKANN needs a Milvus server: set milvus_uri: "
                            "http://host:19530 (Milvus Lite and faiss have no DiskANN)")
        return [p for p in problems if p]

    def expand(self, cells: Sequence[Cell], inputs: Mapping[str, CellInputs]) -> list[Cell]:
        """Each float32 cell followed by its compression and index variant cells."""
        out: list[Cell] = []
        for cell in cells:
            out.append(cell)
            if cell.variant or not (self.cfg.compressions or self.cfg.indexes):
                continue
            if self.cfg.variant_models and cell.model not in self.cfg.variant_models:
                continue
            inp = inputs[cell.dataset]
            dim = int(self.embedders(cell.model).embed_dim)
            n = len(inp.catalogue.split(inp.plan.index_split))
            n_train = len(inp.catalogue.split("train")) if "train" in inp.catalogue.splits else 0
            specs = [*V.compression_specs(self.cfg.compressions, dim, self.cfg.pca_whiten,
                                          n_train),
                     *V.index_specs(self.cfg.indexes, n, dim, self.cfg.k)]
            for spec in specs:
                self.variants[(cell.model, cell.dataset, spec.name)] = spec
                out.append(Cell(STAGE, MODE, cell.model, cell.dataset, variant=spec.name))
        return out

    def _splits(self, cell: Cell, inputs: CellInputs) -> list[str]:
        """The plan's splits, plus train for a compression variant (fitted there)."""
        spec = self.variants.get((cell.model, cell.dataset, cell.variant or ""))
        extra = ["train"] if spec is not None and hasattr(spec, "kind") else []
        return sorted({*inputs.plan.splits, *extra})

    def identity(self, cell: Cell, inputs: CellInputs) -> dict[str, Any]:
        """The cache keys of the vectors this cell scores (and the variant's parameters)."""
        keys = self.embedders.cache_keys(cell.model, inputs, self._splits(cell, inputs))
        spec = self.variants.get((cell.model, cell.dataset, cell.variant or ""))
        return {"caches": keys, **({"variant": spec.params()} if spec is not None else {})}

    def produce(self, cell: Cell, inputs: CellInputs) -> Produced:
        """Embed the plan's splits with the pretrained model (then apply the cell's variant)."""
        t0 = time.perf_counter()
        sets = self.embedders.embed(cell.model, inputs, self._splits(cell, inputs))
        emb = self.embedders(cell.model)
        base = Produced(
            query=sets[inputs.plan.query_split],
            index=sets[inputs.plan.index_split],
            lineage=lineage_of(emb, cell.model),
            spec=emb.spec,
            timings={"embed_s": round(time.perf_counter() - t0, 3)},
        )
        spec = self.variants.get((cell.model, cell.dataset, cell.variant or ""))
        if spec is None:
            return base
        if hasattr(spec, "kind"):
            return V.produce_compressed(spec, sets, inputs, base)
        return V.produce_index(spec, inputs, base, milvus_uri=self.cfg.milvus_uri,
                               token=os.environ.get("MILVUS_TOKEN", ""),
                               timings=self.cfg.deploy_timings, k=self.cfg.k)


def run_embed(cfg: EmbedConfig, store: ResultStore | None = None) -> pd.DataFrame:
    """Run every (model, dataset) cell of ``cfg``; return one row per cell with its metrics."""
    records = run_grid(cfg, EmbedSteps(cfg), store=store)
    return pd.DataFrame([record_row(r) for r in records])


__all__ = ["EmbedConfig", "EmbedSteps", "PretrainedEmbedder", "embed_options", "lineage_of",
           "run_embed", "weights_problem"]
