"""One training: timm model, data, optimizer, schedule, checkpoints, evaluation.

Built from timm's own parts: the loss, optimizer and LR schedule of
:mod:`embbench.train.optim`, ``create_transform`` and ``RepeatAugSampler``. CUDA: bf16/fp16
autocast (a GradScaler for fp16), channels_last, pinned memory; several processes: DDP,
samplers split by rank.

The trainer takes what it needs explicitly: the resolved recipe and the data in a
:class:`TrainJob`, the run's settings in a :class:`TrainSettings`; it never sees a stage config.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from embbench._torch_utils import (
    DistInfo,
    barrier,
    channels_last_for,
    resolve_device,
    resolve_precision,
    seed_all,
    set_rng_state,
)
from embbench._utils import atomic_write_json
from embbench.metrics import accuracy, classification_metrics
from embbench.tracking import run_name
from embbench.train import ddp, tracking
from embbench.train.checkpointing import (
    TrainState,
    load_checkpoint,
    restore_training,
    save_checkpoint,
    save_headless,
)
from embbench.train.data import (
    TrainImages,
    eval_data_config,
    eval_transform,
    train_loader,
    train_sampler,
    train_transform,
)
from embbench.train.evaluate import predict_split
from embbench.train.job import TrainJob, TrainSettings
from embbench.train.model import build_trainable
from embbench.train.optim import build_loss, build_optimizer
from embbench.train.transfer import (
    before_training,
    epoch_retrieval,
    freeze_batchnorm,
    install_head,
    keep_if_best,
    restore_best,
    selects_on_val,
)

logger = logging.getLogger(__name__)

__all__ = ["FineTuner", "TrainJob", "TrainSettings"]

_RANK_SEED = 7919  # other ranks: same initial weights (DDP broadcasts rank 0's), own draws


def _after_epoch(trainer: FineTuner, epoch: int) -> None:
    """Hook called after each epoch's checkpoint (tests replace it to kill a run)."""


