"""The demo's notebooks as a graph: two at once where one does not read the other's results.

The schedule is tested with the notebooks replaced by timed stand-ins; the real notebooks run
through it in tests/test_ray_demo.py (against the grid on Ray). The pieces it needs from the
rest (a Milvus Lite file served to two processes, a niced kernel, the demo catalogue and the
MLflow experiment created by two processes at once) are tested here for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jupyter_core.utils import ensure_event_loop

from embbench import notebook_graph
from embbench.notebook_graph import LiteServer, run_graph
from embbench.notebooks import resolve_params

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("01_embed", "02_finetune", "03_toptune", "04_crosstune", "05_analysis")
SECONDS = {"01_embed": 0.4, "02_finetune": 0.9, "03_toptune": 0.4, "04_crosstune": 0.1}


class FakeKernel:
    made: list[tuple[str, int]] = []

    def __init__(self, name: str, kernel_name: str = "python3", *, nice: int = 0) -> None:
        FakeKernel.made.append((name, nice))
        time.sleep(0.05)  # a kernel starting

    def close(self) -> None:
        pass


@pytest.fixture
def timed(monkeypatch):
    """Notebooks replaced by sleeps; returns ``{name: (start, end)}`` as they run."""
    spans: dict[str, tuple[float, float]] = {}
    FakeKernel.made = []
    fail: dict[str, Exception] = {}

    main_loop = ensure_event_loop()  # jupyter_client's loop of this thread (a context variable)

    def run(name, files, overrides=None, *, kernel=None, progress=True):
        assert isinstance(kernel, FakeKernel)
        assert ensure_event_loop() is not main_loop  # papermill in two threads: one loop each
        if files:
            resolve_params(name, files, overrides)  # as run_notebook does first
        start = time.monotonic()
        time.sleep(SECONDS.get(name, 0.05))
        spans[name] = (start, time.monotonic())
        if name in fail:
            raise fail[name]
        return Path(f"{name}.ipynb")

    def report(params_files=(), kernel=None):
        run("05_analysis", params_files, kernel=kernel)
        return Path("report.html")

    monkeypatch.setattr(notebook_graph, "run_notebook", run)
    monkeypatch.setattr(notebook_graph, "render_report", report)
    monkeypatch.setattr(notebook_graph, "WarmKernel", FakeKernel)
    monkeypatch.setattr(notebook_graph, "_lite_users", lambda steps: [])
    return spans, fail


def test_what_reads_nothing_runs_alongside_and_the_rest_waits_for_what_it_reads(timed):
    spans, _ = timed
    outputs, report = run_graph([(n, []) for n in NAMES], slots=2)
    assert outputs[:4] == [Path(f"{n}.ipynb") for n in NAMES[:4]]  # in the steps' order
    assert report == Path("report.html")
    start = {n: s for n, (s, _) in spans.items()}
    end = {n: e for n, (_, e) in spans.items()}
    assert start["02_finetune"] < end["01_embed"]  # 02 reads nothing of 01: at once
    assert start["03_toptune"] >= end["01_embed"]  # 03 reads 01's cache
    assert start["03_toptune"] < end["02_finetune"]  # ... not 02's checkpoints
    assert start["04_crosstune"] >= max(end["02_finetune"], end["03_toptune"])
    assert start["05_analysis"] >= end["04_crosstune"]
    # 02 is off the longest chain: niced; every kernel was asked for once
    assert sorted(FakeKernel.made) == sorted((n, 10 if n == "02_finetune" else 0) for n in NAMES)


def test_one_slot_runs_them_one_after_the_other_in_order_unniced(timed):
    spans, _ = timed
    run_graph([(n, []) for n in NAMES], slots=1)
    order = sorted(spans, key=lambda n: spans[n][0])
    assert order == list(NAMES)
    assert all(spans[a][1] <= spans[b][0] for a, b in zip(order, order[1:], strict=False))
    assert all(nice == 0 for _, nice in FakeKernel.made)


def test_a_failed_notebook_lets_the_running_one_finish_and_starts_nothing_else(timed):
    spans, fail = timed
    fail["01_embed"] = ValueError("01 broke")
    with pytest.raises(ValueError, match="01 broke"):
        run_graph([(n, []) for n in NAMES], slots=2)
    # 02 was running: it finished (its checkpoints are kept); nothing started after the failure
    assert set(spans) == {"01_embed", "02_finetune"}
    assert spans["02_finetune"][1] > spans["01_embed"][1]


def test_a_notebook_the_graph_does_not_know_reads_everything_before_it(timed):
    spans, _ = timed
    run_graph([("01_embed", []), ("02_finetune", []), ("99_mine", [])], slots=2)
    assert spans["99_mine"][0] >= max(spans["01_embed"][1], spans["02_finetune"][1])


def test_no_lite_server_where_nothing_can_run_at_once(timed, monkeypatch):
    asked = []
    monkeypatch.setattr(notebook_graph, "_lite_users", lambda steps: asked.append(steps) or [])
    run_graph([("02_finetune", []), ("04_crosstune", [])])  # 04 reads 02
    run_graph([("01_embed", []), ("03_toptune", []), ("05_analysis", [])])
    assert not asked and all(nice == 0 for _, nice in FakeKernel.made)
    run_graph([("01_embed", []), ("02_finetune", [])])
    assert asked or notebook_graph.available_cores() < 2


@pytest.mark.slow
def test_a_lite_file_another_process_holds_runs_the_notebooks_one_after_the_other(
    timed, monkeypatch, tmp_path, caplog
):
    spans, _ = timed
    monkeypatch.setenv("EMBBENCH_RUNS", str(tmp_path))
    monkeypatch.setattr(notebook_graph, "_lite_users", lambda steps: ["01_embed"])
    holder = subprocess.Popen(  # a JupyterLab kernel that ran stage 01
        [sys.executable, "-c", "import sys, time; from pymilvus import MilvusClient; "
         f"MilvusClient({str(tmp_path / 'milvus.db')!r}); print('open', flush=True); "
         "time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "open"
        run_graph([("01_embed", []), ("02_finetune", [])], slots=2)
    finally:
        holder.kill()
        holder.wait()
    assert f"is open in process {holder.pid}" in caplog.text
    assert spans["02_finetune"][0] >= spans["01_embed"][1]  # one after the other
    assert not (tmp_path / "milvus-lite-server.log").exists()  # no server tried


def test_files_the_demo_shares_between_notebooks_stay_shared_in_the_graph(timed, tmp_path):
    from embbench.config import ConfigError, shared_params_files

    mine = tmp_path / "my.yaml"  # `embbench demo -f my.yaml`: tasks means nothing to 02
    mine.write_text("label: sku\ntasks: [image-image]\n")
    steps = [("01_embed", [mine]), ("02_finetune", [mine])]
    with pytest.raises(ConfigError, match="tasks"):
        run_graph(steps, slots=2)  # not shared: 02 refuses it
    with shared_params_files([mine]):
        run_graph(steps, slots=2)  # shared: 02 leaves it out, in the notebooks' threads too


@pytest.mark.slow
def test_a_lite_server_serves_the_lite_file_to_two_processes(tmp_path):
    from pymilvus import MilvusClient

    db = tmp_path / "runs" / "milvus.db"
    server = LiteServer(db, tmp_path / "server.log")
    uri = server.start()
    try:
        client = MilvusClient(uri=uri)
        client.create_collection("made_here", dimension=4)
        client.insert("made_here", [{"id": 1, "vector": [0.1, 0.2, 0.3, 0.4]}])
        client.close()
        seen = subprocess.run(  # another process, at the same time
            [sys.executable, "-c", f"from pymilvus import MilvusClient; "
             f"print(MilvusClient(uri={uri!r}).list_collections())"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        assert "made_here" in seen
    finally:
        server.stop()
    assert server.proc.poll() is not None
    # the same file, opened directly by Milvus Lite afterwards: the index is where it was
    client = MilvusClient(str(db))
    try:
        assert "made_here" in client.list_collections()
    finally:
        client.close()


def test_a_lite_server_that_cannot_start_says_where_its_log_is(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(RuntimeError, match="milvus-lite"):
        LiteServer(tmp_path / "m.db", tmp_path / "m.log").start()


def test_lower_priority_reaches_a_process_in_a_session_of_its_own():
    from embbench._threads import lower_priority

    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)  # as a Jupyter kernel
    try:
        assert lower_priority(proc.pid, 10)
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == 10
        group = Path(f"/proc/{proc.pid}/autogroup")
        if group.exists():  # the session's share against other sessions
            assert group.read_text().split()[-1] == "10"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_two_processes_loading_the_demo_at_once_generate_it_once(tmp_path):
    start_at = time.time() + 4  # both start generating at the same moment
    code = (
        "import logging, sys, time; logging.basicConfig(level=logging.INFO)\n"
        "from embbench.demo import make_demo_catalogue\n"
        f"time.sleep(max(0, {start_at} - time.time()))\n"
        f"cat = make_demo_catalogue({str(tmp_path)!r}, products_per_category=3, image_size=96)\n"
        "print(len(cat.items))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0] == outs[1][0] and int(outs[0][0]) > 0
    written = sum(err.count("images written") for _, err in outs)
    assert written == 1, [err[-2000:] for _, err in outs]
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1  # no half-written copy


def test_an_experiment_created_meanwhile_by_another_process_is_used(tmp_path, monkeypatch):
    import mlflow

    from embbench.tracking import setup_mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    setup_mlflow(uri, "shared")  # the other process's
    real = mlflow.MlflowClient.get_experiment_by_name
    calls = []

    def not_yet(self, name):  # this process looked before the other one created it
        calls.append(name)
        return None if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", not_yet)
    assert setup_mlflow(uri, "shared") == uri
    assert mlflow.get_experiment_by_name("shared") is not None
