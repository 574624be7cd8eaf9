"""The cell engine: the one loop that runs a stage's grid of (model, dataset) cells.

Every stage (01 embed, 02 fine-tune, 03 top-tune, 04 cross-tune) is a grid of cells. The engine
owns everything the cells share, in this order:

1. **validate the whole grid up front**: every model, dataset, data root, label, protocol and the
   retrieval backend are checked before the first cell runs, so a typo in the fifth model fails
   in seconds, not after four models have run;
2. **load** each dataset's catalogue once (fetching http(s) rows of a manifest) and **plan** its
   retrieval (label, protocol, query and index splits);
3. per cell: compute the **cell hash** (the stage config's hash, the plan, the catalogue's
   fingerprint (its images' content, root and labels), the stage's identity of its inputs),
   **skip** a finished cell or recompute it (``overwrite``), open the cell's **single MLflow
   run** (started when the cell's work starts), call the stage's **produce**
   step, **score** retrieval with the backend object, and **write the record**.

A stage supplies a :class:`StageSteps` object: its grid, its extra checks, the identity of a
cell's inputs (for the hash), the cells known only once the data is loaded (``expand``) and the
``produce`` step that returns the query and index embeddings with their lineage. The pre-work
check lives in :mod:`embbench.cells_validate`, the cell's MLflow run and its logging in
:mod:`embbench.tracking_runs`, and the record is built by :meth:`ResultRecord.scored`.
This follows mteb's ``AbsTask`` (the task owns the loop, each task fills in its step) and
pytorch-metric-learning's injected ``knn_func`` (the backend is an object passed in, not a
string).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from embbench._torch_utils import DistInfo, barrier, init_distributed, resolve_device
from embbench._utils import hold_lock, stable_hash
from embbench.cache import EmbeddingSet
from embbench.cells_types import Cell, CellInputs, Produced, StageSteps
from embbench.cells_validate import GridError, validate_grid
from embbench.config import GridConfig
from embbench.datasets.prepare import RetrievalPlan, load_catalogue, retrieval_plan
from embbench.metrics import RetrievalResult
from embbench.models import get_model_spec
from embbench.records import CatalogueRef, ResultRecord, ResultStore
from embbench.retrieval import SearchBackend, create_backend, search_and_evaluate
from embbench.services import explain_mid_run
from embbench.tracking import (
    close_stale_run,
    default_tracking_uri,
    log_catalogue_input,
    provenance,
    setup_mlflow,
)
from embbench.tracking_runs import cell_run, log_record

logger = logging.getLogger(__name__)


# ---- loading a dataset for its cells -------------------------------------------------------
def load_cell_inputs(cfg: GridConfig, dataset: str) -> CellInputs:
    """Load ``dataset``'s catalogue as ``cfg`` asks, plan its retrieval, hash its images."""
    cat = load_catalogue(
        dataset,
        cfg.data_root,
        label=cfg.label,
        max_images=cfg.max_images,
        seed=cfg.seed,
        options=cfg.data_options.get(dataset),
    )
    plan = retrieval_plan(dataset, cat, cfg.label, cfg.protocol)
    # hash the images now, with the load (the first run reads each once; under torchrun rank 0
    # does it before the barrier, so the other ranks only stat the files)
    cat.fingerprint()
    return CellInputs(dataset, cat, plan)


