"""The transfer recipe's parts for the trainer.

A cosine head with the CosFace loss, frozen batch norm, the linear probe of LP-FT, and model
selection on the validation split's retrieval metric.

Sources of each choice: :data:`embbench.train.recipes.TRANSFER_SOURCES`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from embbench._torch_utils import barrier
from embbench._utils import atomic_write_json
from embbench.retrieval.evaluate import search_and_evaluate
from embbench.train.checkpointing import atomic_torch_save
from embbench.train.data import TrainImages, eval_loader

logger = logging.getLogger(__name__)

__all__ = [
    "CosFaceLoss",
    "CosineHead",
    "before_training",
    "best_epoch",
    "epoch_retrieval",
    "keep_if_best",
    "restore_best",
    "selects_on_val",
    "freeze_batchnorm",
    "install_head",
    "linear_probe",
    "pooled_features",
    "val_retrieval",
]

_BN = (torch.nn.modules.batchnorm._BatchNorm,)


class CosineHead(torch.nn.Module):
    """Normalised softmax: logits = ``scale`` x cosine(feature, class proxy).

    Args:
        in_features: Feature width.
        num_classes: Classes (proxies).
        scale: Logit scale (inverse temperature).
    """

    def __init__(self, in_features: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_classes, in_features))
        torch.nn.init.normal_(self.weight, std=0.01)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``scale`` x cosine similarities to each class proxy."""
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


class CosFaceLoss(torch.nn.Module):
    """Cross-entropy on a cosine head's logits with the target's cosine lowered by ``margin``.

    Args:
        scale: The head's logit scale (the margin is subtracted as ``scale * margin``).
        margin: Additive cosine margin (Wang et al. 2018).
    """

    def __init__(self, scale: float, margin: float) -> None:
        super().__init__()
        self.shift = float(scale) * float(margin)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The margin loss of hard integer targets."""
        onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
        return F.cross_entropy(logits - self.shift * onehot, target)


def _classifier_name(net: torch.nn.Module) -> str:
    head = net.get_classifier()
    for name, module in net.named_modules():
        if module is head:
            return name
    raise ValueError(f"{type(net).__name__}: cannot find its classifier module")


def install_head(net: torch.nn.Module, hp: dict[str, Any], num_classes: int) -> None:
    """Replace the linear classifier by a :class:`CosineHead` when ``hp["head"] == "cosine"``."""
    kind = hp.get("head", "linear")
    if kind == "linear":
        return
    if kind != "cosine":
        raise ValueError(f"head {kind!r} is not one of ['linear', 'cosine']")
    name = _classifier_name(net)
    old = net.get_classifier()
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    new = CosineHead(old.in_features, num_classes, hp["head_scale"]).to(old.weight.device)
    setattr(parent, name.rpartition(".")[2], new)


def freeze_batchnorm(net: torch.nn.Module) -> int:
    """Put every batch-norm layer in eval mode (running statistics used, not updated).

    Returns:
        The number of layers frozen.
    """
    n = 0
    for m in net.modules():
        if isinstance(m, _BN):
            m.eval()
            n += 1
    return n


def _features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled pre-logits features (what the headless model embeds)."""
    return net.forward_head(net.forward_features(x), pre_logits=True)


