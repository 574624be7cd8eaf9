"""Stage 01's extraction on Ray Data: one split embedded by a pool of actors, into the same cache.

The split's cache (:func:`embbench.embed.embedding_cache`, keyed exactly as the single-process
path keys it) is opened and locked on the driver; the shards still to do become a Ray Dataset,
and ``map_batches`` hands them, one shard per call, to a pool of actors (one per GPU of the
cluster with ``num_gpus=1``, or CPU actors; :func:`plan_actors`). Each actor holds the embedder
(shipped once, so every actor runs the same weights), reads and decodes its shard's images in
``ceil(actor_cpus)`` threads ahead of the model, embeds them in batches that never cross the
shard, on its device and with the precision the single-process path would use there, and writes
the shard with the cache's own ``write_shard`` (checksums, the ``.json`` last). The driver then
consolidates. A killed run keeps its finished shards, so the next run embeds only the rest; the
vectors equal the single-process path's (the same model, preprocessing, batches and precision).
A complete cache is read back without Ray.

Inside a Ray task (a cell of ``embbench ray run``) or a driver that already joined a cluster,
that connection is used and left open (:func:`embbench._ray.ray_session`); the actors are then
scheduled beside the task, which keeps its own CPUs and GPUs.

Ray is optional (``pip install 'embbench[ray]'``): it is imported inside the functions.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embbench._ray import RayRunError, import_ray, ray_session
from embbench._torch_utils import resolve_device, resolve_precision
from embbench.cache import EmbeddingCache, EmbeddingSet
from embbench.catalogue import Catalogue
from embbench.embed import (
    DEFAULT_SHARD_SIZE,
    ImageRows,
    ModelForward,
    embedding_cache,
    unreadable,
    verified_complete,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayEmbedOptions:
    """Where and with how many actors a split is embedded on Ray Data (never what is computed).

    Attributes:
        address: The Ray cluster: "" uses the running connection (inside a Ray task or a
            driver that called ``ray.init``), else Ray's default (``$RAY_ADDRESS``, a cluster
            started on this machine, else a new one); ``local`` starts one here; ``auto``,
            ``HOST:6379`` or ``ray://HOST:10001`` join a running cluster.
        actors: Actors in the pool; 0 = one per GPU of the cluster, else one per free
            ``actor_cpus`` CPUs (never more than the shards to do).
        actor_gpus: GPUs per actor; ``None`` = 1 when the cluster has GPUs, else 0 (CPU actors).
        actor_cpus: CPUs per actor (fractions allowed, e.g. 0.5 to fit beside a cell's task).
    """

    address: str = ""
    actors: int = 0
    actor_gpus: float | None = None
    actor_cpus: float = 1.0


class ShardEmbedder:
    """A Ray Data actor: embeds whole shards of one split and writes them into its cache.

    Args:
        embedder: The embedder (model + preprocessing), the same object on every actor.
        cache: The split's cache (its folder is on a file system every node sees).
        ids: The split's item ids, in cache order.
        paths: Their image files.
        batch_size: Images per forward pass.
        device: ``auto`` (the actor's GPU when Ray gave it one, else the CPU), ``cpu``, ``cuda``.
        precision: As for :func:`embbench.embed.embed_split` (``auto``: fp32 on the CPU).
        decode_threads: Threads reading and decoding the shard's images, in order, ahead of
            the forward passes (PIL and torch release the GIL while they work).
    """

    def __init__(
        self,
        embedder: Any,
        cache: EmbeddingCache,
        ids: list[str],
        paths: list[str],
        batch_size: int,
        device: str = "auto",
        precision: str = "auto",
        decode_threads: int = 1,
    ) -> None:
        self.decoder = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode")
        dev = resolve_device(device)
        self.forward = ModelForward(embedder.model, dev, resolve_precision(precision, dev))
        self.rows = ImageRows(paths, embedder.transform)
        self.dim = embedder.embed_dim
        self.cache, self.ids, self.batch_size = cache, ids, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed and write every shard of ``batch`` (columns ``shard``, ``start``, ``stop``)."""
        done = []
        for s, start, stop in zip(batch["shard"], batch["start"], batch["stop"], strict=True):
            vecs, ok, failed = [], [], []
            decoded = self.decoder.map(self.rows.__getitem__, range(int(start), int(stop)))
            for b in range(int(start), int(stop), self.batch_size):
                items = list(itertools.islice(decoded, min(self.batch_size, int(stop) - b)))
                good = [(i, t) for i, t, r in items if r is None]
                failed += [
                    unreadable(self.ids[i], self.rows.paths[i], reason)
                    for i, _, reason in items
                    if reason is not None
                ]
                if good:
                    vecs.append(self.forward(torch.stack([t for _, t in good])))
                    ok += [self.ids[i] for i, _ in good]
            vec = np.concatenate(vecs) if vecs else np.zeros((0, self.dim), np.float32)
            self.cache.write_shard(int(s), vec, ok, failed)
            done.append(int(s))
        return {"shard": np.asarray(done)}


def plan_actors(
    options: RayEmbedOptions,
    n_todo: int,
    cluster: Mapping[str, float],
    held: Mapping[str, float] | None = None,
) -> tuple[int, float]:
    """``(actors, GPUs per actor)`` for ``n_todo`` shards on a cluster of ``cluster`` resources.

    Args:
        options: The requested pool (0 actors / ``None`` GPUs: decided here).
        n_todo: Shards still to embed (no more actors than that).
        cluster: The cluster's total resources (``ray.cluster_resources()``).
        held: Resources the calling task holds (a cell of ``embbench ray run``); actors cannot
            use them.

    Raises:
        RayRunError: Not even one actor fits beside what the calling task holds (it would wait
            for ever); the message says what to give back.
    """
    held = held or {}
    free_gpus = cluster.get("GPU", 0) - held.get("GPU", 0)
    free_cpus = cluster.get("CPU", 0) - held.get("CPU", 0)
    gpus = options.actor_gpus
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    if (gpus > 0 and free_gpus < gpus) or free_cpus < options.actor_cpus:
        raise RayRunError(
            f"no Ray Data actor fits: each asks for {options.actor_cpus:g} CPU(s) and "
            f"{gpus:g} GPU(s); the cluster has {cluster.get('CPU', 0):g} CPU(s) and "
            f"{cluster.get('GPU', 0):g} GPU(s), of which this task holds "
            f"{held.get('CPU', 0):g} and {held.get('GPU', 0):g}. Fix: ask less per actor "
            "(ray_actor_cpus: 0.5, ray_actor_gpus: 0), add nodes, or give the stage 01 cells "
            "fewer resources (embbench ray run --resources pretrained=1,0)"
        )
    if options.actors:
        n = options.actors
    elif gpus > 0:
        n = int(free_gpus // gpus)
    else:
        n = int(free_cpus // options.actor_cpus)
    return max(1, min(n, n_todo)), float(gpus)


def _held(ray: Any, reused: bool) -> dict[str, float]:
    """What the calling Ray task or actor holds (nothing on a driver)."""
    if not reused:
        return {}
    try:
        return dict(ray.get_runtime_context().get_assigned_resources())
    except Exception:  # noqa: BLE001 - a driver has none
        return {}


def embed_split_ray(
    embedder: Any,
    catalogue: Catalogue,
    split: str,
    *,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    options: RayEmbedOptions | None = None,
    cache_root: Any = None,
    lock_timeout: float | None = None,
) -> EmbeddingSet:
    """Embed ``split`` with a Ray Data actor pool; return the cached vectors (computed if missing).

    Args:
        embedder: An :class:`embbench.models.Embedder`.
        catalogue: The catalogue to read.
        split: The split to embed.
        batch_size: Images per forward pass (per actor).
        device: Each actor's device (``auto``: its GPU, if Ray gave it one).
        precision: As for :func:`embbench.embed.embed_split`.
        shard_size: Images per cache shard (the unit of work and of resumption).
        overwrite: Recompute even when a complete cache exists.
        options: The cluster and the actor pool (:class:`RayEmbedOptions`).
        cache_root: Cache root override (default ``cache_dir()/"embeddings"``).
        lock_timeout: Seconds to wait for another run embedding the same split.

    Raises:
        RayRunError: Ray is missing, the cluster unreachable, or no actor fits on it.
    """
    if shard_size < 1:
        raise ValueError(
            f"shard_size={shard_size}: must be at least 1 (default {DEFAULT_SHARD_SIZE})"
        )
    options = options or RayEmbedOptions()
    cache = embedding_cache(embedder, catalogue, split, root=cache_root)
    if not overwrite and (done := verified_complete(cache)) is not None:
        logger.info("embeddings cached: %s", cache.path)
        return done
    rows = catalogue.split(split)
    ids = rows["item_id"].astype(str).tolist()
    paths = rows["path"].astype(str).tolist()
    ray = import_ray("embed_engine: ray")
    with cache.lock(timeout=lock_timeout):
        if not overwrite and (done := verified_complete(cache)) is not None:
            logger.info("embeddings cached by another run while waiting: %s", cache.path)
            return done
        provenance = {
            "weights_used": embedder.weights_used,
            "engine": "ray-data",
            "device": device,
            "precision": precision,
            "torch": torch.__version__,
        }
        cache.begin(ids, shard_size, provenance=provenance, overwrite=overwrite)
        n_shards = cache.n_shards(len(ids), shard_size)
        todo = [
            {"shard": s, "start": s * shard_size, "stop": min((s + 1) * shard_size, len(ids))}
            for s in range(n_shards)
            if not cache.shard_done(s)
        ]
        if len(todo) < n_shards:
            logger.info(
                "resuming %s: %d of %d shard(s) already done",
                cache.path,
                n_shards - len(todo),
                n_shards,
            )
        if todo:
            with ray_session(ray, options.address) as reused:
                actors, gpus = plan_actors(
                    options, len(todo), ray.cluster_resources(), _held(ray, reused)
                )
                logger.info(
                    "%s: %d shard(s) to %d Ray Data actor(s) (%g CPU, %g GPU each)",
                    cache.path,
                    len(todo),
                    actors,
                    options.actor_cpus,
                    gpus,
                )
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
                            "device": device,
                            "precision": precision,
                            "decode_threads": math.ceil(options.actor_cpus),
                        },
                        batch_size=1,
                        concurrency=actors,
                        num_cpus=options.actor_cpus,
                        num_gpus=gpus,
                    )
                    .take_all()
                )
            logger.info("%s: %d shard(s) embedded by Ray Data", cache.path, len(written))
        return cache.consolidate(n_shards)


__all__ = ["RayEmbedOptions", "ShardEmbedder", "embed_split_ray", "plan_actors"]
