"""CPU thread budget: workers + intra-op threads within the cores, the split rule, applying it."""

from __future__ import annotations

import pytest
import torch

from embbench._threads import (
    ThreadBudget,
    apply_thread_budget,
    available_cores,
    resolve_thread_budget,
    training_gflops,
)


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("cores", [1, 2, 4, 16])
@pytest.mark.parametrize("gflops", [None, 0.01, 0.5, 4.0, 8.2, 35.1, 200.0])
def test_auto_never_exceeds_the_cores(cores, gflops, ahead):
    b = resolve_thread_budget(gflops_per_image=gflops, cores=cores, decode_ahead=ahead)
    assert b.intra_op >= 1 and b.workers >= 0
    assert b.intra_op + b.workers <= cores
    assert b.cores == cores and b.reason


def test_split_follows_decode_and_forward_cost():
    tiny = resolve_thread_budget(gflops_per_image=0.02, cores=2)  # decode-bound
    assert (tiny.intra_op, tiny.workers) == (1, 1)
    # timm's test_resnet (0.2 GFLOPs): its forward costs 2-3x its decoding; on 2 cores inline
    # decoding with both threads measured best (150 images/s vs 112-130 for 1 + 1, quiet)
    small = resolve_thread_budget(gflops_per_image=0.2, cores=2)
    assert (small.intra_op, small.workers) == (2, 0)
    big = resolve_thread_budget(gflops_per_image=8.2, cores=2)  # resnet50: compute-bound
    assert (big.intra_op, big.workers) == (2, 0)
    many = resolve_thread_budget(gflops_per_image=0.02, cores=16)
    assert many.workers > many.intra_op  # decoding needs most cores for a tiny model
    assert resolve_thread_budget(cores=1) == ThreadBudget(1, 0, 1, "one core: decode inline")


def test_decoding_ahead_keeps_every_core_for_the_model_until_one_thread_cannot_keep_pace():
    # embedding (embbench.decode.DecodeAhead): the background thread fills the forward's idle
    # core time, so on 2 cores even a decode-bound model keeps both threads (ties: no worker)
    for gflops in (0.02, 0.2, 0.77, 17.6):
        b = resolve_thread_budget(gflops_per_image=gflops, cores=2, decode_ahead=True)
        assert (b.intra_op, b.workers) == (2, 0), gflops
        assert "background thread" in b.reason
    # 16 cores and a tiny model: one decoding thread (1 / 2.5 ms) cannot feed 16 model threads
    many = resolve_thread_budget(gflops_per_image=0.02, cores=16, decode_ahead=True)
    assert many.workers > many.intra_op
    vit = resolve_thread_budget(gflops_per_image=17.6, cores=16, decode_ahead=True)
    assert (vit.intra_op, vit.workers) == (16, 0)


def test_training_gets_the_threads_its_step_can_use(monkeypatch):
    assert training_gflops(0.8, 224, 112) == pytest.approx(3 * 0.8 / 4)  # 3 forwards, area
    # the demo's stage 02: Lite0 (0.77 GFLOPs at 224 px) trained at 128 px on 2 cores: its step
    # costs 10x its decoding, so both threads train and decoding runs inline (measured: 2 + 0
    # beat 1 + 1 by 1.28x on 2 busy cores with passive OpenMP waiting; _threads' docstring)
    lite0 = training_gflops(0.767815, 224, 128)
    b = resolve_thread_budget(gflops_per_image=lite0, cores=2)
    assert (b.intra_op, b.workers) == (2, 0)
    from embbench.stages import finetune as ft

    facts = {"gflops": 0.767815, "input_size": [3, 224, 224]}
    monkeypatch.setattr("embbench.stagekit.model_facts", lambda name: facts)
    monkeypatch.setattr("embbench._threads.available_cores", lambda: 2)
    cfg = ft.FinetuneConfig(models=["efficientnet_lite0"], datasets=["demo"], train_size=128)
    before = torch.get_num_threads()
    try:
        assert ft.train_settings(cfg, "efficientnet_lite0").num_workers == 0
        assert torch.get_num_threads() == 2
        assert ft.train_settings(cfg).num_workers == 1  # no model: FLOPs unknown, half decode
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_gpu_and_explicit_values():
    gpu = resolve_thread_budget(device="cuda:0", cores=16)
    assert gpu.workers == 8 and gpu.intra_op == 8
    assert resolve_thread_budget(device="cuda", cores=2).workers == 1
    assert resolve_thread_budget(threads=1, cores=4).workers == 3
    assert resolve_thread_budget(num_workers=3, cores=4).intra_op == 1
    assert resolve_thread_budget(num_workers=8, cores=4).intra_op == 1
    kept = resolve_thread_budget(threads=4, num_workers=4, cores=2)  # kept, with a warning
    assert (kept.intra_op, kept.workers) == (4, 4)
    with pytest.raises(ValueError, match="threads"):
        resolve_thread_budget(threads=0)
    with pytest.raises(ValueError, match="num_workers"):
        resolve_thread_budget(num_workers="many")


def test_apply_sets_torch_threads_and_logs(caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="embbench._threads"):
            apply_thread_budget(ThreadBudget(1, 1, 2, "test"))
        assert torch.get_num_threads() == 1
        assert "1 intra-op thread(s) + 1 DataLoader worker(s)" in caplog.text
    finally:
        torch.set_num_threads(before)
    assert available_cores() >= 1


@pytest.mark.slow
def test_bench_embedding_prints_the_ratio_splits_and_gpu_line():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_embedding.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--models", "test_resnet", "--images", "16",
         "--batch", "8", "--rounds", "1", "--all-paths", "--splits", "--repeats", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for line in ("EMBEDDING / CEILING (test_resnet", "old: inline, float", "ahead, nice 19",
                 "BLAS_INFO=", "old default", "auto chose:", "x old default", "GPU"):  # fmt: skip
        assert line in out, out
    if not torch.cuda.is_available():
        assert "GPU benchmark not run" in out
