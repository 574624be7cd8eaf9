"""Stage 02 (notebook ``02_finetune``): full fine-tuning with the ResNet-strikes-back recipes.

For every (model, dataset) cell: train an ImageNet-initialised timm model on the dataset's
training split with recipe A1, A2 (the paper's choice) or A3 (:mod:`embbench.train.recipes`),
with the paper's two changes: cross-entropy (soft-target under mixup) instead of BCE, and no
stochastic depth. The training itself is :class:`embbench.train.FineTuner`; this module plans
the cells, hashes them, registers and scores the trained models, and the cell engine scores and
records them.

- The learning rate is scaled to the global batch (``batch_size`` x processes x ``grad_accum``)
  from the recipe's reference batch (2048) by the linear rule; the scaled value is logged.
- CUDA: bf16/fp16 autocast (a GradScaler for fp16), channels_last, pinned memory. Several GPUs
  and nodes: ``torchrun --nproc_per_node=N -m embbench.stages.finetune -f params/02_finetune.yaml``
  (DDP, one process per GPU, samplers split by rank).
- A checkpoint (model, optimizer, scheduler, scaler, epoch, RNG states) is written atomically
  every ``checkpoint_every`` epochs under ``runs_dir()/finetune/<model>/<dataset>/<hash>/``; a
  killed run started again with the same parameters resumes from it. It is deleted once the
  training has finished (``summary.json`` written).
- Recorded (the paper's table 2): validation accuracy, the classification metrics of the test
  split (accuracy; precision, recall, F1 macro and weighted; the confusion matrix as an
  artifact), training wall time and GPU-hours (0 on the CPU, and the record says so).
- The trained model with its classification head removed (timm ``reset_classifier(0)``) is
  saved as a state dict, logged to MLflow (and registered in its model registry when the
  tracking store has one), registered as a model named ``<model>_ft_<dataset>_<recipe>`` usable
  in ``01_embed`` (by name, and by path as ``weights``), and listed in
  ``runs_dir()/finetuned_models.json`` so later processes find it
  (:func:`register_finetuned_models`). Its embeddings are then scored exactly like stage 01's
  (mode ``fine-tuned``).

Images that cannot be decoded are skipped and listed in the run's summary, never fatal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field, model_validator

from embbench import setup_logging
from embbench._torch_utils import DistInfo, barrier, init_distributed, resolve_device
from embbench._utils import safe_name, stable_hash
from embbench.cells import Cell, CellInputs, Produced, StageSteps, load_cell_inputs, run_grid
from embbench.config import GridConfig, register_stage
from embbench.embed import embed_splits
from embbench.metrics import CLASSIFICATION_KEYS
from embbench.models import create_embedder, get_model_spec
from embbench.models.finetuned import (
    finetuned_name,
    register_finetuned_models,
)
from embbench.paths import runs_dir
from embbench.records import Lineage, ResultRecord, ResultStore, record_row
from embbench.stagekit import EmbedderPool, embed_options, thread_budget, weights_problem
from embbench.stages._finetune_register import register_in_mlflow, register_trained
from embbench.train import (
    CHECKPOINT_FORMAT,
    FinetuneError,
    FineTuner,
    TrainJob,
    TrainSettings,
    get_recipe,
    resolve_recipe,
)
from embbench.train.model import FINETUNABLE_SOURCES
from embbench.train.recipes import with_options

logger = logging.getLogger(__name__)

STAGE = "finetune"
MODE = "fine-tuned"


@register_stage("02_finetune")
class FinetuneConfig(GridConfig):
    """Parameters of stage 02, mirrored by ``notebooks/02_finetune.ipynb`` and its params file.

    ``weights`` is what the training starts from; the shared fields are documented in
    :class:`~embbench.config.GridConfig`.
    """

    # ResNet-strikes-back procedure (paper: A2), or transfer: small catalogues (not the paper's)
    recipe: Literal["A1", "A2", "A3", "transfer"] = "A2"
    # the recipe's fields changed by name, e.g. {lp_steps: 0} (embbench.train.recipes.Recipe)
    recipe_options: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(0, ge=0)  # 0 = the recipe's (A1 600, A2 300, A3 100)
    lr: float = Field(0.0, ge=0)  # lr at lr_reference_batch; 0 = the recipe's
    lr_reference_batch: int = Field(0, ge=0)  # batch the lr refers to; 0 = recipe's (2048)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"  # lr rule for other batches
    train_size: int = Field(0, ge=0)  # training crop side; 0 = the recipe's (224, A3 160)
    test_size: int = Field(0, ge=0)  # evaluation side; 0 = the recipe's (224)
    batch_size: int = Field(128, ge=1)  # images per step per GPU (paper: 4 GPUs x 128)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    eval_every: int = Field(1, ge=0)  # epochs between validation passes; 0 = only at the end
    checkpoint_every: int = Field(1, ge=1)  # epochs between resumable checkpoints
    resume: bool = True  # continue a killed run from its last checkpoint
    register_mlflow: bool = True  # log the headless model to MLflow's model registry

    @model_validator(mode="after")
    def _recipe_options_exist(self) -> FinetuneConfig:
        with_options(get_recipe(self.recipe), self.recipe_options)  # names checked
        return self

    hash_exclude = GridConfig.hash_exclude | {
        "eval_every",
        "checkpoint_every",
        "resume",
        "register_mlflow",
    }


# Fields that change the trained weights (the training hash); k, protocol and backend change
# only the retrieval evaluation and so only the record's hash.
TRAIN_FIELDS = (
    "weights",
    "label",
    "max_images",
    "recipe",
    "epochs",
    "lr",
    "lr_reference_batch",
    "lr_scaling",
    "train_size",
    "test_size",
    "batch_size",
    "grad_accum",
    "precision",
    "seed",
)


# ------------------------------------------------------------------------------ cell set-up
@dataclass
class FinetuneJob(TrainJob):
    """One (model, dataset) cell: the training job plus the retrieval plan it is scored with.

    Attributes:
        plan: Retrieval plan (label, protocol, query/index splits).
    """

    plan: dict = field(default_factory=dict)


def finetune_job(
    cfg: FinetuneConfig, model: str, inputs: CellInputs | str, world_size: int = 1
) -> FinetuneJob:
    """Resolve the recipe and hash the training of one cell.

    Args:
        cfg: The stage config.
        model: The model to fine-tune.
        inputs: The dataset's catalogue and plan (from the cell engine), or a dataset name to
            load them (as the engine does).
        world_size: Training processes.

    Raises:
        FinetuneError: The catalogue has no train split, or fewer than two classes in it.
    """
    if isinstance(inputs, str):
        inputs = load_cell_inputs(cfg, inputs)
    cat, plan, dataset = inputs.catalogue, inputs.plan.as_dict(), inputs.dataset
    if "train" not in cat.splits:
        raise FinetuneError(
            f"dataset {dataset!r} has no 'train' split (splits: {cat.splits}); fine-tuning "
            "needs one"
        )
    classes = sorted(cat.split("train")[plan["label"]].astype(str).unique())
    if len(classes) < 2:
        raise FinetuneError(
            f"dataset {dataset!r}: the train split has {len(classes)} class(es) of label "
            f"{plan['label']!r}; classification needs at least 2"
        )
    hp = resolve_recipe(
        with_options(get_recipe(cfg.recipe), cfg.recipe_options),
        global_batch=cfg.batch_size * world_size * cfg.grad_accum,
        epochs=cfg.epochs,
        lr=cfg.lr,
        reference_batch=cfg.lr_reference_batch,
        lr_scaling=cfg.lr_scaling,
        train_size=cfg.train_size,
        test_size=cfg.test_size,
    )
    identity = {
        "fields": {f: getattr(cfg, f) for f in TRAIN_FIELDS},  # recipe_options: in hp
        "model": model,
        "dataset": dataset,
        "fingerprint": cat.fingerprint(),
        "label": plan["label"],
        "hp": {k: v for k, v in hp.items() if k != "sources"},  # citations change no weights
        "format": CHECKPOINT_FORMAT,
    }
    if hp.get("select") == "val_retrieval":  # which epochs can be kept: it changes the weights
        identity["eval_every"] = cfg.eval_every
    train_hash = stable_hash(identity)
    run_dir = runs_dir() / "finetune" / safe_name(model) / safe_name(dataset) / train_hash
    return FinetuneJob(
        model=model,
        dataset=dataset,
        cat=cat,
        label=plan["label"],
        classes=classes,
        hp=hp,
        train_hash=train_hash,
        run_dir=run_dir,
        world_size=world_size,
        plan=plan,
    )


def train_settings(cfg: FinetuneConfig, model: str | None = None) -> TrainSettings:
    """The trainer's settings: the fields of ``cfg`` that :class:`TrainSettings` names.

    ``num_workers``/``threads`` on ``auto`` are resolved by the thread budget from the FLOPs
    of ``model``'s training step at ``train_size`` (decoding workers only where decoding is
    the bottleneck; without a model, half the cores decode).
    """
    values = {f.name: getattr(cfg, f.name) for f in fields(TrainSettings)}
    values["num_workers"] = thread_budget(cfg, model, train_size=cfg.train_size).workers
    return TrainSettings(**values)


def make_trainer(
    cfg: FinetuneConfig, cell: FinetuneJob, dist_info: DistInfo | None = None
) -> FineTuner:
    """The trainer of one cell; its MLflow run logs the cell's own parameters (not the grid)."""
    own = cfg.model_dump(mode="json", exclude=set(cfg.hash_exclude))
    params = {**own, "stage": STAGE, "model": cell.model, "dataset": cell.dataset}
    return FineTuner(train_settings(cfg, cell.model), cell, dist_info, run_params=params)


