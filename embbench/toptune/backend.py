"""Choose Keras 3's backend for top-tuning, before anything imports keras.

Keras reads ``KERAS_BACKEND`` once, when it is first imported, and cannot switch afterwards. So
:func:`use_keras_backend` sets the variable and must run before ``import keras``; stage 03
(:mod:`embbench.stages.toptune`) calls it first thing in every entry point, and
:mod:`embbench.toptune.keras_model` and :mod:`embbench.toptune.search` (the only modules that
import keras) call it at their top.

``auto`` takes ``KERAS_BACKEND`` when the user set it, otherwise the first installed backend of
:data:`AUTO_ORDER`. The order comes from ``benchmarks/bench_toptune.py`` (an MLP on 100k x 768
embeddings with 1,000 classes, 2 CPU cores; numbers in its docstring): JAX was fastest or tied in
every run; TensorFlow and torch were close at steady state, torch much slower under CPU
contention. JAX is an optional dependency (the ``bench`` extra), so without it ``auto`` is
TensorFlow. Under TensorFlow, triton is imported first (see
:func:`_import_triton_before_tensorflow`): the other order crashes the process.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

from embbench._errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_ORDER",
    "KERAS_BACKENDS",
    "TopTuneError",
    "active_keras_backend",
    "installed_backends",
    "use_keras_backend",
]

KERAS_BACKENDS = ("tensorflow", "torch", "jax")
# Fastest first, as measured by benchmarks/bench_toptune.py (numbers in its docstring).
AUTO_ORDER = ("jax", "tensorflow", "torch")


class TopTuneError(UserError, ValueError):
    """Top-tuning cannot run on these inputs; the message names the dataset, split, key and fix."""


def installed_backends() -> list[str]:
    """The Keras backends whose package is importable here, in :data:`AUTO_ORDER`."""
    return [b for b in AUTO_ORDER if importlib.util.find_spec(b) is not None]


def active_keras_backend() -> str | None:
    """The backend of the keras already imported in this process, or ``None``."""
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    try:
        return str(keras.backend.backend())
    except AttributeError:  # keras partially imported
        return os.environ.get("KERAS_BACKEND")


def _import_triton_before_tensorflow() -> None:
    """Import triton (torch's kernel compiler) now, if installed, before TensorFlow loads.

    Measured with TensorFlow 2.21 and torch 2.14: once TensorFlow is imported, importing triton
    (which torchvision, timm and ``torch.compile`` pull in) kills the process with a segmentation
    fault; in the other order both work. A stage running Keras on TensorFlow in a process that
    later builds a timm/torchvision model would crash without this.
    """
    if "tensorflow" in sys.modules or "triton" in sys.modules:
        return
    if importlib.util.find_spec("triton") is None:
        return
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken triton only matters to torch.compile; say so
        logger.warning("could not import triton before TensorFlow (%s); continuing", exc)


def use_keras_backend(name: str = "auto") -> str:
    """Select Keras's backend (sets ``KERAS_BACKEND``); call before keras is imported.

    Args:
        name: ``auto``, ``tensorflow``, ``torch`` or ``jax``.

    Returns:
        The backend Keras will use.

    Raises:
        TopTuneError: Unknown name; the backend's package is missing; or keras was already
            imported in this process with another backend.
    """
    if name not in ("auto", *KERAS_BACKENDS):
        raise TopTuneError(
            f"keras_backend={name!r} is not a Keras backend; use one of {['auto', *KERAS_BACKENDS]}"
        )
    current = active_keras_backend()
    if current is not None:
        if name in ("auto", current):
            return current
        raise TopTuneError(
            f"keras_backend={name!r}, but Keras is already imported in this process with the "
            f"{current!r} backend and cannot switch. Fix: restart the kernel/process so that "
            f"top-tuning runs before anything imports keras, or set keras_backend: {current} "
            "(or auto)."
        )
    have = installed_backends()
    if name == "auto":
        env = os.environ.get("KERAS_BACKEND", "")
        if env:
            if env not in KERAS_BACKENDS:
                raise TopTuneError(
                    f"keras_backend=auto and the environment variable KERAS_BACKEND={env!r}, "
                    f"which is not one of {list(KERAS_BACKENDS)}; unset it or fix its value"
                )
            name = env
        elif have:
            name = have[0]
        else:
            raise TopTuneError(
                f"no Keras backend is installed (none of {list(KERAS_BACKENDS)} imports). "
                "Fix: pip install torch (or tensorflow, or 'jax[cpu]')."
            )
    if name not in have:
        raise TopTuneError(
            f"keras_backend={name!r}, but the {name!r} package is not installed here "
            f"(installed backends: {have or 'none'}). Fix: install it (JAX: pip install "
            f"'embbench[bench]' or 'jax[cpu]') or set keras_backend to one of {have or ['auto']}."
        )
    os.environ["KERAS_BACKEND"] = name
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if name == "tensorflow":
        _import_triton_before_tensorflow()
    logger.debug("Keras backend: %s", name)
    return name
