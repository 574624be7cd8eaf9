"""Render stage 05 into a self-contained HTML report for stakeholders.

:func:`render_report` runs ``notebooks/05_analysis.ipynb`` through papermill (validated params,
like every notebook) and converts the executed copy with nbconvert's ``HTMLExporter``: code
hidden, figures embedded as base64 PNGs, no external script (the template's require.js, MathJax
and mermaid links are removed), log output dropped. The notebook's first cell states the
weights used (loudly when they were random) and the MLflow run ids behind every number.

Command line: ``python -m embbench report [-f params.yaml ...] [--demo] [--output path]``
(:func:`report_main`).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from embbench._utils import atomic_write_bytes
from embbench.analysis import AnalysisError
from embbench.config import ConfigError, config_for, read_params_files
from embbench.notebooks import run_notebook
from embbench.paths import params_dir, reports_dir

logger = logging.getLogger(__name__)

NOTEBOOK = "05_analysis"
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


class ReportError(RuntimeError):
    """The report could not be rendered; the message names the notebook or file to look at."""


def export_html(
    notebook: str | Path, output: str | Path, *, title: str = "embbench report"
) -> Path:
    """Convert an executed notebook to one self-contained HTML file, code hidden.

    Log output (stderr streams) and cells tagged ``report-hide`` are dropped; figures stay
    embedded as base64 PNGs; no script or stylesheet is fetched from the network.

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
        cell.outputs = [
            o for o in cell.outputs if not (o.output_type == "stream" and o.get("name") == "stderr")
        ]
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


def render_report(
    output: str | Path | None = None,
    params_files: Iterable[str | Path] = (),
    overrides: Mapping[str, Any] | None = None,
    *,
    notebook_output: Path | None = None,
) -> Path:
    """Run notebook 05 with validated params and write its HTML report.

    Args:
        output: The HTML file (default ``<reports_dir>/<report_name>.html``).
        params_files: Layered params files (default ``params/05_analysis.yaml``).
        overrides: Parameter values applied last.
        notebook_output: Where the executed notebook goes (default
            ``<reports_dir>/notebooks/05_analysis.ipynb``).

    Returns:
        The HTML report's path; the executed notebook's path when the params say
        ``report: false`` and no ``output`` is given.

    Raises:
        embbench.config.ConfigError: A params file has an unknown key or a bad value.
        ReportError: A cell of the notebook failed (the executed copy names it).
    """
    files = list(params_files) or [params_dir() / f"{NOTEBOOK}.yaml"]
    params, origin = read_params_files(files)
    params.update(overrides or {})
    cfg = config_for(NOTEBOOK).from_params(params, origin)
    try:
        executed = run_notebook(NOTEBOOK, files, overrides, output=notebook_output)
    except Exception as exc:
        if type(exc).__name__ != "PapermillExecutionError":
            raise
        where = notebook_output or reports_dir() / "notebooks" / f"{NOTEBOOK}.ipynb"
        raise ReportError(
            f"notebook {NOTEBOOK} failed ({getattr(exc, 'ename', '')}: "
            f"{getattr(exc, 'evalue', exc)}); the executed copy is {where}"
        ) from None
    if output is None and not cfg.report:
        logger.info("report: false in the params; executed notebook only: %s", executed)
        return executed
    output = Path(output) if output else reports_dir() / f"{cfg.report_name}.html"
    return export_html(executed, output, title=cfg.title)


def report_main(argv: Sequence[str] | None = None) -> int:
    """``embbench report``: render notebook 05 to HTML; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="embbench report",
        description="Run notebooks/05_analysis.ipynb and write a self-contained HTML report.",
    )
    p.add_argument(
        "-f",
        "--params",
        action="append",
        default=[],
        help="params YAML, layered in order (default params/05_analysis.yaml)",
    )
    p.add_argument(
        "--demo", action="store_true", help="layer params/demo/05_analysis.yaml after the others"
    )
    p.add_argument("--set", action="append", default=[], help="key=value override (YAML value)")
    p.add_argument("--output", default="", help="HTML path (default reports/<report_name>.html)")
    args = p.parse_args(list(argv) if argv is not None else None)
    files = [Path(f) for f in args.params] or [params_dir() / f"{NOTEBOOK}.yaml"]
    if args.demo:
        files.append(params_dir() / "demo" / f"{NOTEBOOK}.yaml")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    try:
        out = render_report(args.output or None, files, overrides)
    except (ConfigError, AnalysisError, ReportError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    sys.stdout.write(f"report: {out}\n")
    return 0