# ---------------------------------------------------------------------------- the steps
class FinetuneSteps(StageSteps):
    """Stage 02's steps for the cell engine."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.pretrained = EmbedderPool(cfg)
        self._jobs: dict[tuple[str, str], FinetuneJob] = {}
        self.dist = DistInfo()

    def grid(self) -> list[Cell]:
        """Every (model, dataset) pair, dataset by dataset."""
        return [Cell(STAGE, MODE, m, d) for d in self.cfg.datasets for m in self.cfg.models]

    def check(self, cells: Sequence[Cell], inputs: Mapping[str, CellInputs]) -> list[str]:
        """Every cell must be trainable (train split, two classes, a timm-based model)."""
        problems = [weights_problem(self.cfg.weights)]
        for c in cells:
            source = get_model_spec(c.model).source
            if source not in FINETUNABLE_SOURCES:
                problems.append(
                    f"model {c.model!r} ({source}) cannot be fine-tuned here; "
                    f"fine-tunable sources: {list(FINETUNABLE_SOURCES)}"
                )
            try:
                self.job(c, inputs[c.dataset])
            except FinetuneError as exc:
                problems.append(str(exc))
        return [p for p in problems if p]

    def job(self, cell: Cell, inputs: CellInputs) -> FinetuneJob:
        """The training job of ``cell`` (computed once)."""
        key = (cell.model, cell.dataset)
        if key not in self._jobs:
            world = int(os.environ.get("WORLD_SIZE", 1))
            self._jobs[key] = finetune_job(self.cfg, cell.model, inputs, world)
        return self._jobs[key]

    def identity(self, cell: Cell, inputs: CellInputs) -> dict[str, Any]:
        """The training's hash (everything that changes the trained weights)."""
        return {"train_hash": self.job(cell, inputs).train_hash}

    def produce(self, cell: Cell, inputs: CellInputs) -> Produced:
        """Train (or reuse a finished training), register, embed the plan's splits."""
        self.dist = init_distributed(resolve_device(self.cfg.device))
        job = self.job(cell, inputs)
        if self.cfg.overwrite == "always" and self.dist.is_main:
            for p in (job.summary_path, job.checkpoint_path):
                p.unlink(missing_ok=True)
        barrier(self.dist)
        if job.summary_path.is_file():
            summary = json.loads(job.summary_path.read_text())
            logger.info("%s: trained earlier (%s)", cell, job.run_dir)
        else:
            summary = make_trainer(self.cfg, job, self.dist).fit()
        name = finetuned_name(cell.model, cell.dataset, summary["recipe"])
        registry = None
        if self.dist.is_main:
            register_trained(job, summary, None)
            if self.cfg.register_mlflow:
                registry = register_in_mlflow(name)
                if registry:
                    register_trained(job, summary, registry)
        barrier(self.dist)
        if not self.dist.is_main:
            register_finetuned_models()
        t0 = time.perf_counter()
        emb = create_embedder(name)
        splits = inputs.plan.splits

        sets = embed_splits(
            emb,
            inputs.catalogue,
            splits,
            overwrite=self.cfg.overwrite == "always",
            **embed_options(self.cfg, cell.model),
        )
        pre = self.pretrained.embed(cell.model, inputs, splits)
        used = dict(emb.weights_used)
        start = summary.get("embedder_weights") or {}
        q, i = inputs.plan.query_split, inputs.plan.index_split
        return Produced(
            query=sets[q],
            index=sets[i],
            lineage=Lineage(
                base_model=cell.model,
                weights=used,
                weights_kind=str(used.get("kind")),
                control=bool(start.get("control", False)),
                finetuned_on=cell.dataset,
                finetune_recipe=summary["recipe"],
                finetune_hp=summary["hyperparameters"],
                finetune_start=str(start.get("kind") or "unknown"),
            ),
            spec=emb.spec,
            classification={k: float(v) for k, v in summary["classification"].items()},
            val_accuracy=summary["val_accuracy"],
            timings={
                "embed_s": round(time.perf_counter() - t0, 3),
                "train_s": summary["train_wall_s"],
                "gpu_hours": summary["gpu_hours"],
            },
            details={
                "recipe": summary["recipe"],
                "train_hash": job.train_hash,
                "finetuned_model": name,
                "checkpoint": str(job.model_path),
                "checkpoint_sha256": summary.get("model_sha256"),
                "start_weights": start,
                "val_split": summary["val_split"],
                "classification_split": summary["classification_split"],
                "gpu_hours_note": summary["gpu_hours_note"],
                "device_name": summary["device_name"],
                "world_size": summary["world_size"],
                "global_batch": summary["global_batch"],
                "lr_base": summary["lr_base"],
                "lr_scaled": summary["lr_scaled"],
                "lr_scaling": summary["lr_scaling"],
                "epochs": summary["epochs"],
                "selection": summary.get("selection", {"rule": "last"}),
                "n_failed_train_images": len(summary["failed_images"]),
                "train_mlflow_run_id": summary.get("mlflow_run_id"),
                "mlflow_registry": registry,
                "run_dir": str(job.run_dir),
            },
            tags={"recipe": summary["recipe"]},
            baseline=(pre[q], pre[i]),
        )


