"""Importing this module registers every stage's config (see :func:`embbench.config.config_for`)."""

from __future__ import annotations

import embbench.analysis  # noqa: F401  05_analysis
import embbench.crosstune  # noqa: F401  04_crosstune
import embbench.embed_stage  # noqa: F401  01_embed
import embbench.finetune  # noqa: F401  02_finetune
import embbench.toptune_stage  # noqa: F401  03_toptune
