"""Every notebook's parameters cell, its stage config and its params files agree, key for key.

papermill only WARNS on an unknown parameter and silently runs the default, so a typo in a
params file would go unnoticed without this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
import yaml

from embbench.notebooks import NOTEBOOKS
from embbench.stages import config_for, stage_names

ROOT = Path(__file__).resolve().parent.parent


def _existing() -> list[str]:
    return [n for n in NOTEBOOKS if (ROOT / "notebooks" / f"{n}.ipynb").is_file()]


def parameters_cell(name: str) -> dict:
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged 'parameters', found {len(cells)}"
    values = {}
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.AnnAssign | ast.Assign), (
            f"{name}: the parameters cell may only hold assignments, found {ast.dump(node)[:60]}"
        )
        target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
        # literals only: ast.literal_eval raises on anything computed
        values[target.id] = ast.literal_eval(node.value)
    return values


@pytest.mark.parametrize("name", _existing())
def test_notebook_parameters_match_config_and_params_files(name):
    cls = config_for(name)
    fields = set(cls.model_fields)
    params = parameters_cell(name)
    assert set(params) == fields, (
        f"{name}: notebook-only {sorted(set(params) - fields)}, "
        f"config-only {sorted(fields - set(params))}"
    )
    cls.from_params(params)  # the notebook's defaults are valid values
    # papermill itself must parse every parameter (it skips lines with a second '=')
    import papermill as pm

    seen = set(pm.inspect_notebook(str(ROOT / "notebooks" / f"{name}.ipynb")))
    assert seen == fields, f"{name}: papermill cannot parse {sorted(fields - seen)}"
    main = ROOT / "params" / f"{name}.yaml"
    assert main.is_file(), f"missing {main}"
    keys = set(yaml.safe_load(main.read_text()) or {})
    assert keys == fields, (
        f"{main}: missing {sorted(fields - keys)}, unknown {sorted(keys - fields)}"
    )
    for overlay in ("demo", "smoke"):
        f = ROOT / "params" / overlay / f"{name}.yaml"
        assert f.is_file(), f"missing {f}"
        extra = set(yaml.safe_load(f.read_text()) or {}) - fields
        assert not extra, f"{f}: unknown keys {sorted(extra)}"
        cls.from_files(main, f)  # layered values validate


@pytest.mark.parametrize("name", _existing())
def test_notebooks_are_thin_and_stripped(name):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tree = ast.parse(cell.source.replace("%", "#"))
        defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        assert not defs, f"{name}: notebooks hold no def/class; logic belongs in embbench/"
        assert not cell.get("outputs"), f"{name}: commit notebooks without outputs"
        assert cell.get("execution_count") is None


def test_every_stage_has_a_notebook():
    assert set(stage_names()) <= set(NOTEBOOKS)
    assert set(_existing()) == set(stage_names())
