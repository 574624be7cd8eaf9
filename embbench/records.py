"""Result records: one typed record per cell, written by every stage, read by the analysis.

A :class:`ResultRecord` holds what one (stage, mode, model, dataset, config hash) cell measured
and where it came from: the retrieval plan, the metrics, the per-query arrays file, timings, the
code version and the **lineage** (which weights the embedder started from, what it was tuned on
and how). Every stage writes this one shape through the cell engine; the analysis reads it
without a table of aliases.

Layout: ``<runs_dir>/results/<stage>/<dataset>/<model>/<mode>-<config_hash>.json`` with, beside
it, ``...-per_query.npz`` holding the per-query retrieval values (for bootstrap confidence
intervals and paired tests) and the top-k result ids. Records are written atomically and never
overwritten silently: reruns skip finished cells unless the overwrite policy says ``always``.

Records written before the schema existed (``schema_version`` 1, flat dicts) are migrated on
read by :func:`migrate_record`, so earlier runs keep loading.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from embbench._errors import UserError
from embbench._utils import atomic_write_bytes, atomic_write_json, safe_name
from embbench.paths import runs_dir
from embbench.records_migrate import SCHEMA_VERSION, migrate_record
from embbench.vocab import MODES, Mode, Task

logger = logging.getLogger(__name__)

OVERWRITE_POLICIES = ("never", "always")


class RecordError(UserError, ValueError):
    """A result record does not match the schema; the message names the file and the field."""


class Lineage(BaseModel):
    """Where the vectors of a cell come from, end to end.

    A fine-tuned model's record says both that its embedder is a checkpoint and which weights
    the fine-tuning started from, so a run that began from random initialisation stays visible
    in every table and sentence built on it.
    """

    model_config = ConfigDict(extra="forbid")

    base_model: str  # the zoo model at the root of the lineage
    weights: dict[str, Any] = Field(default_factory=dict)  # the embedder's weights, as used
    weights_kind: str = "unknown"  # pretrained | random | checkpoint | ...
    control: bool = False  # a random-init control of a real architecture
    finetuned_on: str | None = None  # dataset of the full fine-tuning, if any
    finetune_recipe: str | None = None  # A1 | A2 | A3 | transfer
    # the fine-tuning's resolved hyper-parameters, with each non-RSB choice's source
    finetune_hp: dict[str, Any] = Field(default_factory=dict)
    finetune_start: str | None = None  # weights kind the fine-tuning started from
    toptuned_on: str | None = None  # dataset the MLP head was top-tuned on, if any
    variant: dict[str, Any] = Field(default_factory=dict)  # compression / index variant

    @property
    def start_kind(self) -> str:
        """The weights the whole lineage started from (``random`` means no pretrained signal)."""
        return self.finetune_start or self.weights_kind

    def describe(self) -> str:
        """The lineage in words, e.g. ``fine-tuned on demo (A2, from random init)``."""
        start = {"random": "random init", "pretrained": "pretrained weights"}
        parts = []
        if self.finetuned_on:
            origin = start.get(self.finetune_start or "", self.finetune_start or "unknown start")
            recipe = f"{self.finetune_recipe}, " if self.finetune_recipe else ""
            parts.append(f"fine-tuned on {self.finetuned_on} ({recipe}from {origin})")
        if self.toptuned_on:
            parts.append(f"top-tuned on {self.toptuned_on}")
        if not parts:
            parts.append(start.get(self.weights_kind, f"weights: {self.weights_kind}"))
        if self.control:
            parts.append("control")
        return "; ".join(parts)


class Timings(BaseModel):
    """Wall-clock seconds of a cell's parts (``None`` when a part did not run)."""

    model_config = ConfigDict(extra="forbid")

    embed_s: float | None = None  # computing the embeddings (0 when all came from the cache)
    train_s: float | None = None  # fine-tuning or top-tuning (search + final fit)
    search_s: float | None = None  # retrieval search and scoring
    wall_s: float | None = None  # the whole cell
    gpu_hours: float | None = None  # accelerator hours of the training, when measured