class FineTuner:
    """One training: model, data, optimizer, schedule, checkpoints.

    Args:
        settings: How to run (device, batches, seeds, checkpoints, MLflow experiment).
        job: What to train (model, catalogue, classes, resolved recipe, folders).
        dist_info: This process's rank (:func:`embbench._torch_utils.init_distributed`).
        run_params: Extra parameters logged with the MLflow training run (e.g. the stage's
            config as JSON).
    """

    def __init__(
        self,
        settings: TrainSettings,
        job: TrainJob,
        dist_info: DistInfo | None = None,
        run_params: dict[str, Any] | None = None,
    ) -> None:
        self.settings = s = settings
        self.job = job
        self.run_params = dict(run_params or {})
        self.dist = dist_info or DistInfo()
        self.dev = resolve_device(s.device)
        self.amp_dtype = resolve_precision(s.precision, self.dev)
        self.hp = hp = job.hp
        self.state = TrainState()
        self.class_index = {c: i for i, c in enumerate(job.classes)}

        seed_all(s.seed)
        net, self.embedder, self.extra_model_kwargs = build_trainable(
            job.model, s.weights, len(job.classes), (hp["train_size"], hp["test_size"]), s.seed
        )
        install_head(net, hp, len(job.classes))  # the transfer recipe's cosine head
        if self.dist.rank:
            seed_all(s.seed + _RANK_SEED * self.dist.rank)
        net.to(self.dev)
        self.channels_last = channels_last_for(net, self.dev)  # CUDA; CPU for conv nets
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net  # the bare network; under several processes `ddp` wraps it
        self.ddp = None
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                net, device_ids=[self.dev.index] if self.dev.type == "cuda" else None
            )

        dc = self.embedder.data_config
        self.mean, self.std = tuple(dc["mean"]), tuple(dc["std"])
        self.interpolation = dc.get("interpolation") or "bicubic"
        self.train_transform = train_transform(hp, self.mean, self.std)
        self.eval_data_config = eval_data_config(hp, self.mean, self.std, self.interpolation)
        self.eval_transform = eval_transform(self.eval_data_config)

        rows = job.cat.split("train")
        self.train_paths = rows["path"].astype(str).tolist()
        self.train_ids = rows["item_id"].astype(str).tolist()
        targets = [self.class_index[str(v)] for v in rows[job.label]]
        self.train_set = TrainImages(self.train_paths, targets, self.train_transform)
        self.sampler = train_sampler(self.train_set, self.dist, hp["aug_repeats"], s.seed)
        self.generator = torch.Generator()
        self.loader = train_loader(
            self.train_set,
            self.sampler,
            batch_size=s.batch_size,
            num_workers=s.num_workers,
            pin_memory=self.dev.type == "cuda",
            generator=self.generator,
        )
        self.updates_per_epoch = max(1, math.ceil(len(self.loader) / s.grad_accum))

        self.mixup, self.criterion = build_loss(hp, len(job.classes))
        self.optimizer, self.scheduler = build_optimizer(net, hp, self.updates_per_epoch)
        self.scaler = torch.amp.GradScaler(
            self.dev.type, enabled=self.amp_dtype == torch.float16 and self.dev.type == "cuda"
        )

    # ---- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``last.pt`` atomically (rank 0); every rank waits for it."""
        path = self.job.checkpoint_path
        if self.dist.is_main:
            save_checkpoint(
                path,
                train_hash=self.job.train_hash,
                classes=self.job.classes,
                state=self.state,
                net=self.net,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                device=self.dev,
            )
        barrier(self.dist)
        return path

    def resume(self) -> int:
        """Load ``last.pt`` if it exists; return the epoch training continues at (0 if none).

        Raises:
            FinetuneError: The checkpoint belongs to another training (hash or classes differ).
        """
        path = self.job.checkpoint_path
        ckpt = load_checkpoint(path, train_hash=self.job.train_hash, classes=self.job.classes)
        if ckpt is None:
            return 0
        self.state = restore_training(
            ckpt,
            net=self.net,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
        )
        if self.dist.is_main:
            set_rng_state(ckpt["rng"], self.dev)
        else:  # the checkpoint holds rank 0's streams; other ranks draw their own
            seed_all(self.settings.seed + _RANK_SEED * self.dist.rank + int(ckpt["epoch"]))
        logger.info(
            "%s on %s: resuming from %s at epoch %d (%d updates done)",
            self.job.model,
            self.job.dataset,
            path,
            self.state.epoch,
            self.state.num_updates,
        )
        return self.state.epoch

    # ---- training --------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.dev.type, dtype=self.amp_dtype)

    def batches(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        """The epoch's training batches on the device, mixed, with bad images recorded."""
        seed = self.settings.seed
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch + 1_000_003 * seed)
        self.generator.manual_seed(seed * 100_003 + epoch)
        for x, y, _, bad in self.loader:
            for i, reason in bad:
                if self.train_paths[i] not in self.state.failed:
                    logger.warning("skipping unreadable image %s: %s", self.train_paths[i], reason)
                self.state.failed[self.train_paths[i]] = reason
            if x is None:
                continue
            if self.mixup is not None and len(x) % 2:
                x, y = x[:-1], y[:-1]  # timm's batch mixup pairs images with the flipped batch
            if len(x) == 0:
                continue
            x = x.to(self.dev, non_blocking=True)
            y = y.to(self.dev, non_blocking=True)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def _optimizer_step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.num_updates += 1
        self.scheduler.step_update(self.state.num_updates)

    def train_step(self, x, y, *, sync: bool = True):
        """Forward, backward and (when ``sync``) one optimizer step; returns the loss tensor."""
        forward = self.net if self.ddp is None else self.ddp
        ctx = self.ddp.no_sync() if self.ddp is not None and not sync else nullcontext()
        with ctx:
            with self._autocast():
                loss = self.criterion(forward(x), y)
            self.scaler.scale(loss / self.settings.grad_accum).backward()
        if sync:
            self._optimizer_step()
        return loss

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the sampler; returns mean loss, lr, images and images/s."""
        (self.net if self.ddp is None else self.ddp).train()
        if self.hp.get("freeze_bn"):
            freeze_batchnorm(self.net)
        accum = self.settings.grad_accum
        n_batches = len(self.loader)
        total, n_images, micro = 0.0, 0, 0
        t0 = time.perf_counter()
        for b, (x, y) in enumerate(self.batches(epoch)):
            micro += 1
            sync = micro % accum == 0 or b == n_batches - 1
            loss = self.train_step(x, y, sync=sync)
            total += float(loss.detach()) * len(x)
            n_images += len(x)
        if micro % accum:  # the loader ended early (bad images): flush
            self._optimizer_step()
        wall = time.perf_counter() - t0
        mine = n_images
        total, n_images = ddp.sum_over_ranks(self.dist, total, n_images)  # the job's, all ranks
        stats = {
            "train_loss": total / max(n_images, 1),
            "lr": max(float(g["lr"]) for g in self.optimizer.param_groups),  # the head's
            "train_images": n_images,
            "train_images_per_s": n_images / wall if wall > 0 else 0.0,
        }
        if self.dist.world_size > 1:  # each rank trains on its own shard of the epoch
            stats["train_images_rank0"] = mine
        return stats

    # ---- evaluation ------------------------------------------------------------------------
    def predict(self, split: str) -> dict[str, Any]:
        """Classify ``split`` (rows whose label the head knows); gathered over all ranks.

        Returns:
            ``y_true``, ``y_pred`` (class names), ``failed`` (path -> reason) and
            ``n_unknown`` (rows whose label is not a training class, left out).
        """
        ddp.sync_buffers(self.dist, self.net)  # the ranks share the split: one network
        return predict_split(
            self.net,
            self.job.cat.split(split),
            self.job.label,
            self.job.classes,
            self.eval_transform,
            device=self.dev,
            dist=self.dist,
            batch_size=self.settings.batch_size,
            num_workers=self.settings.num_workers,
            autocast=self._autocast,
        )

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train (resuming if a checkpoint exists and ``settings.resume``), evaluate, save.

        Returns:
            The training summary (also written to ``summary.json`` on rank 0).
        """
        s, job, hp = self.settings, self.job, self.hp
        start = self.resume() if s.resume else 0
        val_split = "val" if "val" in job.cat.splits else "test"
        test_split = "test" if "test" in job.cat.splits else val_split
        run = self._start_run()
        select = selects_on_val(hp)
        try:
            if start == 0 and (select or hp.get("lp_steps")):
                before = before_training(self, val_split)
                if run is not None:
                    tracking.log_epoch(run, {f"start_{k}": v for k, v in before.items()}, 0)
            for epoch in range(start, hp["epochs"]):
                t0 = time.perf_counter()
                stats = self.train_epoch(epoch)
                last = epoch == hp["epochs"] - 1
                if s.eval_every and ((epoch + 1) % s.eval_every == 0) and not last:
                    pred = self.predict(val_split)
                    stats["val_accuracy"] = accuracy(pred["y_true"], pred["y_pred"])
                if select and (last or (s.eval_every and (epoch + 1) % s.eval_every == 0)):
                    stats.update(epoch_retrieval(self, val_split))
                    keep_if_best(self, stats, epoch)
                stats["epoch_wall_s"] = time.perf_counter() - t0
                self.state.train_wall_s += stats["epoch_wall_s"]
                self.state.history.append({"epoch": epoch, **stats})
                self.state.epoch = epoch + 1
                if run is not None:
                    tracking.log_epoch(run, stats, epoch)
                (logger.info if self.dist.is_main else logger.debug)(
                    "%s on %s, epoch %d/%d: %s",
                    job.model,
                    job.dataset,
                    epoch + 1,
                    hp["epochs"],
                    ", ".join(f"{k}={v:.4g}" for k, v in stats.items()),
                )
                if (epoch + 1) % s.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                _after_epoch(self, epoch)

            what = f"{job.model} on {job.dataset}"
            checksums = ddp.weight_checksums(self.dist, self.net, what)
            self.selection = restore_best(self) if select else {"rule": "last"}
            t0 = time.perf_counter()
            val = self.predict(val_split)
            test = val if test_split == val_split else self.predict(test_split)
            eval_wall = time.perf_counter() - t0
            if test["y_true"]:
                test_metrics = classification_metrics(test["y_true"], test["y_pred"])
            else:  # class-disjoint split (e.g. SOP products): no test image has a known class
                logger.warning(
                    "%s on %s: no %s image has a training class of label %r (class-disjoint "
                    "split); classification metrics are undefined",
                    job.model,
                    job.dataset,
                    test_split,
                    job.label,
                )
                test_metrics = {}
            if self.state.history and "val_accuracy" not in self.state.history[-1]:
                self.state.history[-1]["val_accuracy"] = accuracy(val["y_true"], val["y_pred"])
            summary = self._summary(val_split, val, test_split, test, test_metrics, eval_wall)
            summary["weight_checksums"] = checksums  # one per rank, equal (DDP)
            if self.dist.is_main:
                self._save_outputs(summary, test)
                if run is not None:
                    tracking.finish_run(
                        run, summary, test, model_path=job.model_path, run_dir=job.run_dir
                    )
            barrier(self.dist)
        except BaseException:
            if run is not None:
                tracking.kill_run(run)
            raise
        return summary

    def _summary(self, val_split, val, test_split, test, test_metrics, eval_wall) -> dict:
        s, job, hp = self.state, self.job, self.hp
        gpu = self.dev.type == "cuda"
        gpu_hours = s.train_wall_s * self.dist.world_size / 3600 if gpu else 0.0
        return {
            "model": job.model,
            "dataset": job.dataset,
            "recipe": hp["name"],
            "train_hash": job.train_hash,
            "label": job.label,
            "n_classes": len(job.classes),
            "n_train": len(self.train_paths),
            "epochs": hp["epochs"],
            "num_updates": s.num_updates,
            "resumed_at": s.resumed_at,
            "hyperparameters": hp,
            "lr_base": hp["lr_base"],
            "lr_scaled": hp["lr"],
            "lr_scaling": hp["lr_scaling"],
            "reference_batch": hp["reference_batch"],
            "global_batch": hp["global_batch"],
            "world_size": self.dist.world_size,
            "device": str(self.dev),
            "device_name": torch.cuda.get_device_name(self.dev)
            if gpu
            else (platform.processor() or platform.machine()),
            "autocast": str(self.amp_dtype) if self.amp_dtype is not None else "fp32",
            "train_wall_s": round(s.train_wall_s, 3),
            "eval_wall_s": round(eval_wall, 3),
            "gpu_hours": round(gpu_hours, 6),
            "gpu_hours_note": (
                f"{self.dist.world_size} GPU(s) x training wall time"
                if gpu
                else "CPU run: no GPU time (gpu_hours = 0)"
            ),
            "val_split": val_split,
            "val_accuracy": accuracy(val["y_true"], val["y_pred"]),
            "val_n": len(val["y_true"]),
            "val_n_unknown_label": val["n_unknown"],
            "classification_split": test_split,
            "classification": test_metrics,
            "classification_n": len(test["y_true"]),
            "classification_n_unknown_label": test["n_unknown"],
            "failed_images": [
                {"path": p, "reason": r}
                for p, r in sorted({**s.failed, **val["failed"], **test["failed"]}.items())
            ],
            "history": s.history,
            "selection": self.selection,
            "embedder_weights": self.embedder.weights_used,
            "eval_data_config": self.eval_data_config,
            "extra_model_kwargs": self.extra_model_kwargs,
            "mlflow_run_id": s.mlflow_run_id,
            "model_path": str(job.model_path),
        }

    def _save_outputs(self, summary: dict, test: dict) -> None:
        job = self.job
        summary["model_sha256"] = save_headless(self.net, job.model_path)
        atomic_write_json(job.run_dir / "classes.json", list(job.classes))
        pd.DataFrame({"y_true": test["y_true"], "y_pred": test["y_pred"]}).to_csv(
            job.run_dir / "test_predictions.csv", index=False
        )
        atomic_write_json(job.summary_path, summary)
        # finished: the resumable checkpoint (weights + optimizer state, ~3x the model) has
        # served its purpose; the headless model.pt and summary.json are what later stages use
        job.checkpoint_path.unlink(missing_ok=True)

    # ---- MLflow ------------------------------------------------------------------------------
    def _start_run(self) -> str | None:
        """Open (or reopen, when resuming) the training's MLflow run on rank 0; its id."""
        if not self.dist.is_main or not self.settings.experiment:
            return None

        job, hp = self.job, self.hp
        tags = tracking.training_tags(job, hp["name"])
        params = {
            **self.run_params,
            "settings": asdict(self.settings),
            "hp": hp,
            "n_classes": len(job.classes),
            "n_train": len(self.train_paths),
            "world_size": self.dist.world_size,
            "device": str(self.dev),
            "label": job.label,
            "weights_used": self.embedder.weights_used,
        }
        run_id = tracking.start_run(
            self.settings.experiment,
            run_id=self.state.mlflow_run_id,
            run_name=run_name("finetune", job.model, job.dataset, "training"),
            tags=tags,
            params=params,
        )
        if run_id != self.state.mlflow_run_id:
            self.state.mlflow_run_id = run_id
            logger.info(
                "training %s on %s: lr %.4g (recipe %s: %.4g at batch %d, %s rule, global "
                "batch %d)",
                *(job.model, job.dataset, hp["lr"], hp["name"], hp["lr_base"]),
                *(hp["reference_batch"], hp["lr_scaling"], hp["global_batch"]),
            )
        return run_id
