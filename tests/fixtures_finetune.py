"""Shared settings of the tiny stage-02 tests (``from fixtures_finetune import TINY_FINETUNE``)."""

from __future__ import annotations

# a random-weight ResNet on the tiny demo (conftest's ``tiny_demo``), one epoch at 32 px, exact
# search, no MLflow model registry
TINY_FINETUNE = dict(
    models=["test_resnet"],
    weights="random",
    datasets=["demo"],
    epochs=1,
    train_size=32,
    test_size=32,
    batch_size=4,
    num_workers=0,
    backend="exact",
    register_mlflow=False,
)
