"""What the stages share, below them: embedders, embedding options, weights check, lineage.

Stages 01-04 all embed a catalogue's splits with a model's pretrained weights (stage 01 scores
them; 02-04 use them as the baseline and as the top-tuning's input). Before this module they
imported these helpers from stage 01; a stage now only imports what sits below it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embbench._threads import (
    ThreadBudget,
    apply_thread_budget,
    resolve_thread_budget,
    training_gflops,
)
from embbench._torch_utils import resolve_device
from embbench.cells import CellInputs
from embbench.config import GridConfig
from embbench.embed import embed_split, embedding_cache
from embbench.embed_ray import RayEmbedOptions, embed_split_ray
from embbench.models import Embedder, create_embedder, model_facts
from embbench.records import Lineage
from embbench.vocab import WEIGHT_MODES

logger = logging.getLogger(__name__)


def weights_problem(weights: str) -> str | None:
    """Why ``weights`` is not a valid weights setting, or ``None`` when it is."""
    if weights in WEIGHT_MODES or Path(weights).expanduser().is_file():
        return None
    return (
        f"weights {weights!r} is neither pretrained, random, auto nor an existing checkpoint "
        "file. Fix: choose one of those, or give the checkpoint's full path."
    )


def lineage_of(embedder: Embedder, base_model: str) -> Lineage:
    """The lineage of a model's embeddings as the embedder built them."""
    used = dict(embedder.weights_used)
    return Lineage(
        base_model=base_model,
        weights=used,
        weights_kind=str(used.get("kind", "unknown")),
        control=bool(getattr(embedder.spec, "control", False)),
    )


def thread_budget(
    cfg: GridConfig, model: str | None = None, *, train_size: int | None = None
) -> ThreadBudget:
    """Split the cores between DataLoader workers and torch threads, apply it and log it.

    With both ``threads`` and ``num_workers`` on ``auto`` on a CPU, the model's forward FLOPs
    (:func:`embbench.models.model_facts`, cached per machine) decide the split; with
    ``train_size`` (fine-tuning) the FLOPs of a training step at that side
    (:func:`embbench._threads.training_gflops`).
    """
    gflops = None
    if model and cfg.threads == "auto" and cfg.num_workers == "auto":
        try:
            facts = model_facts(model)
            gflops = float(facts["gflops"])
            if train_size:
                gflops = training_gflops(gflops, int(facts["input_size"][-1]), train_size)
        except Exception as exc:  # noqa: BLE001 - facts are advice; the rule works without
            logger.debug(
                "no FLOP count for %s (%s); the thread rule assumes decode-bound", model, exc
            )
    budget = resolve_thread_budget(
        cfg.threads,
        cfg.num_workers,
        resolve_device(cfg.device),
        gflops_per_image=gflops,
        decode_ahead=not train_size,  # embedding decodes ahead (embbench.decode); training not
    )
    apply_thread_budget(budget)
    return budget


def embed_options(cfg: GridConfig, model: str | None = None) -> dict[str, Any]:
    """A stage config's embedding settings, as :func:`embbench.embed.embed_splits` takes them.

    The thread budget is applied here (torch threads set; workers passed on).
    """
    budget = thread_budget(cfg, model)
    return {
        "batch_size": cfg.batch_size,
        "num_workers": budget.workers,
        "device": cfg.device,
        "precision": cfg.precision,
    }


class EmbedderPool:
    """One embedder per model for a run (created once, shared by identity and produce).

    Args:
        cfg: The stage config (weights, embedding settings).
        text_models: Models built with their text tower too (those with text cells); the
            others keep today's image-only memory.
        ray: Embed missing vectors on Ray Data with this actor pool
            (:func:`embbench.embed_ray.embed_split_ray`, stage 01's ``embed_engine: ray``);
            ``None`` embeds in this process. Both write the same cache.
    """

    def __init__(
        self,
        cfg: GridConfig,
        text_models: Sequence[str] = (),
        ray: RayEmbedOptions | None = None,
    ) -> None:
        self.cfg = cfg
        self.ray = ray
        self.text_models = set(text_models)
        self._embedders: dict[str, Embedder] = {}
        self._recomputed: set[str] = set()  # cache keys embedded again by this run

    def __call__(self, model: str) -> Embedder:
        """The embedder of ``model`` with the configured weights."""
        if model not in self._embedders:
            self._embedders[model] = create_embedder(
                model, weights=self.cfg.weights, with_text=model in self.text_models
            )
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
            if self.ray is not None:
                out[split] = embed_split_ray(
                    emb,
                    inputs.catalogue,
                    split,
                    overwrite=again,
                    batch_size=options["batch_size"],
                    device=options["device"],
                    precision=options["precision"],
                    options=self.ray,
                )
            else:
                out[split] = embed_split(emb, inputs.catalogue, split, overwrite=again, **options)
            self._recomputed.add(key)
        return out


__all__ = ["EmbedderPool", "embed_options", "lineage_of", "thread_budget", "weights_problem"]
