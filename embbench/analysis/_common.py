"""The analysis frame's labels (modes, families) and small coercions (modes: embbench.vocab)."""

from __future__ import annotations

import math
from typing import Any

MODE_LABELS = {
    "pretrained": "Pretrained",
    "top-tuned": "Top-tuned",
    "fine-tuned": "Fine-tuned",
    "cross-tuned": "Cross-tuned",
    "cross-top-tuned": "Cross-top-tuned",
}
FAMILIES = ("supervised", "ssl", "text-image")
FAMILY_LABELS = {
    "supervised": "Supervised",
    "ssl": "SSL",
    "text-image": "Text-image",
    "unknown": "Unknown",
}
MEAN = "Mean"
IMPROVEMENT = "improvement"


def num(value: Any) -> float:
    """``value`` as a finite float, else ``NaN`` (None, text, inf)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def text(value: Any) -> str | None:
    """``value`` when it is a non-empty string, else ``None`` (NaN, None, "")."""
    return value if isinstance(value, str) and value else None
