"""An executed notebook -> one self-contained HTML report for stakeholders.

:func:`export_html` converts with nbconvert's ``HTMLExporter``: code hidden, figures embedded as
base64 PNGs, no external script (the template's require.js, MathJax and mermaid links are
removed), log output dropped. :func:`embbench.notebooks.render_report` runs notebook 05 and
calls it (``embbench report``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embbench._errors import UserError
from embbench._utils import atomic_write_bytes

logger = logging.getLogger(__name__)

HIDE_TAG = "report-hide"  # cells with this tag are left out of the HTML (the notebook's intro)
_TEMPLATE_NAME = "embbench_report.html.j2"
# The lab template, minus every script it would fetch from a CDN: the report opens offline.
_TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block html_head_js_requirejs %}{% endblock html_head_js_requirejs %}
{% block html_head_js_mathjax %}{% endblock html_head_js_mathjax %}
{% block html_head_js_mermaidjs %}{% endblock html_head_js_mermaidjs %}
{% block data_png scoped %}
<div class="jp-RenderedImage jp-OutputArea-output {{ extra_class }}">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}"
alt="{{ (output | get_metadata('alt', 'image/png')) or 'figure' | escape_html }}">
</div>
{%- endblock data_png %}
"""


class ReportError(UserError, RuntimeError):
    """The report could not be rendered; the message names the notebook or file to look at."""


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ .*\n?", re.M)
_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _keep_output(output: Any) -> bool:
    """Drop log output and progress widgets from the report; keep tables, figures and text."""
    if output.output_type == "stream":
        if output.get("name") == "stderr":
            return False
        output.text = _LOG_LINE.sub("", "".join(output.text))
        return bool(output.text.strip())
    return _WIDGET_MIME not in output.get("data", {})


EMBED_NOTEBOOKS_MB = 40.0  # executed notebooks up to this size (in all) travel inside the HTML


def _sources_cell(sources: Sequence[str | Path], budget_mb: float = EMBED_NOTEBOOKS_MB) -> Any:
    """A closing markdown cell with the executed notebooks the report came from, embedded.

    Each notebook is a download link holding the file itself (a ``data:`` URI named after the
    versioned run, ``01_embed/20260101-120000-abcd1234.ipynb``), so the links work wherever the
    HTML is sent, and always point at the run the report read, never at a ``latest`` copy. Past
    ``budget_mb`` in all, the rest are named by their versioned path only.
    """
    import base64
    import html as html_mod

    import nbformat

    items, used = [], 0
    for src in sources:
        src = Path(src)
        name = f"{src.parent.name}/{src.name}"
        data = src.read_bytes() if src.is_file() else b""
        if data and used + len(data) <= budget_mb * 1e6:
            used += len(data)
            href = "data:application/x-ipynb+json;base64," + base64.b64encode(data).decode("ascii")
            items.append(
                f'<li><a download="{html_mod.escape(src.parent.name + "_" + src.name)}" '
                f'href="{href}">{html_mod.escape(name)}</a> ({len(data) / 1e6:.1f} MB, '
                "embedded in this file)</li>"
            )
        else:
            why = "not found" if not data else f"over the {budget_mb:g} MB embedding budget"
            items.append(
                f"<li>{html_mod.escape(name)} ({why}; in the reports folder of the run)</li>"
            )
    return nbformat.v4.new_markdown_cell(
        "### Notebooks this report came from\n\n"
        "The executed notebooks of the runs this report read, embedded: a click downloads the "
        "notebook; open it in JupyterLab.\n\n<ul>" + "".join(items) + "</ul>"
    )


def export_html(
    notebook: str | Path,
    output: str | Path,
    *,
    title: str = "embbench report",
    sources: Sequence[str | Path] = (),
) -> Path:
    """Convert an executed notebook to one self-contained HTML file, code hidden.

    Log output (stderr streams, log lines on stdout), progress widgets and cells tagged
    ``report-hide`` are dropped; figures stay embedded as base64 PNGs; no script or stylesheet is
    fetched from the network. ``sources`` (executed notebooks) are embedded in a closing section
    as download links, so the HTML can be shared alone.

    Raises:
        ReportError: The notebook holds a failed cell, or the HTML would load external scripts.
    """
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    notebook, output = Path(notebook), Path(output)
    nb = nbformat.read(notebook, as_version=4)
    nb.cells = [c for c in nb.cells if HIDE_TAG not in c.get("metadata", {}).get("tags", [])]
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        if errors:
            raise ReportError(
                f"{notebook}: cell {i} failed ({errors[0].get('ename')}: "
                f"{errors[0].get('evalue')}); fix it before rendering the report"
            )
        cell.outputs = [o for o in cell.outputs if _keep_output(o)]
    if sources:
        nb.cells.append(_sources_cell(sources))
    nb.metadata["title"] = title
    exporter = HTMLExporter(
        extra_loaders=[DictLoader({_TEMPLATE_NAME: _TEMPLATE})],
        template_file=_TEMPLATE_NAME,
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
        embed_images=True,
    )
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    external = re.findall(r"<(?:script|link|img)\b[^>]*(?:src|href)=[\"']?(?:https?:)?//", body)
    if external:
        raise ReportError(f"the report would load external resources: {external[:3]}")
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, body.encode("utf-8"))
    output.chmod(0o644)  # a report is meant to be shared (temp files are created 0600)
    logger.info("report written: %s (%.1f MB)", output, len(body) / 1e6)
    return output
