"""Stage 01 (notebook ``01_embed``): pretrained embeddings -> retrieval metrics.

For every (model, dataset) cell, the cell engine loads the catalogue and plans retrieval; this
stage's ``produce`` step embeds the splits the plan needs (cached, resumable) with the model's
own preprocessing. The engine scores them with the chosen backend (Milvus by default, built from
the cache; or the exact in-process backend), writes the record and logs one MLflow run.
"""

from __future__ import annotations

import difflib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pandas as pd
from pydantic import Field, field_validator

from embbench._ray import RayRunError, import_ray
from embbench.cells import Cell, CellInputs, Produced, StageSteps, run_grid
from embbench.config import GridConfig, register_stage
from embbench.embed_ray import RayEmbedOptions
from embbench.records import ResultStore, record_row
from embbench.stagekit import EmbedderPool, lineage_of, weights_problem
from embbench.stages import _text_tasks, _variants
from embbench.text import DEFAULT_TEMPLATES, validate_templates
from embbench.vocab import Task

logger = logging.getLogger(__name__)

STAGE = "embed"
MODE = "pretrained"
EMBED_ENGINES = ("local", "ray")
RAY_FIELDS = ("embed_engine", "ray_address", "ray_actors", "ray_actor_gpus", "ray_actor_cpus")


