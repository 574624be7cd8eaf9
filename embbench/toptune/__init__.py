"""Building blocks of top-tuning: an MLP searched by keras-tuner on frozen embeddings.

- :mod:`~embbench.toptune.backend`: Keras's backend, chosen before keras is imported.
- :mod:`~embbench.toptune.space`: the search space (plain data).
- :mod:`~embbench.toptune.data`: cached embeddings and labels checked and encoded; the
  test-split classification; all-zero output rows.
- :mod:`~embbench.toptune.keras_model`: the MLP, its hypermodel, predict/save/load.
- :mod:`~embbench.toptune.search`: the resumable search and the final training.
- :mod:`~embbench.toptune.model`: a saved MLP as an embedding head (:func:`load_toptuned`).

Importing this package does not import keras (``keras_model`` and ``search`` do, and are
imported only after :func:`use_keras_backend`). Stage 03 is :mod:`embbench.stages.toptune`.
"""

from __future__ import annotations

from embbench.toptune.backend import (
    AUTO_ORDER,
    KERAS_BACKENDS,
    TopTuneError,
    active_keras_backend,
    installed_backends,
    use_keras_backend,
)
from embbench.toptune.data import (
    TEST,
    TRAIN,
    VAL,
    TopTuneData,
    fill_zero_rows,
    prepare_data,
    required_splits,
    test_classification,
)
from embbench.toptune.model import TopTunedModel, load_toptuned, toptune_dir
from embbench.toptune.space import ACTIVATIONS, OPTIMIZERS, SearchSpace

__all__ = [
    "ACTIVATIONS",
    "AUTO_ORDER",
    "KERAS_BACKENDS",
    "OPTIMIZERS",
    "TEST",
    "TRAIN",
    "VAL",
    "SearchSpace",
    "TopTuneData",
    "TopTuneError",
    "TopTunedModel",
    "active_keras_backend",
    "fill_zero_rows",
    "installed_backends",
    "load_toptuned",
    "prepare_data",
    "required_splits",
    "test_classification",
    "toptune_dir",
    "use_keras_backend",
]
