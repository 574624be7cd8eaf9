"""Stage 05 (notebook ``05_analysis``): its config and the step that computes every table.

Nothing here recomputes an embedding or a metric from images: every number comes from the runs
that stages 01-04 logged (MLflow runs with their ``result.json`` artifact, or the result records
on disk) and, for confidence intervals and paired tests, from the per-query arrays saved beside
each record. The building blocks (:mod:`~embbench.analysis.load`, ``stats``, ``tables``,
``guide``, ``plots``) take explicit arguments; this module alone reads :class:`AnalysisConfig`.
The HTML report is rendered by :func:`embbench.notebooks.render_report`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from embbench.analysis.categories import (
    best_pairs,
    category_breakdown,
    category_confusion,
    disagreement_table,
    disagreements,
)
from embbench.analysis.deploy import deployment_sentences, deployment_table
from embbench.analysis.gallery import Gallery, build_gallery, gallery_rows
from embbench.analysis.guide import guide_sentences, practical_guide
from embbench.analysis.load import BASELINE_STAGE, AnalysisError, load_results
from embbench.analysis.sources import GallerySource, load_sources
from embbench.analysis.stats import (
    BootstrapCache,
    PerQuery,
    add_confidence_intervals,
    ci_table,
    paired_tests,
    resolvable,
)
from embbench.analysis.tables import (
    cross_deltas,
    metric_correlation,
    model_facts_table,
    table2,
    table3,
    tuning_effect,
)
from embbench.analysis.task_guide import task_guide, task_guide_sentences
from embbench.analysis.tasks import (
    classification_ladder,
    retrieval_task_table,
    zero_shot_table,
)
from embbench.analysis.text_gallery import text_query_gallery
from embbench.catalogue import Catalogue
from embbench.config import StageConfig, register_stage
from embbench.metrics import metric_names
from embbench.records import ResultStore


@register_stage("05_analysis")
class AnalysisConfig(StageConfig):
    """Parameters of stage 05, mirrored by ``notebooks/05_analysis.ipynb`` and its params file."""

    source: Literal["mlflow", "records"] = "mlflow"  # MLflow runs, or result records on disk
    tracking_uri: str = ""  # "" = sqlite runs/mlflow.db (or $MLFLOW_TRACKING_URI)
    experiment: str = "embbench"  # MLflow experiment holding the runs
    models: list[str] = Field(default_factory=list)  # keep only these models; [] = all
    datasets: list[str] = Field(default_factory=list)  # keep only these datasets; [] = all
    k: int = Field(5, ge=1, le=100)  # cut-off of the @k metrics; runs with another k are left out
    metric: str = "mMP@5"  # headline retrieval metric (table 3, figures 4-7, the guide)
    n_boot: int = Field(1000, ge=0)  # bootstrap resamples for CIs and paired tests; 0 = none
    confidence: float = Field(0.95, gt=0.0, lt=1.0)  # CI level; tests use alpha = 1 - confidence
    pairs: Literal["best", "all"] = "best"  # paired tests: best vs each other, or every pair
    seed: int = 0  # bootstrap seed
    facts: bool = True  # figure 2: compute parameters and GFLOPs (builds each model once, cached)
    report: bool = True  # render_report writes <reports_dir>/<report_name>.html
    report_name: str = "report"  # HTML file name, without extension
    title: str = "Image embeddings for e-commerce: benchmark report"  # heading of the report
    gallery: bool = True  # galleries, per-category breakdown, disagreements (cached vectors)
    gallery_models: list[str] = Field(default_factory=list)  # results shown; [] = the best
    gallery_top: int = Field(3, ge=1, le=8)  # with gallery_models []: best results per dataset
    gallery_queries: int = Field(6, ge=0)  # seeded query sample per dataset, by category
    gallery_extremes: int = Field(3, ge=0)  # hardest and easiest queries shown apart, each
    gallery_thumb_px: int = Field(64, ge=16, le=256)  # thumbnail size (longest side, px)
    gallery_max_mb: float = Field(3.0, gt=0.0)  # bound on all gallery thumbnails in the report
    category_label: str = ""  # label to break results down by; "" = the coarsest label
    disagree_rows: int = Field(3, ge=0)  # gallery rows per direction of each disagreeing pair

    hash_exclude = frozenset(
        {"tracking_uri", "report", "report_name", "title", "gallery_thumb_px", "gallery_max_mb"}
    )

    @field_validator("report_name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", v) or v.endswith(".html"):
            raise ValueError(
                f"report_name={v!r} must be a plain file name without '.html' or folders, "
                "e.g. 'report' (written to reports/report.html)"
            )
        return v

    @model_validator(mode="after")
    def _metric_exists(self) -> AnalysisConfig:
        allowed = metric_names(self.k)
        if self.metric not in allowed:
            raise ValueError(
                f"metric={self.metric!r} is not a retrieval metric at k={self.k}; "
                f"choose one of {allowed}"
            )
        return self

    @property
    def alpha(self) -> float:
        """Significance level of the paired tests (1 - confidence)."""
        return 1.0 - self.confidence


@dataclass
class Analysis:
    """Every table and figure's data of stage 05, computed once from the tracked runs."""

    cfg: AnalysisConfig
    results: pd.DataFrame
    table3: pd.DataFrame
    table2: pd.DataFrame
    facts: pd.DataFrame
    correlation: pd.DataFrame
    tuning: pd.DataFrame
    cross: pd.DataFrame
    paired: pd.DataFrame
    ci: pd.DataFrame
    guide: pd.DataFrame
    sentences: list[str]
    notes: list[str] = field(default_factory=list)
    deploy: pd.DataFrame = field(default_factory=pd.DataFrame)  # compression / index variants


