"""The error of the training building blocks."""

from __future__ import annotations

__all__ = ["FinetuneError"]


class FinetuneError(RuntimeError):
    """Fine-tuning cannot run as configured; the message names the cause and the fix."""
