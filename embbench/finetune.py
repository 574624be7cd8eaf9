"""Stage 02 (notebook ``02_finetune``): full fine-tuning with the ResNet-strikes-back recipes.

For every (model, dataset) cell: train an ImageNet-initialised timm model on the dataset's
training split with recipe A1, A2 (the paper's choice) or A3 (:mod:`embbench.train.recipes`),
with the paper's two changes: cross-entropy (soft-target under mixup) instead of BCE, and no
stochastic depth. The training itself is :class:`embbench.train.FineTuner`; this module plans
the cells, hashes them, registers and scores the trained models, and records the results.

- The learning rate is scaled to the global batch (``batch_size`` x processes x ``grad_accum``)
  from the recipe's reference batch (2048) by the linear rule; the scaled value is logged.
- CUDA: bf16/fp16 autocast (a GradScaler for fp16), channels_last, pinned memory. Several GPUs
  and nodes: ``torchrun --nproc_per_node=N -m embbench.finetune -f params/02_finetune.yaml``
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
import contextlib
import fcntl
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field, field_validator

from embbench._torch_utils import DistInfo, barrier, init_distributed, resolve_device
from embbench._utils import atomic_write_json, safe_name, stable_hash
from embbench.config import StageConfig, register_stage
from embbench.metrics import CLASSIFICATION_KEYS
from embbench.paths import runs_dir
from embbench.results import ResultStore
from embbench.train import (
    CHECKPOINT_FORMAT,
    FinetuneError,
    FineTuner,
    TrainJob,
    TrainSettings,
    build_trainable,
    get_recipe,
    resolve_recipe,
)
from embbench.train.model import timm_arch as _timm_arch

logger = logging.getLogger(__name__)

INDEX_NAME = "finetuned_models.json"
INDEX_VERSION = 1

@register_stage("02_finetune")
class FinetuneConfig(StageConfig):
    """Parameters of stage 02, mirrored by ``notebooks/02_finetune.ipynb`` and its params file."""

    models: list[str] = Field(default_factory=lambda: ["resnet50"])  # timm-based registry names
    weights: str = "pretrained"  # start from: pretrained | random | auto | checkpoint path
    datasets: list[str] = Field(default_factory=lambda: ["demo"])  # dataset registry names
    data_root: dict[str, str] = Field(default_factory=dict)  # dataset -> folder
    label: str = ""  # classification and relevance label; "" = the dataset's default
    protocol: Literal["", "within", "cross"] = ""  # retrieval protocol; "" = dataset default
    k: int = Field(5, ge=1, le=100)  # cut-off of the @k retrieval metrics
    max_images: int = Field(0, ge=0)  # per split, 0 = all (seeded, class-preserving)
    recipe: Literal["A1", "A2", "A3"] = "A2"  # ResNet-strikes-back procedure (paper: A2)
    epochs: int = Field(0, ge=0)  # 0 = the recipe's (A1 600, A2 300, A3 100)
    lr: float = Field(0.0, ge=0)  # lr at lr_reference_batch; 0 = the recipe's
    lr_reference_batch: int = Field(0, ge=0)  # batch the lr refers to; 0 = recipe's (2048)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"  # lr rule for other batches
    train_size: int = Field(0, ge=0)  # training crop side; 0 = the recipe's (224, A3 160)
    test_size: int = Field(0, ge=0)  # evaluation side; 0 = the recipe's (224)
    batch_size: int = Field(128, ge=1)  # images per step per GPU (paper: 4 GPUs x 128)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    num_workers: int = Field(8, ge=0)  # DataLoader decoding/augmentation processes
    device: str = "auto"  # auto | cpu | cuda | cuda:N (torchrun: one GPU per process)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast dtype on CUDA
    eval_every: int = Field(1, ge=0)  # epochs between validation passes; 0 = only at the end
    checkpoint_every: int = Field(1, ge=1)  # epochs between resumable checkpoints
    resume: bool = True  # continue a killed run from its last checkpoint
    register_mlflow: bool = True  # log the headless model to MLflow's model registry
    backend: Literal["milvus", "exact"] = "milvus"  # retrieval backend
    milvus_uri: str = ""  # "" = Milvus Lite file runs/milvus.db; or http://host:19530
    tracking_uri: str = ""  # "" = sqlite runs/mlflow.db (or $MLFLOW_TRACKING_URI)
    experiment: str = "embbench"  # MLflow experiment name
    overwrite: Literal["never", "always"] = "never"  # retrain and rescore finished cells?
    seed: int = 0  # subsampling, initialisation and augmentation seed

    hash_exclude = frozenset(
        {
            "models",
            "datasets",
            "data_root",
            "num_workers",
            "device",
            "eval_every",
            "checkpoint_every",
            "resume",
            "register_mlflow",
            "backend",
            "milvus_uri",
            "tracking_uri",
            "experiment",
            "overwrite",
        }
    )

    @field_validator("models", "datasets")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one entry")
        return v


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


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def finetuned_name(model: str, dataset: str, recipe: str) -> str:
    """Registry name of a fine-tuned model: ``<model>_ft_<dataset>_<recipe>`` (``a2``...)."""
    from embbench.models import get_model_spec

    return f"{get_model_spec(model).name}_ft_{_safe(dataset)}_{recipe.lower()}"


# ------------------------------------------------------------------------------ cell set-up
@dataclass
class CellPlan(TrainJob):
    """One (model, dataset) cell: the training job plus the retrieval plan it is scored with.

    Attributes:
        plan: Retrieval plan (label, protocol, query/index splits).
    """

    plan: dict = field(default_factory=dict)


def plan_cell(cfg: FinetuneConfig, model: str, dataset: str, world_size: int = 1) -> CellPlan:
    """Load the catalogue, resolve the recipe and hash the training of one cell."""
    from embbench.embed_stage import load_catalogue, retrieval_plan

    cat = load_catalogue(dataset, cfg.data_root, cfg.max_images, cfg.seed)
    plan = retrieval_plan(dataset, cat, cfg.label, cfg.protocol)
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
    global_batch = cfg.batch_size * world_size * cfg.grad_accum
    hp = resolve_recipe(
        get_recipe(cfg.recipe),
        global_batch=global_batch,
        epochs=cfg.epochs,
        lr=cfg.lr,
        reference_batch=cfg.lr_reference_batch,
        lr_scaling=cfg.lr_scaling,
        train_size=cfg.train_size,
        test_size=cfg.test_size,
    )
    train_hash = stable_hash(
        {
            "fields": {f: getattr(cfg, f) for f in TRAIN_FIELDS},
            "model": model,
            "dataset": dataset,
            "fingerprint": cat.fingerprint(),
            "label": plan["label"],
            "hp": hp,
            "format": CHECKPOINT_FORMAT,
        }
    )
    run_dir = runs_dir() / "finetune" / safe_name(model) / safe_name(dataset) / train_hash
    return CellPlan(
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


def train_settings(cfg: FinetuneConfig) -> TrainSettings:
    """The trainer's settings: the fields of ``cfg`` that :class:`TrainSettings` names."""
    return TrainSettings(**{f.name: getattr(cfg, f.name) for f in fields(TrainSettings)})