def result_row(record: ResultRecord) -> dict:
    """The flat table row of a fine-tuning record (what :func:`run_finetune` returns)."""
    d = record.details
    return {
        **record_row(record),
        "recipe": d.get("recipe"),
        "finetuned_model": d.get("finetuned_model"),
        "val_accuracy": record.val_accuracy,
        **{f"test_{k}": record.classification.get(k) for k in CLASSIFICATION_KEYS},
        "train_s": record.timings.train_s,
        "gpu_hours": record.timings.gpu_hours,
        "lr_scaled": d.get("lr_scaled"),
        "global_batch": d.get("global_batch"),
        "run_dir": d.get("run_dir"),
        "train_mlflow_run_id": d.get("train_mlflow_run_id"),
    }


def run_finetune(cfg: FinetuneConfig, store: ResultStore | None = None) -> pd.DataFrame:
    """Fine-tune, register and score every (model, dataset) cell of ``cfg``.

    Finished cells (a result record with the same hash) are skipped unless
    ``overwrite="always"``; a finished training is not repeated when only the retrieval
    settings changed; a killed training resumes from its checkpoint.

    Returns:
        One row per cell: model, dataset, recipe, retrieval metrics (and the pretrained
        model's on the same data), val accuracy, test classification metrics, training time,
        GPU-hours and the registered name (empty on ranks other than 0 under torchrun).
    """
    records = run_grid(cfg, FinetuneSteps(cfg), store=store)
    return pd.DataFrame([result_row(r) for r in records])


