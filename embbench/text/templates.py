"""Prompt templates: class names -> query texts, and CLIP_benchmark's per-class averaging.

A class name becomes one query per template (``"a photo of {}."`` -> ``"a photo of mug."``); each
prompt is embedded, the prompts of a class are averaged and the mean is L2-normalised again: one
vector per class. This is the prompt ensembling of CLIP (Radford et al. 2021, the 80 ImageNet
prompts of OpenAI's ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``) as LAION CLIP_benchmark
implements it (``clip_benchmark/metrics/zeroshot_classification.py``, ``zero_shot_classifier``:
``class_embeddings.mean(dim=0)`` then ``/ norm``). :data:`DEFAULT_TEMPLATES` adapts that idea to
product photos; a user passes their own list instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embbench._errors import UserError
from embbench.vectors import l2_normalize

__all__ = [
    "DEFAULT_TEMPLATES",
    "TemplateError",
    "average_class_embeddings",
    "class_prompts",
    "validate_templates",
]

# E-commerce prompts in the style of OpenAI's ImageNet prompts (CLIP_benchmark's en_zeroshot
# templates): a plain photo, the product-shot phrasings of catalogues and listings.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a product photo of {}.",
    "a photo of a {}, a type of product.",
    "{} for sale online.",
    "an e-commerce listing image of {}.",
    "a close-up photo of the {}.",
    "a studio photo of {} on a white background.",
    "a catalogue image of {}.",
)


class TemplateError(UserError, ValueError):
    """A prompt template list is empty or a template lacks its ``{}`` placeholder."""


def validate_templates(
    templates: Sequence[str] | None, where: str = "templates"
) -> tuple[str, ...]:
    """Check a template list; ``None`` gives :data:`DEFAULT_TEMPLATES`.

    Args:
        templates: Format strings, each with one ``{}`` where the class name goes.
        where: Where the list came from (a params key or file), named in errors.

    Returns:
        The templates as a tuple.

    Raises:
        TemplateError: An empty list, a non-string entry, or a template without ``{}`` (one
            line naming it and the fix).
    """
    if templates is None:
        return DEFAULT_TEMPLATES
    if isinstance(templates, str):
        raise TemplateError(
            f"{where}: expected a list of templates, got the single string {templates!r}. "
            "Fix: write it as a list, e.g. ['a photo of {}.']."
        )
    out = tuple(templates)
    if not out:
        raise TemplateError(
            f"{where} is an empty list: zero-shot and class-prompt queries need at least one "
            "template. Fix: give templates such as ['a photo of {}.'] or leave the key out for "
            "the default e-commerce set."
        )
    for i, t in enumerate(out):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise TemplateError(
                f"{where}[{i}] = {t!r} must be a string with exactly one '{{}}' where the class "
                "name goes. Fix: e.g. 'a product photo of {}.'"
            )
    return out


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every (class, template) prompt, class-major: class 0's templates first.

    Args:
        classnames: The class names (the text put into each template).
        templates: Validated templates.

    Returns:
        ``len(classnames) * len(templates)`` prompts.
    """
    names = [str(c) for c in classnames]
    empty = [i for i, n in enumerate(names) if not n.strip()]
    if empty:
        raise TemplateError(
            f"class name {empty[0]} is empty ({len(empty)} empty of {len(names)}): every class "
            "needs a name for its prompts. Fix: fill the class names (or the catalogue's class "
            "name column)."
        )
    return [t.format(n) for n in names for t in templates]


def average_class_embeddings(vectors: np.ndarray, n_templates: int) -> np.ndarray:
    """Average each class's prompt embeddings and re-normalise (CLIP_benchmark's ensembling).

    Args:
        vectors: ``(n_classes * n_templates, d)`` embeddings of :func:`class_prompts`' prompts
            (class-major), each L2-normalised.
        n_templates: Templates per class.

    Returns:
        ``(n_classes, d)`` float32 unit vectors.
    """
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or n_templates < 1 or v.shape[0] % n_templates:
        raise ValueError(
            f"average_class_embeddings: {v.shape} vectors do not split into classes of "
            f"{n_templates} templates"
        )
    mean = v.reshape(-1, n_templates, v.shape[1]).mean(axis=1)
    return l2_normalize(mean, "class prompt means")