def make_trainer(
    cfg: FinetuneConfig, cell: CellPlan, dist_info: DistInfo | None = None
) -> FineTuner:
    """The trainer of one cell; its MLflow run logs ``cfg`` as its ``config`` parameters."""
    return FineTuner(
        train_settings(cfg), cell, dist_info, run_params={"config": cfg.model_dump(mode="json")}
    )


# ---------------------------------------------------------------------- fine-tuned models
def finetuned_index_path() -> Path:
    """``runs_dir()/finetuned_models.json``: every fine-tuned model, so any process finds it."""
    return runs_dir() / INDEX_NAME


def read_finetuned_index(path: Path | None = None) -> dict[str, dict]:
    """The index's entries by registry name (empty when there is none yet)."""
    path = path or finetuned_index_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FinetuneError(
            f"{path} is not valid JSON ({exc}); fix or delete it (re-running 02_finetune "
            "rewrites its entries)"
        ) from None
    return dict(data.get("models", {}))


@contextlib.contextmanager
def _index_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_suffix(".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _add_to_index(name: str, entry: dict, path: Path | None = None) -> None:
    path = path or finetuned_index_path()
    with _index_lock(path):
        models = read_finetuned_index(path)
        models[name] = entry
        atomic_write_json(path, {"version": INDEX_VERSION, "models": models})


def register_finetuned_models(path: Path | None = None) -> list[str]:
    """Register every model of the index whose checkpoint still exists; return their names.

    Lets any process (a notebook, ``01_embed``) use fine-tuned models by name.
    """
    from embbench.models import ModelSpec, register_model

    names = []
    for name, entry in read_finetuned_index(path).items():
        spec = dict(entry.get("spec") or {})
        if not spec or not Path(spec.get("checkpoint_path") or "").is_file():
            logger.warning("fine-tuned model %s: checkpoint missing; not registered", name)
            continue
        if isinstance(spec.get("data_config"), dict) and "input_size" in spec["data_config"]:
            spec["data_config"]["input_size"] = tuple(spec["data_config"]["input_size"])
        register_model(ModelSpec(**spec), overwrite=True)
        names.append(name)
    return names


def find_finetuned(base: str, dataset: str, recipe: str) -> dict | None:
    """The newest index entry of ``base`` fine-tuned on ``dataset`` with ``recipe``, if any."""
    from embbench.models import get_model_spec

    base_name = get_model_spec(base).name
    hits = [
        e
        for e in read_finetuned_index().values()
        if e.get("base") == base_name
        and e.get("dataset") == dataset
        and str(e.get("recipe", "")).upper() == recipe.upper()
        and Path(e.get("spec", {}).get("checkpoint_path") or "").is_file()
    ]
    return max(hits, key=lambda e: e.get("created", "")) if hits else None


def register_finetuned_checkpoint(cell: CellPlan, summary: dict, registry: dict | None) -> Any:
    """Register the headless model of a finished training by name, and list it in the index.

    Returns:
        The registered :class:`embbench.models.ModelSpec`.
    """
    from embbench.models import ModelSpec, get_model_spec, register_model

    base = get_model_spec(cell.model)
    if base.source == "checkpoint":
        identifier, tag = base.identifier, base.pretrained
    else:
        identifier = f"timm:{_timm_arch(base)}"
        tag = base.pretrained if base.source == "timm" else None
    name = finetuned_name(cell.model, cell.dataset, summary["recipe"])
    dc = dict(summary["eval_data_config"])
    dc["input_size"] = tuple(dc["input_size"])
    spec = ModelSpec(
        name=name,
        source="checkpoint",
        identifier=identifier,
        pretrained=tag,
        family=base.family,
        backbone=base.backbone,
        paper_name=f"{base.paper_name} (fine-tuned on {cell.dataset}, {summary['recipe']})",
        notes=(
            f"fine-tuned from {base.name} on {cell.dataset} with recipe {summary['recipe']} "
            f"(training {cell.train_hash}, MLflow run {summary.get('mlflow_run_id')})"
        ),
        embed_dim=base.embed_dim,
        data_config=dc,
        model_kwargs={**dict(base.model_kwargs), **summary.get("extra_model_kwargs", {})},
        checkpoint_path=str(cell.model_path.resolve()),
    )
    register_model(spec, overwrite=True)
    entry = {
        "spec": spec.to_dict(),
        "base": base.name,
        "dataset": cell.dataset,
        "recipe": summary["recipe"],
        "label": summary["label"],
        "train_hash": cell.train_hash,
        "sha256": summary.get("model_sha256"),
        "val_accuracy": summary["val_accuracy"],
        "mlflow_run_id": summary.get("mlflow_run_id"),
        "mlflow_registry": registry,
        "created": datetime.now(UTC).isoformat(),
    }
    _add_to_index(name, entry)
    return spec


def _register_in_mlflow(cell: CellPlan, summary: dict, spec_name: str) -> dict | None:
    """Log the headless model as an MLflow model and register it (stores with a registry)."""
    import mlflow
    import torch

    from embbench.models import create_embedder

    run_id = summary.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        model = create_embedder(spec_name, device="cpu").model
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm"],
                registered_model_name=spec_name,
            )
        mlflow.MlflowClient().set_terminated(run_id, status="FINISHED")
        version = getattr(info, "registered_model_version", None)
        return {"name": spec_name, "version": version, "model_uri": info.model_uri}
    except Exception as exc:  # file stores have no registry; a server may refuse
        logger.warning(
            "could not register %s in MLflow's model registry (%s: %s); the state dict is "
            "still logged as an artifact of run %s",
            spec_name,
            type(exc).__name__,
            exc,
            run_id,
        )
        return None


