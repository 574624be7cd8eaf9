"""Stage 01's extraction on Ray Data: one split embedded by a pool of actors, into the same cache.

The split's cache (:func:`embbench.embed.embedding_cache`, keyed exactly as the single-process
path keys it) is opened and locked on the driver; the shards still to do become a Ray Dataset,
and ``map_batches`` hands them, one shard per call, to a pool of actors (``concurrency``; one
per GPU with ``num_gpus=1``, or CPU actors). Each actor holds the embedder (shipped once, so
every actor runs the same weights), reads and decodes its shard's images, embeds them in
batches that never cross the shard and writes the shard with the cache's own ``write_shard``
(checksums, the ``.json`` last). The driver then consolidates. A killed run keeps its finished
shards, so the next run embeds only the rest; the vectors equal the single-process path's
(the same model, preprocessing and batches).

Ray is optional (``pip install 'embbench[ray]'``): it is imported inside the functions.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from embbench.cache import EmbeddingCache, EmbeddingSet
from embbench.catalogue import Catalogue
from embbench.embed import DEFAULT_SHARD_SIZE, ImageRows, embedding_cache
from embbench.pipeline.ray_grid import RayOptions, connect, import_ray

logger = logging.getLogger(__name__)


class ShardEmbedder:
    """A Ray Data actor: embeds whole shards of one split and writes them into its cache.

    Args:
        embedder: The embedder (model + preprocessing), the same object on every actor.
        cache: The split's cache (its folder is on a file system every node sees).
        ids: The split's item ids, in cache order.
        paths: Their image files.
        batch_size: Images per forward pass.
    """

    def __init__(
        self,
        embedder: Any,
        cache: EmbeddingCache,
        ids: list[str],
        paths: list[str],
        batch_size: int,
    ) -> None:
        self.model = embedder.model.eval()
        self.rows = ImageRows(paths, embedder.transform)
        self.dim = embedder.embed_dim
        self.cache, self.ids, self.batch_size = cache, ids, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed and write every shard of ``batch`` (columns ``shard``, ``start``, ``stop``)."""
        done = []
        for s, start, stop in zip(batch["shard"], batch["start"], batch["stop"], strict=True):
            vecs, ok, failed = [], [], []
            for b in range(int(start), int(stop), self.batch_size):
                items = [self.rows[i] for i in range(b, min(b + self.batch_size, int(stop)))]
                good = [(i, t) for i, t, r in items if r is None]
                failed += [
                    {"item_id": self.ids[i], "path": self.rows.paths[i], "reason": r}
                    for i, _, r in items
                    if r is not None
                ]
                if good:
                    with torch.inference_mode():
                        out = self.model(torch.stack([t for _, t in good]))
                    vecs.append(out.float().cpu().numpy())
                    ok += [self.ids[i] for i, _ in good]
            vec = np.concatenate(vecs) if vecs else np.zeros((0, self.dim), np.float32)
            self.cache.write_shard(int(s), vec, ok, failed)
            done.append(int(s))
        return {"shard": np.asarray(done)}


def embed_split_ray(
    embedder: Any,
    catalogue: Catalogue,
    split: str,
    *,
    batch_size: int = 64,
    shard_size: int = DEFAULT_SHARD_SIZE,
    concurrency: int = 2,
    num_gpus: float = 0,
    address: str = "",
    cache_root: Any = None,
) -> EmbeddingSet:
    """Embed ``split`` with a Ray Data actor pool; return the cached vectors (computed if missing).

    Args:
        embedder: An :class:`embbench.models.Embedder`.
        catalogue: The catalogue to read.
        split: The split to embed.
        batch_size: Images per forward pass (per actor).
        shard_size: Images per cache shard (the unit of work and of resumption).
        concurrency: Actors in the pool.
        num_gpus: GPUs per actor (0: CPU actors).
        address: The Ray cluster (:class:`~embbench.pipeline.ray_grid.RayOptions`); "" starts
            Ray here.
        cache_root: Cache root override (default ``cache_dir()/"embeddings"``).

    Raises:
        RayRunError: Ray is missing or the cluster unreachable.
    """
    cache = embedding_cache(embedder, catalogue, split, root=cache_root)
    if cache.is_complete():
        return cache.load()
    rows = catalogue.split(split)
    ids = rows["item_id"].astype(str).tolist()
    paths = rows["path"].astype(str).tolist()
    ray = import_ray()
    with cache.lock():
        provenance = {"weights_used": embedder.weights_used, "engine": "ray-data"}
        cache.begin(ids, shard_size, provenance=provenance)
        n_shards = cache.n_shards(len(ids), shard_size)
        todo = [
            {"shard": s, "start": s * shard_size, "stop": min((s + 1) * shard_size, len(ids))}
            for s in range(n_shards)
            if not cache.shard_done(s)
        ]
        if todo:
            connect(ray, RayOptions(address=address))
            try:
                written = (
                    ray.data.from_items(todo)
                    .map_batches(
                        ShardEmbedder,
                        fn_constructor_kwargs={
                            "embedder": embedder,
                            "cache": cache,
                            "ids": ids,
                            "paths": paths,
                            "batch_size": batch_size,
                        },
                        batch_size=1,
                        concurrency=concurrency,
                        num_gpus=num_gpus,
                    )
                    .take_all()
                )
            finally:
                ray.shutdown()
            logger.info("%s: %d shard(s) embedded by Ray Data", cache.path, len(written))
        return cache.consolidate(n_shards)


__all__ = ["ShardEmbedder", "embed_split_ray"]
