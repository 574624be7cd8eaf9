"""embbench: benchmark and adapt image embeddings for e-commerce retrieval and categorisation.

Layers, arrows pointing down only (import-linter checks them, ``make lint``):

- entry points: :mod:`~embbench.cli`, :mod:`~embbench.notebooks`, :mod:`~embbench.pipeline`;
- stages, one module per notebook: :mod:`embbench.stages` (``embed`` 01, ``finetune`` 02,
  ``toptune`` 03, ``crosstune`` 04, ``analysis`` 05);
- the cell engine: :mod:`~embbench.cells` (the one per-cell loop);
- :mod:`~embbench.report` and :mod:`~embbench.analysis` (tables, figures, galleries);
- building blocks: ``models``, ``datasets``, ``catalogue``, ``demo``, ``images``, ``cache``,
  ``embed``, ``retrieval``, ``metrics``, ``records``, ``tracking``, ``train``, ``toptune``...;
- utilities: ``config``, ``paths``, ``_registry``, ``_utils``, ``_torch_utils``.
"""

from __future__ import annotations

import logging
import os

__version__ = "0.1.0"


def setup_logging(level: int | str = "INFO") -> None:
    """Log embbench's messages to stderr with timestamps (notebooks and the CLI call this)."""
    # Third-party libraries (open_clip logs on the root logger) stay at WARNING.
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING
    )
    logging.getLogger("embbench").setLevel(level)


os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__all__ = ["__version__", "setup_logging"]
