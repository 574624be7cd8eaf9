"""Notebooks as JupyterLab opens and runs them: clean files, offline runs that fail fast and say
what to do, log lines printed once, and params files that name only things that exist."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from embbench.paths import project_root

ROOT = project_root()
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PARAMS = sorted((ROOT / "params").rglob("*.yaml"))


# ------------------------------------------------------------------ offline, in one line


def test_offline_pretrained_fails_at_once_in_one_line_naming_the_demo_models(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE, no network: one probe, no download attempt, one line naming the fix."""
    from huggingface_hub import constants

    from embbench.models import WeightsUnavailableError, _builder, create_embedder

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setattr(_builder, "_hub_reachable", None, raising=False)
    probes, connects = [], []

    def no_route(address, *args, **kwargs):
        probes.append(address)
        raise OSError("Network is unreachable")

    def no_connect(self, address):
        connects.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        create_embedder("resnet50", weights="pretrained")
    assert time.monotonic() - t0 < 30
    assert len(probes) == 1 and not connects, (probes, connects)  # no request, no retry
    message = str(info.value)
    assert "\n" not in message
    for demo in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        assert demo in message
    assert "params/demo/" in message and "efficientnet_lite0_random" not in message
    # in a notebook IPython shows the message, not pages of library traceback
    assert info.value._render_traceback_() == [f"WeightsUnavailableError: {message}"]
    assert constants.HF_HUB_OFFLINE is True  # the rest of the run reads caches, no retries


def test_hub_library_log_lines_print_once():
    """huggingface_hub's retry warnings printed twice (its own stderr handler and the root's)."""
    code = (
        "import embbench\n"
        "embbench.setup_logging()\n"
        "from huggingface_hub.utils import logging as hl\n"
        "hl.get_logger('huggingface_hub.file_download').warning('Retrying in 1s [Retry 1/5].')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    assert sum("Retrying in 1s" in line for line in lines) == 1, lines


# ------------------------------------------------------------------ notebooks open clean


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_saved_as_jupyter_saves_them(path):
    """Opening and saving changes nothing: bytes, metadata and kernel info as Lab writes them.

    Jupyter writes notebooks with ``nbformat.writes`` (sorted keys, one-space indent); Lab
    replaces ``language_info`` with the kernel's on start, so a partial one opens modified.
    """
    raw = path.read_text(encoding="utf-8")
    nb = nbformat.reads(raw, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert (nb.nbformat, nb.nbformat_minor) == (4, 5), path.stem  # cell ids, as Lab writes
    assert nbformat.writes(nb) + "\n" == raw or nbformat.writes(nb) == raw, (
        f"{path} is not in Jupyter's format; rewrite it: python -c \"import nbformat as n; "
        f"n.write(n.read('{path.relative_to(ROOT)}', 4), '{path.relative_to(ROOT)}')\""
    )
    from ipykernel.ipkernel import IPythonKernel

    kernel = dict(IPythonKernel.language_info)
    info = dict(nb.metadata["language_info"])
    assert {k: v for k, v in info.items() if k != "version"} == {
        k: v for k, v in kernel.items() if k != "version"
    }
    assert info["version"].split(".")[:2] == kernel["version"].split(".")[:2]
    assert set(nb.metadata) == {"kernelspec", "language_info"}  # no widget state, no signature
    for cell in nb.cells:
        assert set(cell.metadata) <= {"tags"}, (path.stem, cell.id, dict(cell.metadata))
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


# ------------------------------------------------------------------ the parameters cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_says_how_to_pick_the_demo_a_params_file_or_own_data(path):
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    comments = [line for line in cell.source.splitlines() if line.startswith("#")]
    text = "\n".join(comments)
    assert re.search(r"^# Offline demo:", text, re.M), path.stem
    assert re.search(r"^# A params file:.*\.from_files\(", text, re.M), path.stem
    assert re.search(r"^# Your own catalogue:", text, re.M), path.stem
    config = re.search(r"\b(\w+Config)\.from_namespace", "".join(c.source for c in nb.cells))
    assert config and f"{config.group(1)}.from_files(" in text, path.stem
    intro = nb.cells[0].source
    assert f"{config.group(1)}.from_files" in intro, path.stem
    # the files named in those lines exist, seen from the notebook's folder (Lab's cwd)
    for ref in re.findall(r'"(\.\./[^"]+)"', text):
        assert (path.parent / ref).resolve().is_file(), (path.stem, ref)


# ------------------------------------------------------------------ named paths exist

_PATH = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)+[\w.-]+\.(?:py|ya?ml|md|json|ipynb))(?:::(\w+))?")
_MODULE = re.compile(r"(?<![\w.])(embbench(?:\.\w+)+)")
_OUTPUTS = ("runs/", "data/", "reports/", "cache/", "my", "../")  # made by a run, or the user's


def _texts():
    for path in PARAMS:
        yield path, path.read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text(encoding="utf-8"))
        yield path, "\n".join("".join(c["source"]) for c in nb["cells"])


def _defines(file: Path, name: str) -> bool:
    text = file.read_text(encoding="utf-8")
    defined = rf"^(?:class|def) {name}\b|^{name}\s*[:=]"
    exported = rf"^\s*[\"']{name}[\"'],"  # in __all__
    return bool(re.search(f"{defined}|{exported}", text, re.M))


def _module_file(dotted: str) -> tuple[Path | None, list[str]]:
    """The file of the longest importable prefix of ``dotted`` and the attributes after it."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:n])
        for file in (base.with_suffix(".py"), base / "__init__.py"):
            if file.is_file():
                return file, parts[n:]
    return None, parts


def test_every_path_and_module_named_in_params_files_and_notebooks_exists():
    problems = []
    for path, text in _texts():
        where = path.relative_to(ROOT)
        for ref, name in _PATH.findall(text):
            if ref.startswith(_OUTPUTS) or "<" in ref:
                continue
            target = ROOT / ref
            if not target.exists():
                problems.append(f"{where}: {ref} does not exist")
            elif name and not _defines(target, name):
                problems.append(f"{where}: {ref} defines no {name}")
        for dotted in _MODULE.findall(text):
            file, attrs = _module_file(dotted)
            if file is None:
                problems.append(f"{where}: no module {dotted}")
            elif attrs and not _defines(file, attrs[0]):
                problems.append(f"{where}: {dotted}: {file.relative_to(ROOT)} has no {attrs[0]}")
    assert not problems, problems
