"""Building blocks of full fine-tuning: recipes, data, model, trainer, checkpoints.

- :mod:`~embbench.train.recipes`: the ResNet-strikes-back procedures A1/A2/A3 as data and the
  learning-rate scaling rule.
- :mod:`~embbench.train.data`: images with class indices, timm transforms, samplers, loaders.
- :mod:`~embbench.train.model`: a timm model from the zoo with a new classification head.
- :mod:`~embbench.train.trainer`: :class:`FineTuner`, driven by a :class:`TrainJob` (what to
  learn) and :class:`TrainSettings` (how to run).
- :mod:`~embbench.train.checkpointing`: resumable checkpoints and the headless model.
- :mod:`~embbench.train.tracking`: the MLflow run of one training.

Nothing here knows about stages or their configs; stage 02
(:mod:`embbench.stages.finetune`) plans the cells and calls these.
"""

from __future__ import annotations

from embbench.train.checkpointing import CHECKPOINT_FORMAT, TrainState
from embbench.train.data import TrainImages, collate
from embbench.train.errors import FinetuneError
from embbench.train.job import TrainJob, TrainSettings
from embbench.train.model import FINETUNABLE_SOURCES, build_trainable, timm_arch
from embbench.train.recipes import (
    LR_SCALING,
    RECIPES,
    Recipe,
    get_recipe,
    resolve_recipe,
    scale_lr,
)
from embbench.train.trainer import FineTuner

__all__ = [
    "CHECKPOINT_FORMAT",
    "FINETUNABLE_SOURCES",
    "LR_SCALING",
    "RECIPES",
    "FineTuner",
    "FinetuneError",
    "Recipe",
    "TrainImages",
    "TrainJob",
    "TrainSettings",
    "TrainState",
    "build_trainable",
    "collate",
    "get_recipe",
    "resolve_recipe",
    "scale_lr",
    "timm_arch",
]
