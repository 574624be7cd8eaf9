"""Stage 05's analysis: the paper's tables and figures, CIs, paired tests and the guide.

Modules, each one responsibility:

- :mod:`~embbench.analysis.load`: result records and MLflow runs -> the analysis frame.
- :mod:`~embbench.analysis.stats`: per-query arrays, bootstrap CIs, paired tests, Holm.
- :mod:`~embbench.analysis.tables`: tables 2 and 3 and the data of figures 2-7.
- :mod:`~embbench.analysis.guide`: the practical guide and its sentences.
- :mod:`~embbench.analysis.plots`: the figures (seaborn).
- :mod:`~embbench.analysis.sources`, :mod:`~embbench.analysis.gallery` and
  :mod:`~embbench.analysis.categories`: what the search returns for sampled queries, scores
  per category, wrong top-1 confusion, disagreements.
Stage 05 itself (its config and ``run_analysis``) is :mod:`embbench.stages.analysis`, which
calls these with explicit arguments.

Missing cells (a model not run on a dataset, a run without per-query arrays) stay missing
(``NaN``), never zero.
"""

from __future__ import annotations

from embbench.analysis._common import (
    FAMILIES,
    FAMILY_LABELS,
    IMPROVEMENT,
    MEAN,
    MODE_LABELS,
)
from embbench.analysis.categories import (
    breakdown_table,
    category_breakdown,
    category_confusion,
    disagreement_table,
    disagreements,
)
from embbench.analysis.deploy import deployment_points, deployment_sentences, deployment_table
from embbench.analysis.finetune_curves import finetune_curves, finetune_curves_figure
from embbench.analysis.gallery import (
    Gallery,
    build_gallery,
    common_queries,
    gallery_for_runs,
    sample_queries,
)
from embbench.analysis.guide import GUIDE_COLUMNS, guide_sentences, practical_guide
from embbench.analysis.load import (
    BASELINE_STAGE,
    CELL_KEY,
    AnalysisError,
    ResultsQuery,
    baseline_rows,
    latest_only,
    load_results,
    mlflow_records,
    normalise_record,
    records_frame,
    runs_summary,
    weights_summary,
)
from embbench.analysis.sources import (
    GalleryError,
    GallerySource,
    load_source,
    load_sources,
    rank,
    top1_correct,
)
from embbench.analysis.stats import (
    BootstrapCache,
    PerQuery,
    add_confidence_intervals,
    aligned,
    ci_table,
    holm,
    paired_test,
    paired_tests,
    resolvable,
)
from embbench.analysis.tables import (
    best_per_type,
    cross_deltas,
    metric_correlation,
    model_facts_table,
    results_long,
    strategy_costs,
    table2,
    table3,
    tuning_effect,
    zscore_vs_size,
)
from embbench.vocab import CROSS_MODES, MODES, TUNED_MODES

__all__ = [
    "finetune_curves",
    "finetune_curves_figure",
    "deployment_points",
    "deployment_sentences",
    "deployment_table",
    "AnalysisError",
    "BASELINE_STAGE",
    "BootstrapCache",
    "CELL_KEY",
    "CROSS_MODES",
    "FAMILIES",
    "FAMILY_LABELS",
    "GUIDE_COLUMNS",
    "Gallery",
    "GalleryError",
    "GallerySource",
    "IMPROVEMENT",
    "MEAN",
    "MODES",
    "MODE_LABELS",
    "PerQuery",
    "ResultsQuery",
    "TUNED_MODES",
    "add_confidence_intervals",
    "aligned",
    "baseline_rows",
    "best_per_type",
    "breakdown_table",
    "build_gallery",
    "common_queries",
    "category_breakdown",
    "category_confusion",
    "ci_table",
    "cross_deltas",
    "disagreement_table",
    "disagreements",
    "gallery_for_runs",
    "guide_sentences",
    "holm",
    "latest_only",
    "load_results",
    "load_source",
    "load_sources",
    "metric_correlation",
    "mlflow_records",
    "model_facts_table",
    "normalise_record",
    "paired_test",
    "paired_tests",
    "practical_guide",
    "rank",
    "records_frame",
    "resolvable",
    "results_long",
    "runs_summary",
    "sample_queries",
    "strategy_costs",
    "table2",
    "table3",
    "top1_correct",
    "tuning_effect",
    "weights_summary",
    "zscore_vs_size",
]
