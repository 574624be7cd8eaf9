"""What a newcomer sees: notebooks that open right, quiet logs, a terminal that talks."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest

from embbench.models import list_models
from embbench.paths import project_root

ROOT = project_root()
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LOG_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_open_on_the_embbench_kernel_and_cite_only_the_repository(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"] == {
        "display_name": "Python (embbench)",
        "language": "python",
        "name": "embbench",
    }
    text = "".join("".join(c["source"]) for c in nb["cells"])
    zoo = set(list_models())
    params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    for line in "".join(params["source"]).splitlines():
        if line.startswith(("models:", "gallery_models:")):
            names = re.findall(r'"([^"]+)"', line.split("#")[0])
            assert set(names) <= zoo, (path.stem, names)
    for ref in re.findall(r"\b[\w./-]+\.(?:ya?ml|md|py)\b", text):
        if "/" in ref and not ref.startswith(("my", "http")):
            assert (ROOT / ref).exists(), (path.stem, ref)
    assert "protocol.md" not in text and "params/models.yaml" not in text
    # every cell has an id (nbformat 4.5): papermill would print MissingIDFieldWarning otherwise
    assert all(c.get("id") for c in nb["cells"]), path.stem
    assert len({c["id"] for c in nb["cells"]}) == len(nb["cells"]), path.stem


def test_random_open_clip_weights_log_no_warning(caplog):
    from embbench.models import create_embedder

    caplog.set_level(logging.INFO)
    create_embedder("test_clip", weights="random")
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]


def test_progress_bar_logs_its_meter_with_an_eta(caplog):
    from embbench.progress import progress_bar

    caplog.set_level(logging.INFO, logger="embbench.progress")
    bar = progress_bar(total=10, desc="embed x", log_every=0.0, disable=False)
    bar.update(4)
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "embbench.progress"]
    assert lines and "embed x" in lines[0] and "4/10" in lines[0] and "<" in lines[0]


def test_kernel_log_relay_forwards_log_lines_only():
    import io

    from embbench.notebooks import KernelLogRelay

    out = io.StringIO()
    relay = KernelLogRelay("01_embed", stream=out)
    relay.write("2026-01-01 10:00:00,123 INFO embbench.cells: [1/2] test_resnet on demo\nplain ")
    relay.write("text\n2026-01-01 10:00:01,000 INFO embbench.cells: done (record r.json)\n")
    assert out.getvalue().splitlines() == [
        "2026-01-01 10:00:00,123 INFO embbench.cells: [1/2] test_resnet on demo",
        "2026-01-01 10:00:01,000 INFO embbench.cells: done (record r.json)",
    ]


@pytest.mark.slow
@pytest.mark.notebook
def test_notebook_01_smoke_run_is_quiet_and_talks(capfd, caplog):
    import nbformat

    from embbench.notebooks import run_notebook

    caplog.set_level(logging.INFO)
    params = ROOT / "params"
    environ = dict(os.environ)
    out = run_notebook(
        "01_embed", [params / "01_embed.yaml", params / "smoke" / "01_embed.yaml"], progress=False
    )
    # the kernel's variables are given to it: notebooks run at once from threads of one process
    assert dict(os.environ) == environ
    terminal = capfd.readouterr().err
    log = terminal + "\n".join(r.getMessage() for r in caplog.records)
    problems = [line for line in log.splitlines() if LOG_PROBLEM.search(line)]
    assert not problems, problems
    # the terminal got the engine's per-cell lines from inside the kernel
    assert re.search(r"INFO embbench\.cells: .*\[1/\d+\]", terminal), terminal[-2000:]
    assert "done" in terminal
    # the run is kept under its stage with a latest copy
    assert out.parent.name == "01_embed" and (out.parent / "latest.ipynb").is_file()
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stderr = [o.text[:300] for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, stderr
    text = "".join(o.get("text", "") for o in outputs)
    assert not [line for line in text.splitlines() if LOG_PROBLEM.search(line)]


def test_mlflow_experiment_opens_on_its_runs_without_a_stray_default(tmp_path):
    import mlflow

    from embbench.tracking import EXPERIMENT_KIND, setup_mlflow

    uri = setup_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", "embbench")
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("embbench")
    assert exp.tags["mlflow.experimentKind"] == EXPERIMENT_KIND
    assert [e.name for e in client.search_experiments()] == ["embbench"]
    assert not (tmp_path / "mlruns").exists() and not (ROOT / "notebooks" / "mlruns").exists()


def test_a_users_catalogue_has_the_users_name(tmp_path, monkeypatch):
    from fixtures_datasets import write_jpeg

    import embbench.datasets as ds
    from embbench.catalogue import CatalogueError
    from embbench.datasets._registry import _REGISTRY

    monkeypatch.setattr(_REGISTRY, "_entries", dict(_REGISTRY._entries))  # no leak
    write_jpeg(tmp_path / "imgs" / "a.jpg")
    write_jpeg(tmp_path / "imgs" / "b.jpg", 1)
    csv = tmp_path / "catalogue.csv"
    csv.write_text("path,label,split\nimgs/a.jpg,mug,test\nimgs/b.jpg,lamp,test\n")
    # the built-in `manifest` entry names its catalogue as it is loaded (not the CSV's stem)
    assert ds.create_catalogue("manifest", csv).name == "manifest"
    # a name of the user's own: data_root {my_shop: catalogue.csv} registers it
    assert ds.register_user_catalogues({"my_shop": csv, "sop": tmp_path, "x": "nope"}) == [
        "my_shop"
    ]
    assert "my_shop" in ds.list_datasets() and "x" not in ds.list_datasets()
    cat = ds.create_catalogue("my_shop", csv)
    assert cat.name == "my_shop" and len(cat.items) == 2
    info = ds.get_dataset_info("my_shop")
    assert info.name == "my_shop" and info.protocol == ds.get_dataset_info("manifest").protocol
    folder = tmp_path / "shop_tree"
    write_jpeg(folder / "test" / "mug" / "1.jpg")
    assert ds.create_catalogue("shop_tree", folder).name == "shop_tree"  # registered on use
    with pytest.raises(CatalogueError, match="built in"):
        ds.register_catalogue("sop", csv)


@pytest.mark.slow
@pytest.mark.notebook
def test_a_warm_kernel_runs_a_notebook_with_the_notebooks_own_environment(tmp_path):
    """The demo starts the next notebook's kernel (imports done) while one runs; papermill then
    runs the notebook on it, with the variables that name that notebook set in the kernel."""
    import nbformat
    import papermill as pm

    from embbench.notebooks import WarmKernel

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import os, sys\n"
            "print(os.environ['EMBBENCH_NOTEBOOK'], 'embbench.stages.embed' in sys.modules,\n"
            "      bool(os.environ.get('MALLOC_MMAP_THRESHOLD_')), os.getpid())"
        )
    ]
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    warm = WarmKernel("01_embed")
    km = warm.take({"EMBBENCH_NOTEBOOK": "the-notebook"})
    assert km is not None, warm.error
    pid = km.provisioner.process.pid
    try:
        pm.execute_notebook(
            str(path), str(tmp_path / "out.ipynb"), km=km, kernel_name="python3", progress_bar=False
        )
    finally:
        km.shutdown_kernel(now=True)
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in out.cells for o in c.get("outputs", []))
    assert text.split() == ["the-notebook", "True", "True", str(pid)]


@pytest.mark.slow
def test_a_warm_kernel_closed_while_it_starts_is_not_left_running():
    """The demo closes the next notebook's kernel when a notebook fails, maybe mid-start."""
    from embbench.notebooks import WarmKernel

    warm = WarmKernel("01_embed")
    warm.close()  # at once: the kernel is still starting
    warm._thread.join()
    try:
        assert warm.km is None or not warm.km.has_kernel
    finally:
        if warm.km is not None and warm.km.has_kernel:
            warm.km.shutdown_kernel(now=True)


def test_a_warm_kernel_that_cannot_start_leaves_it_to_papermill(caplog):
    from embbench.notebooks import WarmKernel

    caplog.set_level(logging.INFO)
    assert WarmKernel("01_embed", kernel_name="no-such-kernel").take({}) is None
    assert "the warm kernel failed" in caplog.text and "no-such-kernel" in caplog.text
