"""The HTML report: self-contained, code hidden, weights and run ids on top, every figure drawn.

The slow tests run notebook 05 with the smoke params on synthetic MLflow runs (written the way
stages 01-04 write theirs), render the report, and open it in headless Chromium.
"""

from __future__ import annotations

import base64
import io
import re

import nbformat
import numpy as np
import pandas as pd
import pytest
from test_analysis import log_mlflow_runs

from embbench import analysis as an
from embbench import report as rep
from embbench.notebooks import render_report, report_main
from embbench.paths import project_root
from embbench.records import ResultStore
from embbench.stages.analysis import Analysis, AnalysisConfig

# figures 2, 3, 4a, 4b, 4c, 5, 6 and 7 (the synthetic runs feed all of them), the per-category
# scores and the wrong top-1 confusion (the demo runs feed those), and the zero-shot -> fine-tuned
# ladder of alpha and beta (their top- and fine-tuned records' test accuracy)
N_FIGURES = 12


def _png() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _executed_notebook(path, *, error: bool = False):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell("# Title\n## Figure 1"))
    code = nbformat.v4.new_code_cell("secret_code_marker = 1\nshow(fig)")
    code.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="INFO noisy log line\n"),
        nbformat.v4.new_output("display_data", data={"image/png": _png(), "text/plain": "fig"}),
        nbformat.v4.new_output("display_data", data={"text/html": "<b>a table</b>"}),
    ]
    nb.cells.append(code)
    if error:
        bad = nbformat.v4.new_code_cell("1/0")
        bad.outputs = [
            nbformat.v4.new_output(
                "error", ename="ZeroDivisionError", evalue="division by zero", traceback=[]
            )
        ]
        nb.cells.append(bad)
    nbformat.write(nb, path)
    return path


