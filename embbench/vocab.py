"""The package's vocabulary: the words that name modes, weights and tasks, defined once.

Each word set is a ``Literal`` type (what pydantic fields and signatures use) and the tuple of
its values read from it with :func:`typing.get_args` (what checks, loops and messages use), so
the two can never disagree. Everything else imports them from here.
"""

from __future__ import annotations

from typing import Literal, get_args

# How a cell's embedder came to be: as published, top-tuned (an MLP head on frozen pretrained
# embeddings), fine-tuned (the backbone trained), or tuned on one dataset and scored on another.
Mode = Literal["pretrained", "top-tuned", "fine-tuned", "cross-tuned", "cross-top-tuned"]
MODES: tuple[str, ...] = get_args(Mode)
TUNED_MODES: tuple[str, ...] = ("top-tuned", "fine-tuned")  # tuned and scored on one dataset
CROSS_MODES: tuple[str, ...] = ("cross-tuned", "cross-top-tuned")  # tuned on A, scored on B

# The named weights settings of a model (anything else must be a checkpoint file's path).
WeightMode = Literal["pretrained", "random", "auto"]
WEIGHT_MODES: tuple[str, ...] = get_args(WeightMode)

# What a cell measures. Today: image->image retrieval (every cell) and classification (the
# cells that train a classifier: top- and fine-tuning). Text->image retrieval will be next.
Task = Literal["image-image", "classification"]
TASKS: tuple[str, ...] = get_args(Task)

RANDOM_SEED = 0  # seed of every random initialisation (so random-weight vectors are repeatable)

__all__ = [
    "CROSS_MODES",
    "MODES",
    "RANDOM_SEED",
    "TASKS",
    "TUNED_MODES",
    "WEIGHT_MODES",
    "Mode",
    "Task",
    "WeightMode",
]
