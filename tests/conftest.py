"""Shared fixtures: every test writes under a temporary project home, never into the checkout."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP threads that spin while waiting slow tiny-model steps ~20x on 2 busy cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Point data/cache/runs/reports at a per-test temporary folder."""
    for var, sub in (
        ("EMBBENCH_DATA", "data"),
        ("EMBBENCH_CACHE", "cache"),
        ("EMBBENCH_RUNS", "runs"),
        ("EMBBENCH_REPORTS", "reports"),
    ):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield


@pytest.fixture(autouse=True)
def _restore_model_registry():
    """Models registered by a test (e.g. a fine-tuned checkpoint) do not leak into the next."""
    from embbench import models

    before = set(models._MODELS.names())
    yield
    for name in set(models._MODELS.names()) - before:
        models.unregister_model(name)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A demo catalogue generated once per session (small: 4 categories x 3 products)."""
    return tmp_path_factory.mktemp("demo")


@pytest.fixture
def small_demo(demo_root):
    from embbench.demo import make_demo_catalogue

    return make_demo_catalogue(
        demo_root, n_categories=4, products_per_category=3, views=(4, 2, 3), image_size=48
    )