# --------------------------------------------------------------------------------- the stage
def run_finetune(cfg: FinetuneConfig, store: ResultStore | None = None) -> pd.DataFrame:
    """Fine-tune, register and score every (model, dataset) cell of ``cfg``.

    Finished cells (a result record with the same hash) are skipped unless
    ``overwrite="always"``; a finished training is not repeated when only the retrieval
    settings changed; a killed training resumes from its checkpoint.

    Returns:
        One row per cell: model, dataset, recipe, retrieval metrics, val accuracy, test
        classification metrics, training wall time, GPU-hours and the registered name (empty
        on ranks other than 0 under torchrun).
    """
    from embbench.embed import embed_splits, embedding_cache
    from embbench.embed_stage import score_and_record
    from embbench.models import create_embedder
    from embbench.tracking import setup_mlflow

    store = store or ResultStore()
    dist_info = init_distributed(resolve_device(cfg.device))
    if dist_info.is_main:
        setup_mlflow(cfg.tracking_uri, cfg.experiment)
    barrier(dist_info)
    rows = []
    for dataset in cfg.datasets:
        for model in cfg.models:
            # rank 0 first: it may have to create the catalogue (the demo is generated)
            cell = (
                plan_cell(cfg, model, dataset, dist_info.world_size) if dist_info.is_main else None
            )
            barrier(dist_info)
            cell = cell or plan_cell(cfg, model, dataset, dist_info.world_size)
            if cfg.overwrite == "always" and dist_info.is_main:
                for p in (cell.summary_path, cell.checkpoint_path):
                    p.unlink(missing_ok=True)
            barrier(dist_info)
            record_hash = stable_hash(
                {"train": cell.train_hash, "cfg": cfg.config_hash(), "plan": cell.plan}
            )
            done = store.get("finetune", dataset, model, "fine-tuned", record_hash)
            if done and cfg.overwrite == "never" and _record_current(done):
                logger.info("skip %s on %s: finished (%s)", model, dataset, record_hash)
                rows.append(_row(done))
                continue
            if cell.summary_path.is_file():
                summary = json.loads(cell.summary_path.read_text())
                logger.info("%s on %s: trained earlier (%s)", model, dataset, cell.run_dir)
            else:
                summary = make_trainer(cfg, cell, dist_info).fit()
            name = finetuned_name(model, dataset, summary["recipe"])
            registry = None
            if dist_info.is_main:
                register_finetuned_checkpoint(cell, summary, None)
                if cfg.register_mlflow:
                    registry = _register_in_mlflow(cell, summary, name)
                    if registry:
                        register_finetuned_checkpoint(cell, summary, registry)
            barrier(dist_info)
            if not dist_info.is_main:
                register_finetuned_models()
            embedder = create_embedder(name, device="cpu")
            t0 = time.perf_counter()
            splits = sorted({cell.plan["query_split"], cell.plan["index_split"]})
            sets = embed_splits(embedder, cell.cat, splits, cfg, progress=False)
            if not dist_info.is_main:
                continue
            keys = {s: embedding_cache(embedder, cell.cat, s).key for s in splits}
            extra = {
                "recipe": summary["recipe"],
                "train_hash": cell.train_hash,
                "finetuned_model": name,
                "checkpoint": str(cell.model_path),
                "checkpoint_sha256": summary.get("model_sha256"),
                "val_accuracy": summary["val_accuracy"],
                "val_split": summary["val_split"],
                "classification": summary["classification"],
                "classification_split": summary["classification_split"],
                "train_wall_s": summary["train_wall_s"],
                "gpu_hours": summary["gpu_hours"],
                "gpu_hours_note": summary["gpu_hours_note"],
                "device_name": summary["device_name"],
                "world_size": summary["world_size"],
                "global_batch": summary["global_batch"],
                "lr_base": summary["lr_base"],
                "lr_scaled": summary["lr_scaled"],
                "lr_scaling": summary["lr_scaling"],
                "epochs": summary["epochs"],
                "n_failed_train_images": len(summary["failed_images"]),
                "train_mlflow_run_id": summary.get("mlflow_run_id"),
                "mlflow_registry": registry,
                "caches_keys": keys,
                "embed_wall_s": round(time.perf_counter() - t0, 3),
            }
            tags = {"recipe": summary["recipe"]}
            if summary.get("mlflow_run_id"):
                tags["mlflow.parentRunId"] = summary["mlflow_run_id"]
            record = score_and_record(
                stage="finetune",
                mode="fine-tuned",
                model=model,
                dataset=dataset,
                cat=cell.cat,
                plan=cell.plan,
                query=sets[cell.plan["query_split"]],
                index=sets[cell.plan["index_split"]],
                cfg=cfg,
                config_hash=record_hash,
                spec=embedder.spec,
                weights_used=embedder.weights_used,
                extra=extra,
                store=store,
                tags=tags,
            )
            rows.append(_row(record))
    return pd.DataFrame(rows)


