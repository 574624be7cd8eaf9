"""glibc's allocator settings for every process embbench starts: no mmap churn per forward pass.

Almost every activation of a batch-32 CNN forward pass is larger than glibc's largest dynamic
mmap threshold (32 MB on 64-bit; e.g. 32 x 32 x 112 x 112 x 4 B = 51 MB), so with glibc's
defaults each forward maps, zero-fills and unmaps gigabytes: about 19k minor page faults per
image for EfficientNet-Lite0 at 224 px, and the kernel time that goes with them. Raising the
mmap and trim thresholds above any activation and padding the heap's top keeps the freed blocks
in the heap for the next batch instead (``benchmarks/bench_allocator.py`` prints faults per
image and images/s with and without, in one run; README "Performance").

glibc reads these settings once, when the process starts: ``mallopt(M_MMAP_THRESHOLD)`` at run
time is capped at 32 MB, so they must be in the environment **before the interpreter starts**.
Where each process gets them:

* the ``embbench`` command and ``python -m embbench``: :func:`reexec_with_allocator_env`
  re-executes the interpreter once with them set (:data:`REEXEC_MARKER` guards the loop);
* papermill kernels: :func:`embbench.notebooks.run_notebook` puts them in the environment
  the kernel inherits; the kernel ``make setup`` registers (``embbench``, used by JupyterLab)
  carries them in its ``kernel.json`` ``env``;
* DataLoader workers: inherit their parent's environment (fork or spawn alike);
* Kubeflow tasks: the project's image sets them (``Dockerfile`` ``ENV``).

The same route carries ``OMP_WAIT_POLICY=PASSIVE`` (:data:`OMP_ENV`; libgomp also reads it
once, at start-up): idle OpenMP threads sleep instead of spinning. A value the user set is
never replaced (``OMP_WAIT_POLICY=ACTIVE`` keeps the spinning); ``EMBBENCH_MALLOC=0`` turns the
whole thing off (for instance under a preloaded allocator such as tcmalloc).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

__all__ = [
    "MALLOC_ENV",
    "OMP_ENV",
    "PROCESS_ENV",
    "OPT_OUT",
    "REEXEC_MARKER",
    "allocator_env",
    "missing_allocator_env",
    "reexec_with_allocator_env",
]

# 4 GiB thresholds: no activation of the zoo's models at the benchmark's batch sizes is mapped
# on its own or trimmed away; 512 MiB of top pad: the heap grows in large steps, so the
# zero-filled pages of one batch are reused by the next. Measured in bench_allocator.py.
MALLOC_ENV: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": str(4 * 1024**3),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 1024**3),
    "MALLOC_TOP_PAD_": str(512 * 1024**2),
}
# Idle OpenMP threads (torch's intra-op pool, libgomp) sleep instead of spinning up to ~300k
# iterations between parallel regions, leaving the core to DataLoader workers and to whatever
# else runs (measured in bench_allocator.py: a large gain on a loaded machine; _threads.py).
OMP_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
PROCESS_ENV: dict[str, str] = {**MALLOC_ENV, **OMP_ENV}  # what every process gets at start-up
OPT_OUT = "EMBBENCH_MALLOC"  # "0" (or "off", "false", "no"): leave glibc's defaults alone
REEXEC_MARKER = "EMBBENCH_MALLOC_REEXEC"  # set in the re-executed process: never twice


def _opted_out(environ: Mapping[str, str]) -> bool:
    return environ.get(OPT_OUT, "").strip().lower() in {"0", "off", "false", "no"}


def missing_allocator_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The :data:`PROCESS_ENV` variables ``environ`` lacks (none when the user opted out)."""
    env = os.environ if environ is None else environ
    if _opted_out(env):
        return {}
    return {k: v for k, v in PROCESS_ENV.items() if k not in env}


def allocator_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default ``os.environ``) with :data:`PROCESS_ENV` added."""
    env = dict(os.environ if environ is None else environ)
    env.update(missing_allocator_env(env))
    return env


def reexec_with_allocator_env(
    argv: Sequence[str] | None = None, *, command: Sequence[str] = ("-m", "embbench")
) -> None:
    """Re-execute this interpreter (``python -m embbench``) with :data:`PROCESS_ENV` set.

    Returns (does nothing) when they are all set already, the user opted out, this process is
    the re-executed one, or the platform has no glibc ``exec`` worth doing it for. Call it first
    thing in the command's entry point, before anything allocates much.

    Args:
        argv: The command's arguments (default ``sys.argv[1:]``).
        command: What the interpreter runs before them (a benchmark passes its own path).
    """
    if not sys.platform.startswith("linux") or os.environ.get(REEXEC_MARKER):
        return
    missing = missing_allocator_env()
    if not missing:
        return
    env = {**os.environ, **missing, REEXEC_MARKER: "1"}
    args = list(sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *command, *args], env)
    except OSError:  # no exec here (a frozen or sandboxed interpreter): run on, defaults
        return
