"""A saved top-tuning MLP used as an embedding head (cross-top-tuning), and where cells live."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embbench._utils import safe_name
from embbench.paths import runs_dir
from embbench.toptune.backend import TopTuneError, use_keras_backend
from embbench.vectors import l2_normalize

__all__ = ["TopTunedModel", "load_toptuned", "toptune_dir"]


def toptune_dir(dataset: str, model: str) -> Path:
    """``<runs_dir>/toptune/<dataset>/<model>``: searches and final models of one cell."""
    return runs_dir() / "toptune" / safe_name(dataset) / safe_name(model)


@dataclass
class TopTunedModel:
    """A saved top-tuning MLP, used as an embedding head.

    Attributes:
        path: The ``model.keras`` file.
        source_model: The embedding model whose (pretrained) vectors it takes.
        source_dataset: The dataset it was top-tuned on.
        label: The label it classifies.
        classes: Class index -> label value.
        input_dim: Expected input dimension.
        embed_dim: Output (last hidden layer) dimension.
        meta: Everything in ``toptune.json`` (hyperparameters, versions, hashes).
    """

    path: Path
    source_model: str
    source_dataset: str
    label: str
    classes: list
    input_dim: int
    embed_dim: int
    meta: dict
    _model: Any = field(default=None, repr=False)
    _embed: Any = field(default=None, repr=False)

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise TopTuneError(
                f"{self.path}: expects (n, {self.input_dim}) embeddings of "
                f"{self.source_model!r}, got shape {x.shape}. Fix: feed embeddings of the same "
                "model the MLP was top-tuned on."
            )
        return l2_normalize(x, "top-tuning inputs", zero_rows="keep")

    def embed(self, vectors: np.ndarray) -> np.ndarray:
        """Top-tuned embeddings (last hidden layer) of pretrained ``vectors``.

        Args:
            vectors: (n, input_dim) pretrained embeddings of ``source_model`` (raw; they are
                L2-normalised here, as in training).

        Returns:
            (n, embed_dim) float32.
        """
        # keras: imported only here, after the backend is chosen (use_keras_backend)
        from embbench.toptune.keras_model import predict

        return predict(self._embed, self._check(vectors))

    def predict_labels(self, vectors: np.ndarray) -> np.ndarray:
        """The classifier's predicted label for each of ``vectors``."""
        # keras: imported only here, after the backend is chosen (use_keras_backend)
        from embbench.toptune.keras_model import predict

        probs = predict(self._model, self._check(vectors))
        return np.asarray(self.classes, dtype=object)[np.argmax(probs, axis=1)]


def load_toptuned(record_or_path: Mapping[str, Any] | str | Path) -> TopTunedModel:
    """Load a top-tuned MLP for use as an embedding head (e.g. cross-top-tuning).

    Args:
        record_or_path: A top-tuning result record (dict, or the path of its JSON), a
            ``model.keras`` path, or its folder.

    Returns:
        The model with ``.embed(vectors)`` and its source (model, dataset, label).

    Raises:
        TopTuneError: Nothing loadable there (naming the path and how to produce it).
    """
    if isinstance(record_or_path, Mapping):
        record = record_or_path
        if "toptune_model_path" not in record:
            raise TopTuneError(
                f"record of stage {record.get('stage')!r} ({record.get('model')} on "
                f"{record.get('dataset')}) has no toptune_model_path; pass a 03_toptune record"
            )
        path = Path(record["toptune_model_path"])
    else:
        path = Path(record_or_path)
        if path.suffix == ".json" and path.is_file():
            data = json.loads(path.read_text())
            if "toptune_model_path" in data:
                path = Path(data["toptune_model_path"])
            else:
                path = path.parent
        if path.is_dir():
            path = path / "model.keras"
    meta_path = path.parent / "toptune.json"
    if not path.is_file() or not meta_path.is_file():
        raise TopTuneError(
            f"no top-tuned model at {path} (with {meta_path.name} beside it). Fix: run "
            "03_toptune for that model and dataset (its record's toptune_model_path says where "
            "the model is)."
        )
    meta = json.loads(meta_path.read_text())
    use_keras_backend("auto")
    # keras: imported only here, after the backend is chosen (use_keras_backend)
    from embbench.toptune.keras_model import embedding_model, load_model

    keras_model = load_model(path)
    return TopTunedModel(
        path=path,
        source_model=meta["source_model"],
        source_dataset=meta["source_dataset"],
        label=meta["label"],
        classes=meta["classes"],
        input_dim=int(meta["input_dim"]),
        embed_dim=int(meta["embed_dim"]),
        meta=meta,
        _model=keras_model,
        _embed=embedding_model(keras_model),
    )
