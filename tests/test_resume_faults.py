"""A run killed with SIGKILL and rerun gives the record of an uninterrupted run.

Top-tuning: a 4-trial search killed in a real subprocess right after its 2nd trial, then rerun,
must give the same trials (hyperparameters and scores), best trial and metrics as an
uninterrupted search. Fine-tuning: a 3-epoch training killed after its first epoch's checkpoint,
then resumed, must give the uninterrupted run's per-epoch losses and metrics within 1e-6 (both
run on the CPU with the same thread count; measured: equal to the last bit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-6  # fine-tuning: per-epoch losses, accuracies and retrieval metrics

TOPTUNE = textwrap.dedent("""
    import json, os, signal, sys
    import embbench
    embbench.setup_logging()
    from embbench.toptune import use_keras_backend
    use_keras_backend("auto")
    import keras_tuner
    from tests.test_toptune import synthetic, tiny_cfg, toptune_synthetic

    kill_after = int(sys.argv[1])
    if kill_after:  # SIGKILL between trials: after the kill_after-th trial is saved
        base = keras_tuner.engine.base_tuner.BaseTuner
        on_trial_end = base.on_trial_end

        def killing(self, trial):
            on_trial_end(self, trial)
            if sum(t.status == "COMPLETED" for t in self.oracle.trials.values()) >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        base.on_trial_end = killing
    cat, sets = synthetic(n_classes=8, noise=2.5)  # hard enough for trials to differ
    rec = toptune_synthetic(tiny_cfg(max_trials=4, search_epochs=4, final_epochs=4), cat, sets)
    print("RESULT " + json.dumps({
        "metrics": rec.metrics, "val_accuracy": rec.val_accuracy, "hash": rec.config_hash,
        "best": rec.details["best_hyperparameters"], "best_trial": rec.details["best_trial"],
        "trials": [[t["trial_id"], t["score"], t["hyperparameters"]]
                   for t in rec.details["trials"]],
    }))
""")

FINETUNE = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    import embbench
    embbench.setup_logging()
    import embbench.cells as cells
    import embbench.train.trainer as trainer_mod
    from embbench.demo import make_demo_catalogue
    from embbench.records import ResultStore
    from embbench.stages.finetune import FinetuneConfig, finetune_job, run_finetune
    from tests.fixtures_finetune import TINY_FINETUNE as TINY

    cat = make_demo_catalogue(sys.argv[2], n_categories=2, products_per_category=2,
                              views=(4, 2, 2), image_size=40)
    cells.load_catalogue = lambda *a, **k: cat
    if sys.argv[1] == "kill":  # SIGKILL right after the first epoch's checkpoint is written
        trainer_mod._after_epoch = (
            lambda trainer, epoch: os.kill(os.getpid(), signal.SIGKILL) if epoch == 0 else None)
    cfg = FinetuneConfig(**{**TINY, "epochs": 3, "lr": 0.5})  # a large lr: RNG shows in losses
    run_finetune(cfg)
    summary = json.loads(finetune_job(cfg, "test_resnet", "demo").summary_path.read_text())
    (rec,) = ResultStore().records("finetune")
    print("RESULT " + json.dumps({
        "metrics": rec.metrics, "val_accuracy": rec.val_accuracy, "hash": rec.config_hash,
        "classification": rec.classification, "resumed_at": summary["resumed_at"],
        "history": [[h["epoch"], h["train_loss"], h["val_accuracy"]]
                    for h in summary["history"]],
    }))
""")


