"""What several training processes (DDP) agree on: the epoch's numbers, buffers, weights.

DDP averages the gradients, so every rank takes the same optimizer step, but each rank sees
only its shard of the epoch and keeps its own BatchNorm statistics (no SyncBatchNorm on the
CPU). These helpers make the job's record the job's, not rank 0's:

- :func:`sum_over_ranks`: the epoch's loss and image count over every rank;
- :func:`sync_buffers`: rank 0's buffers (BatchNorm statistics) on every rank before an
  evaluation the ranks share (each rank's last forward updated its own);
- :func:`weight_checksums`: every rank's checksum of the weights, compared: a job whose ranks
  diverged (gradients not synchronised) fails instead of recording rank 0's model.

With one process every function is a no-op or a local computation.
"""

from __future__ import annotations

import torch

from embbench._torch_utils import DistInfo
from embbench.train.errors import FinetuneError

__all__ = ["sum_over_ranks", "sync_buffers", "weight_checksums"]


def sum_over_ranks(dist: DistInfo, loss_sum: float, n_images: int) -> tuple[float, int]:
    """The loss sum and image count of an epoch summed over every rank."""
    if dist.world_size <= 1:
        return loss_sum, n_images
    import torch.distributed as torch_dist

    both = torch.tensor([loss_sum, float(n_images)], dtype=torch.float64)
    torch_dist.all_reduce(both)
    return float(both[0]), int(both[1])


def sync_buffers(dist: DistInfo, net: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if dist.world_size <= 1:
        return
    import torch.distributed as torch_dist

    for buf in net.buffers():
        torch_dist.broadcast(buf, src=0)


def weight_checksums(dist: DistInfo, net: torch.nn.Module, what: str) -> list[float]:
    """Every rank's checksum of ``net``'s weights and buffers (after :func:`sync_buffers`).

    Args:
        dist: This process's rank.
        net: The bare network (not the DDP wrapper).
        what: The training, for the error (``model on dataset``).

    Raises:
        FinetuneError: The ranks hold different weights: gradients were not synchronised.
    """
    sync_buffers(dist, net)
    with torch.no_grad():
        mine = torch.stack([t.detach().double().sum() for t in net.state_dict().values()])
    if dist.world_size <= 1:
        return [float(mine.sum())]
    import torch.distributed as torch_dist

    parts = [torch.zeros_like(mine) for _ in range(dist.world_size)]
    torch_dist.all_gather(parts, mine)
    if any(not torch.equal(parts[0], p) for p in parts[1:]):
        raise FinetuneError(
            f"{what}: the {dist.world_size} training processes hold different weights after "
            "training (gradients were not synchronised); the run is not valid"
        )
    return [float(p.sum()) for p in parts]
