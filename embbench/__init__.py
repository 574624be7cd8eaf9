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
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=False
    )
    logging.getLogger("embbench").setLevel(level)
    for noisy in ("urllib3", "PIL", "matplotlib", "alembic", "mlflow", "pymilvus", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__all__ = ["__version__", "setup_logging"]
