"""CPU thread budget: DataLoader workers + intra-op threads never exceed the usable cores.

On a CPU, image decoding (DataLoader workers, one core each) and the forward pass (torch's
intra-op threads) share the cores. torch's default (one intra-op thread per core) plus decoding
workers oversubscribes them. How much that costs depends on what else the machine runs: on 2
cores with timm's ``test_resnet``, the oversubscribed default (2 threads + 2 workers) ran at
11.8 images/s on a busy machine (load ~9) against 32-42 for one thread and one worker; on the
same machine quiet (load ~1, 640 images) it ran at 142 images/s, within the noise of every other
split (105-150), because the cores were free for the extra threads. The budget never
oversubscribes, so it is never the pathological case.

**The rule** (:func:`resolve_thread_budget`, ``threads="auto"``, ``num_workers="auto"``):

* CUDA: the GPU runs the model, the CPU only decodes: ``workers = min(8, cores - 1)``, the rest
  (at least 1) intra-op threads.
* CPU: split the ``cores`` so both pipelines keep pace. Per image, decoding costs about
  :data:`DECODE_CORE_MS` core-milliseconds and the forward pass about ``gflops /``
  :data:`CORE_GFLOPS` core-seconds. With ``w`` workers decoding and ``cores - w`` threads
  running the model, the pipeline delivers ``min(w / decode, (cores - w) / forward)`` images/s;
  with no worker, decoding runs inline: ``1 / (decode + forward / cores)``, or, embedding
  (``decode_ahead=True``: :class:`embbench.decode.DecodeAhead`), in one low-priority background
  thread that fills the core time the forward pass leaves idle:
  ``min(cores / (decode + forward), 1 / decode)``. The rule takes the ``w`` with the highest
  rate (ties: fewer workers). On 2 cores every model gets 2 threads and no worker (the tiny test
  model too: its forward costs 2-3x its decoding); on 16 cores a small model gets decoding
  workers (one background thread cannot keep pace). Without a FLOP count half the cores decode.
* Training (stage 02, :func:`embbench.stagekit.thread_budget` with ``train_size``): the same
  rule with the FLOPs of a training step, :func:`training_gflops` (3 forwards at the training
  crop's area). EfficientNet-Lite0 at 128 px costs about 10x its decoding of the demo's 96 px
  JPEGs, so on 2 cores both threads train and decoding runs inline (before, without a FLOP
  count, half the cores decoded: 1 thread + 1 worker that sat idle).
* An explicit number for one of the two takes the rest of the cores for the other; explicit
  numbers for both are kept (a warning is logged if they exceed the cores).

**Spin-waiting.** torch's OpenMP threads (libgomp) spin up to ~300k iterations after each
parallel region; with another runnable process on the cores (a decoding worker, another job) the
spinning thread takes the core from it and a 2-thread step slows down many times over. Every
process embbench starts gets ``OMP_WAIT_POLICY=PASSIVE`` (:mod:`embbench._malloc`: read once at
start-up, like glibc's allocator settings), so idle threads sleep.

Measured on the project's 2-core AMD EPYC machine, shared with other jobs (load 3.5-12), with
glibc's allocator settings on; stage 02's real pipeline (Lite0, recipe A3, 128 px, batch 32,
96 training JPEGs of 96 px, 3 interleaved epochs, best kept; ``/tmp`` script around
``benchmarks/bench_finetune.py``'s ``pipeline_epoch``):

==================  ==================  ==========================
split               spinning (default)  ``OMP_WAIT_POLICY=PASSIVE``
==================  ==================  ==========================
1 thread + 1 worker 21.8 images/s       23.8 images/s
2 threads + 0       10.0                **30.5** (1.28x 1 + 1)
2 threads + 1       7.2                 23.4
==================  ==================  ==========================

``benchmarks/bench_allocator.py`` (Lite0, 2 threads, child processes interleaved, load 4-12):
passive waiting multiplied images/s by 4.6 (inference) and 5.1 (training steps) over glibc's
and libgomp's defaults, against 2.3 and 0.96 for the allocator settings alone. The cost on an
idle machine (a futex wake per parallel region instead of a spin) was not measurable here: the
machine was never idle while this was written. Embedding on 2 cores: see the README figures.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

__all__ = [
    "ThreadBudget",
    "apply_thread_budget",
    "available_cores",
    "lower_priority",
    "resolve_thread_budget",
    "training_gflops",
]

# Measured with benchmarks/bench_embedding.py on the project's 2-core AMD EPYC machine, quiet
# (load ~1): 384 px JPEG decode + timm preprocessing 2.3-3.4 ms per image on one core; forward
# 31 GFLOP/s/core for timm's test_resnet, 77 for ViT-B/16. The small model's figure is used: the
# split only matters for models whose forward is as cheap as decoding. (Busy, load ~9, both were
# 4-5x slower: decode 14-16 ms, test_resnet 9 GFLOP/s/core; only their ratio matters.)
DECODE_CORE_MS = 2.5  # JPEG decode + resize + crop + normalise of one image, one core
CORE_GFLOPS = 30.0  # effective fp32 forward throughput of one core, small model
MAX_GPU_WORKERS = 8
# A training step (forward, backward: gradients of activations and of weights) costs about 3
# forward passes (Kaplan et al. 2020, "Scaling laws", section 2.1).
TRAIN_FLOPS_FACTOR = 3.0

Auto = Literal["auto"]


@dataclass(frozen=True)
class ThreadBudget:
    """How the cores are split between decoding workers and the forward pass.

    Attributes:
        intra_op: torch (and TensorFlow) intra-op threads of the main process.
        workers: DataLoader worker processes (each decodes with one thread).
        cores: Usable cores (``os.sched_getaffinity``).
        reason: One line saying which rule chose the numbers (logged).
    """

    intra_op: int
    workers: int
    cores: int
    reason: str


def available_cores() -> int:
    """Cores this process may run on (affinity mask; containers and ``taskset`` honoured)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _is_cuda(device: Any) -> bool:
    return str(device).startswith("cuda")