# ---- the engine -------------------------------------------------------------------------------
class CellEngine:
    """Runs a stage's grid: validate, load, plan, hash, skip, produce, score, record.

    Args:
        cfg: The stage's config (the shared grid fields are read from it).
        steps: The stage's steps.
        store: The result store (default: the project's).
        backend: The retrieval backend object (default: created from ``cfg.backend``).
    """

    def __init__(
        self,
        cfg: GridConfig,
        steps: StageSteps,
        *,
        store: ResultStore | None = None,
        backend: SearchBackend | None = None,
    ) -> None:
        self.cfg = cfg
        self.steps = steps
        self.store = store or ResultStore()
        self._backend = backend
        self._owns_backend = backend is None
        self.inputs: dict[str, CellInputs] = {}
        self.dist = DistInfo()
        self._tracking_uri = ""

    def validate(self, cells: Sequence[Cell]) -> None:
        """Check the whole grid before any work (:func:`validate_grid`); load every dataset."""
        validate_grid(
            self.cfg,
            (c.model for c in cells),
            (c.dataset for c in cells),
            self.inputs_for,
            lambda: self.steps.check(cells, self.inputs),
            probe_milvus=self.dist.is_main,
        )

    def inputs_for(self, dataset: str) -> CellInputs:
        """The catalogue and plan of ``dataset`` (loaded once per engine)."""
        if dataset not in self.inputs:
            self.inputs[dataset] = load_cell_inputs(self.cfg, dataset)
        return self.inputs[dataset]

    @property
    def backend(self) -> SearchBackend:
        """The retrieval backend (created on first use from the config)."""
        if self._backend is None:
            kwargs: dict[str, Any] = {}
            if self.cfg.backend == "milvus":
                kwargs = {"uri": self.cfg.milvus_uri or None, "collection_prefix": "embbench"}
            self._backend = create_backend(self.cfg.backend, **kwargs)
        return self._backend

    def run(self, select: Callable[[Cell], bool] | None = None) -> list[ResultRecord]:
        """Validate the grid, then run every cell; return the records in grid order.

        Args:
            select: Run only the cells for which this returns true (e.g. the one cell of a
                pipeline task); the others are neither validated nor run.
        """
        # under torchrun every rank runs the grid; rank 0 loads first (it may generate the demo
        # catalogue), logs, locks and records, the others join the collective work of produce
        self.dist = init_distributed(resolve_device(self.cfg.device))
        cells = [c for c in self.steps.grid() if select is None or select(c)]
        records = []
        try:
            if self.dist.is_main:
                self.validate(cells)
                self._tracking_uri = default_tracking_uri(self.cfg.tracking_uri)
                setup_mlflow(self._tracking_uri, self.cfg.experiment)
            barrier(self.dist)
            if not self.dist.is_main:
                self.validate(cells)
            # cells known only once the data is (e.g. an index sweep)
            cells = [
                c for c in self.steps.expand(cells, self.inputs) if select is None or select(c)
            ]
            for i, cell in enumerate(cells, 1):
                logger.info("[%d/%d] %s", i, len(cells), cell)
                record = self.run_cell(cell)
                if record is not None:
                    records.append(record)
        except Exception as err:  # a lost service or a full/read-only disk: one line, no traceback
            uri = getattr(self._backend, "uri", "") or self.cfg.milvus_uri or "Milvus Lite"
            explain_mid_run(err, self._tracking_uri, str(uri))
            raise
        finally:
            if self._owns_backend and self._backend is not None:
                self._backend.close()
                self._backend = None
        return records

    def cell_hash(self, cell: Cell, inputs: CellInputs) -> str:
        """The hash of everything that changes the cell's result."""
        return stable_hash(
            {
                "cfg": self.cfg.config_hash(),
                "cell": [
                    cell.stage,
                    cell.mode,
                    cell.model,
                    cell.dataset,
                    cell.source,
                    cell.variant,
                    # image-image cells keep the hash they had before tasks existed
                    *([] if cell.task == "image-image" else [cell.task]),
                ],
                "plan": inputs.plan.as_dict(),
                # the images' content, root, ids, splits and labels: other data, another cell
                "dataset": inputs.catalogue.fingerprint(),
                "inputs": self.steps.identity(cell, inputs),
            }
        )

    def run_cell(self, cell: Cell) -> ResultRecord | None:
        """Run one cell (or read it back when finished and ``overwrite`` is ``never``).

        The cell's lock is held from the skip check to the record, so two runs of the same
        grid never compute (or log) one cell twice: the second waits, then skips it. Under
        torchrun, ranks other than 0 only take part in ``produce`` and return ``None``.
        """
        cfg, inputs = self.cfg, self.inputs_for(cell.dataset)
        chash = self.cell_hash(cell, inputs)
        where = (cell.stage, cell.dataset, cell.model, cell.mode, chash, cell.task)
        path = self.store.path(*where)
        if not self.dist.is_main:
            done = self.store.get(*where)
            if done is None or self.cfg.overwrite == "always":
                self.steps.produce(cell, inputs)
            barrier(self.dist)
            return None
        with hold_lock(path.with_name(path.name + ".lock"), str(cell)):
            done = self.store.get(*where)
            if done is not None and self.cfg.overwrite == "never":
                logger.info("skipped %s: finished earlier (record %s)", cell, path)
                close_stale_run(done.mlflow_run_id)
                return done
            started = datetime.now(UTC).isoformat()
            t0 = time.perf_counter()
            with self._cell_run(cell, chash, inputs) as run:
                produced = self.steps.produce(cell, inputs)
                record, per_query = score_cell(
                    cfg, lambda: self.backend, cell, inputs, chash, produced, started
                )
                record.timings.wall_s = round(time.perf_counter() - t0, 3)
                record.mlflow_run_id = run.info.run_id
                log_record(
                    record,
                    cfg.model_dump(mode="json", exclude=set(cfg.hash_exclude)),
                    {**cell_identity(cell), "data_root": cfg.data_root.get(cell.dataset)},
                    produced.tags,
                )
                self.store.save(record, per_query)
        barrier(self.dist)
        logger.info(
            "done %s in %.1f s: %s (record %s)",
            cell,
            record.timings.wall_s or 0.0,
            ", ".join(f"{k}={v:.4f}" for k, v in _headline(record).items()),
            path,
        )
        return record

    def _cell_run(self, cell: Cell, chash: str, inputs: CellInputs) -> Any:
        """The cell's one MLflow run (:func:`embbench.tracking_runs.cell_run`)."""
        spec = get_model_spec(cell.model)
        tags = {k: v for k, v in cell_identity(cell).items() if v}
        tags.update(
            config_hash=chash, family=spec.family, backbone=spec.backbone, weights=self.cfg.weights
        )
        cat, plan = inputs.catalogue, inputs.plan
        return cell_run(
            **cell_identity(cell, "source", "variant"),
            config_hash=chash,
            tags=tags,
            parent_run_id=lambda: self._variant_parent(cell),
            on_start=lambda: log_catalogue_input(
                cell.dataset, cat.root, cat.fingerprint(), "+".join(plan.splits)
            ),
        )

    def _variant_parent(self, cell: Cell) -> str | None:
        """The MLflow run of a deployment variant's plain cell (its parent in the UI)."""
        if not cell.variant:
            return None
        plain = replace(cell, variant=None)
        done = self.store.get(
            plain.stage,
            plain.dataset,
            plain.model,
            plain.mode,
            self.cell_hash(plain, self.inputs_for(cell.dataset)),
            plain.task,
        )
        return done.mlflow_run_id if done is not None else None


