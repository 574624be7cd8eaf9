"""Ray, imported on demand: the pip command when it is missing, and joining or starting a cluster.

Below the stages and the building blocks: :mod:`embbench.embed_ray` (stage 01's extraction on
Ray Data) and :mod:`embbench.pipeline` (``embbench ray run``, Ray Train) both connect through
here. Ray is optional (``pip install 'embbench[ray]'``): it is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any

from embbench._errors import UserError
from embbench._malloc import missing_allocator_env

logger = logging.getLogger(__name__)

RAY_INSTALL = "pip install 'embbench[ray]'  (or: pip install 'ray[data,train,default]==2.60.0')"
# forwarded to every worker: the shared folders, services and their tokens, offline switches
FORWARDED_ENV_PREFIXES = ("EMBBENCH_", "MLFLOW_", "MILVUS_", "HF_", "TF_")
FORWARDED_ENV = ("PYTHONPATH", "OMP_WAIT_POLICY", "KERAS_BACKEND")


class RayRunError(UserError, RuntimeError):
    """Ray is missing, the cluster is unreachable or cannot run the work; the message says why."""


def import_ray(what: str = "`embbench ray`") -> Any:
    """The ``ray`` module.

    Args:
        what: What needs Ray, for the message (e.g. ``embed_engine: ray``).

    Raises:
        RayRunError: Ray is not installed (the message gives the pip command).
    """
    try:
        import ray
    except ImportError as exc:
        raise RayRunError(
            f"{what} needs Ray, which is not installed ({exc}). Fix: {RAY_INSTALL}"
        ) from exc
    return ray


# where Ray's job manager hands a submitted job's config (runtime env included) to its driver
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def worker_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables forwarded to the workers (shared folders, URIs, tokens).

    Ray starts a fresh worker process for a runtime environment, so glibc's allocator settings
    and ``OMP_WAIT_POLICY`` (:mod:`embbench._malloc`, read once at start-up) reach the workers
    this way too, unless the driver opted out (``EMBBENCH_MALLOC=0``).
    """
    env = os.environ if environ is None else environ
    forwarded = {
        k: v for k, v in env.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV
    }
    out = {**missing_allocator_env(env), **forwarded}
    # Run as a submitted job (`ray job submit --runtime-env-json ...`), the job's own variables
    # reach every worker already, and Ray refuses a driver that sets one of them again.
    return {k: v for k, v in out.items() if k not in _job_env_vars(env)}


def _job_env_vars(environ: Mapping[str, str]) -> set[str]:
    """The variables the submitted Ray job's runtime environment sets (none outside a job)."""
    raw = environ.get(JOB_CONFIG_ENV, "")
    if not raw:
        return set()
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``ray://host:port``; None for ``auto`` and ``local``."""
    if address in ("auto", "local"):
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise RayRunError(
            f"--address {address!r}: expected auto, local, HOST:PORT (the head's GCS, e.g. "
            "10.0.0.5:6379) or ray://HOST:PORT (Ray Client, e.g. ray://head:10001)"
        )
    return host or "127.0.0.1", int(port)


def connect(ray: Any, address: str = "", *, num_cpus: int = 0) -> None:
    """Join the cluster at ``address`` (or start a Ray instance here when it is "").

    Args:
        ray: The ``ray`` module.
        address: ``auto`` (the running cluster of this machine), ``host:6379`` or
            ``ray://host:10001``; ``local`` starts a Ray instance on this machine; "" is Ray's
            default: ``$RAY_ADDRESS`` or a cluster started on this machine (``ray start``),
            else a new instance here.
        num_cpus: CPUs of a Ray instance started here (address "" or ``local``); 0 = all.

    Raises:
        RayRunError: The address is malformed, or nothing answers there (checked first with a
            plain TCP connection: Ray itself retries an unreachable head for minutes).
    """
    runtime_env = {"env_vars": worker_env()}
    if address in ("", "local"):
        kwargs = {"num_cpus": num_cpus} if num_cpus else {}
        ray.init(address=address or None, runtime_env=runtime_env, **kwargs)
        return
    where = _host_port(address)
    if where is not None:
        try:
            socket.create_connection(where, timeout=5).close()
        except OSError as exc:
            raise RayRunError(
                f"cannot reach the Ray cluster at {address} ({exc}). Fix: start it "
                "(`ray start --head`) or give the head's address: --address HOST:6379 or "
                "ray://HOST:10001"
            ) from exc
    try:
        ray.init(address=address, runtime_env=runtime_env)
    except ConnectionError as exc:
        raise RayRunError(
            f"cannot join the Ray cluster at {address}: {exc}. Fix: start one "
            "(`ray start --head`) or give --address HOST:6379 / ray://HOST:10001"
        ) from exc


@contextlib.contextmanager
def ray_session(ray: Any, address: str = "") -> Iterator[bool]:
    """Ray, connected for the block: the running connection if there is one, else a new one.

    Inside a Ray task or actor (a cell of ``embbench ray run``) or a driver that already called
    ``ray.init``, that connection is used and left open; otherwise :func:`connect` joins
    ``address`` (as that function reads it) and ``ray.shutdown()`` ends it after the block.

    Yields:
        Whether the block reuses a connection it did not open.
    """
    if ray.is_initialized():
        logger.debug("using the running Ray connection")
        yield True
        return
    connect(ray, address)
    try:
        yield False
    finally:
        ray.shutdown()


__all__ = [
    "FORWARDED_ENV",
    "FORWARDED_ENV_PREFIXES",
    "RAY_INSTALL",
    "RayRunError",
    "connect",
    "import_ray",
    "ray_session",
    "worker_env",
]