def _record_current(record: dict) -> bool:
    """A record is reusable while its checkpoint still exists (the model must stay usable)."""
    ckpt = record.get("checkpoint")
    return bool(ckpt) and Path(ckpt).is_file()


def _row(record: dict) -> dict:
    cls = record.get("classification", {})
    return {
        "model": record["model"],
        "dataset": record["dataset"],
        "mode": record["mode"],
        "recipe": record.get("recipe"),
        "finetuned_model": record.get("finetuned_model"),
        **record["metrics"],
        "val_accuracy": record.get("val_accuracy"),
        **{f"test_{k}": cls.get(k) for k in CLASSIFICATION_KEYS},
        "train_wall_s": record.get("train_wall_s"),
        "gpu_hours": record.get("gpu_hours"),
        "lr_scaled": record.get("lr_scaled"),
        "global_batch": record.get("global_batch"),
        "n_failed": len(record.get("failed_images", [])) + record.get("n_failed_train_images", 0),
        "run_dir": str(Path(record["checkpoint"]).parent) if record.get("checkpoint") else None,
        "mlflow_run_id": record.get("mlflow_run_id"),
        "train_mlflow_run_id": record.get("train_mlflow_run_id"),
    }


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
        summary = json.loads(path.read_text())
        hist = pd.DataFrame(summary.get("history", []))
        if hist.empty:
            continue
        hist.insert(0, "dataset", row["dataset"])
        hist.insert(0, "model", row["model"])
        frames.append(hist)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ------------------------------------------------------------------------------- torchrun CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m embbench.finetune -f params/02_finetune.yaml [-f overlay] [--set k=v]``.

    The entry point for several GPUs and nodes: ``torchrun --nproc_per_node=4 -m
    embbench.finetune -f params/02_finetune.yaml``.
    """
    import yaml

    from embbench import setup_logging

    parser = argparse.ArgumentParser(prog="python -m embbench.finetune", description=__doc__)
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
    cfg = FinetuneConfig.from_files(*args.params, **overrides)
    table = run_finetune(cfg)
    if not table.empty:
        sys.stdout.write(table.to_string(index=False) + "\n")
    return 0


__all__ = [
    "CellPlan",
    "FineTuner",
    "FinetuneConfig",
    "FinetuneError",
    "build_trainable",
    "find_finetuned",
    "finetuned_index_path",
    "finetuned_name",
    "main",
    "make_trainer",
    "plan_cell",
    "read_finetuned_index",
    "register_finetuned_checkpoint",
    "register_finetuned_models",
    "run_finetune",
    "train_settings",
    "training_history",
]

if __name__ == "__main__":  # run the imported module, so its logger is embbench.finetune
    from embbench.finetune import main as _main

    sys.exit(_main())
