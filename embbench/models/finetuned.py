"""Fine-tuned models: the one way to register a checkpoint of a zoo model, and their index.

:func:`register_finetuned` makes a ``checkpoint`` spec that builds the base model's
architecture (with the base's preprocessing, or the data config the fine-tuning evaluated with)
and loads the checkpoint; with ``index_entry`` it also lists the model in
``runs_dir()/finetuned_models.json`` so any later process (a notebook, ``01_embed``) finds it by
name: :func:`get_model_spec` reads the index on a miss (:func:`register_finetuned_models`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from embbench._utils import atomic_write_json, safe_name
from embbench.models._zoo import (
    ModelError,
    ModelSpec,
    add_lookup_fallback,
    get_model_spec,
    register_model,
)
from embbench.paths import runs_dir

logger = logging.getLogger(__name__)

INDEX_NAME = "finetuned_models.json"
INDEX_VERSION = 1


def finetuned_name(model: str, dataset: str, recipe: str) -> str:
    """Registry name of a fine-tuned model: ``<model>_ft_<dataset>_<recipe>`` (``a2``...)."""
    return f"{get_model_spec(model).name}_ft_{safe_name(dataset)}_{recipe.lower()}"


def finetuned_spec(
    name: str,
    base: str,
    checkpoint_path: str | Path,
    *,
    paper_name: str | None = None,
    notes: str = "",
    data_config: Mapping[str, Any] | None = None,
    extra_model_kwargs: Mapping[str, Any] | None = None,
) -> ModelSpec:
    """The ``checkpoint`` spec of ``base`` fine-tuned into ``checkpoint_path`` (not registered).

    Args:
        name: New registry name (e.g. ``"resnet50_ft_cars196_a2"``).
        base: Registered name (or ``timm:``/``open_clip:`` name) it was fine-tuned from.
        checkpoint_path: The headless state dict file.
        paper_name: Label for tables (default: ``"<base label> (fine-tuned)"``).
        notes: Free text (dataset, recipe, run id).
        data_config: The preprocessing the fine-tuned model is evaluated with (default: the
            base spec's ``data_config``).
        extra_model_kwargs: Constructor arguments added to the base's (e.g. ``img_size``).

    Returns:
        The spec. Supported bases: timm, open_clip, checkpoint, and hf-hub / torch.hub entries
        with an ``arch``.
    """
    b = get_model_spec(base)
    if b.source in ("timm", "open_clip"):
        identifier, tag = f"{b.source}:{b.identifier}", b.pretrained
    elif b.source == "hf-hub" and b.arch:
        identifier, tag = f"open_clip:{b.arch}", None
    elif b.source == "torch.hub" and b.arch:
        identifier, tag = f"timm:{b.arch}", None
    elif b.source == "checkpoint":
        identifier, tag = b.identifier, b.pretrained
    else:
        raise ModelError(
            f"Cannot register a fine-tuned checkpoint of {base!r} (source {b.source}): its "
            "architecture is not buildable locally; give the base spec an `arch`."
        )
    dc = dict(data_config) if data_config is not None else b.data_config
    if dc is not None and "input_size" in dc:
        dc = {**dc, "input_size": tuple(dc["input_size"])}
    return ModelSpec(
        name=name,
        source="checkpoint",
        identifier=identifier,
        pretrained=tag,
        family=b.family,
        backbone=b.backbone,
        paper_name=paper_name or f"{b.paper_name} (fine-tuned)",
        notes=notes or f"fine-tuned from {b.name}",
        embed_dim=b.embed_dim,
        data_config=dc,
        model_kwargs={**dict(b.model_kwargs), **dict(extra_model_kwargs or {})},
        checkpoint_path=str(Path(checkpoint_path).expanduser().resolve()),
        tiny=b.tiny,
        control=b.control,
    )


def register_finetuned(
    name: str,
    base: str,
    checkpoint_path: str | Path,
    *,
    index_entry: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    **spec_options: Any,
) -> ModelSpec:
    """Register a headless fine-tuned checkpoint of a zoo model under ``name``.

    Args:
        name: New registry name.
        base: The model it was fine-tuned from.
        checkpoint_path: The state dict file.
        index_entry: Also list the model in :func:`finetuned_index_path` with these fields
            (``dataset``, ``recipe``, ``label``, ``train_hash``, ``sha256``, run ids...); the
            spec, ``base`` and ``created`` are added.
        overwrite: Replace an existing entry of the same name.
        **spec_options: ``paper_name``, ``notes``, ``data_config``, ``extra_model_kwargs``, as
            :func:`finetuned_spec` takes them.

    Returns:
        The registered spec.
    """
    spec = finetuned_spec(name, base, checkpoint_path, **spec_options)
    register_model(spec, overwrite=overwrite)
    if index_entry is not None:
        entry = {
            **dict(index_entry),
            "spec": spec.to_dict(),
            "base": get_model_spec(base).name,
            "created": datetime.now(UTC).isoformat(),
        }
        _add_to_index(name, entry)
    return spec


# ------------------------------------------------------------------------------------ index


def finetuned_index_path() -> Path:
    """``runs_dir()/finetuned_models.json``: every fine-tuned model, so any process finds it."""
    return runs_dir() / INDEX_NAME


def read_finetuned_index(path: Path | None = None) -> dict[str, dict]:
    """The index's entries by registry name (empty when there is none yet)."""
    path = path or finetuned_index_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{path} is not valid JSON ({exc}); fix or delete it (re-running 02_finetune "
            "rewrites its entries)"
        ) from None
    return dict(data.get("models", {}))


@contextlib.contextmanager
def _index_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_suffix(".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _add_to_index(name: str, entry: dict, path: Path | None = None) -> None:
    path = path or finetuned_index_path()
    with _index_lock(path):
        models = read_finetuned_index(path)
        models[name] = entry
        atomic_write_json(path, {"version": INDEX_VERSION, "models": models})


def register_finetuned_models(path: Path | None = None) -> list[str]:
    """Register every model of the index whose checkpoint still exists; return their names.

    Lets any process (a notebook, ``01_embed``) use fine-tuned models by name.
    """
    names = []
    for name, entry in read_finetuned_index(path).items():
        spec = dict(entry.get("spec") or {})
        if not spec or not Path(spec.get("checkpoint_path") or "").is_file():
            logger.warning("fine-tuned model %s: checkpoint missing; not registered", name)
            continue
        if isinstance(spec.get("data_config"), dict) and "input_size" in spec["data_config"]:
            spec["data_config"]["input_size"] = tuple(spec["data_config"]["input_size"])
        register_model(ModelSpec(**spec), overwrite=True)
        names.append(name)
    return names


def find_finetuned(base: str, dataset: str, recipe: str) -> dict | None:
    """The newest index entry of ``base`` fine-tuned on ``dataset`` with ``recipe``, if any."""
    base_name = get_model_spec(base).name
    hits = [
        e
        for e in read_finetuned_index().values()
        if e.get("base") == base_name
        and e.get("dataset") == dataset
        and str(e.get("recipe", "")).upper() == recipe.upper()
        and Path(e.get("spec", {}).get("checkpoint_path") or "").is_file()
    ]
    return max(hits, key=lambda e: e.get("created", "")) if hits else None


# get_model_spec reads the index when a name is not registered yet (a model fine-tuned by
# another process).
add_lookup_fallback(register_finetuned_models)

__all__ = [
    "INDEX_NAME",
    "INDEX_VERSION",
    "find_finetuned",
    "finetuned_index_path",
    "finetuned_name",
    "finetuned_spec",
    "read_finetuned_index",
    "register_finetuned",
    "register_finetuned_models",
]
