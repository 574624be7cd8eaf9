"""The grid of a pipeline: its cell tasks, read from the params files (no Kubeflow needed).

A pipeline task runs exactly one cell of one stage through the cell engine
(:func:`run_one_cell`, the ``embbench run-cell`` command); this module lists those tasks:

- which cells (each stage's own grid, from :func:`embbench.stages.steps_for` on its config);
- the order between them (the stage order of the study):

  ====================================  =====================================================
  task                                  runs after
  ====================================  =====================================================
  03 top-tuned (m, d)                   01 pretrained (m, d): top-tuning reads its embeddings
  04 cross-tuned (m, from A, on B)      02 fine-tuned (m, A); 01 pretrained (m, B) (baseline)
  04 cross-top-tuned (m, from X, on Y)  03 top-tuned (m, X); 01 pretrained (m, Y)
  05 report                             every cell
  ====================================  =====================================================

  A prerequisite that is not in the pipeline's grid is expected to exist already (the engine
  says which stage to run when it does not);
- a **cell key** per task: the hash of the stage config's result-relevant fields and the cell,
  i.e. the params content that changes the cell's numbers. The engine's own cell hash also
  covers the data and the embedding caches, which exist only on the cluster's volume, so the
  key is what a pipeline can know when it is compiled. Kubeflow's task cache uses it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embbench._registry import UnknownNameError
from embbench._utils import stable_hash
from embbench.cells import Cell, CellEngine, run_grid
from embbench.config import ConfigError, GridConfig, StageConfig
from embbench.models import check_text_capable, get_model_spec
from embbench.records import ResultStore
from embbench.stages import config_for, steps_for
from embbench.vocab import TASKS, TEXT_TASKS

logger = logging.getLogger(__name__)

REPORT_NOTEBOOK = "05_analysis"
_NOTEBOOK_RE = re.compile(r"^(0[1-5]_[a-z]+)$")


class CellSelectError(ConfigError):
    """``run-cell`` cannot pick exactly one cell; the message lists the grid and the fix."""


@dataclass(frozen=True)
class CellTask:
    """One pipeline task: a cell of a stage, its params and what it waits for.

    Attributes:
        notebook: The stage's notebook name (``01_embed`` ...).
        cell: The cell of the stage's grid.
        key: The cell key (config hash of the result-relevant fields + the cell).
        params_yaml: The stage's full validated config as YAML (what the task runs with).
        after: The keys of the cells this one waits for.
    """

    notebook: str
    cell: Cell
    key: str
    params_yaml: str
    after: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """A short display name: ``01 pretrained resnet50 on cars196 (from sop)``."""
        origin = f" (from {self.cell.source})" if self.cell.source else ""
        task = "" if self.cell.task == "image-image" else f" {self.cell.task}"
        return (
            f"{self.notebook[:2]} {self.cell.mode}{task} {self.cell.model} on "
            f"{self.cell.dataset}{origin}"
        )


@dataclass
class PipelineGrid:
    """Every task of a pipeline, in stage order, and the report's params (if any)."""

    cells: list[CellTask] = field(default_factory=list)
    report_yaml: str | None = None

    @property
    def params(self) -> dict[str, str]:
        """Notebook -> its validated config as YAML (the pipeline's ``params`` parameter)."""
        out = {c.notebook: c.params_yaml for c in self.cells}
        if self.report_yaml is not None:
            out[REPORT_NOTEBOOK] = self.report_yaml
        return out

    def by_key(self) -> dict[str, CellTask]:
        """The cell tasks by key."""
        return {c.key: c for c in self.cells}

    @property
    def grid_key(self) -> str:
        """One hash of every cell key (the report's cache key)."""
        return stable_hash(sorted(c.key for c in self.cells) + [self.report_yaml or ""])


