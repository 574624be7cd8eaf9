"""Text embeddings: texts -> L2-normalised vectors of a text tower, cached like image vectors.

:func:`encode_texts` tokenises with the model's own tokenizer and runs ``encode_text`` in batches
(``torch.inference_mode``; bf16/fp16 autocast on CUDA as :mod:`embbench.embed` does; a progress
bar), then L2-normalises with :func:`embbench.retrieval.l2_normalize`, the normaliser applied to
image vectors before search. :func:`embed_texts` adds the embedding cache
(:class:`~embbench.cache.EmbeddingCache`: atomic, checksummed, verified on read, one lock per
entry). A text entry sits beside the image entries, ``<cache>/embeddings/<dataset>/<model>/
text-<purpose>-<key>/``, and its key hashes the text tower's identity (model, weights,
tokenizer and its fingerprint, context length), the template set, the texts' fingerprint (a
SHA-256 of the texts in order) and :data:`TEXT_VERSION`: changing any of them misses.
:func:`embed_class_prompts` is the class-prompt path (templates -> averaged class vectors).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embbench.cache import CacheError, CorruptCacheError, EmbeddingCache
from embbench.models import TextTower
from embbench.progress import progress_bar
from embbench.retrieval import l2_normalize
from embbench.text.templates import average_class_embeddings, class_prompts, validate_templates

logger = logging.getLogger(__name__)

__all__ = [
    "TEXT_VERSION",
    "TextEmbeddings",
    "embed_class_prompts",
    "embed_texts",
    "encode_texts",
    "text_cache",
    "texts_fingerprint",
]

TEXT_VERSION = 1  # bump when this module changes the text vectors it produces


@dataclass
class TextEmbeddings:
    """Cached text vectors with their ids.

    Attributes:
        vectors: ``(n, d)`` float32 L2-normalised vectors (memory-mapped when read from cache).
        ids: ``(n,)`` ids of the texts (item ids, class names or positions), aligned.
        meta: The cache entry's ``meta.json``.
        path: The cache folder.
    """

    vectors: np.ndarray
    ids: np.ndarray
    meta: dict
    path: Path | None = None


def texts_fingerprint(texts: Sequence[str]) -> str:
    """A stable SHA-256 (hex, 32 characters) of the texts, in order."""
    h = hashlib.sha256()
    for t in texts:
        h.update(json.dumps(str(t)).encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def encode_texts(
    tower: TextTower,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
) -> np.ndarray:
    """Embed texts with the tower's own tokenizer and ``encode_text``; L2-normalise them.

    Args:
        tower: A :class:`~embbench.models.TextTower`.
        texts: The texts (truncated to the tower's context length by its tokenizer).
        batch_size: Texts per forward pass.
        device: ``auto``, ``cpu``, ``cuda``...
        precision: ``auto`` (bf16/fp16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16``,
            ``fp16``.
        progress: Show a progress bar.

    Returns:
        ``(len(texts), d)`` float32 unit vectors.
    """
    import torch

    # _torch_utils imports torch: only when texts are encoded
    from embbench._torch_utils import resolve_device, resolve_precision

    if batch_size < 1:
        raise ValueError(f"encode_texts: batch_size={batch_size} must be at least 1")
    texts = [str(t) for t in texts]
    if not texts:
        return np.zeros((0, tower.embed_dim), np.float32)
    dev = resolve_device(device)
    amp = resolve_precision(precision, dev)
    model = tower.model.to(dev).eval()
    tower.device = str(dev)
    autocast = torch.autocast(device_type=dev.type, dtype=amp) if amp is not None else nullcontext()
    out = []
    bar = progress_bar(
        total=len(texts), disable=not progress, unit="text", desc=f"embed texts {tower.spec.name}"
    )
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            tokens = tower.tokenizer(batch).to(dev)
            with autocast:
                feats = model.encode_text(tokens)
            out.append(feats.float().cpu().numpy())
            bar.update(len(batch))
    bar.close()
    return l2_normalize(np.concatenate(out), "text embeddings")


def text_cache(
    tower: TextTower,
    texts: Sequence[str],
    *,
    dataset: str = "texts",
    purpose: str = "texts",
    templates: Sequence[str] = (),
    root: Path | None = None,
) -> EmbeddingCache:
    """The cache entry of ``texts`` embedded by ``tower`` (not necessarily computed).

    Args:
        tower: The text tower.
        texts: The texts, in order (their fingerprint is part of the key).
        dataset: Folder the entry is grouped under (the dataset the texts belong to).
        purpose: What the texts are (``classes``, ``title``...): the entry's folder prefix.
        templates: The template set the texts were made from (part of the key; empty for item
            texts).
        root: Cache root override (default ``cache_dir()/"embeddings"``).
    """
    identity = {
        "kind": "text",
        **tower.cache_identity(),
        "templates": list(templates),
        "texts_fingerprint": texts_fingerprint(texts),
        "n_texts": len(texts),
        "normalized": True,
        "text_version": TEXT_VERSION,
    }
    return EmbeddingCache(dataset, tower.spec.name, f"text-{purpose}", identity, root=root)


def embed_texts(
    tower: TextTower,
    texts: Sequence[str],
    *,
    ids: Sequence[Any] | None = None,
    dataset: str = "texts",
    purpose: str = "texts",
    templates: Sequence[str] = (),
    cache_root: Path | None = None,
    overwrite: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
) -> TextEmbeddings:
    """Embed texts through the cache: a complete, verified entry is read, else computed.

    Args:
        tower: The text tower.
        texts: The texts.
        ids: An id per text (default ``0..n-1``), stored beside the vectors.
        dataset: Folder the entry is grouped under.
        purpose: What the texts are (folder prefix).
        templates: The template set the texts came from (keyed).
        cache_root: Cache root override.
        overwrite: Recompute even when cached.
        batch_size: Texts per forward pass.
        device: Where to run.
        precision: Autocast choice (see :func:`encode_texts`).
        progress: Show a progress bar.

    Returns:
        The vectors (L2-normalised) with their ids.
    """
    texts = [str(t) for t in texts]
    ids = [str(i) for i in (range(len(texts)) if ids is None else ids)]
    if len(ids) != len(texts):
        raise ValueError(f"embed_texts: {len(ids)} ids for {len(texts)} texts")
    if not texts:
        raise ValueError("embed_texts: no texts to embed")
    cache = text_cache(
        tower, texts, dataset=dataset, purpose=purpose, templates=templates, root=cache_root
    )
    if not overwrite:
        try:
            if cache.is_complete():
                es = cache.load()
                if es.item_ids.tolist() == ids:
                    logger.info("text embeddings cached: %s", cache.path)
                    return TextEmbeddings(es.vectors, es.item_ids, es.meta, es.path)
                logger.info("text cache %s holds other ids; recomputing", cache.path)
        except CorruptCacheError as err:
            logger.warning("%s", err)
            cache.quarantine_consolidated(f"failed verification: {err}")
        except CacheError as err:
            logger.warning("%s; recomputing", err)
    vectors = encode_texts(
        tower, texts, batch_size=batch_size, device=device, precision=precision, progress=progress
    )
    provenance = {
        "weights_used": tower.weights_used,
        "device": tower.device,
        "precision": precision,
        "purpose": purpose,
    }
    es = cache.save_complete(vectors, ids, provenance)
    return TextEmbeddings(es.vectors, es.item_ids, es.meta, es.path)


def embed_class_prompts(
    tower: TextTower,
    classnames: Sequence[str],
    templates: Sequence[str] | None = None,
    *,
    where: str = "templates",
    **kwargs: Any,
) -> np.ndarray:
    """One vector per class: every template embedded, averaged per class, re-normalised.

    Args:
        tower: The text tower.
        classnames: The class names, in the order of the returned rows.
        templates: Templates with ``{}`` (default :data:`~embbench.text.DEFAULT_TEMPLATES`).
        where: Where the templates came from, named in errors (e.g. a params key).
        **kwargs: Passed to :func:`embed_texts` (dataset, cache_root, overwrite, batch_size,
            device...).

    Returns:
        ``(len(classnames), d)`` float32 unit vectors.

    Raises:
        TemplateError: An empty template list, a template without ``{}``, an empty class name.
    """
    tpl = validate_templates(templates, where)
    prompts = class_prompts(classnames, tpl)
    emb = embed_texts(tower, prompts, purpose="classes", templates=tpl, **kwargs)
    return average_class_embeddings(np.asarray(emb.vectors), len(tpl))
