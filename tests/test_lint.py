"""ruff and the layer contracts are part of the test suite (``make lint`` runs the same checks)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is not installed (pip install -e .[dev])"
    return path


def test_ruff_clean():
    proc = subprocess.run([_tool("ruff"), "check", "embbench", "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {"PATH": str(BIN), "PYTHONPATH": str(tree), "HOME": str(tree)}
    return subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=tree, capture_output=True,
                          text=True, env=env)


def test_layers_hold():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BROKEN" not in proc.stdout and "KEPT" in proc.stdout


def test_a_building_block_importing_a_stage_breaks_the_layers(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copy(ROOT / "pyproject.toml", tree)
    shutil.copytree(ROOT / "embbench", tree / "embbench",
                    ignore=shutil.ignore_patterns("__pycache__"))
    metrics = tree / "embbench" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nfrom embbench.stages import embed  # noqa\n")
    proc = _lint_imports(tree)
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout and "embbench.metrics -> embbench.stages" in proc.stdout