def test_export_html_is_self_contained_and_hides_code(tmp_path):
    out = rep.export_html(
        _executed_notebook(tmp_path / "x.ipynb"), tmp_path / "r.html", title="My report"
    )
    html = out.read_text()
    assert "<title>My report</title>" in html
    assert "secret_code_marker" not in html  # code hidden
    assert "noisy log line" not in html  # logs dropped
    assert "<b>a table</b>" in html
    imgs = re.findall(r'<img[^>]+src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) == 1 and len(imgs[0]) > 100
    assert 'alt="figure"' in html  # no title given: a generic alternative text
    assert not re.search(r"<script[^>]+src=", html)  # no CDN scripts (require.js, MathJax)
    assert not re.search(r"<link[^>]+href=[\"']https?://", html)


def test_export_html_refuses_a_failed_notebook(tmp_path):
    with pytest.raises(rep.ReportError, match="ZeroDivisionError"):
        rep.export_html(_executed_notebook(tmp_path / "x.ipynb", error=True), tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def _analysis(results: pd.DataFrame, **cfg) -> an.Analysis:
    empty = pd.DataFrame()
    return Analysis(
        cfg=AnalysisConfig(**cfg),
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
        notes=["a note to the reader"],
    )


def _rows(kinds):
    rows = []
    for i, kind in enumerate(kinds):
        rows.append(
            {
                "model": f"m{i}",
                "dataset": "d",
                "mode": "pretrained",
                "entry": f"m{i}",
                "weights_kind": kind,
                "weights_fell_back": kind == "random",
                "mlflow_run_id": f"run{i:04d}",
                "git_sha": "abc123",
                "mMP@5": 0.5,
            }
        )
    return pd.DataFrame(rows)


def test_header_states_weights_and_run_ids():
    html = rep.header_html(_analysis(_rows(["pretrained", "random"]), title="T"))
    assert "<h1>T</h1>" in html
    assert "RANDOM WEIGHTS" in html and "m1" in html.split("RANDOM WEIGHTS")[1][:300]
    assert "run0000" in html and "run0001" in html
    assert "a note to the reader" in html and "abc123" in html
    clean = rep.header_html(_analysis(_rows(["pretrained", "pretrained"])))
    assert "RANDOM WEIGHTS" not in clean and "no random initialisation" in clean


def test_tables_show_missing_cells_as_a_dash_never_zero():
    df = pd.DataFrame({"model": ["a", "b"], "alpha": [0.5, np.nan], "beta": [np.nan, 0.25]})
    html = rep.style_table(df).to_html()
    assert html.count(f">{rep.MISSING}<") == 2 and "nan" not in html.lower()
    assert ">0.000<" not in html
    t3 = pd.DataFrame(
        [[0.4, np.nan, np.nan], [0.5, np.nan, np.nan], [0.1, np.nan, np.nan]],
        index=pd.MultiIndex.from_tuples(
            [("ssl", "pretrained"), ("ssl", "top-tuned"), ("ssl", "improvement")],
            names=["type", "row"],
        ),
        columns=["alpha", "beta", "Mean"],
    )
    shown = rep.table3_display(t3)
    assert list(shown.index) == ["Pretrained SSL", "Top-tuned SSL", "Δ top-tuning SSL"]
    html3 = rep.style_table3(t3).to_html()
    assert html3.count(f">{rep.MISSING}<") == 6 and "#1a7f37" in html3  # improvement green
    res = pd.DataFrame(
        {
            "entry": ["a", "b"],
            "dataset": ["x", "y"],
            "mMP@5": [0.5, 0.6],
            "mMP@5 low": [0.4, np.nan],
            "mMP@5 high": [0.6, np.nan],
        }
    )
    ci = rep.ci_display(res, "mMP@5")
    assert ci.loc["a", "x"] == "0.500 [0.400, 0.600]" and ci.loc["b", "y"] == "0.600"
    assert ci.loc["a", "y"] == rep.MISSING


def test_report_main_names_a_bad_params_file(tmp_path, caplog):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nboot: 3\n")
    assert report_main(["-f", str(bad)]) == 2
    assert "did you mean 'n_boot'" in caplog.text


# --------------------------------------------------------- the real report (slow, notebook)


def _embed_demo(mp, demo_root, uri):
    """Real stage-01 runs (tiny random-weight models) on the small demo: the gallery's input."""
    import embbench.cells as stage
    from embbench.demo import make_demo_catalogue
    from embbench.stages.embed import EmbedConfig, run_embed

    cat = make_demo_catalogue(
        demo_root, n_categories=4, products_per_category=3, views=(4, 2, 3), image_size=48
    )
    mp.setattr(stage, "load_catalogue", lambda *a, **k: cat)
    cfg = EmbedConfig(
        models=["test_resnet", "test_clip"],
        weights="random",
        datasets=["demo"],
        batch_size=16,
        num_workers=0,
        backend="exact",
        tracking_uri=uri,
    )
    return run_embed(cfg)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, demo_root):
    """Notebook 05 run with the smoke params on synthetic MLflow runs, rendered to HTML."""
    home = tmp_path_factory.mktemp("report_home")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (
            ("EMBBENCH_RUNS", "runs"),
            ("EMBBENCH_REPORTS", "reports"),
            ("EMBBENCH_CACHE", "cache"),
            ("EMBBENCH_DATA", "data"),
        ):
            mp.setenv(var, str(home / sub))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = f"sqlite:///{home / 'runs' / 'mlflow.db'}"
        recs = log_mlflow_runs(uri, "embbench", ResultStore(home / "runs" / "results"))
        demo = _embed_demo(mp, demo_root, uri)
        params = project_root() / "params"
        html = render_report(
            params_files=[params / "05_analysis.yaml", params / "smoke" / "05_analysis.yaml"]
        )
    runs = sorted((home / "reports" / "notebooks" / "05_analysis").glob("2*.ipynb"))
    assert len(runs) == 1  # kept per run, with a latest copy
    nb = nbformat.read(runs[0].parent / "latest.ipynb", as_version=4)
    return {"html": html, "records": recs, "notebook": nb, "home": home, "demo": demo}


def _png_outputs(nb) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    )