def _run(script: str, arg: str, home: Path, *extra: str) -> tuple[int, dict | None, str]:
    """Run ``script`` in a fresh Python with the project folders under ``home``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    for var, sub in (
        ("EMBBENCH_DATA", "data"),
        ("EMBBENCH_CACHE", "cache"),
        ("EMBBENCH_RUNS", "runs"),
        ("EMBBENCH_REPORTS", "reports"),
    ):
        env[var] = str(home / sub)
    proc = subprocess.run(
        [sys.executable, "-c", script, arg, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return proc.returncode, (json.loads(lines[-1][7:]) if lines else None), proc.stderr


@pytest.mark.slow
def test_killed_toptune_search_resumes_to_the_uninterrupted_result(tmp_path):
    rc, whole, err = _run(TOPTUNE, "0", tmp_path / "whole")
    assert rc == 0 and whole, err[-3000:]
    rc, _, err = _run(TOPTUNE, "2", tmp_path / "killed")
    assert rc == -9, err[-3000:]  # killed by SIGKILL after its 2nd trial, no record
    search = next((tmp_path / "killed" / "runs" / "toptune").rglob("oracle.json")).parent
    assert len(list(search.glob("trial_*/trial.json"))) == 2
    rc, resumed, err = _run(TOPTUNE, "0", tmp_path / "killed")
    assert rc == 0 and resumed, err[-3000:]
    assert "2 trial(s) already done" in err  # the finished trials were kept, not rerun
    assert resumed["hash"] == whole["hash"]
    assert resumed["trials"] == whole["trials"]  # same hyperparameters, same scores, in order
    assert resumed["best"] == whole["best"] and resumed["best_trial"] == whole["best_trial"]
    assert resumed["metrics"] == whole["metrics"]
    assert resumed["val_accuracy"] == whole["val_accuracy"]


@pytest.mark.slow
def test_bayesian_oracle_state_survives_a_reload(tmp_path):
    """The Bayesian phase (past the random initial points) proposes the same after a reload,
    and the last finished trial is not proposed again (keras-tuner left it 'ongoing')."""
    import keras_tuner

    from embbench.toptune import use_keras_backend

    use_keras_backend("auto")
    from embbench.toptune.search import ResumableBayesianOracle

    def oracle(name: str):
        hp = keras_tuner.HyperParameters()
        hp.Float("lr", 1e-4, 1e-1, sampling="log")
        hp.Float("momentum", 0.0, 0.9)
        o = ResumableBayesianOracle(
            objective=keras_tuner.Objective("score", "max"),
            max_trials=6,
            num_initial_points=2,
            seed=7,
            hyperparameters=hp,
        )
        o._set_project_dir(str(tmp_path), name)
        return o

    def step(o) -> dict:
        trial = o.create_trial("tuner0")
        values = dict(trial.hyperparameters.values)
        o.update_trial(trial.trial_id, {"score": -abs(np.log10(values["lr"]) + 2.0)})
        trial.status = "COMPLETED"  # as keras-tuner's tuner does before end_trial
        o.end_trial(trial)
        return values

    whole = oracle("whole")
    expected = [step(whole) for _ in range(4)]
    first = oracle("resumed")
    got = [step(first) for _ in range(3)]  # two random points and one Bayesian proposal
    again = oracle("resumed")  # a new process: the project is reloaded from its files
    again.reload()
    got.append(step(again))
    assert got == expected


@pytest.mark.slow
def test_killed_finetune_resumes_to_the_uninterrupted_result(tmp_path):
    demo = tmp_path / "demo"
    rc, whole, err = _run(FINETUNE, "full", tmp_path / "whole", str(demo))
    assert rc == 0 and whole, err[-3000:]
    rc, _, err = _run(FINETUNE, "kill", tmp_path / "killed", str(demo))
    assert rc == -9, err[-3000:]
    rc, resumed, err = _run(FINETUNE, "full", tmp_path / "killed", str(demo))
    assert rc == 0 and resumed, err[-3000:]
    assert resumed["resumed_at"] == [1] and whole["resumed_at"] == []
    assert resumed["hash"] == whole["hash"]
    np.testing.assert_allclose(resumed["history"], whole["history"], rtol=0, atol=TOLERANCE)
    for key in ("metrics", "classification"):
        assert resumed[key].keys() == whole[key].keys()
        for name, value in whole[key].items():
            assert resumed[key][name] == pytest.approx(value, abs=TOLERANCE), (key, name)
    assert resumed["val_accuracy"] == pytest.approx(whole["val_accuracy"], abs=TOLERANCE)