def pooled_features(
    net: torch.nn.Module,
    paths: list[str],
    transform,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int,
) -> tuple[torch.Tensor, np.ndarray]:
    """Pooled features of ``paths`` (eval mode); ``(features, readable positions)``."""
    ds = TrainImages(list(paths), list(range(len(paths))), transform)
    loader = eval_loader(
        ds, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    feats, keep = [], []
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        for x, y, _, _bad in loader:
            if x is None:
                continue
            feats.append(_features(net, x.to(device)).float().cpu())
            keep.extend(y.tolist())
    net.train(was_training)
    width = int(net.num_features) if hasattr(net, "num_features") else 0
    out = torch.cat(feats) if feats else torch.zeros(0, width)
    return out, np.asarray(keep, dtype=np.int64)


def linear_probe(
    net: torch.nn.Module,
    features: torch.Tensor,
    targets: torch.Tensor,
    criterion: torch.nn.Module,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> dict[str, float]:
    """Train only the head on frozen features (LP of LP-FT), full batch, AdamW.

    Args:
        net: The network; only ``net.get_classifier()`` changes.
        features: ``(n, d)`` pooled features of the training images.
        targets: ``(n,)`` class indices.
        criterion: The training loss (on the head's logits).
        steps: Optimizer steps.
        lr: Learning rate.
        weight_decay: Decoupled weight decay.
        seed: Seed (the head is already initialised; kept for reproducible float order).

    Returns:
        The probe's first and last loss and its training accuracy.
    """
    head = net.get_classifier()
    device = next(head.parameters()).device
    x, y = features.to(device), targets.to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    torch.manual_seed(seed)
    first = last = float("nan")
    head.train()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = criterion(head(x), y)
        loss.backward()
        opt.step()
        sched.step()
        last = float(loss.detach())
        if step == 0:
            first = last
    with torch.no_grad():
        acc = float((head(x).argmax(1) == y).float().mean()) if len(y) else float("nan")
    return {"lp_loss_first": first, "lp_loss_last": last, "lp_train_accuracy": acc}


def val_retrieval(
    net: torch.nn.Module,
    cat,
    label: str,
    plan: dict,
    transform,
    *,
    split: str,
    device: torch.device,
    batch_size: int,
    num_workers: int,
) -> dict[str, float]:
    """mMP@k and mR@1 of ``split`` under the cell's retrieval protocol, headless features.

    ``within``: queries = index = ``split``; ``cross``: queries from ``split``, the index from
    the plan's index split (the test split's place taken by ``split``).

    Returns:
        ``{"val_mMP@k": .., "val_mR@1": .., "val_n_queries": ..}`` (empty when ``split`` has
        no queries with a relevant item).
    """
    k = int(plan.get("k", 5))
    protocol = plan.get("protocol", "within")
    q_rows = cat.split(split)
    q, q_ok = _split_features(net, q_rows, transform, device, batch_size, num_workers)
    q_lab = q_rows[label].astype(str).to_numpy()[q_ok]
    if protocol == "cross" and plan.get("index_split") not in (None, split):
        i_rows = cat.split(plan["index_split"])
        x, x_ok = _split_features(net, i_rows, transform, device, batch_size, num_workers)
        res = search_and_evaluate(
            q, q_lab, x, i_rows[label].astype(str).to_numpy()[x_ok], k=k, protocol="cross"
        )
    else:
        res = search_and_evaluate(q, q_lab, k=k, protocol="within")
    if not res.n_queries:
        return {}
    return {
        f"val_mMP@{k}": res.summary[f"mMP@{k}"],
        "val_mR@1": res.summary["mR@1"],
        "val_n_queries": float(res.n_queries),
    }


def _split_features(net, rows: pd.DataFrame, transform, device, batch_size, num_workers):
    feats, ok = pooled_features(
        net,
        rows["path"].astype(str).tolist(),
        transform,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
    )
    return feats.numpy().astype(np.float32), ok


def best_epoch(history: list[dict], k: int) -> dict | None:
    """The history entry with the best ``val_mMP@k`` (ties: best ``val_mR@1``, then earliest)."""
    scored = [h for h in history if f"val_mMP@{k}" in h]
    if not scored:
        return None
    return max(scored, key=lambda h: (h[f"val_mMP@{k}"], h.get("val_mR@1", 0.0), -h["epoch"]))


# ------------------------------------------------------------------- the trainer's phases
def selects_on_val(hp: dict[str, Any]) -> bool:
    """Whether the recipe keeps the best-validation-retrieval epoch instead of the last."""
    return hp.get("select", "last") == "val_retrieval"


def before_training(trainer, val_split: str) -> dict[str, float]:
    """A fresh training's first steps: the pretrained start's val retrieval, then the probe.

    The start's validation mMP@k and mR@1 (the line the curves are drawn against) are written
    to ``pretrained_val.json`` in the run folder; with ``lp_steps`` the head is trained on the
    frozen backbone's features (no augmentation) before any backbone update.

    Returns:
        The start's val retrieval metrics and the probe's statistics.
    """
    hp, job = trainer.hp, trainer.job
    out = epoch_retrieval(trainer, val_split)
    if hp.get("lp_steps", 0) > 0:
        feats, ok = pooled_features(
            trainer.net,
            trainer.train_paths,
            trainer.eval_transform,
            device=trainer.dev,
            batch_size=trainer.settings.batch_size,
            num_workers=trainer.settings.num_workers,
        )
        targets = torch.as_tensor(np.asarray(trainer.train_set.targets)[ok], dtype=torch.long)
        out.update(
            linear_probe(
                trainer.net,
                feats.to(trainer.dev),
                targets,
                trainer.criterion,
                steps=int(hp["lp_steps"]),
                lr=float(hp["lp_lr"]),
                weight_decay=float(hp["weight_decay"]),
                seed=trainer.settings.seed,
            )
        )
        if trainer.dist.world_size > 1:  # every rank probed the same features: keep rank 0's
            import torch.distributed as torch_dist

            for param in trainer.net.get_classifier().parameters():
                torch_dist.broadcast(param.data, src=0)
    if trainer.dist.is_main:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(job.run_dir / "pretrained_val.json", out)
    logger.info("%s on %s, before training: %s", job.model, job.dataset, json.dumps(out))
    return out


def epoch_retrieval(trainer, val_split: str) -> dict[str, float]:
    """The network's validation retrieval now (headless features, the cell's protocol)."""
    return val_retrieval(
        trainer.net,
        trainer.job.cat,
        trainer.job.label,
        getattr(trainer.job, "plan", None) or {},
        trainer.eval_transform,
        split=val_split,
        device=trainer.dev,
        batch_size=trainer.settings.batch_size,
        num_workers=trainer.settings.num_workers,
    )


def keep_if_best(trainer, stats: dict[str, Any], epoch: int) -> None:
    """Write ``best.pt`` (rank 0) when this epoch's val retrieval beats every earlier one."""
    k = int((getattr(trainer.job, "plan", None) or {}).get("k", 5))
    best = best_epoch([*trainer.state.history, {"epoch": epoch, **stats}], k)
    if best is not None and best["epoch"] == epoch and trainer.dist.is_main:
        state = {n: v.detach().cpu() for n, v in trainer.net.state_dict().items()}
        atomic_torch_save(state, trainer.job.run_dir / "best.pt")


def restore_best(trainer) -> dict[str, Any]:
    """Load the best-validation epoch's weights (``best.pt``); the selection, as data."""
    k = int((getattr(trainer.job, "plan", None) or {}).get("k", 5))
    best = best_epoch(trainer.state.history, k)
    path = trainer.job.run_dir / "best.pt"
    start_path = trainer.job.run_dir / "pretrained_val.json"
    start = json.loads(start_path.read_text()) if start_path.is_file() else {}
    barrier(trainer.dist)
    if best is None or not path.is_file():
        return {"rule": "last", "epoch": trainer.state.epoch - 1, "start": start}
    trainer.net.load_state_dict(torch.load(path, map_location=trainer.dev, weights_only=True))
    return {
        "start": start,
        "rule": f"best val mMP@{k} (ties: mR@1, earliest)",
        "epoch": int(best["epoch"]),
        f"val_mMP@{k}": float(best[f"val_mMP@{k}"]),
        "val_mR@1": float(best.get("val_mR@1", float("nan"))),
        "of_epochs": len(trainer.state.history),
    }