@pytest.mark.slow
@pytest.mark.notebook
def test_report_renders_every_table_and_figure(rendered):
    html_path = rendered["html"]
    assert html_path == rendered["home"] / "reports" / "report.html"
    html = html_path.read_text()
    nb = rendered["notebook"]
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    assert _png_outputs(nb) == N_FIGURES
    imgs = re.findall(r'<img[^>]+src="data:image/png;base64,([^"]*)"', html)
    assert len(imgs) == N_FIGURES and all(len(i) > 1000 for i in imgs)
    assert "Traceback" not in html
    assert 'data-mime-type="application/vnd.jupyter.stderr"' not in html  # no error, no log
    assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING)", html)
    # the report embeds the executed notebook it came from (the versioned run, not latest)
    assert "Notebooks this report came from" in html
    assert re.search(
        r'download="05_analysis_\d{8}-\d{6}-[0-9a-f]{8}\.ipynb" '
        r'href="data:application/x-ipynb\+json;base64,',
        html,
    )
    stderr = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream" and o.get("name") == "stderr"
    ]
    assert not stderr, [o.text[:200] for o in stderr]
    figures = [t for t in re.findall(r"<img[^>]*>", html) if "data:image/png" in t]
    alts = [re.search(r'alt="([^"]*)"', t).group(1) for t in figures if 'alt="' in t]
    assert len(alts) == N_FIGURES and all(a and a != "figure" for a in alts)
    # the gallery: demo thumbnails embedded as JPEG data, framed, within the size bound
    thumbs = [t for t in re.findall(r"<img[^>]*>", html) if "embbench-thumb" in t]
    assert len(thumbs) >= 10 * (1 + 2 * 5)
    assert all('src="data:image/jpeg;base64,' in t for t in thumbs)
    assert sum(len(t) for t in thumbs) <= 3.0e6  # gallery_max_mb of params/05_analysis.yaml
    assert "#1a7f37" in html and "#b42318" in html
    assert not re.search(r'(?:src|href)="(?:https?|file):', html)
    for heading in ("retrieval gallery", "Per category", "Where results disagree"):
        assert heading in html, heading
    assert not re.search(r"<script[^>]+src=", html)
    # the top states the weights (random here, loudly) and every run id
    top = html[: html.index("Table 3")]
    assert "RANDOM WEIGHTS" in top
    for rec in rendered["records"]:
        assert rec["mlflow_run_id"] in top
    for heading in (
        "Table 3",
        "Table 2",
        "Figure 2",
        "Figure 3",
        "4a",
        "4b",
        "4c",
        "Figure 5",
        "Figure 6",
        "Figure 7",
        "Practical guide",
        "confidence intervals",
        "Paired bootstrap",
    ):
        assert heading in html, heading
    assert "alpha, visual search: use" in html  # generated guide sentence
    # the tasks' sections: the ladder drawn, the text sections honest about having no runs
    assert "From zero-shot to fine-tuning" in html
    assert "no text-&gt;image results: run stage 01 with tasks: [text-image]" in html
    assert "import embbench" not in html  # code hidden


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.browser
def test_report_opens_in_headless_chromium(rendered, chromium, tmp_path):
    html = rendered["html"].read_text()
    # after load, count the images the browser actually decoded
    probe = (
        "<script>window.addEventListener('load', () => {"
        "const imgs = [...document.images];"
        "document.body.setAttribute('data-imgs', imgs.length);"
        "document.body.setAttribute('data-decoded',"
        " imgs.filter(i => i.complete && i.naturalWidth > 0).length);"
        "});</script>"
    )
    page = tmp_path / "report.html"
    page.write_text(html.replace("</body>", probe + "</body>"))
    dom = chromium.dom(page.as_uri(), tmp_path / "profile")
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    n_imgs = int(re.search(r'data-imgs="(\d+)"', body.group(0)).group(1))
    decoded = int(re.search(r'data-decoded="(\d+)"', body.group(0)).group(1))
    thumbs = html.count('class="embbench-thumb"')
    assert thumbs > 0 and n_imgs == decoded == N_FIGURES + thumbs
    # a screenshot of the report's gallery section, rendered by the browser
    start = html.index('<div class="embbench-gallery">')
    end = html.index("</table></div>", start) + len("</table></div>")
    shot_page = tmp_path / "gallery.html"
    shot_page.write_text(f"<html><body>{html[start:end]}</body></html>")
    shot = tmp_path / "gallery.png"
    chromium.run(
        shot_page.as_uri(),
        tmp_path / "profile2",
        "--hide-scrollbars",
        "--window-size=1400,1200",
        f"--screenshot={shot}",
    )
    assert shot.is_file()
    from PIL import Image

    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    green = (abs(rgb - [0x1A, 0x7F, 0x37]).sum(axis=2) < 40).sum()
    red = (abs(rgb - [0xB4, 0x23, 0x18]).sum(axis=2) < 40).sum()
    assert green > 100 and red > 100  # frames drawn around thumbnails
    assert "Traceback" not in dom and "RANDOM WEIGHTS" in dom