def group_params(specs: Iterable[str | Path]) -> dict[str, list[Path]]:
    """Group ``-f`` arguments by notebook, keeping their order.

    ``NOTEBOOK=path`` names the notebook; a bare path is assigned by its file name
    (``params/01_embed.yaml``, ``params/smoke/01_embed.yaml`` -> ``01_embed``).

    Raises:
        ConfigError: A bare path whose name is not a notebook's.
    """
    grouped: dict[str, list[Path]] = {}
    for spec in specs:
        text = str(spec)
        nb, sep, path = text.partition("=")
        if not sep:
            nb, path = Path(text).stem, text
        if not _NOTEBOOK_RE.match(nb):
            raise ConfigError(
                f"params file {text!r}: cannot tell its notebook from the name. Fix: write "
                "NOTEBOOK=path, e.g. 01_embed=my_models.yaml"
            )
        grouped.setdefault(nb, []).append(Path(path))
    return grouped


def load_config(notebook: str, files: Sequence[str | Path], **overrides: Any) -> StageConfig:
    """The validated config of ``notebook`` from layered ``files`` and ``overrides``."""
    return config_for(notebook).from_files(*files, **overrides)


def stage_cells(notebook: str, cfg: GridConfig) -> list[Cell]:
    """The cells of a stage's grid (a stage-01 task also runs its deployment variants)."""
    return list(steps_for(cfg).grid())


def canonical_model(name: str) -> str:
    """The registry's name of ``name`` (aliases match across stages); ``name`` if unknown."""
    try:
        return get_model_spec(name).name
    except UnknownNameError:
        return name


def cell_key(notebook: str, cfg: StageConfig, cell: Cell) -> str:
    """The cell key: the config's result-relevant hash and the cell (see the module doc)."""
    return stable_hash(
        {
            "notebook": notebook,
            "config": cfg.config_hash(),
            "cell": [cell.stage, cell.mode, cell.model, cell.dataset, cell.source]
            + ([] if cell.task == "image-image" else [cell.task]),
        }
    )


