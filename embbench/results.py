"""Result records: one JSON per (stage, mode, model, dataset, config hash).

Records are never overwritten silently.

Layout: ``<runs_dir>/results/<stage>/<dataset>/<model>/<mode>-<config_hash>.json`` with, beside
it, ``...-per_query.npz`` holding the per-query retrieval values (for bootstrap confidence
intervals and paired tests). Each record carries the resolved config, metrics, weights used,
dataset fingerprint, git sha, package versions and wall time. Reruns skip finished records
unless the overwrite policy says otherwise (``never``: keep existing; ``always``: recompute).
:func:`results_table` aggregates every record into one table for the analysis.
"""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embbench._utils import atomic_write_bytes, atomic_write_json
from embbench.paths import runs_dir

logger = logging.getLogger(__name__)

OVERWRITE_POLICIES = ("never", "always")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


class ResultStore:
    """Reads and writes result records under ``root`` (default ``<runs_dir>/results``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else runs_dir() / "results"

    def path(self, stage: str, dataset: str, model: str, mode: str, config_hash: str) -> Path:
        """Where the record for this cell lives."""
        return (
            self.root
            / _safe(stage)
            / _safe(dataset)
            / _safe(model)
            / f"{_safe(mode)}-{config_hash}.json"
        )

    def get(self, stage: str, dataset: str, model: str, mode: str, config_hash: str) -> dict | None:
        """The stored record, or ``None``."""
        p = self.path(stage, dataset, model, mode, config_hash)
        return json.loads(p.read_text()) if p.is_file() else None

    def save(self, record: dict, per_query: dict[str, np.ndarray] | None = None) -> Path:
        """Write ``record`` (and its per-query arrays) atomically; returns the JSON path."""
        for key in ("stage", "dataset", "model", "mode", "config_hash"):
            if key not in record:
                raise KeyError(f"result record lacks {key!r}")
        p = self.path(
            record["stage"],
            record["dataset"],
            record["model"],
            record["mode"],
            record["config_hash"],
        )
        record = {**record, "saved": datetime.now(UTC).isoformat()}
        if per_query:
            buf = io.BytesIO()
            np.savez_compressed(buf, **{k: np.asarray(v) for k, v in per_query.items()})
            pq = p.with_name(p.stem + "-per_query.npz")
            atomic_write_bytes(pq, buf.getvalue())
            record["per_query_file"] = pq.name
        atomic_write_json(p, record)
        return p

    def per_query(self, record: dict) -> dict[str, np.ndarray]:
        """The per-query arrays saved with ``record`` (empty when there are none)."""
        name = record.get("per_query_file")
        if not name:
            return {}
        p = self.path(
            record["stage"],
            record["dataset"],
            record["model"],
            record["mode"],
            record["config_hash"],
        ).with_name(name)
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def records(self, stage: str | None = None) -> list[dict]:
        """Every stored record (optionally of one stage), sorted by path."""
        base = self.root / _safe(stage) if stage else self.root
        out = []
        for p in sorted(base.rglob("*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except json.JSONDecodeError:
                logger.warning("skipping unreadable result record %s", p)
        return out


def results_table(store: ResultStore | None = None, stage: str | None = None) -> pd.DataFrame:
    """One row per record: identifying columns, then each metric as a column."""
    store = store or ResultStore()
    rows = []
    for r in store.records(stage):
        row: dict[str, Any] = {
            k: r.get(k)
            for k in (
                "stage",
                "mode",
                "model",
                "dataset",
                "config_hash",
                "family",
                "backbone",
                "label",
                "protocol",
                "weights_kind",
                "n_queries",
                "n_lone",
                "wall_s",
                "mlflow_run_id",
                "source_dataset",
                "tuned_on",
            )
        }
        row.update(r.get("metrics", {}))
        rows.append(row)
    return pd.DataFrame(rows)
