"""From benchmark to deployment: compression and index variants, scale, Pareto figures.

- :mod:`~embbench.deploy.compress`: float16 / int8 / binary / PCA variants of an embedding,
  scored with the protocol's exact search (binary: Hamming search with the same rules).
- :mod:`~embbench.deploy.indexes`: typed index specs, the default sweep, faiss families and timings.
- :mod:`~embbench.deploy.ann`: index variants through Milvus (Lite or a server), recall against
  exact, task metrics, labelled costs.
- :mod:`~embbench.deploy.scale`: synthetic vectors with a real embedding's class structure,
  measures at growing sizes and a labelled projection to 10M / 100M items.
- :mod:`~embbench.deploy.plots`: Pareto figures and the deployment sentence.
"""

from __future__ import annotations

from embbench.deploy.ann import (
    MEASUREMENT,
    IndexResult,
    evaluate_indexes,
    rank_candidates,
    snap_scores,
    tie_aware_recall,
)
from embbench.deploy.compress import (
    CompressionResult,
    CompressionSpec,
    FittedCompression,
    compare_compressions,
    default_compressions,
    evaluate_compression,
    fit_compression,
    hamming_search,
)
from embbench.deploy.indexes import (
    INDEX_TYPES,
    IndexSpec,
    Timing,
    TimingBudget,
    build_faiss,
    default_index_grid,
    faiss_factory,
    time_faiss,
)
from embbench.deploy.plots import (
    VariantPoint,
    deployment_sentence,
    pareto_mask,
    quality_latency_figure,
    quality_memory_figure,
    variant_points,
)
from embbench.deploy.scale import (
    ClassStructure,
    Projection,
    ScalePoint,
    fit_class_structure,
    measure_scale,
    project,
    sample_like,
    scale_grid,
)

__all__ = [
    "INDEX_TYPES",
    "ClassStructure",
    "Projection",
    "ScalePoint",
    "VariantPoint",
    "deployment_sentence",
    "fit_class_structure",
    "measure_scale",
    "pareto_mask",
    "project",
    "quality_latency_figure",
    "quality_memory_figure",
    "sample_like",
    "scale_grid",
    "variant_points",
    "CompressionResult",
    "CompressionSpec",
    "FittedCompression",
    "MEASUREMENT",
    "IndexResult",
    "IndexSpec",
    "Timing",
    "TimingBudget",
    "build_faiss",
    "compare_compressions",
    "default_compressions",
    "default_index_grid",
    "evaluate_compression",
    "evaluate_indexes",
    "faiss_factory",
    "fit_compression",
    "hamming_search",
    "rank_candidates",
    "snap_scores",
    "tie_aware_recall",
    "time_faiss",
]