def pipeline_grid(params: Mapping[str, Sequence[str | Path]]) -> PipelineGrid:
    """The cell tasks of ``params`` (notebook -> its layered params files).

    Raises:
        ConfigError: A params file is invalid, or a notebook has no grid and is not 05.
    """
    grid = PipelineGrid()
    found: dict[tuple[str, str, str], str] = {}  # (mode, model, dataset) -> key, for ordering
    pending: list[tuple[str, GridConfig, Cell, bool]] = []
    for notebook in sorted(params):
        files = list(params[notebook])
        if notebook == REPORT_NOTEBOOK:
            cfg = load_config(notebook, files)
            grid.report_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
            continue
        # skip_missing would drop 04 cells whose sources the pipeline itself is to train
        overrides = {"skip_missing": False} if notebook == "04_crosstune" else {}
        cfg = load_config(notebook, files, **overrides)
        if not hasattr(cfg, "models") or not hasattr(cfg, "datasets"):
            raise ConfigError(f"{notebook} has no grid of cells; only 01-04 and 05 can be given")
        pending += [(notebook, cfg, c) for c in stage_cells(notebook, cfg)]
    texts: dict[str, str] = {}
    for notebook, cfg, cell in pending:
        key = cell_key(notebook, cfg, cell)
        texts.setdefault(notebook, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        if cell.task == "image-image":  # what later stages wait for
            found.setdefault((cell.mode, canonical_model(cell.model), cell.dataset), key)
        after = [found.get(need) for need in _needs(cell)]
        grid.cells.append(
            CellTask(
                notebook, cell, key, texts[notebook], tuple(k for k in after if k and k != key)
            )
        )
    keys = [c.key for c in grid.cells]
    if len(set(keys)) != len(keys):
        raise ConfigError("two cells of the pipeline have the same key; the grid repeats a cell")
    return grid


# Stage 04's sources are what the grid itself trains, so its tasks check it when they start.
DRIVER_CHECKED = ("01_embed", "02_finetune", "03_toptune")


def check_stages(
    params: Mapping[str, Sequence[str | Path]], overrides: Mapping[str, Any] | None = None
) -> None:
    """The cell engine's up-front checks of stages 01-03, run here before any task is sent.

    The same checks a notebook runs before its first cell (models, datasets, labels, splits,
    the stage's own: text tasks without a text-image model...), so a grid that cannot run fails
    in one message on the driver instead of once per cell on the workers.

    Raises:
        GridError: Every problem found, with its fix.
        ConfigError: A params file is invalid.
    """
    for notebook in sorted(params):
        if notebook not in DRIVER_CHECKED:
            continue
        cfg = load_config(notebook, list(params[notebook]), **dict(overrides or {}))
        steps = steps_for(cfg, ResultStore())
        CellEngine(cfg, steps).validate(steps.grid())


def _needs(cell: Cell) -> list[tuple[str, str, str]]:
    """The (mode, model, dataset) cells that must finish before ``cell`` (stage order)."""
    model = canonical_model(cell.model)
    if cell.task != "image-image":  # text and baseline cells reuse its cached image vectors
        return [("pretrained", model, cell.dataset)]
    if cell.mode == "top-tuned":
        return [("pretrained", model, cell.dataset)]
    if cell.mode == "cross-tuned":
        return [("fine-tuned", model, cell.source or ""), ("pretrained", model, cell.dataset)]
    if cell.mode == "cross-top-tuned":
        return [("top-tuned", model, cell.source or ""), ("pretrained", model, cell.dataset)]
    return []


def run_one_cell(
    notebook: str,
    files: Sequence[str | Path],
    overrides: Mapping[str, Any] | None = None,
    *,
    model: str,
    dataset: str,
    mode: str = "",
    source: str = "",
    task: str = "image-image",
) -> Any:
    """Run exactly one cell of ``notebook``'s grid through the cell engine; return its record.

    A finished cell is read back, not recomputed (the engine skips it unless ``overwrite``).
    ``skip_missing`` is turned off: a named cell whose source model is missing fails, naming
    the stage to run, instead of being skipped silently.

    Raises:
        CellSelectError: The stage has no cells, or the arguments match no cell or several.
        GridError: The cell cannot run (raised by the engine's up-front checks).
        TextUnsupportedError: A text task asked for an image-only model (before any work).
    """
    if task not in TASKS:
        raise CellSelectError(f"--task {task!r} is not a task; choose one of {list(TASKS)}")
    if task in TEXT_TASKS:
        check_text_capable(model, task)
    cls = config_for(notebook)
    if not issubclass(cls, GridConfig):
        raise CellSelectError(f"{notebook} has no cells; run it with `embbench report`")
    extra = dict(overrides or {})
    if "skip_missing" in cls.model_fields:
        extra["skip_missing"] = False
    cfg = cls.from_files(*files, **extra)
    store = ResultStore()
    steps = steps_for(cfg, store)

    def select(c: Cell) -> bool:
        return (
            c.model == model
            and c.dataset == dataset
            and (not mode or c.mode == mode)
            and (not source or c.source == source)
            and c.task == task
        )

    grid = steps.grid()
    matches = [c for c in grid if select(c)]
    if len(matches) != 1:
        listed = "\n- ".join(str(c) for c in grid[:20]) + ("\n- ..." if len(grid) > 20 else "")
        what = "no cell" if not matches else f"{len(matches)} cells"
        raise CellSelectError(
            f"{notebook}: {what} of the grid match model={model!r} dataset={dataset!r}"
            f"{f' mode={mode!r}' if mode else ''}{f' source={source!r}' if source else ''}"
            f" task={task!r}. "
            f"Fix: name one cell of the params' grid (add --mode/--source to tell cells of "
            f"the same model and dataset apart). The grid:\n- {listed}"
        )
    records = run_grid(cfg, steps, store=store, select=select)
    return records[0] if records else None


__all__ = [
    "CellSelectError",
    "CellTask",
    "PipelineGrid",
    "canonical_model",
    "cell_key",
    "check_stages",
    "group_params",
    "load_config",
    "pipeline_grid",
    "run_one_cell",
    "stage_cells",
]
