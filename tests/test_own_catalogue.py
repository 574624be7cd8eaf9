"""A user's own catalogue (a CSV manifest, label ``sku``, named ``my_shop``) through notebook 01,
stage 03 and the report of notebook 05, exactly like a public dataset: every section runs and
every gallery thumbnail is an image of that manifest (also as decoded by headless Chromium)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from fixtures_datasets import write_jpeg

from embbench.paths import project_root

PARAMS = project_root() / "params"
SKUS = 8
VIEWS = {"train": 3, "val": 1, "test": 3}


def _manifest(folder: Path) -> Path:
    """``my_shop.csv``: 8 SKUs in 2 categories, 7 views each; the label column is ``sku``."""
    rows = []
    for s in range(SKUS):
        v = 0
        for split, n in VIEWS.items():
            for _ in range(n):
                rel = f"img/sku{s}_{v}.jpg"
                write_jpeg(folder / rel, cls=s, view=3 * v, size=(24, 24))
                rows.append({"path": rel, "sku": f"SKU-{s:03d}", "split": split})
                v += 1
    csv = folder / "my_shop.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _files(csv: Path) -> dict[str, str]:
    """The manifest's item id -> digest of its image file."""
    rows = pd.read_csv(csv)
    return {p: _digest(csv.parent / p) for p in rows["path"]}


def _thumbs(html: str) -> list[tuple[str, str]]:
    tags = [t for t in re.findall(r"<img[^>]*>", html) if "embbench-thumb" in t]
    marks = [re.search(r'data-item-id="([^"]*)" data-sha256="([0-9a-f]*)"', t) for t in tags]
    assert all(marks), "a gallery thumbnail without its item id and digest"
    return [m.groups() for m in marks]


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """Notebook 01 and stage 03 on my_shop (smoke params), then notebook 05's report."""
    import yaml

    import embbench.datasets._registry as ds
    from embbench.notebooks import render_report, run_notebook
    from embbench.records import ResultStore
    from embbench.report import export_html
    from embbench.stages.toptune import TopTuneConfig, run_toptune

    home = tmp_path_factory.mktemp("shop_home")
    csv = _manifest(home / "shop")
    own = {
        "datasets": ["my_shop"],
        "data_root": {"my_shop": str(csv)},
        "label": "sku",
        "max_images": 0,
        "backend": "exact",
    }
    own_yaml = home / "my_shop.yaml"
    own_yaml.write_text(yaml.safe_dump(own))
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RUNS", "REPORTS", "CACHE", "DATA"):
            mp.setenv(f"EMBBENCH_{var}", str(home / var.lower()))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setattr(ds._REGISTRY, "_entries", dict(ds._REGISTRY._entries))  # no leak
        nb01 = run_notebook(
            "01_embed",
            [PARAMS / "01_embed.yaml", PARAMS / "smoke" / "01_embed.yaml", own_yaml],
            progress=False,
        )
        html01 = export_html(nb01, home / "01_embed.html", title="01")
        run_toptune(
            TopTuneConfig.from_files(
                PARAMS / "03_toptune.yaml", PARAMS / "smoke" / "03_toptune.yaml", **own
            )
        )
        # notebook 01's gallery again, as in a process that never registered my_shop
        from embbench.analysis import gallery_for_runs

        mp.setattr(
            ds._REGISTRY,
            "_entries",
            {k: v for k, v in ds._REGISTRY._entries.items() if k != "my_shop"},
        )
        run_ids = [r.mlflow_run_id for r in ResultStore().records("embed")]
        galleries = gallery_for_runs(run_ids, k=5)
        html = render_report(
            params_files=[PARAMS / "05_analysis.yaml", PARAMS / "smoke" / "05_analysis.yaml"]
        )
        runs = sorted((home / "reports" / "notebooks" / "05_analysis").glob("2*.ipynb"))
        nb = nbformat.read(runs[-1], as_version=4)
        nb1 = nbformat.read(nb01, as_version=4)
    return {
        "csv": csv,
        "galleries": galleries,
        "html": html,
        "notebook": nb,
        "notebook01": nb1,
        "html01": html01,
    }


@pytest.mark.slow
@pytest.mark.notebook
def test_own_catalogue_flows_through_the_chain_and_the_report(shop):
    files = _files(shop["csv"])
    for nb in (shop["notebook01"], shop["notebook"]):
        errors = [
            o
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.outputs
            if o.output_type == "error"
        ]
        assert not errors, [e.get("evalue") for e in errors]
    # notebook 01 drew its run's gallery: thumbnails of the manifest, no "not readable" line
    html01 = shop["html01"].read_text()
    assert "not readable" not in html01 and "No gallery" not in html01
    thumbs01 = _thumbs(html01)
    assert len(thumbs01) >= 4 * (1 + 2 * 5)
    assert all(files.get(item) == digest for item, digest in thumbs01)
    (gallery,) = shop["galleries"]  # notebook 01: the run's gallery, not an error line
    assert gallery.rows and gallery.label == "sku"
    shown = [c for r in gallery.rows for c in [r.query, *sum(r.results.values(), [])]]
    assert all(_digest(Path(c.path)) == files[c.item_id] for c in shown)
    assert not gallery.notes
    html = shop["html"].read_text()
    for heading in (
        "retrieval gallery",
        "Per category",
        "Where results disagree",
        "From benchmark to deployment",
    ):
        assert heading in html, heading
    assert "my_shop" in html and "not readable" not in html and "UnknownNameError" not in html
    assert "No per-category data" not in html  # the per-category section ran on my_shop
    thumbs = _thumbs(html)
    assert len(thumbs) >= 4 * (1 + 5)
    assert all(files.get(item) == digest for item, digest in thumbs)


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.browser
def test_report_gallery_images_are_the_searched_catalogue_in_chromium(shop, chromium, tmp_path):
    files = _files(shop["csv"])
    # after load, the browser lists each decoded gallery image with its item id and digest
    probe = (
        "<script>window.addEventListener('load', () => {"
        "const t = [...document.querySelectorAll('img.embbench-thumb')]"
        ".filter(i => i.complete && i.naturalWidth > 0)"
        ".map(i => i.dataset.itemId + '|' + i.dataset.sha256);"
        "const p = document.createElement('pre'); p.id = 'decoded-thumbs';"
        "p.textContent = t.join('\\n'); document.body.appendChild(p);"
        "});</script>"
    )
    for name, path in (("report", shop["html"]), ("notebook 01", shop["html01"])):
        page = tmp_path / f"{name.replace(' ', '_')}.html"
        html = path.read_text()
        page.write_text(html.replace("</body>", probe + "</body>"))
        dom = chromium.dom(page.as_uri(), tmp_path / "profile")
        block = re.search(r'<pre id="decoded-thumbs">([^<]*)</pre>', dom)
        assert block, (name, dom[-1000:])
        decoded = [line.split("|") for line in block.group(1).split("\n") if line]
        assert len(decoded) == len(_thumbs(html)) > 0, name  # every thumbnail decoded
        assert all(files.get(item) == digest for item, digest in decoded), name
