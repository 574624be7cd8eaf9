"""Text tasks of text-image models: prompts, text embeddings, text<->image retrieval, zero-shot.

Layout: :mod:`~embbench.text.templates` (prompt templates, CLIP_benchmark's per-class
averaging), :mod:`~embbench.text.encode` (texts -> cached, L2-normalised vectors of a
:class:`~embbench.models.TextTower`) and :mod:`~embbench.text.tasks` (text->image and
image->text retrieval scored by the image-retrieval metric code, zero-shot classification) and
:mod:`~embbench.text.evaluate` (one call per task family for the engine).

>>> from embbench.models import create_text_embedder
>>> from embbench.text import embed_class_prompts, zero_shot_classify
>>> tower = create_text_embedder("test_clip", weights="random")
>>> classes = embed_class_prompts(tower, ["mug", "lamp"], ["a photo of {}."], progress=False)
>>> classes.shape
(2, 32)
"""

from __future__ import annotations

from embbench.text.encode import (
    TEXT_VERSION,
    TextEmbeddings,
    embed_class_prompts,
    embed_texts,
    encode_texts,
    text_cache,
    texts_fingerprint,
)
from embbench.text.evaluate import (
    ClassPromptResults,
    ItemTextResults,
    class_prompt_tasks,
    item_text_tasks,
)
from embbench.text.tasks import (
    ItemTexts,
    TextColumnError,
    ZeroShotResult,
    cross_modal_retrieval,
    item_texts,
    retrieval_cis,
    zero_shot_classify,
)
from embbench.text.templates import (
    DEFAULT_TEMPLATES,
    TemplateError,
    average_class_embeddings,
    class_prompts,
    validate_templates,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "TEXT_VERSION",
    "ClassPromptResults",
    "ItemTextResults",
    "ItemTexts",
    "TemplateError",
    "TextColumnError",
    "TextEmbeddings",
    "ZeroShotResult",
    "average_class_embeddings",
    "class_prompt_tasks",
    "class_prompts",
    "cross_modal_retrieval",
    "embed_class_prompts",
    "embed_texts",
    "encode_texts",
    "item_text_tasks",
    "item_texts",
    "retrieval_cis",
    "text_cache",
    "texts_fingerprint",
    "validate_templates",
    "zero_shot_classify",
]
