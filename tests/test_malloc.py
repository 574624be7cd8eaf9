"""glibc/libgomp start-up settings reach every process embbench starts (timing: bench_allocator)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from embbench import _malloc, cli, notebooks
from embbench._malloc import (
    OPT_OUT,
    PROCESS_ENV,
    REEXEC_MARKER,
    allocator_env,
    missing_allocator_env,
    reexec_with_allocator_env,
)

ROOT = Path(__file__).resolve().parents[1]


class Exec(Exception):
    """Raised by the fake execve so the test sees what would have run."""


@pytest.fixture
def fake_exec(monkeypatch):
    calls = []

    def execve(path, args, env):
        calls.append((path, args, env))
        raise Exec

    monkeypatch.setattr(_malloc.os, "execve", execve)
    for key in [*PROCESS_ENV, OPT_OUT, REEXEC_MARKER]:
        monkeypatch.delenv(key, raising=False)
    return calls


def test_missing_env_respects_user_values_and_opt_out():
    assert missing_allocator_env({}) == PROCESS_ENV
    user = {"MALLOC_TOP_PAD_": "1"}
    assert "MALLOC_TOP_PAD_" not in missing_allocator_env(user)
    assert allocator_env(user)["MALLOC_TOP_PAD_"] == "1"  # the user's value is kept
    assert allocator_env(user)["MALLOC_MMAP_THRESHOLD_"] == PROCESS_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert missing_allocator_env({OPT_OUT: "0"}) == {}
    assert missing_allocator_env({OPT_OUT: "off"}) == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc re-exec is Linux only")
def test_cli_reexecs_once_with_the_env(fake_exec, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["embbench", "demo", "--dry-run"])
    with pytest.raises(Exec):
        cli.main()  # argv None: a command, so it re-executes first
    path, args, env = fake_exec[0]
    assert path == sys.executable and args == [
        sys.executable,
        "-m",
        "embbench",
        "demo",
        "--dry-run",
    ]
    assert all(env[k] == v for k, v in PROCESS_ENV.items()) and env[REEXEC_MARKER] == "1"
    # the re-executed process (marker set), an opted-out user, or a set env: no second exec
    for key, value in ((REEXEC_MARKER, "1"), (OPT_OUT, "0")):
        monkeypatch.setenv(key, value)
        reexec_with_allocator_env(["x"])
        monkeypatch.delenv(key)
    for key, value in PROCESS_ENV.items():
        monkeypatch.setenv(key, value)
    reexec_with_allocator_env(["x"])
    assert len(fake_exec) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc re-exec is Linux only")
def test_a_script_reexecs_itself(fake_exec):
    with pytest.raises(Exec):
        reexec_with_allocator_env(["--n", "3"], command=["bench.py"])
    assert fake_exec[0][1] == [sys.executable, "bench.py", "--n", "3"]


def test_cli_with_argv_never_reexecs(fake_exec):
    assert cli.main(["--dry-run", "demo"]) == 0
    assert fake_exec == []


def test_papermill_kernels_inherit_the_env(monkeypatch, tmp_path):
    import papermill

    for key in [*PROCESS_ENV, OPT_OUT]:
        monkeypatch.delenv(key, raising=False)
    seen = {}

    class Kernel:
        def shutdown_kernel(self, now=False):
            pass

    def start_kernel(env, kernel_name="python3"):
        seen.update({k: env.get(k) for k in PROCESS_ENV})
        return Kernel()

    monkeypatch.setattr(notebooks, "start_kernel", start_kernel)
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: None)
    notebooks.run_notebook("02_finetune", output=tmp_path / "out.ipynb", progress=False)
    assert seen == PROCESS_ENV
    # given to the kernel, not set here: notebooks run at once from threads of one process
    assert not any(k in os.environ for k in PROCESS_ENV)


def test_makefile_kernel_and_dockerfile_carry_the_same_values():
    make = (ROOT / "Makefile").read_text()
    line = re.search(r"^PROCESS_ENV := ((?:.*\\\n)*.*)$", make, re.M)
    assert line, "Makefile: no PROCESS_ENV"
    pairs = line.group(1).replace("\\\n", " ").split()
    assert dict(kv.split("=") for kv in pairs) == PROCESS_ENV
    install = re.search(r"ipykernel install[^\n]*\\\n[^\n]*", make)
    assert install and "--env $(subst =, ,$(kv))" in install.group(0)
    docker = (ROOT / "Dockerfile").read_text()
    for key, value in PROCESS_ENV.items():
        assert f"{key}={value}" in docker


def test_ray_workers_get_the_env_unless_opted_out():
    from embbench._ray import worker_env

    env = worker_env({"EMBBENCH_DATA": "/shared/data", "HOME": "/root"})
    assert env == {"EMBBENCH_DATA": "/shared/data", **PROCESS_ENV}
    user = worker_env({"OMP_WAIT_POLICY": "ACTIVE"})
    assert user["OMP_WAIT_POLICY"] == "ACTIVE"
    assert worker_env({OPT_OUT: "0"}) == {OPT_OUT: "0"}  # the opt-out travels, nothing else
