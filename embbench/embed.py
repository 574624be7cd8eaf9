"""Embedding extraction: images of one catalogue split -> cached vectors.

Batched decoding overlapped with the forward pass: DataLoader worker processes when the thread
budget gives decoding its own cores, otherwise a low-priority background thread that fills the
forward pass's idle core time (:mod:`embbench.decode`; uint8 batches normalised once per batch,
pixel-exact); ``torch.inference_mode``; channels_last (CUDA, and CPU for convolutional nets);
bf16/fp16 autocast and pinned memory on CUDA; a progress bar. Vectors go to an
:class:`~embbench.cache.EmbeddingCache` shard by shard, so a killed run resumes from the
finished shards (the resume unit, ``shard_size``, defaults to
:data:`DEFAULT_SHARD_SIZE` images: under a minute of work for a ViT-B/16 on a 2-core CPU, so a
kill loses little). One run embeds a split at a time: the split's file lock is taken before any
work, and a second run waits for it, then reuses its vectors. Cached vectors are verified on
every read; a corrupt shard or consolidated file is named, moved aside and recomputed.

Several GPUs: run the same entry point under ``torchrun --nproc_per_node=N`` (see
``python -m embbench embed --help``); each rank takes every N-th shard, and rank 0 joins them once
all ranks reach the barrier. Images that cannot be read are skipped, recorded with the reason in
the cache's ``failed.json`` and listed in the run's output; one bad image never stops a run.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from embbench._torch_utils import (
    DistInfo,
    barrier,
    channels_last_for,
    init_distributed,
    resolve_device,
    resolve_precision,
)
from embbench.cache import CorruptCacheError, EmbeddingCache, EmbeddingSet
from embbench.catalogue import Catalogue
from embbench.decode import DecodeAhead, Preprocess, decode_row, split_transform
from embbench.progress import progress_bar as tqdm

logger = logging.getLogger(__name__)

EXTRACTION_VERSION = 1  # bump when this module changes the vectors it produces
# Measured: ViT-B/16 embeds 6.1 images/s end to end on this project's 2-core CPU (README,
# bench_embedding.py), so 256 images are ~42 s of work: a kill loses under a minute.
DEFAULT_SHARD_SIZE = 256


# ---- data --------------------------------------------------------------------------------------
class ImageRows(Dataset):
    """Decode and preprocess catalogue rows; a bad image yields its reason instead of a tensor.

    Args:
        paths: Image file of each row.
        transform: The model's transform (``PIL.Image -> C x H x W`` tensor).
        prep: When given, images go through its PIL steps only (uint8, see
            :mod:`embbench.decode`) and :func:`collate_rows` with it makes the float batch.
    """

    def __init__(self, paths: list[str], transform, prep: Preprocess | None = None) -> None:
        self.paths = paths
        self.transform = transform
        self.prep = prep if prep is not None else Preprocess(transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        tensor, reason = decode_row(self.paths[i], self.prep)
        return i, tensor, reason


def collate_rows(batch, prep: Preprocess | None = None):
    """``[(index, tensor, reason)] -> (decoded indices, N x C x H x W batch or None, bad)``."""
    ok = [(i, t) for i, t, r in batch if r is None]
    bad = [(i, r) for i, t, r in batch if r is not None]
    items = [t for _, t in ok]
    tensor = (prep.batch(items) if prep is not None else torch.stack(items)) if ok else None
    return [i for i, _ in ok], tensor, bad


class _ShardBatches(Sampler[list[int]]):
    """Batches that never cross a shard boundary, over the shards this rank still has to do."""

    def __init__(self, shards: list[tuple[int, int, int]], batch_size: int) -> None:
        self.shards = shards
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for _, start, stop in self.shards:
            for b in range(start, stop, self.batch_size):
                yield list(range(b, min(b + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for _, start, stop in self.shards)


# ---- extraction --------------------------------------------------------------------------------
class ModelForward:
    """An embedder's model prepared for extraction on ``dev``, called on a batch of images.

    Evaluation mode on ``dev``, channels_last where it is faster (:func:`channels_last_for`),
    ``inference_mode`` and the autocast of ``amp_dtype`` (``None``: fp32); returns float32
    vectors. The single-process path and the Ray Data actors (:mod:`embbench.embed_ray`) both
    embed through it, so their vectors are the same.
    """

    def __init__(self, model: torch.nn.Module, dev: torch.device, amp_dtype) -> None:
        self.dev, self.amp_dtype = dev, amp_dtype
        self.model = model.to(dev).eval()
        self.nhwc = channels_last_for(self.model, dev)
        if self.nhwc:
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """``N x C x H x W`` images (any layout) -> ``N x D`` float32 vectors."""
        images = images.to(self.dev, non_blocking=True)
        # uint8 batches arrive channels-last (embbench.decode): the layout the model takes
        images = images.contiguous(
            memory_format=torch.channels_last if self.nhwc else torch.contiguous_format
        )
        autocast = (
            torch.autocast(device_type=self.dev.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else nullcontext()
        )
        with torch.inference_mode(), autocast:
            out = self.model(images)
        return out.float().cpu().numpy()


def unreadable(item_id: str, path: str, reason: str) -> dict:
    """The cache's entry for an image that could not be read (logged as skipped)."""
    logger.warning("skipping unreadable image %s: %s", path, reason)
    return {"item_id": item_id, "path": path, "reason": reason}