def resolve_thread_budget(
    threads: int | Auto = "auto",
    num_workers: int | Auto = "auto",
    device: Any = "cpu",
    *,
    gflops_per_image: float | None = None,
    cores: int | None = None,
    decode_ahead: bool = False,
) -> ThreadBudget:
    """Choose intra-op threads and DataLoader workers so their sum stays within the cores.

    Args:
        threads: Intra-op threads, or ``"auto"``.
        num_workers: DataLoader workers, or ``"auto"``.
        device: The resolved device (``cpu``, ``cuda``, ``cuda:1``, a ``torch.device``).
        gflops_per_image: Forward FLOPs of one image in GFLOPs (``model_facts(name)["gflops"]``);
            ``None`` treats the model as decode-bound.
        cores: Override the usable cores (tests); default :func:`available_cores`.
        decode_ahead: With no worker, a background thread decodes while the model runs
            (embedding, :func:`embbench.embed.embed_split`); ``False``: decoding is serial with
            the forward (training).

    Returns:
        The budget; see the module docstring for the rule.
    """
    for what, value in (("threads", threads), ("num_workers", num_workers)):
        if value != "auto" and (
            not isinstance(value, int) or value < (1 if what == "threads" else 0)
        ):
            raise ValueError(
                f"thread budget: {what} must be 'auto' or an integer >= "
                f"{1 if what == 'threads' else 0}, got {value!r}"
            )
    c = cores if cores is not None else available_cores()
    if threads != "auto" and num_workers != "auto":
        if threads + num_workers > c:
            logger.warning(
                "thread budget: threads=%d + num_workers=%d exceed the %d usable cores; expect "
                "slower embedding (set either to 'auto')",
                threads,
                num_workers,
                c,
            )
        return ThreadBudget(threads, num_workers, c, "both set explicitly")
    if threads != "auto":
        return ThreadBudget(threads, max(0, c - threads), c, "workers = cores - threads")
    if num_workers != "auto":
        return ThreadBudget(max(1, c - num_workers), num_workers, c, "threads = cores - workers")
    if _is_cuda(device):
        w = max(0, min(MAX_GPU_WORKERS, c - 1))
        return ThreadBudget(max(1, c - w), w, c, "cuda: cores decode, one feeds the GPU")
    if c == 1:
        return ThreadBudget(1, 0, 1, "one core: decode inline")
    decode = DECODE_CORE_MS / 1000.0
    if gflops_per_image is None:
        w = max(1, c // 2)
        return ThreadBudget(c - w, w, c, "cpu, FLOPs unknown: half the cores decode")
    forward = gflops_per_image / CORE_GFLOPS

    def rate(w: int) -> float:  # images/s with w workers and c - w intra-op threads
        if w == 0 and decode_ahead:  # a background thread fills the forward's idle core time
            return min(c / (decode + forward), 1.0 / decode)
        if w == 0:
            return 1.0 / (decode + forward / c)  # decoding inline, serial with the forward
        return min(w / decode, (c - w) / forward)

    w = max(range(c), key=lambda w: (rate(w), -w))  # ties: fewer workers (less memory)
    inline = "decode ahead in a background thread" if decode_ahead else "decode inline"
    kind = inline if w == 0 else "cores split by decode/forward cost"
    return ThreadBudget(c - w, w, c, f"cpu, {gflops_per_image:.2g} GFLOPs/image: {kind}")


def training_gflops(gflops: float, input_side: int, train_size: int) -> float:
    """GFLOPs per image of a training step at ``train_size`` px, from the forward's at its input.

    Args:
        gflops: Forward GFLOPs per image at the model's input side (``model_facts``).
        input_side: That side in pixels.
        train_size: The training crop's side in pixels (convolutions scale with the area).
    """
    return TRAIN_FLOPS_FACTOR * gflops * (train_size / input_side) ** 2


def apply_thread_budget(budget: ThreadBudget) -> None:
    """Set torch's intra-op threads (and TensorFlow's, if it is loaded) to ``budget.intra_op``.

    Keras 3 on the torch backend follows torch's setting. TensorFlow accepts the setting only
    before its runtime starts (the first op); later calls are logged and ignored. JAX reads its
    thread count from ``XLA_FLAGS`` at import and cannot be changed here. DataLoader workers use
    one torch thread each (torch sets it in every worker), so ``budget.workers`` is passed as
    ``num_workers``.
    """
    import torch  # heavy, but every caller runs torch anyway

    torch.set_num_threads(budget.intra_op)
    if "tensorflow" in sys.modules:  # never import TensorFlow just to configure it
        tf = sys.modules["tensorflow"]
        try:
            tf.config.threading.set_intra_op_parallelism_threads(budget.intra_op)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except (RuntimeError, AttributeError) as err:
            logger.info("thread budget: TensorFlow already initialised, not changed (%s)", err)
    logger.info(
        "thread budget: %d intra-op thread(s) + %d DataLoader worker(s) on %d core(s) (%s)",
        budget.intra_op,
        budget.workers,
        budget.cores,
        budget.reason,
    )


def lower_priority(pid: int, nice: int) -> bool:
    """Let process ``pid`` run on the CPU time others leave: niceness ``nice`` (never raised).

    Linux shares the CPU between session autogroups first
    (``/proc/sys/kernel/sched_autogroup_enabled``), and a Jupyter kernel starts a session of
    its own, so the niceness of its threads alone would weigh nothing against another kernel:
    its autogroup's (``/proc/<pid>/autogroup``) is set too, and every current thread's
    (threads started later, the OpenMP pool and DataLoader workers, inherit it). Raising
    niceness needs no privilege.

    Returns:
        Whether any setting took (``False`` where the platform has neither, e.g. not Linux).
    """
    took = False
    try:
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
        took = True
    except OSError:  # no autogroups (kernel option), or not Linux
        pass
    try:
        tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
            took = True
        except (OSError, AttributeError):  # gone meanwhile; no setpriority (not POSIX)
            pass
    if not took:
        logger.info("could not lower the CPU priority of process %d", pid)
    return took
