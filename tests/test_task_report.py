"""The report's sections for text queries, zero-shot and the baselines, rendered cheaply.

Notebook 05's own cells (its imports and the task sections, unchanged) run on synthetic records
(per the record contract, through ``ResultStore.save``) and the result is exported to HTML the
way the report is: every new section, table and figure must appear.
"""

from __future__ import annotations

import re

import nbformat
import pytest
from test_analysis import write_records
from test_task_analysis import _cls_record, _save, _text_record

from embbench import report as rep
from embbench.paths import project_root
from embbench.records import ResultStore

NOTEBOOK = project_root() / "notebooks" / "05_analysis.ipynb"


def test_notebook_05_has_the_task_sections_as_call_sites_only():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = [c for c in nb.cells if c.get("id", "").startswith("tasks-")]
    assert len(cells) == 12
    code = "\n".join(c.source for c in cells if c.cell_type == "code")
    assert "def " not in code and "class " not in code and "run_task_analysis(cfg)" in code


@pytest.mark.notebook
def test_report_shows_the_task_sections_tables_and_figures(tmp_path):
    store = ResultStore()
    write_records(store)
    for model, p, seed in (("test_clip", 0.8, 11), ("big_clip", 0.5, 12)):
        rec, pq = _text_record(model, "alpha", p, seed)
        _save(store, rec, pq)
    _save(store, _cls_record("test_clip", "alpha", "zero-shot", 0.41, [0.35, 0.47], n_classes=4))
    _save(store, _cls_record("test_clip", "alpha", "knn", 0.52, [0.46, 0.58]))
    _save(store, _cls_record("test_vit", "alpha", "probe", 0.96, [0.95, 0.97]))
    source = nbformat.read(NOTEBOOK, as_version=4)
    nb = nbformat.v4.new_notebook(metadata=source.metadata)
    setup = nbformat.v4.new_code_cell(
        'cfg = AnalysisConfig(source="records", n_boot=100, facts=False)\n'
        "thumbs = GalleryRenderer(cfg.gallery_max_mb, cfg.gallery_thumb_px)"
    )
    task_cells = [c for c in source.cells if c.get("id", "").startswith("tasks-")]
    nb.cells = [source.cells[1], setup, *task_cells]
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    path = tmp_path / "tasks.ipynb"
    nbformat.write(nb, path)
    html = rep.export_html(path, tmp_path / "tasks.html").read_text()
    for heading in (
        "three questions",
        "Search box · text-&gt;image retrieval",
        "Image-&gt;text retrieval",
        "Zero-shot classification",
        "From zero-shot to fine-tuning",
        "What a text query returns",
    ):
        assert heading in html, heading
    # figures: text->image, zero-shot, and one ladder per dataset (alpha, beta)
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', html)) == 4
    assert "Search box (text-&gt;image) on alpha: test_clip" in html
    assert "Categorisation (probe / top-tuned) on alpha: test_vit [probe]" in html
    assert "No image-&gt;text results" in html  # honest about the task never run
    assert "class-prompts" in html and "a product photo of a {}" in html  # texts named