def run_analysis(
    cfg: AnalysisConfig,
    store: ResultStore | None = None,
    *,
    facts_fn: Callable[[str], Mapping[str, Any]] | None = None,
) -> Analysis:
    """Load the runs and compute every table, figure's data, CI, test and the guide.

    Args:
        cfg: The stage's parameters.
        store: Result records (for ``source="records"`` and the per-query arrays).
        facts_fn: Replaces :func:`embbench.models.model_facts` (tests).

    Returns:
        The :class:`Analysis`.
    """
    store = store or ResultStore()
    loader = PerQuery(store)
    cache = BootstrapCache()
    notes: list[str] = []
    results = load_results(cfg, store)
    # deployment variants (stage 01's compressions and indexes) have their own section
    is_variant = results["variant"].fillna("") != ""
    deploy = deployment_table(results[is_variant], cfg.metric)
    results = results[~is_variant].reset_index(drop=True)
    if results.attrs.get("superseded"):
        notes.append(
            f"{results.attrs['superseded']} older run(s) of the same cells were superseded by "
            "newer ones and left out."
        )
    results = add_confidence_intervals(
        results,
        loader,
        k=cfg.k,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
        confidence=cfg.confidence,
        cache=cache,
    )
    scored = results[cfg.metric].notna() & results[f"{cfg.metric} low"].isna()
    baseline = results["stage"] == BASELINE_STAGE
    if cfg.n_boot and (scored & ~baseline).any():
        notes.append(
            f"{int((scored & ~baseline).sum())} result(s) have no per-query arrays on this "
            "machine (runs/results): their confidence intervals and paired tests are missing."
        )
    if baseline.any():
        notes.append(
            f"{int(baseline.sum())} pretrained result(s) are the baselines that stages 03/04 "
            "scored on their own data and label (no stage-01 run matches them); they have no "
            "per-query arrays, hence no confidence interval."
        )
    facts = model_facts_table(results, compute=cfg.facts, facts_fn=facts_fn)
    failed = facts[facts["error"] != ""]
    if len(failed):
        notes.append("Model facts (figure 2) unavailable for " + ", ".join(failed["model"]) + ".")
    paired = paired_tests(
        results,
        loader,
        cfg.metric,
        pairs=cfg.pairs,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
        alpha=cfg.alpha,
        cache=cache,
    )
    if not paired.empty:
        widest = int(paired.groupby("dataset").size().max())
        if not resolvable(widest, cfg.n_boot, cfg.alpha):
            notes.append(
                f"n_boot={cfg.n_boot} resamples cannot show significance after the Holm "
                f"correction over {widest} comparisons (smallest p = {widest}/(n_boot+1)); "
                f"use n_boot >= {math.ceil(widest / cfg.alpha)} for the paired tests."
            )
    # a random-init control is shown beside the models, never averaged with them or recommended
    control = results["control"].fillna(False).astype(bool) if "control" in results else None
    models = results if control is None else results[~control]
    if control is not None and control.any():
        notes.append(
            "The random-init control(s) "
            + ", ".join(sorted(set(results.loc[control, "model"])))
            + " are shown beside the models but left out of table 3's per-type means and the "
            "practical guide: they measure what pretraining adds."
        )
    t3 = table3(models, cfg.metric)
    guide = practical_guide(models, cfg.metric)
    tuning = tuning_effect(
        models,
        cfg.metric,
        loader=loader,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
        alpha=cfg.alpha,
        cache=cache,
    )
    cache.save()
    return Analysis(
        cfg=cfg,
        results=results,
        table3=t3,
        table2=table2(results, "mR@1"),
        facts=facts,
        correlation=metric_correlation(results, cfg.k),
        tuning=tuning,
        cross=cross_deltas(results, cfg.metric),
        paired=paired,
        ci=ci_table(results, cfg.k),
        guide=guide,
        sentences=[
            *guide_sentences(guide, table=t3, paired=paired, alpha=cfg.alpha),
            *deployment_sentences(deploy, cfg.metric),
        ],
        notes=notes,
        deploy=deploy,
    )


