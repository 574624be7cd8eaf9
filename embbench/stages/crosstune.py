"""Stage 04 (notebook ``04_crosstune``): tuned on dataset A, evaluated on dataset B.

Two kinds of cells, both run by the cell engine and scored with the same protocol as stage 01:

- ``cross-tuned``: the model fine-tuned on A (stage 02, head removed) embeds target B;
- ``cross-top-tuned``: the MLP top-tuned on X (stage 03) is applied to Y's pretrained
  embeddings.

Each record carries the pretrained model's metrics on the same target data (scored in the same
cell, with the same backend) and so the differences the paper plots in figure 7.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from embbench.cache import EmbeddingCache
from embbench.cells import Cell, CellInputs, Produced, StageSteps, run_grid
from embbench.config import GridConfig, register_stage
from embbench.embed import embed_splits, embedding_cache
from embbench.models import create_embedder, get_model_spec
from embbench.models.finetuned import find_finetuned, register_finetuned_models
from embbench.paths import runs_dir
from embbench.records import Lineage, ResultRecord, ResultStore, record_row
from embbench.stagekit import EmbedderPool, embed_options, lineage_of, weights_problem
from embbench.toptune import load_toptuned

logger = logging.getLogger(__name__)

STAGE = "crosstune"
CROSS_TUNED = "cross-tuned"
CROSS_TOP_TUNED = "cross-top-tuned"
CROSSTUNE_VERSION = 2  # bump when this module changes what it computes


def _below_runs(path: str | None) -> str | None:
    """``path`` relative to the runs folder when it is inside it (else as it is)."""
    if not path:
        return path
    try:
        return Path(path).resolve().relative_to(runs_dir().resolve()).as_posix()
    except ValueError:
        return path


@register_stage("04_crosstune")
class CrosstuneConfig(GridConfig):
    """Parameters of stage 04, mirrored by ``notebooks/04_crosstune.ipynb`` and its params file.

    ``models`` are the base models; ``datasets`` the targets B / Y; ``weights`` the weights of
    the pretrained baseline and of the top-tuning inputs. The shared fields are documented in
    :class:`~embbench.config.GridConfig`.
    """

    # the 02_finetune recipe of the fine-tuned models (the demo's: transfer, params/small/)
    recipe: Literal["A1", "A2", "A3", "transfer"] = "A2"
    finetuned_on: list[str] = Field(default_factory=list)  # source datasets A ([] = none)
    toptuned_on: list[str] = Field(default_factory=list)  # source datasets X ([] = none)
    include_diagonal: bool = False  # also score source == target (stages 02/03 do already)
    skip_missing: bool = False  # skip cells whose source model is missing instead of failing

    hash_exclude = GridConfig.hash_exclude | {
        "finetuned_on",
        "toptuned_on",
        "include_diagonal",
        "skip_missing",
    }

    def grid_datasets(self) -> list[str]:
        """The targets and the source datasets (whose ``data_options`` name their models)."""
        return list(dict.fromkeys([*self.datasets, *self.finetuned_on, *self.toptuned_on]))

    @model_validator(mode="after")
    def _some_source(self) -> CrosstuneConfig:
        if not self.finetuned_on and not self.toptuned_on:
            raise ValueError(
                "finetuned_on and toptuned_on are both empty: name the datasets the models "
                "were fine-tuned (02_finetune) or top-tuned (03_toptune) on"
            )
        return self


def grid(cfg: CrosstuneConfig) -> list[Cell]:
    """Every cell of ``cfg`` (sources found or not), in run order."""
    cells = []
    for target in cfg.datasets:
        for model in cfg.models:
            for mode, sources in (
                (CROSS_TUNED, cfg.finetuned_on),
                (CROSS_TOP_TUNED, cfg.toptuned_on),
            ):
                for source in sources:
                    if source != target or cfg.include_diagonal:
                        cells.append(Cell(STAGE, mode, model, target, source))
    return cells


def missing_text(cfg: CrosstuneConfig, cell: Cell) -> str:
    """What is missing for ``cell`` and the stage that makes it."""
    if cell.mode == CROSS_TUNED:
        return (
            f"{cell.model} fine-tuned on {cell.source} with recipe {cfg.recipe} "
            f"(02_finetune models=[{cell.model}] datasets=[{cell.source}] recipe={cfg.recipe})"
        )
    return (
        f"{cell.model} top-tuned on {cell.source} "
        f"(03_toptune models=[{cell.model}] datasets=[{cell.source}])"
    )


class CrosstuneSteps(StageSteps):
    """Stage 04's steps for the cell engine."""

    def __init__(self, cfg: CrosstuneConfig, store: ResultStore) -> None:

        self.cfg = cfg
        self.store = store
        self.pretrained = EmbedderPool(cfg)
        self._sources: dict[Cell, Any] = {}
        self._finetuned: dict[str, Any] = {}
        register_finetuned_models()
        self.cells = grid(cfg)
        self.missing = [c for c in self.cells if self.source(c) is None]

    def source(self, cell: Cell) -> Any:
        """The fine-tuned index entry, or the newest top-tuning record, of a cell's source."""
        if cell not in self._sources:
            if cell.mode == CROSS_TUNED:
                self._sources[cell] = find_finetuned(cell.model, cell.source, self.cfg.recipe)
            else:
                self._sources[cell] = self._toptuned(cell.model, cell.source)
        return self._sources[cell]

    def _toptuned(self, model: str, dataset: str) -> ResultRecord | None:

        name = get_model_spec(model).name
        hits = [
            r
            for r in self.store.records("toptune")
            if r.model in (model, name)
            and r.dataset == dataset
            and r.mode == "top-tuned"
            and r.toptune_model_path
        ]
        return max(hits, key=lambda r: r.saved or "") if hits else None

    def grid(self) -> list[Cell]:
        """The cells whose source exists (all of them unless ``skip_missing``)."""
        for cell in self.missing:
            if self.cfg.skip_missing:
                logger.warning("skipping %s: missing %s", cell, missing_text(self.cfg, cell))
        return [c for c in self.cells if c not in self.missing or not self.cfg.skip_missing]

    def check(self, cells: Sequence[Cell], inputs: Mapping[str, CellInputs]) -> list[str]:
        """Every source model must exist (unless skipped), and the weights must be usable."""
        problems = [weights_problem(self.cfg.weights)]
        problems += [
            f"missing source model: {missing_text(self.cfg, c)}. Run that stage first, or set "
            "skip_missing: true"
            for c in cells
            if c in self.missing
        ]
        return [p for p in problems if p]

    def _finetuned_embedder(self, cell: Cell) -> Any:
        name = self.source(cell)["spec"]["name"]
        if name not in self._finetuned:
            self._finetuned[name] = create_embedder(name)
        return self._finetuned[name]

    def identity(self, cell: Cell, inputs: CellInputs) -> dict[str, Any]:
        """The source model's identity and the cache keys of the vectors scored."""
        src = self.source(cell)
        splits = inputs.plan.splits
        base = {
            "version": CROSSTUNE_VERSION,
            "pretrained": self.pretrained.cache_keys(cell.model, inputs, splits),
        }
        if cell.mode == CROSS_TUNED:
            emb = self._finetuned_embedder(cell)
            keys = {s: embedding_cache(emb, inputs.catalogue, s).key for s in splits}
            return {
                **base,
                "train_hash": src.get("train_hash"),
                "sha256": src.get("sha256"),
                "caches": keys,
            }
        return {
            **base,
            "toptune_hash": src.config_hash,
            # where the head is below the runs folder: the same key in every home (a cluster
            # mounting the runs elsewhere, a moved checkout) for the same head
            "toptune_model_path": _below_runs(src.toptune_model_path),
        }

    def produce(self, cell: Cell, inputs: CellInputs) -> Produced:
        """Embed the target with the tuned model; the pretrained embeddings are the baseline."""
        t0 = time.perf_counter()
        splits = inputs.plan.splits
        pre = self.pretrained.embed(cell.model, inputs, splits)
        base_lineage = lineage_of(self.pretrained(cell.model), cell.model)
        src = self.source(cell)
        if cell.mode == CROSS_TUNED:
            emb = self._finetuned_embedder(cell)
            sets = embed_splits(
                emb,
                inputs.catalogue,
                splits,
                overwrite=self.cfg.overwrite == "always",
                **embed_options(self.cfg, cell.model),
            )
            used = dict(emb.weights_used)
            start = (src.get("start_weights") or {}).get("kind")
            lineage = Lineage(
                base_model=cell.model,
                weights=used,
                weights_kind=str(used.get("kind")),
                finetuned_on=cell.source,
                finetune_recipe=src.get("recipe"),
                finetune_start=start or "unknown",
            )
            toptune_model_path = None
            details = {
                "finetuned_model": src["spec"]["name"],
                "train_hash": src.get("train_hash"),
                "checkpoint": src["spec"].get("checkpoint_path"),
                "checkpoint_sha256": src.get("sha256"),
            }
            spec = emb.spec
        else:
            sets = self._apply_toptuned(cell, src, pre)
            lineage = base_lineage.model_copy(update={"toptuned_on": cell.source})
            toptune_model_path = src.toptune_model_path
            details = {
                "toptune_record_hash": src.config_hash,
                "source_caches": {s: str(es.path) for s, es in pre.items()},
            }
            spec = self.pretrained(cell.model).spec
        q, i = inputs.plan.query_split, inputs.plan.index_split
        return Produced(
            query=sets[q],
            index=sets[i],
            lineage=lineage,
            spec=spec,
            timings={"embed_s": round(time.perf_counter() - t0, 3)},
            toptune_model_path=toptune_model_path,
            details={**details, "crosstune_version": CROSSTUNE_VERSION},
            tags={"recipe": str(src.get("recipe"))} if cell.mode == CROSS_TUNED else {},
            baseline=(pre[q], pre[i]),
        )

    def _apply_toptuned(self, cell: Cell, record: ResultRecord, pre: Mapping) -> dict:
        """Y's pretrained embeddings through the MLP top-tuned on X, cached."""
        src_kind = record.lineage.weights_kind
        tgt_kind = self.pretrained(cell.model).weights_used.get("kind")
        if src_kind != tgt_kind:
            logger.warning(
                "%s: the MLP top-tuned on %s took %s embeddings, the target's are %s; "
                "set weights as in 03_toptune",
                cell.model,
                cell.source,
                src_kind,
                tgt_kind,
            )
        mlp = load_toptuned(str(record.toptune_model_path))
        out = {}
        for split, es in pre.items():
            identity = {
                "source_cache": es.meta.get("key"),
                "toptune_hash": record.config_hash,
                "mode": CROSS_TOP_TUNED,
                "tuned_on": cell.source,
                "normalized": False,
                "crosstune_version": CROSSTUNE_VERSION,
            }
            cache = EmbeddingCache(cell.dataset, cell.model, split, identity)
            if cache.is_complete() and self.cfg.overwrite == "never":
                out[split] = cache.load()
                continue
            vectors = (
                mlp.embed(np.asarray(es.vectors))
                if len(es.vectors)
                else np.zeros((0, mlp.embed_dim), np.float32)
            )
            out[split] = cache.save_complete(
                vectors,
                es.item_ids,
                failed=list(es.failed),
                provenance={"toptune_model_path": str(mlp.path), "tuned_on": cell.source},
            )
        return out