class CatalogueRef(BaseModel):
    """How to load again exactly the catalogue a cell scored (the galleries read it back).

    ``root`` is where the loader read the catalogue (a generated demo folder, a manifest CSV,
    an image folder, a public dataset's folder), not the configured parent, so reading it again
    never generates nor looks elsewhere; the record's ``dataset_fingerprint`` then proves it is
    the same catalogue.
    """

    model_config = ConfigDict(extra="forbid")

    name: str  # the dataset's registry name (a user's catalogue: the user's own name)
    root: str | None = None  # the folder or manifest the catalogue was read from
    options: dict[str, Any] = Field(default_factory=dict)  # loader options (data_options[name])
    label: str = ""  # label column the loader was asked for ("" = the catalogue's default)
    max_images: int = 0  # per-split subsample (0 = all)
    seed: int = 0  # subsample and split seed


class ResultRecord(BaseModel):
    """One cell's result: identity, lineage, retrieval plan, metrics, timings, provenance."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    stage: str  # embed | finetune | toptune | crosstune | ...
    mode: Mode
    task: Task = "image-image"  # image-image | text-image | image-text | zero-shot | probe | knn
    model: str  # the zoo model name (for fine-tuned models: the base model)
    dataset: str  # the dataset scored (for cross-tuning: the target)
    config_hash: str = ""  # hash of everything that changes the result ("" if rebuilt from tags)
    family: str = "unknown"  # supervised | ssl | text-image
    backbone: str = "unknown"  # convolutional | transformer | ...
    paper_name: str = ""
    lineage: Lineage
    backend: str = "exact"  # the retrieval backend that searched
    protocol: str = "within"  # within | cross
    label: str = ""  # the relevance / classification label column
    query_split: str = "test"
    index_split: str = "test"
    k: int = 5
    metrics: dict[str, float] = Field(default_factory=dict)  # retrieval metrics (mMP@5, ...)
    n_queries: int = 0
    n_lone: int = 0  # queries with no relevant item in the index (left out of the means)
    n_index: int = 0
    embed_dim: int = 0
    classification: dict[str, float] = Field(default_factory=dict)  # test split, when trained
    val_accuracy: float | None = None
    pretrained_metrics: dict[str, float] = Field(default_factory=dict)  # baseline, same data
    timings: Timings = Field(default_factory=Timings)
    config: dict[str, Any] = Field(default_factory=dict)  # the resolved stage config
    dataset_fingerprint: str = ""
    dataset_root: str | None = None
    catalogue: CatalogueRef | None = None  # how to reload the scored catalogue (None: older runs)
    caches: dict[str, str] = Field(default_factory=dict)  # role -> embedding cache folder
    failed_images: list[dict[str, Any]] = Field(default_factory=list)
    per_query_file: str | None = None
    mlflow_run_id: str | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)  # git sha, versions, platform
    # the top-tuned MLP (top-tuned: the one trained; cross-top-tuned: the one applied)
    toptune_model_path: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)  # stage-specific facts, for reading
    started: str | None = None
    saved: str | None = None

    @classmethod
    def scored(
        cls,
        *,
        cell: Mapping[str, str],
        config_hash: str,
        spec: Any,
        lineage: Lineage,
        backend: str,
        k: int,
        plan: Mapping[str, Any],
        result: Any,
        vectors: Mapping[str, Any],
        catalogue: CatalogueRef,
        fingerprint: str,
        dataset_root: str | None,
        config: dict[str, Any],
        timings: Mapping[str, float | None],
        classification: Mapping[str, float] | None = None,
        val_accuracy: float | None = None,
        pretrained_metrics: Mapping[str, float] | None = None,
        toptune_model_path: str | None = None,
        details: Mapping[str, Any] | None = None,
        provenance: Mapping[str, Any] | None = None,
        started: str | None = None,
    ) -> ResultRecord:
        """The record of one scored cell.

        Args:
            cell: ``stage``, ``mode``, ``model`` and ``dataset``.
            config_hash: The cell's hash.
            spec: The model's spec (``family``, ``backbone``, ``paper_name``; missing ones read
                as unknown, the paper name as the model).
            lineage: Where the vectors come from.
            backend: The retrieval backend (or index engine) that searched.
            k: The cut-off of the retrieval metrics.
            plan: The retrieval plan (label, protocol, query and index splits).
            result: The retrieval result (``summary``, ``n_queries``, ``n_lone``).
            vectors: ``query`` and ``index`` embedding sets scored.
            catalogue: How to reload the scored catalogue.
            fingerprint: The catalogue's fingerprint.
            dataset_root: Where the catalogue was read.
            config: The resolved stage config.
            timings: The stage's and the engine's timings.
            classification: Test-split classification metrics, when trained.
            val_accuracy: Validation accuracy, when trained.
            pretrained_metrics: The pretrained baseline's metrics on the same data.
            toptune_model_path: The top-tuned MLP trained or applied.
            details: Stage-specific facts.
            provenance: Git sha, versions, platform.
            started: When the cell's work started (ISO 8601).
        """
        query, index = vectors["query"], vectors["index"]
        failed = list(query.failed) + ([] if index is query else list(index.failed))
        return cls(
            **cell,
            config_hash=config_hash,
            family=getattr(spec, "family", "unknown") or "unknown",
            backbone=getattr(spec, "backbone", "unknown") or "unknown",
            paper_name=getattr(spec, "paper_name", "") or cell["model"],
            lineage=lineage,
            backend=backend,
            k=k,
            **plan,
            metrics={key: float(v) for key, v in result.summary.items()},
            n_queries=result.n_queries,
            n_lone=result.n_lone,
            n_index=int(len(index.vectors)),
            embed_dim=int(query.vectors.shape[1]),
            classification=dict(classification or {}),
            val_accuracy=val_accuracy,
            pretrained_metrics={key: float(v) for key, v in (pretrained_metrics or {}).items()},
            timings=Timings(**timings),
            config=config,
            dataset_fingerprint=fingerprint,
            dataset_root=dataset_root,
            catalogue=catalogue,
            caches={"query": str(query.path), "index": str(index.path)},
            failed_images=failed,
            provenance=dict(provenance or {}),
            toptune_model_path=toptune_model_path,
            details=dict(details or {}),
            started=started,
        )

    @property
    def tuned_on(self) -> str | None:
        """The dataset the embedder was adapted on (fine- or top-tuned), if any."""
        return self.lineage.finetuned_on or self.lineage.toptuned_on

    @property
    def test_accuracy(self) -> float | None:
        """Test-split classification accuracy, when the cell trained a classifier."""
        return self.classification.get("accuracy")

    @property
    def git_sha(self) -> str:
        """The code version that produced the record."""
        return str(self.provenance.get("git_sha", "unknown"))

    def catalogue_ref(self) -> CatalogueRef:
        """How to reload the scored catalogue.

        Records written before ``catalogue`` existed get it rebuilt from the stage config
        they carry and their ``dataset_root``.
        """
        if self.catalogue is not None:
            return self.catalogue
        cfg = self.config
        options = (cfg.get("data_options") or {}).get(self.dataset) or {}
        return CatalogueRef(
            name=self.dataset,
            root=self.dataset_root,
            options=dict(options),
            label=str(cfg.get("label") or ""),
            max_images=int(cfg.get("max_images") or 0),
            seed=int(cfg.get("seed") or 0),
        )

    def key(self) -> tuple[str, str, str, str, str]:
        """(stage, dataset, model, mode, config_hash): where the record lives."""
        return (self.stage, self.dataset, self.model, self.mode, self.config_hash)


def parse_record(raw: Mapping[str, Any], source: str = "record") -> ResultRecord:
    """Validate a stored mapping (any schema version) into a :class:`ResultRecord`.

    Raises:
        RecordError: Naming ``source`` and every field that does not fit.
    """
    try:
        return ResultRecord.model_validate(migrate_record(raw))
    except ValidationError as exc:
        bad = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise RecordError(f"{source}: not a valid result record ({bad})") from None


# ---- the store --------------------------------------------------------------------------------
class ResultStore:
    """Reads and writes result records under ``root`` (default ``<runs_dir>/results``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else runs_dir() / "results"

    def path(
        self,
        stage: str,
        dataset: str,
        model: str,
        mode: str,
        config_hash: str,
        task: str = "image-image",
    ) -> Path:
        """Where the record for this cell lives (other tasks: ``<mode>-<task>-<hash>.json``)."""
        what = safe_name(mode) if task == "image-image" else f"{safe_name(mode)}-{safe_name(task)}"
        return (
            self.root
            / safe_name(stage)
            / safe_name(dataset)
            / safe_name(model)
            / f"{what}-{config_hash}.json"
        )

    def get(self, *where: str) -> ResultRecord | None:
        """The stored record of the cell ``where`` (:meth:`path`'s arguments), or ``None``."""
        p = self.path(*where)
        return self.read(p) if p.is_file() else None

    @staticmethod
    def read(path: Path) -> ResultRecord:
        """Read and validate one record file.

        Raises:
            RecordError: The file is not JSON or not a record; names the file.
        """
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecordError(
                f"{path}: unreadable result record ({exc}); move it aside and rerun the cell"
            ) from None
        return parse_record(raw, str(path))

    def save(
        self,
        record: ResultRecord | Mapping[str, Any],
        per_query: Mapping[str, np.ndarray] | None = None,
    ) -> Path:
        """Write ``record`` (and its per-query arrays) atomically; returns the JSON path.

        A mapping is validated (and migrated from an older schema) first.
        """
        if not isinstance(record, ResultRecord):
            record = parse_record(record)
        p = self.path(*record.key(), task=record.task)
        record.saved = datetime.now(UTC).isoformat()
        if per_query:
            buf = io.BytesIO()
            np.savez_compressed(buf, **{k: np.asarray(v) for k, v in per_query.items()})
            pq = p.with_name(p.stem + "-per_query.npz")
            atomic_write_bytes(pq, buf.getvalue())
            record.per_query_file = pq.name
        atomic_write_json(p, record.model_dump(mode="json"))
        return p

    def per_query(self, record: ResultRecord | Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The per-query arrays saved with ``record`` (empty when there are none)."""
        rec = record if isinstance(record, ResultRecord) else parse_record(record)
        if not rec.per_query_file:
            return {}
        p = self.path(*rec.key(), task=rec.task).with_name(rec.per_query_file)
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def records(self, stage: str | None = None) -> list[ResultRecord]:
        """Every stored record (optionally of one stage), sorted by path.

        Unreadable or invalid files are skipped with a warning naming them.
        """
        base = self.root / safe_name(stage) if stage else self.root
        out = []
        for p in sorted(base.rglob("*.json")):
            try:
                out.append(self.read(p))
            except RecordError as exc:
                logger.warning("skipping %s", exc)
        return out


def record_row(record: ResultRecord) -> dict[str, Any]:
    """The flat table row of a record: identity, lineage, the metrics, counts and run id."""
    lin = record.lineage
    return {
        "stage": record.stage,
        "mode": record.mode,
        "task": record.task,
        "model": record.model,
        "dataset": record.dataset,
        "family": record.family,
        "weights": lin.weights_kind,
        "lineage": lin.describe(),
        "tuned_on": record.tuned_on,
        "variant": lin.variant.get("name", ""),
        **record.metrics,
        **{f"pretrained_{k}": v for k, v in record.pretrained_metrics.items()},
        **{
            f"delta_{k}": v - record.pretrained_metrics[k]
            for k, v in record.metrics.items()
            if k in record.pretrained_metrics
        },
        **{f"test_{k}": v for k, v in record.classification.items()},
        "n_queries": record.n_queries,
        "n_lone": record.n_lone,
        "n_failed": len(record.failed_images),
        "wall_s": record.timings.wall_s,
        "config_hash": record.config_hash,
        "mlflow_run_id": record.mlflow_run_id,
    }


def results_table(store: ResultStore | None = None, stage: str | None = None) -> pd.DataFrame:
    """One row per record (see :func:`record_row`)."""
    store = store or ResultStore()
    return pd.DataFrame([record_row(r) for r in store.records(stage)])


__all__ = [
    "MODES",
    "OVERWRITE_POLICIES",
    "SCHEMA_VERSION",
    "CatalogueRef",
    "Lineage",
    "RecordError",
    "ResultRecord",
    "ResultStore",
    "Timings",
    "migrate_record",
    "parse_record",
    "record_row",
    "results_table",
]
