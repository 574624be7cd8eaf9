"""Checkpoints: read a state dict safely (``weights_only=True``) and load it into a model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from embbench._utils import sha256_file
from embbench.models._builder import Built
from embbench.models._zoo import CheckpointError

logger = logging.getLogger(__name__)


def read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"Cannot read checkpoint {path}: {type(e).__name__}: {e}. It must be a state dict "
            "saved with torch.save(model.state_dict(), path) (loaded with weights_only=True; "
            "pickled objects such as argparse.Namespace are refused) or a .safetensors file."
        ) from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(
            f"Checkpoint {path} does not hold a state dict (a mapping of parameter names to "
            "tensors). Save it with torch.save(model.state_dict(), path)."
        )
    return dict(obj)


def load_checkpoint(built: Built, path: Path) -> None:
    state = read_state_dict(path)
    load_state_dict_into(built, state, source=str(path))
    built.info = {
        "kind": "checkpoint",
        "id": built.info.get("id"),
        "sha256": sha256_file(path),
        "path": str(Path(path).resolve()),
    }


def load_state_dict_into(built: Built, state: Mapping[str, Any], *, source: str) -> None:
    """Load ``state`` strictly, except classifier-head keys (and an open_clip text tower)."""
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    ignored: list[str] = []
    if built.keep_prefix and any(k.startswith(built.keep_prefix) for k in state):
        n = len(built.keep_prefix)
        ignored = [k for k in state if not k.startswith(built.keep_prefix)]
        state = {k[n:]: v for k, v in state.items() if k.startswith(built.keep_prefix)}
    expected = set(built.model.state_dict())
    for k in list(state):
        if k not in expected and any(k.startswith(p) for p in built.head_prefixes):
            ignored.append(k)
            del state[k]
    try:
        result = built.model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(
            f"Checkpoint {source} does not fit the architecture of "
            f"{built.info.get('id')}: {e}. Fix: load it into the architecture it was trained "
            "with (same timm/open_clip name and model_kwargs such as img_size)."
        ) from e
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {source} does not match {built.info.get('id')}: "
            f"{len(missing)} missing key(s) {missing[:8]}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:8]}. Only classifier-head keys {list(built.head_prefixes)} are "
            "ignored. Fix: pass the checkpoint of this architecture (saved from the model "
            "without DDP/EMA wrappers), or register it with the right base model."
        )
    if ignored:
        logger.info("checkpoint %s: ignored %d head/text key(s)", source, len(ignored))