def run_crosstune(cfg: CrosstuneConfig, store: ResultStore | None = None) -> pd.DataFrame:
    """Score every cell of the grid (skipping finished ones); one row per cell.

    Returns:
        Columns: mode, model, source, dataset (the target), the retrieval metrics, the
        pretrained metrics (``pretrained_<metric>``) and their differences (``delta_<metric>``),
        and the MLflow run id. Missing cells (``skip_missing``) have a ``status`` saying what to
        run.

    Raises:
        GridError: A source model is missing (unless ``skip_missing``), listing every missing
            cell and the stage to run.
    """
    store = store or ResultStore()
    steps = CrosstuneSteps(cfg, store)
    records = run_grid(cfg, steps, store=store)
    rows = [{**record_row(r), "source": r.tuned_on, "status": "done"} for r in records]
    rows += [
        {
            "mode": c.mode,
            "model": c.model,
            "source": c.source,
            "dataset": c.dataset,
            "status": "missing: " + missing_text(cfg, c),
        }
        for c in steps.missing
    ]
    columns = None if rows else ["mode", "model", "source", "dataset", "status"]
    return pd.DataFrame(rows, columns=columns)


def delta_matrix(results: pd.DataFrame, mode: str, metric: str = "mMP@5") -> pd.DataFrame:
    """Source x target table of the mean ``delta_<metric>`` over models (figure 7's numbers).

    Args:
        results: A :func:`run_crosstune` table.
        mode: ``cross-tuned`` or ``cross-top-tuned``.
        metric: The retrieval metric.

    Returns:
        Rows = source dataset (fine-tuned or top-tuned on), columns = target dataset.
    """
    col = f"delta_{metric}"
    sub = results[(results["mode"] == mode)] if "mode" in results else results.iloc[:0]
    if col not in sub or sub.empty:
        return pd.DataFrame()
    return sub.pivot_table(index="source", columns="dataset", values=col, aggfunc="mean")


__all__ = [
    "CROSS_TOP_TUNED",
    "CROSS_TUNED",
    "CrosstuneConfig",
    "CrosstuneSteps",
    "delta_matrix",
    "grid",
    "missing_text",
    "run_crosstune",
]
