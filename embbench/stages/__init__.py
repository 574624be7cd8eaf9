"""The pipeline stages, one module per notebook; importing this package registers them all.

| notebook        | module                          | what it produces                           |
|-----------------|---------------------------------|--------------------------------------------|
| ``01_embed``    | :mod:`embbench.stages.embed`    | pretrained embeddings -> retrieval metrics |
| ``02_finetune`` | :mod:`embbench.stages.finetune` | fine-tuned models -> retrieval metrics     |
| ``03_toptune``  | :mod:`embbench.stages.toptune`  | top-tuned MLPs -> retrieval metrics        |
| ``04_crosstune``| :mod:`embbench.stages.crosstune`| tuned on A, scored on B                    |
| ``05_analysis`` | :mod:`embbench.stages.analysis` | the paper's tables and figures, the report |

Each stage module holds its config (a :class:`embbench.config.GridConfig` for 01-04), its steps
for the cell engine (:mod:`embbench.cells`) and a ``run_*`` function. Stages sit at the top of
the package: nothing below imports them.
"""

from __future__ import annotations

from collections.abc import Callable

from embbench.cells import StageSteps
from embbench.config import GridConfig, StageConfig, registered_stage, registered_stage_names
from embbench.records import ResultStore
from embbench.stages import analysis, crosstune, embed, finetune, toptune  # noqa: F401

__all__ = ["config_for", "stage_names", "steps_for"]


def config_for(notebook: str) -> type[StageConfig]:
    """The config class of ``notebook`` (``01_embed`` ... ``05_analysis``)."""
    return registered_stage(notebook)


def stage_names() -> list[str]:
    """Every registered notebook name."""
    return registered_stage_names()


_STEPS: dict[str, Callable[[GridConfig, ResultStore], StageSteps]] = {
    "01_embed": lambda cfg, store: embed.EmbedSteps(cfg),
    "02_finetune": lambda cfg, store: finetune.FinetuneSteps(cfg),
    "03_toptune": lambda cfg, store: toptune.TopTuneSteps(cfg),
    "04_crosstune": lambda cfg, store: crosstune.CrosstuneSteps(cfg, store),
}


def steps_for(cfg: GridConfig, store: ResultStore | None = None) -> StageSteps:
    """The cell-engine steps of ``cfg``'s stage (``cfg.notebook`` names it).

    Raises:
        KeyError: The stage has no grid of cells (05_analysis).
    """
    try:
        factory = _STEPS[cfg.notebook]
    except KeyError:
        raise KeyError(
            f"stage {cfg.notebook!r} has no cells; stages with cells: {sorted(_STEPS)}"
        ) from None
    return factory(cfg, store or ResultStore())