@register_stage("01_embed")
class EmbedConfig(GridConfig):
    """Parameters of stage 01, mirrored by ``notebooks/01_embed.ipynb`` and its params file.

    The shared fields are declared in :class:`~embbench.config.GridConfig`; these add the
    deployment variants (:mod:`embbench.stages._variants`), each scored as a cell of its own,
    and where missing vectors are embedded (``embed_engine``: this process, or a Ray Data actor
    pool, :mod:`embbench.embed_ray`; the same cache, so neither the hash nor the cache key
    depends on it).
    """

    # float16 | int8 | binary | pca_half | pca_quarter | pca_eighth | pca<N> | default (all)
    compressions: list[str] = Field(default_factory=list)
    pca_whiten: bool = False  # whiten the PCA variants
    # FLAT | IVF_FLAT | IVF_SQ8 | IVF_PQ | HNSW | SCANN | DISKANN | IVF_RABITQ | default (all)
    indexes: list[str] = Field(default_factory=list)
    deploy_timings: bool = True  # measure index latency/memory (faiss, or the Milvus server)
    variant_models: list[str] = Field(default_factory=list)  # models with variants; [] = all
    # image-image | text-image | image-text | zero-shot (text tasks: text-image models only)
    tasks: list[Task] = Field(default_factory=lambda: ["image-image"])
    # class-prompt templates, each with one {} for the class name
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    text_column: str = ""  # item-text column; "" = the catalogue's own (title/text), if any
    # where missing vectors are embedded: local (this process) | ray (a Ray Data actor pool,
    # pip install 'embbench[ray]'); both write the same cache, the same vectors
    embed_engine: str = "local"
    ray_address: str = ""  # "" = the running Ray, else Ray's default; local | auto | HOST:6379
    ray_actors: int = Field(0, ge=0)  # 0 = one per GPU of the cluster, else per free CPUs
    ray_actor_gpus: float | Literal["auto"] = "auto"  # per actor; auto = 1 if GPUs, else 0
    ray_actor_cpus: float = Field(1.0, gt=0)  # CPUs (decoding threads) per actor

    # tasks, templates and text column change only the text cells: in their identity instead
    hash_exclude = GridConfig.hash_exclude | {
        "compressions",
        "indexes",
        "deploy_timings",
        "variant_models",
        "tasks",
        "templates",
        "text_column",
        *RAY_FIELDS,  # where the vectors are computed, not what they are
    }

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t in ("probe", "knn")]
        if bad:
            raise ValueError(f"{bad} run in stage 03 (params/03_toptune.yaml `baselines`)")
        if not v:
            raise ValueError("must name at least one task, e.g. [image-image]")
        return list(dict.fromkeys(v))

    @field_validator("embed_engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        if v not in EMBED_ENGINES:
            close = difflib.get_close_matches(v, EMBED_ENGINES, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"choose one of {list(EMBED_ENGINES)}{hint}")
        return v

    @field_validator("ray_actor_gpus")
    @classmethod
    def _gpus(cls, v: float | str) -> float | str:
        if v != "auto" and v < 0:
            raise ValueError("must be 'auto' or a number of GPUs >= 0 (0: CPU actors)")
        return v

    def ray_options(self) -> RayEmbedOptions | None:
        """The Ray Data actor pool of ``embed_engine: ray`` (``None`` for ``local``)."""
        if self.embed_engine != "ray":
            return None
        gpus = None if self.ray_actor_gpus == "auto" else float(self.ray_actor_gpus)
        return RayEmbedOptions(self.ray_address, self.ray_actors, gpus, self.ray_actor_cpus)

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        return list(validate_templates(v, "templates"))


class EmbedSteps(StageSteps):
    """Stage 01's steps for the cell engine."""

    def __init__(self, cfg: EmbedConfig) -> None:
        self.cfg = cfg
        self.text_models = _text_tasks.text_models(cfg.models, cfg.tasks)
        self.embedders = EmbedderPool(cfg, self.text_models, ray=cfg.ray_options())
        self.variants: dict[tuple[str, str, str], Any] = {}

    def grid(self) -> list[Cell]:
        """Every (model, dataset) pair, dataset by dataset, each with its text task cells.

        Variants (and item-text queries) follow in :meth:`expand`.
        """
        _text_tasks.log_image_only(self.cfg.models, self.cfg.tasks, self.text_models)
        out = []
        for d in self.cfg.datasets:
            for m in self.cfg.models:
                cell = Cell(STAGE, MODE, m, d)
                out += [cell] if "image-image" in self.cfg.tasks else []
                out += _text_tasks.text_cells(cell, self.cfg.tasks, self.text_models)
        return out

    def check(self, cells: Sequence[Cell], inputs: Mapping[str, CellInputs]) -> list[str]:
        """The weights setting must be usable; variants need known names and a train split."""
        problems = [weights_problem(self.cfg.weights)]
        if self.cfg.embed_engine == "ray":
            try:
                import_ray("embed_engine: ray")
            except RayRunError as exc:
                problems.append(str(exc))
        problems += _text_tasks.check_text_grid(
            self.cfg.models, self.cfg.tasks, self.cfg.text_column, inputs
        )
        try:
            _variants.compression_specs(self.cfg.compressions, 1024, self.cfg.pca_whiten)
            _variants.index_specs(self.cfg.indexes, 1000, 64, self.cfg.k)
        except ValueError as exc:
            problems.append(str(exc))
        if self.cfg.compressions:
            problems += [
                f"dataset {name!r}: compression variants are fitted on a 'train' split, the "
                f"catalogue has {inp.catalogue.splits}"
                for name, inp in inputs.items()
                if "train" not in inp.catalogue.splits
            ]
        if "DISKANN" in self.cfg.indexes and not self.cfg.milvus_uri.startswith("http"):
            problems.append(
                "index DISKANN needs a Milvus server: set milvus_uri: "
                "http://host:19530 (Milvus Lite and faiss have no DiskANN)"
            )
        return [p for p in problems if p]

    def expand(self, cells: Sequence[Cell], inputs: Mapping[str, CellInputs]) -> list[Cell]:
        """Each float32 cell followed by its compression and index variant cells.

        Text cells get their item-text queries (:func:`~embbench.stages._text_tasks.expand_text`).
        """
        out: list[Cell] = []
        for cell in _text_tasks.expand_text(cells, self.cfg.text_column, inputs):
            out.append(cell)
            if cell.task != "image-image" or cell.variant:
                continue
            if not (self.cfg.compressions or self.cfg.indexes):
                continue
            if self.cfg.variant_models and cell.model not in self.cfg.variant_models:
                continue
            inp = inputs[cell.dataset]
            dim = int(self.embedders(cell.model).embed_dim)
            n = len(inp.catalogue.split(inp.plan.index_split))
            n_train = len(inp.catalogue.split("train")) if "train" in inp.catalogue.splits else 0
            specs = [
                *_variants.compression_specs(
                    self.cfg.compressions, dim, self.cfg.pca_whiten, n_train
                ),
                *_variants.index_specs(self.cfg.indexes, n, dim, self.cfg.k),
            ]
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
        if cell.task != "image-image":
            return _text_tasks.text_identity(
                self.embedders, cell, inputs, self.cfg.templates, self.cfg.text_column
            )
        keys = self.embedders.cache_keys(cell.model, inputs, self._splits(cell, inputs))
        spec = self.variants.get((cell.model, cell.dataset, cell.variant or ""))
        return {"caches": keys, **(_variants.variant_identity(spec) if spec is not None else {})}

    def produce(self, cell: Cell, inputs: CellInputs) -> Produced:
        """Embed the plan's splits with the pretrained model (then apply the cell's variant).

        A text cell scores its text task on the same cached image vectors.
        """
        t0 = time.perf_counter()
        if cell.task != "image-image":
            produced = _text_tasks.produce_text(
                self.embedders,
                cell,
                inputs,
                templates=self.cfg.templates,
                text_column=self.cfg.text_column,
                k=self.cfg.k,
                overwrite=self.cfg.overwrite == "always",
                seed=self.cfg.seed,
            )
            produced.timings = {"embed_s": round(time.perf_counter() - t0, 3)}
            return produced
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
            return _variants.produce_compressed(spec, sets, inputs, base)
        return _variants.produce_index(
            spec,
            inputs,
            base,
            milvus_uri=self.cfg.milvus_uri,
            token=os.environ.get("MILVUS_TOKEN", ""),
            timings=self.cfg.deploy_timings,
            k=self.cfg.k,
        )


def run_embed(cfg: EmbedConfig, store: ResultStore | None = None) -> pd.DataFrame:
    """Run every (model, dataset) cell of ``cfg``; return one row per cell with its metrics."""
    records = run_grid(cfg, EmbedSteps(cfg), store=store)
    return pd.DataFrame([record_row(r) for r in records])


__all__ = ["EmbedConfig", "EmbedSteps", "run_embed"]
