"""``embbench ray run`` submitted as a Ray job (`ray job submit`), as on KubeRay or any cluster.

The head is a real ``ray start --head`` with the dashboard (the job API: ``ray[default]``, in
the ``dev`` extra), token authentication on as Ray 2.60 starts it; the job's runtime
environment carries the project's variables, as a KubeRay submission would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_env_leaves_the_submitted_jobs_variables_to_the_job(monkeypatch):
    """Ray refuses a driver whose ``ray.init`` sets a variable the job's runtime env sets."""
    from embbench._ray import JOB_CONFIG_ENV, worker_env

    env = {"EMBBENCH_RUNS": "/mnt/runs", "EMBBENCH_CACHE": "/mnt/cache", "HF_HOME": "/hf"}
    assert {"EMBBENCH_RUNS", "EMBBENCH_CACHE", "HF_HOME"} <= set(worker_env(env))
    job = {"runtime_env": {"env_vars": {"EMBBENCH_RUNS": "/mnt/runs"}}}
    inside = worker_env({**env, JOB_CONFIG_ENV: json.dumps(job)})
    assert "EMBBENCH_RUNS" not in inside and inside["EMBBENCH_CACHE"] == "/mnt/cache"


@pytest.fixture
def ray_head():
    """A ``ray start --head --block`` with the job API; (dashboard URL, env for the CLI)."""
    pytest.importorskip("ray.dashboard.modules.job.sdk")
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Unix socket paths must stay short
    dashboard = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--block",
            f"--port={_free_port()}",
            "--num-cpus=1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ok = subprocess.run(
                [str(RAY), "job", "list", "--address", url], env=env, capture_output=True
            )
            if ok.returncode == 0:
                break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(2)
        else:
            pytest.fail(f"the Ray job API at {url} did not answer in 120 s")
        yield url, env
    finally:
        # the cluster is this test's alone: no graceful stop (`ray stop` would stop every
        # Ray on the machine); its daemons (GCS, raylet, dashboard) name the session's folder
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        subprocess.run(["pkill", "-9", "-f", temp], check=False)


@pytest.mark.slow
def test_the_grid_submitted_as_a_ray_job_runs_on_the_cluster(tmp_path, ray_head):
    url, env = ray_head
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("models: [test_resnet]\ntasks: [image-image]\nbackend: exact\n")
    home = {v: str(tmp_path / v.lower()) for v in ("EMBBENCH_CACHE", "EMBBENCH_RUNS")}
    runtime = {"env_vars": {**home, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}}
    files = [ROOT / "params" / "01_embed.yaml", ROOT / "params" / "smoke" / "01_embed.yaml", tiny]
    proc = subprocess.run(
        [
            str(RAY),
            "job",
            "submit",
            "--address",
            url,
            "--runtime-env-json",
            json.dumps(runtime),
            "--",
            sys.executable,
            "-m",
            "embbench",
            "ray",
            "run",
            "--address",
            "auto",
            *[a for f in files for a in ("-f", f"01_embed={f}")],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "ray grid finished: 1 cells" in out and "succeeded" in out
    records = list((tmp_path / "embbench_runs" / "results" / "embed").rglob("pretrained-*.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["model"] == "test_resnet" and rec["metrics"]["mMP@5"] >= 0
