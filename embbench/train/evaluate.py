"""Classify a catalogue split with a trained network (all ranks share the work)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pandas as pd
import torch

from embbench._torch_utils import DistInfo, channels_last_for
from embbench.train.data import TrainImages, eval_loader

__all__ = ["predict_split"]


def predict_split(
    net: torch.nn.Module,
    rows: pd.DataFrame,
    label: str,
    classes: list[str],
    transform,
    *,
    device: torch.device,
    dist: DistInfo,
    batch_size: int,
    num_workers: int,
    autocast: Callable[[], AbstractContextManager],
) -> dict[str, Any]:
    """Classify the rows whose ``label`` is one of ``classes``; gathered over all ranks.

    Args:
        net: The network with its classification head (put back in train mode afterwards).
        rows: Catalogue rows (``path`` and the label column).
        label: The label column.
        classes: The head's class names, in order.
        transform: Evaluation transform.
        device: Where the network is.
        dist: This process's rank; each rank classifies every ``world_size``-th row.
        batch_size: Images per forward pass.
        num_workers: DataLoader processes.
        autocast: Returns the autocast context of the forward pass.

    Returns:
        ``y_true``, ``y_pred`` (class names), ``failed`` (path -> reason) and ``n_unknown``
        (rows whose label is not a training class, left out).
    """
    class_index = {c: i for i, c in enumerate(classes)}
    labels = rows[label].astype(str).tolist()
    known = [i for i, v in enumerate(labels) if v in class_index]
    mine = known[dist.rank :: dist.world_size]
    paths = rows["path"].astype(str).tolist()
    ds = TrainImages([paths[i] for i in mine], [class_index[labels[i]] for i in mine], transform)
    loader = eval_loader(
        ds, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    out_true: list[int] = []
    out_pred: list[int] = []
    failed: dict[str, str] = {}
    nhwc = channels_last_for(net, device)  # the trainer put such a net in channels_last
    net.eval()
    with torch.inference_mode():
        for x, y, _, bad in loader:
            for j, reason in bad:
                failed[ds.paths[j]] = reason
            if x is None:
                continue
            x = x.to(device, non_blocking=True)
            if nhwc:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = net(x)
            out_pred.extend(logits.argmax(1).cpu().tolist())
            out_true.extend(y.tolist())
    net.train()
    part = (out_true, out_pred, failed)
    if dist.world_size > 1:
        import torch.distributed as torch_dist

        parts: list[Any] = [None] * dist.world_size
        torch_dist.all_gather_object(parts, part)
    else:
        parts = [part]
    return {
        "y_true": [classes[t] for p in parts for t in p[0]],
        "y_pred": [classes[t] for p in parts for t in p[1]],
        "failed": {k: v for p in parts for k, v in p[2].items()},
        "n_unknown": len(labels) - len(known),
    }
