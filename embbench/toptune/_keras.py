"""keras and keras_tuner, imported only after Keras's backend is chosen.

Keras fixes its backend on first import, so :func:`~embbench.toptune.backend.use_keras_backend`
runs first (a no-op when the stage already chose the configured one). The embbench modules that
need keras (:mod:`~embbench.toptune.keras_model`, :mod:`~embbench.toptune.search`) import it
from here, so the order is kept in one place.
"""

from __future__ import annotations

from embbench.toptune.backend import use_keras_backend

use_keras_backend("auto")  # no-op when the stage already chose one

import keras  # noqa: E402
import keras_tuner  # noqa: E402

__all__ = ["keras", "keras_tuner"]
