"""ruff and the layer contracts are part of the test suite (``make lint`` runs the same checks)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is not installed (pip install -e .[dev])"
    return path


def test_ruff_clean():
    proc = subprocess.run(
        [_tool("ruff"), "check", "embbench", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_clean():
    proc = subprocess.run(
        [_tool("ruff"), "format", "--check", "embbench", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {"PATH": str(BIN), "PYTHONPATH": str(tree), "HOME": str(tree)}
    return subprocess.run(
        [_tool("lint-imports"), "--no-cache"], cwd=tree, capture_output=True, text=True, env=env
    )


def test_layers_hold():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BROKEN" not in proc.stdout and "KEPT" in proc.stdout


def _tree_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package and its contracts, with ``line`` appended to ``module``'s file."""
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copy(ROOT / "pyproject.toml", tree)
    shutil.copytree(
        ROOT / "embbench", tree / "embbench", ignore=shutil.ignore_patterns("__pycache__")
    )
    path = tree / "embbench" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    return tree


def test_a_building_block_importing_a_stage_breaks_the_layers(tmp_path):
    proc = _lint_imports(_tree_with(tmp_path, "metrics.py", "from embbench.stages import embed"))
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout and "embbench.metrics -> embbench.stages" in proc.stdout


# Arrows between two building blocks that the old single blocks layer allowed: a block may only
# import the sub-layers below its own, and never a sibling of its sub-layer.
@pytest.mark.parametrize(
    ("module", "line", "arrow"),
    [
        ("metrics.py", "from embbench.catalogue import Catalogue", "metrics -> embbench.catalogue"),
        ("records.py", "from embbench.models import get_model_spec", "records -> embbench.models"),
    ],
)
def test_a_wrong_arrow_between_building_blocks_breaks_the_layers(tmp_path, module, line, arrow):
    proc = _lint_imports(_tree_with(tmp_path, module, line))
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout and f"embbench.{arrow}" in proc.stdout, proc.stdout


def _import_cycles(graph) -> list[list[str]]:
    """The import cycles of a grimp graph: its strongly connected components of 2+ modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start in sorted(graph.modules):
        if start in index:
            continue
        # Tarjan's algorithm, iterative (the package is deeper than a comfortable recursion).
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def _embbench_graph():
    grimp = pytest.importorskip("grimp")  # installed with import-linter
    return grimp.build_graph("embbench", cache_dir=None)


def test_no_import_cycles_in_the_package():
    # package __init__ re-exports count: `embbench.datasets` importing a module that imports
    # `embbench.datasets` back is a cycle.
    assert _import_cycles(_embbench_graph()) == []


def test_an_import_cycle_is_found():
    graph = _embbench_graph()
    graph.add_import(importer="embbench.datasets._common", imported="embbench.datasets")
    cycles = _import_cycles(graph)
    assert len(cycles) == 1
    assert {"embbench.datasets", "embbench.datasets._common"} <= set(cycles[0])
