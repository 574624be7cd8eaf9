"""Progress bars that also reach a terminal when a notebook runs under papermill.

``progress_bar(...)`` is :class:`tqdm.auto.tqdm` (a compact ipywidgets bar in a notebook, a text
bar at a terminal) that in addition logs tqdm's own one-line meter (count, rate, elapsed and
ETA) on the ``embbench.progress`` logger at most every ``log_every`` seconds. ``embbench demo``
and ``embbench run-notebook`` relay the kernel's ``embbench`` log lines to the terminal, so a
long step there still shows its progress and ETA while the widget stays in the notebook.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger("embbench.progress")

LOG_EVERY_S = 20.0


class LoggingProgress(tqdm):
    """:class:`tqdm.auto.tqdm` that logs its meter every ``log_every`` seconds and at the end."""

    def __init__(self, *args: Any, log_every: float = LOG_EVERY_S, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._log_every = log_every
        self._last_log = time.monotonic()

    def _log_meter(self) -> None:
        self._last_log = time.monotonic()
        logger.info("%s", self.format_meter(**self.format_dict).strip())

    def update(self, n: float | None = 1) -> bool | None:
        """Advance the bar; log the meter when ``log_every`` seconds have passed."""
        out = super().update(n)
        if not self.disable and time.monotonic() - self._last_log >= self._log_every:
            self._log_meter()
        return out

    def close(self) -> None:
        """Close the bar; log the final meter of a step that ran longer than ``log_every``."""
        if not self.disable and not getattr(self, "_closed_logged", False):
            self._closed_logged = True
            if self.n and time.monotonic() - self.start_t >= self._log_every:
                self._log_meter()
        super().close()


def progress_bar(*args: Any, **kwargs: Any) -> LoggingProgress:
    """A :class:`LoggingProgress` bar (same arguments as :class:`tqdm.auto.tqdm`)."""
    return LoggingProgress(*args, **kwargs)


__all__ = ["LOG_EVERY_S", "LoggingProgress", "progress_bar"]