def score_cell(
    cfg: GridConfig,
    backend: Callable[[], SearchBackend],
    cell: Cell,
    inputs: CellInputs,
    chash: str,
    produced: Produced,
    started: str,
) -> tuple[ResultRecord, dict[str, np.ndarray]]:
    """Score the produced vectors (and the baseline) and build the cell's record.

    ``backend`` gives the engine's retrieval backend, created only when a search needs it.
    """
    cat = inputs.catalogue
    t0 = time.perf_counter()
    result = produced.result or evaluate_pair(
        produced.query, produced.index, inputs, k=cfg.k, backend=backend()
    )
    search_s = round(time.perf_counter() - t0, 3)
    pretrained = dict(produced.pretrained_metrics)
    if produced.baseline is not None:
        pretrained = dict(
            evaluate_pair(*produced.baseline, inputs, k=cfg.k, backend=backend()).summary
        )
    record = ResultRecord.scored(
        cell=cell_identity(cell, "", ""),
        config_hash=chash,
        spec=produced.spec,
        lineage=produced.lineage,
        backend=(produced.searched_with if produced.result is not None else None) or cfg.backend,
        k=cfg.k,
        plan=inputs.plan.as_dict(),
        result=result,
        vectors={"query": produced.query, "index": produced.index},
        catalogue=CatalogueRef(  # what a gallery reloads (and checks by the fingerprint)
            name=cell.dataset,
            root=str(Path(cat.root).resolve()) if cat.root else None,
            options=dict(cfg.data_options.get(cell.dataset) or {}),
            label=cfg.label,
            max_images=cfg.max_images,
            seed=cfg.seed,
        ),
        fingerprint=cat.fingerprint(),
        dataset_root=str(cat.root) if cat.root else None,
        config=cfg.model_dump(mode="json"),
        timings={**produced.timings, "search_s": search_s},
        classification=produced.classification,
        val_accuracy=produced.val_accuracy,
        pretrained_metrics=pretrained,
        toptune_model_path=produced.toptune_model_path,
        details=produced.details,
        provenance=provenance(),
        started=started,
    )
    if produced.record_fields:
        record = record.model_copy(update=produced.record_fields)
    per_query = {**result.per_query, "query_index": result.query_index, **produced.per_query}
    if getattr(result, "topk_ids", None) is not None:  # the ranking scored, for galleries
        per_query["topk_ids"] = result.topk_ids
    return record, per_query


