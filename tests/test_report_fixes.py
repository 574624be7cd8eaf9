"""The report's rough edges, each checked on what the reader sees: placeholders, headings,
counts, deployment memory and its axis, the guide's wording, figure 4a, links that travel."""

from __future__ import annotations

import base64
import json
import math
import re
from itertools import combinations
from unittest import mock

import nbformat
import numpy as np
import pandas as pd
import pytest

from embbench import analysis as an
from embbench import report as rep
from embbench.paths import project_root
from embbench.stages.analysis import Analysis, AnalysisConfig


def _displayed(fn, *args, **kwargs) -> list:
    shown = []
    with mock.patch("IPython.display.display", side_effect=lambda *a, **k: shown.append(a)):
        fn(*args, **kwargs)
    return shown


def test_no_placeholder_sentence_when_there_is_nothing_to_say():
    assert _displayed(rep.show_sentences, []) == []  # was "Nothing to say yet." over the gallery
    assert _displayed(rep.show_sentences, ["", None]) == []
    (shown,) = _displayed(rep.show_sentences, [], empty="No notes.")
    assert "No notes." in shown[0].data
    (shown,) = _displayed(rep.show_sentences, ["a", "b"])
    assert shown[0].data == "- a\n- b"


@pytest.mark.parametrize(
    "path", sorted((project_root() / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem
)
def test_no_heading_without_content(path):
    """A heading-only markdown cell must be followed by something before the next heading."""
    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    for cell, nxt in zip(cells, cells[1:], strict=False):
        lines = [x for x in cell.source.strip().splitlines() if x.strip()]
        if cell.cell_type != "markdown" or len(lines) != 1 or not lines[0].startswith("#"):
            continue
        level = len(lines[0]) - len(lines[0].lstrip("#"))
        if nxt.cell_type == "markdown" and nxt.source.lstrip().startswith("#"):
            nxt_level = len(nxt.source.lstrip()) - len(nxt.source.lstrip().lstrip("#"))
            assert nxt_level > level, f"{path.stem}: empty section {lines[0]!r}"
    last = cells[-1]
    assert not (last.cell_type == "markdown" and last.source.strip().startswith("#")), path.stem


def _analysis(results: pd.DataFrame) -> Analysis:
    empty = pd.DataFrame()
    return Analysis(
        cfg=AnalysisConfig(title="T", n_boot=0),
        results=results,
        table3=empty,
        table2=empty,
        facts=empty,
        correlation=empty,
        tuning=empty,
        cross=empty,
        paired=empty,
        ci=empty,
        guide=empty,
        sentences=[],
        notes=[],
    )


def test_header_and_footer_count_results_and_runs_the_same_way():
    rows = [
        {
            "model": f"m{i}",
            "dataset": "d",
            "mode": "pretrained",
            "stage": "embed",
            "entry": f"m{i}",
            "weights_kind": "pretrained",
            "weights_fell_back": False,
            "mlflow_run_id": f"run{i:02d}",
            "git_sha": "abc",
            "mMP@5": 0.5,
        }
        for i in range(14)
    ]
    rows += [
        {
            **rows[0],
            "model": f"b{i}",
            "entry": f"b{i}",
            "stage": "toptune-baseline",
            "mlflow_run_id": None,
        }
        for i in range(2)
    ]
    a = _analysis(pd.DataFrame(rows))
    header = rep.header_html(a)
    footer = " ".join(rep.results_footer(a))
    said = "16 results from 14 MLflow runs (2 pretrained baselines that a tuning run recorded"
    assert said in header and said in footer
    assert not re.search(r"\b16 results,", header)


def _variant_rows() -> pd.DataFrame:
    base = {"dataset": "demo", "mode": "pretrained", "stage": "embed", "metric": 0.6}
    rows = [{**base, "model": "lite0", "variant": "", "embed_dim": 1280, "mMP@5": 0.65}]
    for name, dim in (("pca64", 64), ("pca128", 128), ("pca160", 160)):
        rows.append(
            {
                **base,
                "model": "lite0",
                "variant": name,
                "variant_kind": "compression",
                "embed_dim": dim,
                "bytes_per_vector": 4 * dim,
                "float32_bytes_per_vector": 5120,
                "mMP@5": 0.6,
                "pretrained_metrics.mMP@5": 0.65,
            }
        )
    # a record without float32_bytes_per_vector: the plain row's dimension is the reference
    rows.append(
        {
            **rows[1],
            "variant": "pca32",
            "embed_dim": 32,
            "bytes_per_vector": 128,
            "float32_bytes_per_vector": math.nan,
        }
    )
    return pd.DataFrame(rows)


def test_memory_ratio_of_pca_variants_is_against_the_full_float32_vector():
    table = an.deployment_table(_variant_rows(), "mMP@5").set_index("variant")
    assert table.loc["pca64", "memory_ratio"] == pytest.approx(256 / 5120)
    assert table.loc["pca128", "memory_ratio"] == pytest.approx(512 / 5120)
    assert table.loc["pca160", "memory_ratio"] == pytest.approx(640 / 5120)
    assert table.loc["pca32", "memory_ratio"] == pytest.approx(128 / 5120)


def _overlaps(fig, ax) -> list[tuple[str, str]]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    lo, hi = ax.get_xlim()
    labels = [
        t
        for tick in ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
        for t in (tick.label1,)
        if t.get_visible() and t.get_text() and lo <= tick.get_loc() <= hi
    ]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
    return [(a, b) for (a, ba), (b, bb) in combinations(boxes, 2) if ba.overlaps(bb)]


@pytest.mark.parametrize(
    "sizes",
    [
        (160, 256, 512, 640, 1280, 2560, 5120),  # binary, PCA, int8, float16, float32: the demo's
        (300, 400, 600, 700),  # under a decade: matplotlib labelled the minor ticks 3x10^2 4x10^2
        (0.04, 0.2, 3.0, 900.0),  # over four decades
    ],
)
def test_memory_figure_tick_labels_are_plain_and_do_not_overlap(sizes):
    import matplotlib

    matplotlib.use("Agg")
    from embbench.deploy.plots import VariantPoint, quality_memory_figure

    points = [
        VariantPoint(
            f"v{i}",
            "compression",
            0.6 + 0.01 * i,
            1.0,
            float(b),
            float(b) / 5120,
            math.nan,
            math.nan,
            "",
            "exact",
        )
        for i, b in enumerate(sizes)
    ]
    fig = quality_memory_figure(points, model="lite0", dataset="demo")
    ax = fig.axes[0]
    assert not _overlaps(fig, ax), _overlaps(fig, ax)
    shown = [
        t.get_text() for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True) if t.get_text()
    ]
    assert len(shown) >= 2 and not any("times" in s or "^" in s for s in shown), shown


def _guide(train_hours: float) -> pd.DataFrame:
    common = {
        "dataset": "demo",
        "task": "visual search",
        "paper_name": None,
        "score_name": "mMP@5",
        "low": math.nan,
        "high": math.nan,
        "gpu_hours": math.nan,
        "gain_per_gpu_hour": math.nan,
        "weights_kind": "pretrained",
    }
    return pd.DataFrame(
        [
            {
                **common,
                "strategy": "top-tuned",
                "model": "lite0",
                "score": 0.8,
                "gain": 0.179,
                "train_hours": train_hours,
                "gain_per_hour": 0.179 / train_hours if train_hours >= 0.01 else math.nan,
                "recommended": True,
            },
            {
                **common,
                "strategy": "pretrained",
                "model": "lite0",
                "score": 0.621,
                "gain": 0.0,
                "train_hours": 0.0,
                "gain_per_hour": math.nan,
                "recommended": False,
            },
        ]
    ).reindex(columns=an.guide.GUIDE_COLUMNS)


def test_guide_says_how_far_behind_in_words_and_quotes_no_rate_for_seconds_of_tuning():
    (sentence,) = an.guide_sentences(_guide(1.0))
    assert "0.179 lower" in sentence and "behind" not in sentence
    assert "+0.179 per hour of tuning" in sentence and "(0.179 lower; no training)" in sentence
    # 17 s of tuning: no "+38.573 per hour", and not "0.00 h of training" either
    costs = an.strategy_costs(
        pd.DataFrame(
            [
                {
                    "model": "m",
                    "dataset": "d",
                    "mode": "pretrained",
                    "base_model": None,
                    "mMP@5": 0.6,
                    "train_hours": math.nan,
                    "gpu_hours": math.nan,
                },
                {
                    "model": "m",
                    "dataset": "d",
                    "mode": "top-tuned",
                    "base_model": "m",
                    "mMP@5": 0.78,
                    "train_hours": 17 / 3600,
                    "gpu_hours": math.nan,
                },
            ]
        ),
        "mMP@5",
    )
    assert costs["gain_per_hour"].isna().all()
    (short,) = an.guide_sentences(_guide(17 / 3600))
    assert "per hour" not in short and "0.00 h" not in short and "17 s of training" in short


def test_figure_4a_labels_every_dot_and_marks_the_control():
    import matplotlib

    matplotlib.use("Agg")
    from embbench.analysis import plots

    rows = [
        {
            "dataset": "demo",
            "model": m,
            "family": "supervised",
            "mode": "pretrained",
            "mMP@5": v,
            "control": m.endswith("_random"),
        }
        for m, v in (("lite0", 0.65), ("lite1", 0.66), ("lite2", 0.64), ("lite0_random", 0.2))
    ]
    fig = plots.all_models_figure(pd.DataFrame(rows), "mMP@5")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    for model in ("lite0", "lite1", "lite2"):
        assert model in texts, texts
    assert "lite0_random (control)" in texts
    # the control is drawn unlike the models (another marker and colour) and has a legend entry
    faces = [tuple(np.round(c.get_facecolors()[0], 3)) for c in ax.collections]
    assert sorted(faces.count(f) for f in set(faces)) == [1, 3], faces
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "random-init control" in legend


def _executed(path, marker: str):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(f"# {marker}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_report_embeds_the_versioned_notebooks_it_came_from(tmp_path):
    from embbench.notebooks import versioned_notebook

    folder = tmp_path / "notebooks" / "01_embed"
    _executed(folder / "20260101-100000-aaaaaaaa.ipynb", "old run")
    new = _executed(folder / "20260102-100000-bbbbbbbb.ipynb", "new run")
    latest = folder / "latest.ipynb"
    latest.write_bytes(new.read_bytes())
    assert versioned_notebook(latest) == new
    five = _executed(
        tmp_path / "notebooks" / "05_analysis" / "20260102-110000-cccccccc.ipynb", "analysis"
    )
    out = rep.export_html(
        five, tmp_path / "shared" / "report.html", sources=[versioned_notebook(latest), five]
    )
    html = out.read_text()
    assert "latest.ipynb" not in html
    links = dict(
        re.findall(
            r'download="([^"]+)" href="data:application/x-ipynb\+json;base64,'
            r'([^"]+)"',
            html,
        )
    )
    assert set(links) == {
        "01_embed_20260102-100000-bbbbbbbb.ipynb",
        "05_analysis_20260102-110000-cccccccc.ipynb",
    }
    embedded = json.loads(base64.b64decode(links["01_embed_20260102-100000-bbbbbbbb.ipynb"]))
    assert "".join(embedded["cells"][0]["source"]) == "# new run"
    assert not re.search(r'href="(?!data:)[^"]*\.ipynb"', html)  # nothing relative to break