@dataclass
class StakeholderViews:
    """What the search returns, per category and where results disagree (issue: galleries).

    Attributes:
        galleries: One retrieval gallery per dataset.
        categories: :func:`~embbench.analysis.categories.category_breakdown`'s long table.
        confusion: ``"<dataset>: <entry>"`` -> wrong top-1 category confusion (best result).
        disagreements: Top-1 disagreement counts per pair, with the paired test's verdict.
        disagreement_galleries: Gallery rows of the disagreeing queries, one per pair.
        notes: Results that could not be shown, and why.
    """

    galleries: list[Gallery]
    categories: pd.DataFrame
    confusion: dict[str, pd.DataFrame]
    disagreements: pd.DataFrame
    disagreement_galleries: list[Gallery]
    notes: list[str] = field(default_factory=list)


def _shown(results: pd.DataFrame, cfg: AnalysisConfig) -> pd.DataFrame:
    """Per dataset, the results the gallery shows: ``gallery_models`` or the best few."""
    has = results[results["cache_query"].notna() & results[cfg.metric].notna()]
    if cfg.gallery_models:
        keep = has["model"].isin(cfg.gallery_models) | has["entry"].isin(cfg.gallery_models)
        return has[keep]
    ranked = has.sort_values(cfg.metric, ascending=False)
    return ranked.groupby(["dataset", "label", "query_split"], dropna=False).head(cfg.gallery_top)


def run_views(
    cfg: AnalysisConfig,
    analysis: Analysis,
    store: ResultStore | None = None,
    *,
    catalogues: Mapping[str, Catalogue] | None = None,
) -> StakeholderViews:
    """Galleries, per-category breakdown, confusion and disagreements from the stored runs.

    Args:
        cfg: The stage's parameters (``gallery_*``, ``category_label``, ``disagree_rows``).
        analysis: :func:`run_analysis`' result (its results table and paired tests).
        store: Result records (the per-query arrays).
        catalogues: Dataset name -> catalogue, instead of re-reading them (tests).
    """
    empty = StakeholderViews([], pd.DataFrame(), {}, pd.DataFrame(), [], [])
    if not cfg.gallery or "cache_query" not in analysis.results:
        return empty
    shown = _shown(analysis.results, cfg)
    sources, notes = load_sources(shown, PerQuery(store), catalogues)
    scores = dict(zip(shown["entry"], shown[cfg.metric], strict=True))
    galleries, confusion, pairs, dis_galleries = [], {}, [], []
    by_dataset: dict[str, list[GallerySource]] = {}
    for s in sources:
        by_dataset.setdefault(s.dataset, []).append(s)
    metric_k = f"mMP@{cfg.k}"
    for dataset, group in sorted(by_dataset.items()):
        group.sort(key=lambda s: -scores.get(s.entry, 0.0))
        same = [s for s in group if (s.query.item_ids.shape == group[0].query.item_ids.shape)]
        galleries.append(
            build_gallery(
                same,
                k=cfg.k,
                n_sample=cfg.gallery_queries,
                n_extreme=cfg.gallery_extremes,
                seed=cfg.seed,
                metric=cfg.metric,
                group_label=cfg.category_label,
            )
        )
        notes += [f"{dataset}: {n}" for n in galleries[-1].notes]
        confusion[f"{dataset}: {group[0].entry}"] = category_confusion(
            group[0], group_label=cfg.category_label
        )
        for a, b in best_pairs(group, scores):
            pairs.append((a, b))
            d = disagreements(a, b)
            rng = np.random.default_rng(cfg.seed)
            rows = []
            for key, title in (
                ("a_only", f"{a.entry} right, {b.entry} wrong"),
                ("b_only", f"{b.entry} right, {a.entry} wrong"),
            ):
                pick = np.sort(rng.permutation(d[key])[: cfg.disagree_rows])
                rows += gallery_rows(
                    [a, b], pick, section=title, k=cfg.k, group_label=galleries[-1].group_label
                )
            dis_galleries.append(
                Gallery(
                    dataset=dataset,
                    label=a.label,
                    group_label=galleries[-1].group_label,
                    entries=[a.entry, b.entry],
                    k=cfg.k,
                    rows=rows,
                    sections={r.section: r.section for r in rows},
                )
            )
    categories = category_breakdown(
        sources,
        list(dict.fromkeys([metric_k, "mR@1"])),
        group_label=cfg.category_label,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
        confidence=cfg.confidence,
    )
    return StakeholderViews(
        galleries=galleries,
        categories=categories,
        confusion=confusion,
        disagreements=disagreement_table(pairs, analysis.paired),
        disagreement_galleries=dis_galleries,
        notes=notes,
    )


