"""Galleries of text queries: each query's text as the row header, then its top-k images.

Everything comes from what the text->image cell stored: its per-query file holds the query
strings (``query_text``, in query order), their labels (``query_label``) and the ranking the
metrics scored (``topk_ids``: positions in the gallery split's cached vectors, rows aligned with
``query_index`` when saved); the record names the gallery's cached vectors (``cache_index``) and
its catalogue, which is read again and proven by the record's fingerprint exactly as for the
image galleries (:func:`embbench.analysis.sources._catalogue`), so every picture shown is one the
run searched. Relevance is the metrics' rule: the image's label equals the query's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from embbench.analysis.gallery import Gallery, GalleryCell, GalleryRow
from embbench.analysis.load import records_frame
from embbench.analysis.sources import (
    GalleryError,
    PerQueryLoader,
    _catalogue,
    load_embedding_set,
)
from embbench.analysis.stats import PerQuery
from embbench.catalogue import Catalogue
from embbench.records import ResultStore

logger = logging.getLogger(__name__)

TEXT_SECTION = "text"
TEXT_SECTIONS = {TEXT_SECTION: "Text queries (a seeded sample) and the top images of each model"}


def _text_entry(row: Mapping[str, Any], loader: PerQueryLoader, memo: dict, catalogues) -> dict:
    """One text->image result's material: texts, labels, ranking, gallery images (verified)."""
    entry = str(row.get("model"))
    source = str(row.get("text_source") or "")
    if source:  # one model's class-prompt and item-text results are two columns: say which
        entry += " · " + (
            "class prompts" if source == "class-prompts" else source.replace("item-text:", "")
        )
    pq = loader(row) or {}
    missing = [key for key in ("query_text", "topk_ids") if key not in pq]
    if missing:
        raise GalleryError(f"{entry}: its per-query file holds no {' / '.join(missing)}")
    if "query_label" not in pq:
        raise GalleryError(
            f"{entry}: its per-query file holds no query_label, so relevance cannot be framed"
        )
    if not row.get("cache_index"):
        raise GalleryError(f"{entry}: the result names no cached gallery embeddings")
    cat = _catalogue(row, catalogues, memo)  # the run's own catalogue, fingerprint checked
    index = load_embedding_set(str(row["cache_index"]))
    label = str(row.get("label") or cat.default_label)
    items = cat.items.set_index("item_id", drop=False)
    texts = np.asarray(pq["query_text"]).astype(str)
    order = np.asarray(pq.get("query_index", np.arange(len(texts))), dtype=np.int64)
    ids = np.asarray(pq["topk_ids"], dtype=np.int64)
    if ids.ndim != 2 or len(ids) != len(order):
        raise GalleryError(f"{entry}: topk_ids do not line up with its queries")
    return {
        "entry": entry,
        "texts": texts,
        "qlabels": np.asarray(pq["query_label"]),
        "rows": pd.Series(np.arange(len(order)), index=order),
        "ids": ids,
        "scores": np.asarray(pq["topk_scores"]) if "topk_scores" in pq else None,
        "index_ids": index.item_ids,
        "index_labels": np.asarray(index.labels(cat.items, label)),
        "items": items,
        "label": label,
    }


def text_query_gallery(
    results: pd.DataFrame,
    loader: PerQueryLoader,
    catalogues: Mapping[str, Catalogue] | None = None,
    *,
    n_queries: int = 8,
    k: int = 5,
    seed: int = 0,
) -> list[Gallery]:
    """One gallery per dataset of its text->image results, on a seeded sample of text queries.

    Args:
        results: Analysis rows (any task; the text->image ones are shown).
        loader: Row -> per-query arrays (:class:`~embbench.analysis.PerQuery`).
        catalogues: Dataset name -> catalogue, to skip re-reading it (still fingerprint-checked).
        n_queries: Text queries sampled per dataset (the same texts for every model).
        k: Images per query and model.
        seed: Fixes the sample.

    Returns:
        The galleries; a result that cannot be shown is one note of its dataset's gallery.
    """
    if results.empty or "task" not in results:
        return []
    text_rows = results[results["task"] == "text-image"]
    out = []
    memo: dict = {}
    # class prompts and item texts are different queries: one gallery per dataset and source
    source = text_rows.get("text_source", pd.Series("", index=text_rows.index))
    text_rows = text_rows.assign(_source=source.fillna("").astype(str))
    for (dataset, _), group in text_rows.groupby(["dataset", "_source"], sort=True):
        notes, entries = [], []
        for row in group.to_dict("records"):
            try:
                entries.append(_text_entry(row, loader, memo, catalogues))
            except GalleryError as exc:
                notes.append(str(exc))
                logger.warning("text gallery: %s", exc)
        rows = _rows(entries, n_queries=n_queries, k=k, seed=seed)
        label = entries[0]["label"] if entries else str(group["label"].iloc[0] or "label")
        out.append(
            Gallery(
                dataset=str(dataset),
                label=label,
                group_label="text query",
                entries=[e["entry"] for e in entries],
                k=k,
                rows=rows,
                sections=dict(TEXT_SECTIONS),
                notes=notes,
            )
        )
    return out


def _rows(entries: list[dict], *, n_queries: int, k: int, seed: int) -> list[GalleryRow]:
    """Gallery rows of the texts every entry scored, a seeded sample of them."""
    if not entries:
        return []
    common = set(entries[0]["texts"].tolist())
    for e in entries[1:]:
        common &= set(e["texts"].tolist())
    texts = sorted(common)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(texts), size=min(n_queries, len(texts)), replace=False))
    rows = []
    for t in (texts[i] for i in chosen):
        results: dict[str, list[GalleryCell]] = {}
        qlabel = None
        for e in entries:
            pos = int(np.flatnonzero(e["texts"] == t)[0])
            qlabel = e["qlabels"][pos] if qlabel is None else qlabel
            if pos not in e["rows"].index:
                results[e["entry"]] = []
                continue
            r = int(e["rows"].loc[pos])
            cells = []
            for c, idx in enumerate(e["ids"][r, :k].tolist()):
                if idx < 0:
                    continue
                iid = e["index_ids"][idx]
                score = float(e["scores"][r, c]) if e["scores"] is not None else float("nan")
                cells.append(
                    GalleryCell(
                        item_id=str(iid),
                        path=str(e["items"].at[iid, "path"]),
                        label=e["index_labels"][idx],
                        rank=c + 1,
                        score=score,
                        relevant=bool(e["index_labels"][idx] == e["qlabels"][pos]),
                    )
                )
            results[e["entry"]] = cells
        query = GalleryCell(item_id="", path="", label=t, rank=0, score=float("nan"), relevant=None)
        rows.append(GalleryRow(section=TEXT_SECTION, query=query, group=qlabel, results=results))
    return rows


def text_gallery_for_runs(
    run_ids: Iterable[str],
    *,
    store: ResultStore | None = None,
    k: int = 5,
    n_queries: int = 6,
    seed: int = 0,
    catalogues: Mapping[str, Catalogue] | None = None,
) -> list[Gallery]:
    """Galleries of text queries (one per dataset) of the runs ``run_ids`` (notebook 01).

    Only the text->image results among the runs are shown; none gives an empty list.
    """
    store = store or ResultStore()
    wanted = {r for r in run_ids if isinstance(r, str)}
    frame = records_frame([r for r in store.records() if r.mlflow_run_id in wanted], k)
    return text_query_gallery(
        frame, PerQuery(store), catalogues, n_queries=n_queries, k=k, seed=seed
    )