def _headline(record: ResultRecord) -> dict[str, float]:
    """What a cell's "done" line shows: its retrieval metrics, else its test accuracy."""
    if record.metrics:
        return record.metrics
    keys = ("accuracy", "balanced_accuracy", "top5_accuracy")
    return {k: record.classification[k] for k in keys if k in record.classification}


def cell_identity(cell: Cell, source: str = "source_dataset", variant: str = "variant") -> dict:
    """``stage``, ``mode``, ``model``, ``dataset``, ``task`` of ``cell``, with source and variant.

    Args:
        cell: The cell.
        source: The key of its source dataset ("" leaves it out).
        variant: The key of its variant ("" leaves it out).
    """
    out: dict[str, Any] = {
        "stage": cell.stage,
        "mode": cell.mode,
        "model": cell.model,
        "dataset": cell.dataset,
        "task": cell.task,
    }
    out.update(
        {key: value for key, value in ((source, cell.source), (variant, cell.variant)) if key}
    )
    return out


def evaluate_pair(
    query: EmbeddingSet,
    index: EmbeddingSet,
    inputs: CellInputs,
    *,
    k: int,
    backend: SearchBackend,
) -> RetrievalResult:
    """Score one query/index pair of ``inputs``' dataset with ``backend``."""
    plan, items = inputs.plan, inputs.catalogue.items
    shared = plan.protocol == "within" and index is query
    return search_and_evaluate(
        np.asarray(query.vectors),
        query.labels(items, plan.label),
        None if shared else np.asarray(index.vectors),
        None if shared else index.labels(items, plan.label),
        k=k,
        protocol=plan.protocol,
        backend=backend,
    )


def run_grid(
    cfg: GridConfig,
    steps: StageSteps,
    *,
    store: ResultStore | None = None,
    backend: SearchBackend | None = None,
    select: Callable[[Cell], bool] | None = None,
) -> list[ResultRecord]:
    """Run ``steps``' grid (or the ``select``-ed cells) under ``cfg`` through a CellEngine."""
    return CellEngine(cfg, steps, store=store, backend=backend).run(select)


__all__ = [
    "Cell", "CellEngine", "CellInputs", "GridError", "Produced", "RetrievalPlan", "StageSteps",
    "load_catalogue", "cell_identity", "evaluate_pair", "load_cell_inputs", "retrieval_plan",
    "run_grid", "score_cell",
]  # fmt: skip
