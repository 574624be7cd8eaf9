"""The error of the training building blocks."""

from __future__ import annotations

from embbench._errors import UserError

__all__ = ["FinetuneError"]


class FinetuneError(UserError, RuntimeError):
    """Fine-tuning cannot run as configured; the message names the cause and the fix."""
