"""Shared fixtures: every test writes under a temporary project home, never into the checkout."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