def embed_split(
    embedder,
    catalogue: Catalogue,
    split: str,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    cache_root=None,
    progress: bool = True,
    lock_timeout: float | None = None,
    keep_shards: bool = False,
) -> EmbeddingSet:
    """Embed every image of ``split``; return the cached vectors, computing only what is missing.

    Args:
        embedder: An :class:`embbench.models.Embedder` (model + its own preprocessing).
        catalogue: The catalogue to read.
        split: The split to embed.
        batch_size: Images per forward pass (per GPU under torchrun).
        num_workers: DataLoader decoding processes.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        precision: ``auto`` (bf16/fp16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``.
        shard_size: Images per cache shard, the unit of resumption (a kill loses at most one
            shard per rank). Changing it restarts a partial split.
        overwrite: Recompute even when a complete cache exists.
        cache_root: Cache root override (default ``cache_dir()/"embeddings"``).
        progress: Show a progress bar.
        lock_timeout: Seconds to wait for another run embedding the same split before
            :class:`~embbench.cache.CacheBusyError` (``None``: wait; it logs who holds it).
        keep_shards: Keep the shards after consolidation, so a corrupt ``vectors.npy`` is
            rebuilt without embedding again (doubles the disk used).

    Returns:
        The split's vectors (memory-mapped) with ids and failures.

    Raises:
        CacheBusyError: The split stayed locked by another run for ``lock_timeout`` seconds.
        CacheError: The model produced NaN/inf (the message names the shard file).
        DiskFullError: The cache's file system is full (the message names the file).
    """
    if shard_size < 1:
        raise ValueError(
            f"shard_size={shard_size}: must be at least 1 (default {DEFAULT_SHARD_SIZE})"
        )
    rows = catalogue.split(split)
    cache = embedding_cache(embedder, catalogue, split, root=cache_root)
    if not overwrite and (done := verified_complete(cache)) is not None:
        logger.info("embeddings cached: %s", cache.path)
        return done
    dev = resolve_device(device)
    dist_info = init_distributed(dev)
    with cache.lock(timeout=lock_timeout) if dist_info.is_main else nullcontext():
        if not overwrite and dist_info.is_main and (done := verified_complete(cache)):
            logger.info("embeddings cached by another run while waiting: %s", cache.path)
            return done
        return _embed_locked(
            embedder,
            catalogue,
            split,
            rows,
            cache,
            dev,
            dist_info,
            batch_size=batch_size,
            num_workers=num_workers,
            precision=precision,
            shard_size=shard_size,
            overwrite=overwrite,
            progress=progress,
            keep_shards=keep_shards,
        )


def verified_complete(cache: EmbeddingCache) -> EmbeddingSet | None:
    """The complete, verified cache; a corrupt one is moved aside (WARNING) and None returned."""
    try:
        return cache.load() if cache.is_complete() else None
    except CorruptCacheError as err:
        logger.warning("%s", err)
        cache.quarantine_consolidated(f"failed verification: {err}")
        return None