@dataclass
class TaskAnalysis:
    """The tasks beyond image->image (issue 25): text queries, zero-shot and the baselines.

    Attributes:
        results: Every task's rows (image->image included), with the retrieval CIs.
        text_image: :func:`~embbench.analysis.tasks.retrieval_task_table` of text->image.
        image_text: The same for image->text.
        zero_shot: :func:`~embbench.analysis.tasks.zero_shot_table`.
        ladder: :func:`~embbench.analysis.tasks.classification_ladder` (zero-shot -> kNN ->
            probe -> top-tuned -> fine-tuned per model and dataset).
        guide: :func:`~embbench.analysis.task_guide.task_guide`'s three questions.
        sentences: The guide in words.
        text_galleries: One gallery of text queries per dataset with text->image results.
    """

    results: pd.DataFrame
    text_image: pd.DataFrame
    image_text: pd.DataFrame
    zero_shot: pd.DataFrame
    ladder: pd.DataFrame
    guide: pd.DataFrame
    sentences: list[str]
    text_galleries: list[Gallery] = field(default_factory=list)


def run_task_analysis(
    cfg: AnalysisConfig,
    store: ResultStore | None = None,
    *,
    catalogues: Mapping[str, Catalogue] | None = None,
) -> TaskAnalysis:
    """Every task's table, the ladder, the three-question guide and the text galleries.

    Reads the same runs as :func:`run_analysis` (every task this time; deployment variants
    left out) and adds the retrieval CIs from the per-query arrays (same bootstrap settings and
    cache). Text galleries are drawn when ``cfg.gallery`` is on, from the runs' own catalogues.
    """
    store = store or ResultStore()
    loader = PerQuery(store)
    try:
        every = load_results(cfg, store, all_tasks=True)
    except AnalysisError:
        every = pd.DataFrame(columns=["task", "dataset", "model", "mode", "variant"])
    every = every[every["variant"].fillna("") == ""].reset_index(drop=True)
    cache = BootstrapCache()
    every = add_confidence_intervals(
        every, loader, k=cfg.k, n_boot=cfg.n_boot, seed=cfg.seed,
        confidence=cfg.confidence, cache=cache,
    )  # fmt: skip
    cache.save()
    guide = task_guide(every, cfg.metric)
    galleries = (
        text_query_gallery(
            every,
            loader,
            catalogues,
            n_queries=max(cfg.gallery_queries, 1),
            k=cfg.k,
            seed=cfg.seed,
        )  # fmt: skip
        if cfg.gallery
        else []
    )
    return TaskAnalysis(
        results=every,
        text_image=retrieval_task_table(every, "text-image", cfg.k),
        image_text=retrieval_task_table(every, "image-text", cfg.k),
        zero_shot=zero_shot_table(every),
        ladder=classification_ladder(every),
        guide=guide,
        sentences=task_guide_sentences(guide),
        text_galleries=galleries,
    )