def training_history(results: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch training curves (loss, lr, val accuracy, images/s) of the cells in ``results``.

    Args:
        results: A :func:`run_finetune` table (its ``run_dir`` column locates each summary).

    Returns:
        One row per (model, dataset, epoch).
    """
    frames = []
    for _, row in results.iterrows():
        path = Path(str(row.get("run_dir"))) / "summary.json"
        if not path.is_file():
            continue
        hist = pd.DataFrame(json.loads(path.read_text()).get("history", []))
        if hist.empty:
            continue
        hist.insert(0, "dataset", row["dataset"])
        hist.insert(0, "model", row["model"])
        frames.append(hist)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ------------------------------------------------------------------------------- torchrun CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m embbench.stages.finetune -f params/02_finetune.yaml [-f more] [--set k=v]``.

    The entry point for several GPUs and nodes: ``torchrun --nproc_per_node=4 -m
    embbench.stages.finetune -f params/02_finetune.yaml``.
    """
    import yaml

    parser = argparse.ArgumentParser(prog="python -m embbench.stages.finetune", description=__doc__)
    parser.add_argument("-f", "--params", action="append", default=[], help="params YAML")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override (YAML value)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    table = run_finetune(FinetuneConfig.from_files(*args.params, **overrides))
    if not table.empty:
        sys.stdout.write(table.to_string(index=False) + "\n")
    return 0


__all__ = [
    "FinetuneJob",
    "FinetuneConfig",
    "FinetuneSteps",
    "main",
    "make_trainer",
    "finetune_job",
    "register_trained",
    "result_row",
    "run_finetune",
    "train_settings",
    "training_history",
]

if __name__ == "__main__":  # run the imported module, so its logger is embbench.stages.finetune
    from embbench.stages.finetune import main as _main

    sys.exit(_main())
