"""Shared fixtures: every test writes under a temporary project home, never into the checkout."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


# ---- stage 01 on the small demo -------------------------------------------------------------
@pytest.fixture
def embed_options() -> dict:
    """The options of a tiny stage-01 grid: a random-weight ResNet on the demo, exact search."""
    return dict(
        models=["test_resnet"],
        datasets=["demo"],
        weights="random",
        batch_size=8,
        num_workers=0,
        backend="exact",
    )


@pytest.fixture
def demo_cells(small_demo, monkeypatch):
    """The cell engine reads ``small_demo`` for every dataset; returns it."""
    import embbench.cells as cells

    monkeypatch.setattr(cells, "load_catalogue", lambda *a, **k: small_demo)
    return small_demo


# ---- stage 02 on a tiny demo ---------------------------------------------------------------
@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; on a shared 2-core box, spinning OpenMP threads
    waiting for a busy core made steps 25x slower (``pytestmark = usefixtures(...)``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """4 products (2 categories x 2), views 4/2/2, 40 px: 16 train, 8 val, 8 test images."""
    from embbench.demo import make_demo_catalogue

    return make_demo_catalogue(
        tmp_path_factory.mktemp("tinydemo"),
        n_categories=2,
        products_per_category=2,
        views=(4, 2, 2),
        image_size=40,
    )


@pytest.fixture
def use_tiny(tiny_demo, monkeypatch):
    """The cell engine reads ``tiny_demo`` for every dataset; returns it."""
    import embbench.cells as cells

    monkeypatch.setattr(cells, "load_catalogue", lambda *a, **k: tiny_demo)
    return tiny_demo


# ---- real MLflow and Milvus Lite servers ----------------------------------------------------
class Services:
    """Starts MLflow and Milvus Lite servers as process groups; stops them all at teardown.

    A server lives below ``home`` (``mlflow.db`` and ``mlartifacts/``, or ``milvus.db``) and
    logs to ``home/<kind>.log``.
    """

    BIN = Path(sys.executable).parent

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    @staticmethod
    def free_port() -> int:
        """A TCP port nothing listens on now."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def _command(self, kind: str, home: Path, port: int) -> list[str]:
        where = ["--host", "127.0.0.1", "--port", str(port)]
        if kind == "mlflow":
            return [
                str(self.BIN / "mlflow"),
                "server",
                *where,
                "--backend-store-uri",
                f"sqlite:///{home / 'mlflow.db'}",
                "--artifacts-destination",
                str(home / "mlartifacts"),
                "--workers",
                "1",
            ]
        return [
            str(self.BIN / "milvus-lite"),
            "server",
            "--data-dir",
            str(home / "milvus.db"),
            *where,
        ]

    @staticmethod
    def _answers(kind: str, port: int) -> bool:
        if kind == "mlflow":
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status == 200
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True

    def start(self, kind: str, home: Path, port: int, timeout: float = 120.0) -> subprocess.Popen:
        """Start ``kind`` (``mlflow`` or ``milvus``) on ``port`` and wait until it answers."""
        home.mkdir(parents=True, exist_ok=True)
        with (home / f"{kind}.log").open("a") as log:
            proc = subprocess.Popen(
                self._command(kind, home, port),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if self._answers(kind, port):
                    return proc
            except OSError:
                pass
            time.sleep(0.5)
        self.kill(proc)
        raise RuntimeError(f"{kind} server did not come up; see {home / f'{kind}.log'}")

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Stop the server's process group (``SIGTERM``: gracefully, killed after 20 s)."""
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def services():
    """:class:`Services`; whatever a test started is killed after it."""
    started = Services()
    yield started
    for proc in started.started:
        started.kill(proc)


# ---- headless Chromium ----------------------------------------------------------------------
class Chromium:
    """Headless Chromium with a fresh profile per call, offline (no sync, updates, first run)."""

    FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    )

    def __init__(self, path: str) -> None:
        self.path = path

    def run(self, url: str, profile: Path, *args: str, timeout: float = 180) -> str:
        """Open ``url`` with the extra ``args``; its stdout (it must exit 0)."""
        proc = subprocess.run(
            [self.path, *self.FLAGS, f"--user-data-dir={profile}", *args, url],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    def dom(self, url: str, profile: Path, budget_ms: int = 5000) -> str:
        """The page's DOM after ``budget_ms`` of virtual time (its scripts ran)."""
        return self.run(url, profile, f"--virtual-time-budget={budget_ms}", "--dump-dom")


@pytest.fixture
def chromium() -> Chromium:
    """:class:`Chromium`; the test is skipped where it is not installed."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); .ci/run installs it")
    return Chromium(path)


# ---- a real local Ray cluster -----------------------------------------------------------------
@pytest.fixture
def ray_cluster():
    """A local Ray cluster: a head with no CPUs, two 1-CPU worker nodes; (cluster, workers).

    ``ray.cluster_utils.Cluster``: real raylets and worker processes on this machine.
    """
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        yield cluster, workers
    finally:
        cluster.shutdown()  # every raylet and worker process of the cluster, none left behind
