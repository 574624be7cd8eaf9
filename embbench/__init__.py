"""embbench: benchmark and adapt image embeddings for e-commerce retrieval and categorisation.

Layers, arrows pointing down only (import-linter checks them, ``make lint``):

- entry points: :mod:`~embbench.cli`, :mod:`~embbench.notebooks`, :mod:`~embbench.pipeline`;
- stages, one module per notebook: :mod:`embbench.stages` (``embed`` 01, ``finetune`` 02,
  ``toptune`` 03, ``crosstune`` 04, ``analysis`` 05);
- the cell engine: :mod:`~embbench.cells` (the one per-cell loop);
- :mod:`~embbench.report` and :mod:`~embbench.analysis` (tables, figures, galleries);
- building blocks: ``models``, ``datasets``, ``catalogue``, ``demo``, ``images``, ``cache``,
  ``embed``, ``retrieval``, ``metrics``, ``records``, ``tracking``, ``train``, ``toptune``...;
- utilities: ``config``, ``paths``, ``_registry``, ``_utils``, ``_torch_utils``, ``progress``.
"""

from __future__ import annotations

import logging
import os

__version__ = "0.1.0"


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (a notebook, or papermill running one)."""
    import sys

    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and hasattr(shell, "kernel")


def setup_logging(level: int | str = "INFO") -> None:
    """Log embbench's messages with timestamps (notebooks and the CLI call this).

    At a terminal they go to stderr. In a notebook they go to stdout: plain text under the cell
    instead of red stderr blocks, and ``embbench run-notebook`` relays them to the terminal.
    """
    import sys

    stream = sys.stdout if _in_kernel() else sys.stderr
    # Third-party libraries (open_clip logs on the root logger) stay at WARNING.
    logging.basicConfig(format=LOG_FORMAT, level=logging.WARNING, stream=stream)
    logging.getLogger("embbench").setLevel(level)
    _one_handler(*_OWN_HANDLER_LIBRARIES)


# Libraries that add a stderr handler of their own AND propagate to the root logger, so each of
# their lines printed twice (a red stderr copy under the root's); their lines go through the
# root's handler only.
_OWN_HANDLER_LIBRARIES = ("huggingface_hub",)


def _one_handler(*names: str) -> None:
    """Drop the plain stderr handler of each library in ``names`` (the root's prints its lines)."""
    import contextlib
    import importlib

    for name in names:
        with contextlib.suppress(ImportError):
            importlib.import_module(f"{name}.utils.logging")  # adds its handler on import
        lib = logging.getLogger(name)
        if not lib.propagate or not logging.getLogger().handlers:
            continue
        for handler in list(lib.handlers):
            if type(handler) is logging.StreamHandler:  # the library's plain stderr handler
                lib.removeHandler(handler)


os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow's own stderr handler prints INFO chatter ("Creating initial MLflow database tables")
# as red stderr blocks in notebooks; without it MLflow's warnings reach the root handler above.
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")

__all__ = ["__version__", "setup_logging"]
