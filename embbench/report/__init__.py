"""The stakeholders' report: notebook 05's display helpers and its HTML rendering.

- :mod:`~embbench.report.display`: :func:`show`, :func:`show_table`, :func:`show_header`,
  :func:`show_sentences`, :func:`show_html`... (the same look in JupyterLab and the report);
- :mod:`~embbench.report.render`: :func:`export_html` (an executed notebook -> one
  self-contained HTML file); :func:`embbench.notebooks.render_report` runs notebook 05 and
  calls it (``embbench report``).
"""

from __future__ import annotations

from embbench.report.display import (
    MISSING,
    ci_display,
    figure_png,
    figure_title,
    guide_display,
    header_html,
    results_footer,
    runs_count,
    show,
    show_header,
    show_sentences,
    show_table,
    show_table3,
    style_table,
    style_table3,
    table3_display,
)
from embbench.report.gallery import GalleryRenderer, show_gallery
from embbench.report.render import (
    HIDE_TAG,
    ReportError,
    export_html,
)

__all__ = [
    "HIDE_TAG",
    "MISSING",
    "GalleryRenderer",
    "ReportError",
    "ci_display",
    "export_html",
    "figure_png",
    "figure_title",
    "guide_display",
    "header_html",
    "results_footer",
    "runs_count",
    "show",
    "show_gallery",
    "show_header",
    "show_sentences",
    "show_table",
    "show_table3",
    "style_table",
    "style_table3",
    "table3_display",
]