def _embed_locked(
    embedder,
    catalogue,
    split,
    rows,
    cache,
    dev,
    dist_info,
    *,
    batch_size,
    num_workers,
    precision,
    shard_size,
    overwrite,
    progress,
    keep_shards,
) -> EmbeddingSet:
    amp_dtype = resolve_precision(precision, dev)
    ids = rows["item_id"].astype(str).tolist()
    paths = rows["path"].astype(str).tolist()
    if dist_info.is_main:
        cache.begin(
            ids,
            shard_size,
            provenance=_provenance(embedder, dev, amp_dtype, dist_info),
            overwrite=overwrite,
        )
    barrier(dist_info)
    n_shards = cache.n_shards(len(ids), shard_size)
    todo = [
        (s, s * shard_size, min((s + 1) * shard_size, len(ids)))
        for s in range(n_shards)
        if s % dist_info.world_size == dist_info.rank and not cache.shard_done(s)
    ]
    if len(todo) < n_shards:
        logger.info(
            "resuming %s: %d of %d shard(s) already done",
            cache.path,
            n_shards - len(todo),
            n_shards,
        )

    forward = ModelForward(embedder.model, dev, amp_dtype)
    prep = split_transform(embedder.transform)
    sampler = _ShardBatches(todo, batch_size)
    if num_workers > 0:
        loader = DataLoader(
            ImageRows(paths, embedder.transform, prep),
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=partial(collate_rows, prep=prep),
            pin_memory=dev.type == "cuda",
            prefetch_factor=4,
            persistent_workers=False,
        )
    else:  # no worker: a background thread decodes ahead of the model (embbench.decode)
        loader = DecodeAhead(paths, prep, list(sampler))
    shard_of = {}
    for s, start, stop in todo:
        shard_of.update(dict.fromkeys(range(start, stop), s))
    pending = {
        s: {"n": stop - start, "idx": [], "vec": [], "failed": []} for s, start, stop in todo
    }
    t0 = time.perf_counter()
    n_images = 0
    bar = tqdm(
        total=sum(stop - start for _, start, stop in todo),
        disable=not progress,
        desc=f"embed {embedder.spec.name} {catalogue.name}/{split}",
        unit="img",
    )
    with torch.inference_mode():
        for idx, images, bad in loader:
            first = idx[0] if idx else bad[0][0]
            shard = pending[shard_of[first]]
            if images is not None:
                shard["vec"].append(forward(images))
                shard["idx"].extend(idx)
            for i, reason in bad:
                shard["failed"].append(unreadable(ids[i], paths[i], reason))
            n_images += len(idx) + len(bad)
            bar.update(len(idx) + len(bad))
            if len(shard["idx"]) + len(shard["failed"]) == shard["n"]:
                s = shard_of[first]
                vec = (
                    np.concatenate(shard["vec"])
                    if shard["vec"]
                    else np.zeros((0, embedder.embed_dim), np.float32)
                )
                cache.write_shard(s, vec, [ids[i] for i in shard["idx"]], shard["failed"])
                del pending[s]
    bar.close()
    elapsed = time.perf_counter() - t0
    barrier(dist_info)
    if not dist_info.is_main:
        return cache.load() if _wait_complete(cache) else None  # type: ignore[return-value]
    result = cache.consolidate(
        n_shards,
        keep_shards=keep_shards,
        extra_meta={
            "images_per_s": round(n_images / elapsed, 2) if elapsed > 0 and n_images else None,
            "wall_s": round(elapsed, 2),
        },
    )
    if result.failed:
        logger.warning(
            "%d image(s) of %s/%s could not be read and were skipped; listed in %s",
            len(result.failed),
            catalogue.name,
            split,
            result.path / "failed.json",
        )
    barrier(dist_info)
    return result


def embed_splits(
    embedder,
    catalogue: Catalogue,
    splits,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    lock_timeout: float | None = None,
    overwrite: bool = False,
) -> dict[str, EmbeddingSet]:
    """Run :func:`embed_split` for each of ``splits``; return ``{split: EmbeddingSet}``.

    The arguments are those of :func:`embed_split`.
    """
    return {
        s: embed_split(
            embedder,
            catalogue,
            s,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            precision=precision,
            shard_size=shard_size,
            progress=progress,
            lock_timeout=lock_timeout,
            overwrite=overwrite,
        )
        for s in sorted(set(splits))
    }


def _wait_complete(cache: EmbeddingCache) -> bool:
    import torch.distributed as dist

    dist.barrier()
    return cache.is_complete()


def embedding_cache(embedder, catalogue: Catalogue, split: str, root=None) -> EmbeddingCache:
    """The cache entry for ``embedder`` on ``catalogue``/``split`` (not necessarily computed)."""
    identity = {
        **embedder.cache_identity(),
        "dataset_fingerprint": catalogue.fingerprint(),
        "normalized": False,  # raw pooled features; consumers L2-normalise
        "extraction_version": EXTRACTION_VERSION,
    }
    return EmbeddingCache(catalogue.name, embedder.spec.name, split, identity, root=root)


def _provenance(embedder, dev: torch.device, amp_dtype, dist_info: DistInfo) -> dict:
    return {
        "weights_used": embedder.weights_used,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor(),
        "autocast": str(amp_dtype) if amp_dtype is not None else "fp32",
        "world_size": dist_info.world_size,
        "torch": torch.__version__,
    }


def split_labels(es: EmbeddingSet, catalogue: Catalogue, column: str | None = None) -> np.ndarray:
    """Labels of the cached vectors, in their order."""
    return es.labels(catalogue.items, column or catalogue.default_label)


__all__ = [
    "DEFAULT_SHARD_SIZE",
    "ModelForward",
    "embed_split",
    "embed_splits",
    "embedding_cache",
    "split_labels",
    "unreadable",
    "verified_complete",
    "resolve_device",
    "resolve_precision",
    "init_distributed",
    "DistInfo",
]
