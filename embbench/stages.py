"""Importing this module registers every stage's config (see :func:`embbench.config.config_for`)."""

from __future__ import annotations

import embbench.analysis  # noqa: F401  05_analysis
import embbench.embed_stage  # noqa: F401  01_embed
