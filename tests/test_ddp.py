"""Stage 02's DDP path run for real on the CPU with gloo: ``torchrun --nproc_per_node=2`` and
a Ray Train ``TorchTrainer`` with 2 workers.

One 2-process job (8 images per rank and step) against a 1-process job with the same global
batch (16), seed, recipe and schedule. Exact equality is not expected and not tested: each
rank draws its own augmentations (RandAugment, crops, mixup/cutmix) and keeps its own BatchNorm
batch statistics (no SyncBatchNorm on the CPU), so the curves agree only within noise. What is
exact: the learning-rate schedule, the updates per epoch, the images per epoch (each rank half
of them) and the weights of both ranks (DDP synchronises the gradients; the trainer compares
the ranks' checksums and fails when they differ).

Measured on this setting (3 epochs, lr 0.05, 48 training images, one thread per process, no
kill): the per-epoch loss of 2 processes differed from 1 process by 0.04/0.11/0.28 (seed 0) and
0.11/0.12/0.06 (seed 1), the final validation accuracy by 0.03 and 0; two seeds of the
1-process job differed by 0.13/0.37/0.35. The tolerances below are 0.35 (loss, near
ln(7) = 1.95) and 0.2 (accuracy on 34 images); the runs are seeded, so the test is repeatable.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from embbench.records import ResultStore
from embbench.stages.finetune import FinetuneConfig, finetune_job
from embbench.tracking import default_tracking_uri

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ["-f", "params/02_finetune.yaml", "-f", "params/smoke/02_finetune.yaml"]
COMMON = {"epochs": 3, "lr": 0.05, "lr_scaling": "none", "seed": 0}
LOSS_TOLERANCE = 0.35  # per-epoch mean training loss, absolute (see the module doc)
ACCURACY_TOLERANCE = 0.2  # final validation accuracy on ~34 images, absolute


def _args(batch_size: int) -> list[str]:
    sets = {**COMMON, "batch_size": batch_size}
    return PARAMS + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _run(nproc: int, batch_size: int, kill_rank: int | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("EMBBENCH_TEST_KILL_RANK", None)
    if kill_rank is not None:
        env["EMBBENCH_TEST_KILL_RANK"] = str(kill_rank)
    entry = [str(ROOT / "tests" / "ddp_entry.py")]
    if nproc > 1:
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd = [sys.executable, *launch, *entry]
    else:
        cmd = [sys.executable, *entry]
    proc = subprocess.Popen(
        cmd + _args(batch_size),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a hung job is killed with its workers, none left behind
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _job(batch_size: int, world_size: int):
    cfg = FinetuneConfig.from_files(*PARAMS[1::2], **COMMON, batch_size=batch_size)
    return finetune_job(cfg, "test_resnet", "demo", world_size)


def _summary(batch_size: int, world_size: int) -> dict:
    return json.loads(_job(batch_size, world_size).summary_path.read_text())


def _mlflow_runs() -> list:
    import mlflow

    mlflow.set_tracking_uri(default_tracking_uri())
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


@pytest.mark.slow
def test_two_ddp_processes_match_one_and_resume_after_a_killed_rank(tmp_path, monkeypatch):
    one = _run(1, 16)
    assert one.returncode == 0, one.stderr[-3000:]
    single = _summary(16, 1)
    runs_before = {r.info.run_id for r in _mlflow_runs()}

    # rank 1 killed after the first epoch: the job fails and says which rank died
    killed = _run(2, 8, kill_rank=1)
    assert killed.returncode != 0
    assert "ChildFailedError" in killed.stderr
    assert re.search(r"Root Cause.*?rank\s*: 1 .*?Signal 9 \(SIGKILL\)", killed.stderr, re.S)
    job = _job(8, 2)
    assert job.checkpoint_path.is_file() and not job.summary_path.exists()

    again = _run(2, 8)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    ddp = _summary(8, 2)
    assert ddp["world_size"] == 2 and ddp["resumed_at"] == [1]
    assert ddp["global_batch"] == single["global_batch"] == 16
    # the same schedule: updates per epoch and the learning rate of every epoch
    assert ddp["num_updates"] == single["num_updates"]
    assert [h["lr"] for h in ddp["history"]] == [h["lr"] for h in single["history"]]
    # data sharded per rank: the job saw the epoch once, each rank half of it
    assert [h["train_images"] for h in ddp["history"]] == [
        h["train_images"] for h in single["history"]
    ]
    assert all(2 * h["train_images_rank0"] == h["train_images"] for h in ddp["history"])
    # gradients synchronised: both ranks ended with the same weights
    assert len(ddp["weight_checksums"]) == 2
    assert ddp["weight_checksums"][0] == ddp["weight_checksums"][1]
    # the loss curve and the final accuracy agree within the stated tolerances
    for a, b in zip(ddp["history"], single["history"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < LOSS_TOLERANCE, (a, b)
    assert abs(ddp["val_accuracy"] - single["val_accuracy"]) < ACCURACY_TOLERANCE

    # rank 0 alone wrote: one record, one training run and one cell run (resumed, not doubled)
    records = [r for r in ResultStore().records("finetune") if r.details["world_size"] == 2]
    assert len(records) == 1
    new = [r for r in _mlflow_runs() if r.info.run_id not in runs_before]
    assert sorted(r.data.tags.get("mode") for r in new) == ["fine-tuned", "training"]
    assert all(r.info.status == "FINISHED" for r in new)
    assert records[0].details["train_mlflow_run_id"] == ddp["mlflow_run_id"]

    # the same DDP path on Ray Train: a TorchTrainer with 2 CPU workers (gloo), in a new home
    pytest.importorskip("ray")
    from embbench.pipeline.ray_train import finetune_on_ray_train

    monkeypatch.setenv("EMBBENCH_RUNS", str(tmp_path / "ray_train_runs"))
    files = [ROOT / f for f in PARAMS[1::2]]
    finetune_on_ray_train(files, {**COMMON, "batch_size": 8}, num_workers=2)
    ray_ddp = _summary(8, 2)
    assert ray_ddp["world_size"] == 2 and ray_ddp["resumed_at"] == []
    assert ray_ddp["weight_checksums"][0] == ray_ddp["weight_checksums"][1]
    assert [h["lr"] for h in ray_ddp["history"]] == [h["lr"] for h in single["history"]]
    assert all(2 * h["train_images_rank0"] == h["train_images"] for h in ray_ddp["history"])
    for a, b in zip(ray_ddp["history"], single["history"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < LOSS_TOLERANCE, (a, b)
    assert abs(ray_ddp["val_accuracy"] - single["val_accuracy"]) < ACCURACY_TOLERANCE
    assert len(ResultStore().records("finetune")) == 1  # rank 0 alone recorded
