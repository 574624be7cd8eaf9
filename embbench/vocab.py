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

# What a cell measures (a record's ``task``). Retrieval tasks score rankings with the five
# retrieval metrics: image->image (every cell of the paper's grid), text->image (class-name
# prompts or item texts as queries, the split's images as the gallery) and image->text (images
# as queries, the items' texts as the gallery). Classification tasks score predicted labels:
# zero-shot (class-name prompts of a text-image model), and the two baselines on frozen
# embeddings, a linear probe and a kNN classifier. Top- and fine-tuned records are image->image
# records that also carry their classifier's test metrics.
Task = Literal["image-image", "text-image", "image-text", "zero-shot", "probe", "knn"]
TASKS: tuple[str, ...] = get_args(Task)
RETRIEVAL_TASKS: tuple[str, ...] = ("image-image", "text-image", "image-text")
CLASSIFICATION_TASKS: tuple[str, ...] = ("zero-shot", "probe", "knn")
TEXT_TASKS: tuple[str, ...] = ("text-image", "image-text", "zero-shot")  # need a text tower
BASELINE_TASKS: tuple[str, ...] = ("probe", "knn")  # any model, on frozen embeddings

RANDOM_SEED = 0  # seed of every random initialisation (so random-weight vectors are repeatable)

__all__ = [
    "CROSS_MODES",
    "MODES",
    "RANDOM_SEED",
    "BASELINE_TASKS",
    "CLASSIFICATION_TASKS",
    "RETRIEVAL_TASKS",
    "TASKS",
    "TEXT_TASKS",
    "TUNED_MODES",
    "WEIGHT_MODES",
    "Mode",
    "Task",
    "WeightMode",
]
