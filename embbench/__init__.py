"""embbench: benchmark and adapt image embeddings for e-commerce retrieval and categorisation.

Stages (one module each, one notebook each):
``embed_stage`` (01, pretrained retrieval), ``finetune`` (02), ``toptune`` (03),
``crosstune`` (04), ``analysis`` (05). Building blocks: ``catalogue`` and ``datasets`` (data),
``models`` (the model zoo), ``embed`` and ``cache`` (vectors), ``retrieval`` and ``metrics``
(search and scoring), ``tracking`` and ``results`` (MLflow and result records).
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
