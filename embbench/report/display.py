"""Display helpers of notebook 05: figures, styled tables, sentences and the report's header.

They show things the same way in JupyterLab and in the HTML report (figures as embedded PNGs with
a titled alt text, missing cells as "—", best values in bold).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from embbench.analysis import FAMILY_LABELS, IMPROVEMENT, MODE_LABELS, runs_summary, weights_summary

MISSING = "—"


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def figure_title(fig: Any) -> str:
    """The figure's title (suptitle, else its first axes' title), for alternative text."""
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_text():
        return sup.get_text()
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    return titles[0] if titles else "figure"


def show(fig: Any, missing: str = "No data for this figure in the runs analysed.") -> None:
    """Display a figure as an embedded PNG (titled alt text), or an italic note when ``None``."""
    from IPython.display import Markdown, display

    if fig is None:
        display(Markdown(f"*{missing}*"))
        return
    title = figure_title(fig)
    data = base64.b64encode(figure_png(fig)).decode("ascii")
    display(
        {"image/png": data, "text/plain": f"<figure: {title}>"},
        raw=True,
        metadata={"image/png": {"alt": title}},
    )


def style_table(
    df: pd.DataFrame,
    *,
    digits: int = 3,
    best: str | None = "max",
    best_columns: Sequence[str] | None = None,
    caption: str = "",
) -> Any:
    """A pandas Styler: numbers rounded, missing cells shown as "—", best values in bold.

    Args:
        df: The table.
        digits: Decimals shown.
        best: ``"max"``, ``"min"`` or ``None``: which value of each column is bolded.
        best_columns: Columns to highlight (default: every numeric column).
        caption: Table caption.

    Returns:
        The Styler (rendered as HTML by Jupyter and the report).
    """
    styler = df.style.format(precision=digits, na_rep=MISSING)
    numeric = [
        c
        for c in df.columns
        if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
    ]
    whole = [
        c
        for c in numeric
        if df[c].notna().any() and (df[c].dropna() == df[c].dropna().round()).all()
    ]
    if whole:  # counts and sizes: no decimals
        styler = styler.format(precision=0, na_rep=MISSING, subset=whole)
    if isinstance(df.index, pd.RangeIndex):
        styler = styler.hide(axis="index")
    cols = [c for c in (best_columns if best_columns is not None else numeric) if c in numeric]
    if best and cols:
        props = "font-weight: bold"
        if best == "max":
            styler = styler.highlight_max(subset=cols, props=props)
        else:
            styler = styler.highlight_min(subset=cols, props=props)
    if caption:
        styler = styler.set_caption(caption)
    return styler


def table3_display(t3: pd.DataFrame) -> pd.DataFrame:
    """Table 3 with readable row labels (e.g. "Top-tuned SSL", "Δ top-tuning SSL")."""
    labels = []
    for fam, row in t3.index:
        name = FAMILY_LABELS.get(fam, fam)
        labels.append(
            f"Δ top-tuning {name}" if row == IMPROVEMENT else f"{MODE_LABELS[row]} {name}"
        )
    out = t3.copy()
    out.index = pd.Index(labels, name="model type")
    out.columns = [str(c) for c in out.columns]
    return out


def style_table3(t3: pd.DataFrame, digits: int = 3) -> Any:
    """Table 3 styled like the paper: best score per column in bold, improvements coloured."""
    shown = table3_display(t3)
    is_delta = pd.Series([lab.startswith("Δ") for lab in shown.index], index=shown.index)
    styler = shown.style.format(precision=digits, na_rep=MISSING)
    scores = shown.loc[~is_delta.to_numpy()]
    if not scores.empty:
        best = scores.max()

        def bold(col: pd.Series) -> list[str]:
            return [
                "font-weight: bold"
                if not is_delta[i] and pd.notna(v) and v >= best[col.name] - 1e-12
                else ""
                for i, v in col.items()
            ]

        styler = styler.apply(bold, axis=0)

    def colour(row: pd.Series) -> list[str]:
        if not is_delta[row.name]:
            return [""] * len(row)
        return [
            ""
            if pd.isna(v)
            else (
                "color: #1a7f37; font-style: italic"
                if v > 0
                else "color: #b42318; font-style: italic"
            )
            for v in row
        ]

    styler = styler.apply(colour, axis=1)
    n = t3.attrs.get("metric", "")
    return styler.set_caption(
        f"{n} per model type (mean over the models of that type), pretrained vs top-tuned; "
        f"{MISSING} = not run"
    )


def show_table(
    df: pd.DataFrame | Any, empty: str = "No data for this table.", **style: Any
) -> None:
    """Display a DataFrame styled by :func:`style_table` (or a Styler as is); a note if empty."""
    from IPython.display import Markdown, display

    if isinstance(df, pd.DataFrame):
        if df.empty:
            display(Markdown(f"*{empty}*"))
            return
        df = style_table(df, **style)
    display(df)


def show_table3(t3: pd.DataFrame) -> None:
    """Display table 3 styled by :func:`style_table3` (a note when there is nothing to show)."""
    from IPython.display import Markdown, display

    if t3.empty:
        display(Markdown("*No pretrained or top-tuned results to tabulate.*"))
        return
    display(style_table3(t3))


def guide_display(guide: pd.DataFrame) -> pd.DataFrame:
    """The practical guide as a compact table: one row per dataset, task and strategy."""
    if guide.empty:
        return guide
    ci = [
        f"[{lo:.3f}, {hi:.3f}]" if pd.notna(lo) and pd.notna(hi) else MISSING
        for lo, hi in zip(guide["low"], guide["high"], strict=True)
    ]
    return pd.DataFrame(
        {
            "dataset": guide["dataset"],
            "task": guide["task"],
            "strategy": guide["strategy"],
            "model": guide["model"],
            "score": guide["score"],
            "of": guide["score_name"],
            "95% CI": ci,
            "gain vs pretrained": guide["gain"],
            "training h": guide["train_hours"],
            "GPU-h": guide["gpu_hours"],
            "gain / h": guide["gain_per_hour"],
            "gain / GPU-h": guide["gain_per_gpu_hour"],
            "pick": ["✓" if r else "" for r in guide["recommended"]],
        }
    ).reset_index(drop=True)


def ci_display(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``metric`` with its bootstrap CI per result (rows) and dataset (columns), as text.

    Cells read ``0.812 [0.790, 0.833]``; a result without per-query arrays shows its value
    alone, a cell that was not run shows "—".
    """
    if results.empty:
        return pd.DataFrame()
    low, high = f"{metric} low", f"{metric} high"
    cells = []
    for r in results[results[metric].notna()].to_dict("records"):
        text = f"{r[metric]:.3f}"
        if pd.notna(r.get(low)) and pd.notna(r.get(high)):
            text += f" [{r[low]:.3f}, {r[high]:.3f}]"
        cells.append({"result": r["entry"], "dataset": r["dataset"], "value": text})
    if not cells:
        return pd.DataFrame()
    table = pd.DataFrame(cells).pivot(index="result", columns="dataset", values="value")
    return table.fillna(MISSING)


def show_sentences(sentences: Iterable[str], *, empty: str = "") -> None:
    """Display generated sentences as a bullet list; nothing (or ``empty``) when there are none.

    A placeholder such as "Nothing to say yet." above a gallery or a table reads as a broken
    section, so an empty list shows nothing unless the caller names what is missing.
    """
    from IPython.display import Markdown, display

    items = [s for s in sentences if s]
    if items:
        display(Markdown("\n".join(f"- {s}" for s in items)))
    elif empty:
        display(Markdown(f"*{empty}*"))


# Results with no MLflow run of their own, by stage: what they are, in words.
_RUNLESS = {
    "toptune-baseline": ("pretrained baseline", " that a tuning run recorded as its reference"),
}


def runs_count(df: pd.DataFrame) -> str:
    """How the number of results relates to the number of MLflow runs, in words.

    The header and the closing lines of the report both quote it, so they never disagree:
    ``16 results from 14 MLflow runs (2 pretrained baselines that a tuning run recorded as
    its reference have no run of their own)``.
    """
    n = len(df)
    ids = df["mlflow_run_id"] if "mlflow_run_id" in df else pd.Series([None] * n, index=df.index)
    has_run = ids.notna() & (ids.astype(str) != "")
    n_runs = int(ids[has_run].nunique())
    text = f"{n} result{'s' if n != 1 else ''} from {n_runs} MLflow run{'s' if n_runs != 1 else ''}"
    why = []
    stages = df.loc[~has_run, "stage"] if "stage" in df else pd.Series(dtype=object)
    for stage, count in sorted(stages.fillna("unknown").astype(str).value_counts().items()):
        noun, rest = _RUNLESS.get(stage, (f"{stage} result", ""))
        one = count == 1
        why.append(
            f"{count} {noun}{'' if one else 's'}{rest} "
            f"{'has' if one else 'have'} no run of {'its' if one else 'their'} own"
        )
    shared = int(has_run.sum()) - n_runs
    if shared:
        why.append(f"{shared} result{'s' if shared != 1 else ''} share a run with another result")
    return text + (f" ({'; '.join(why)})" if why else "")


def results_footer(analysis: Any) -> list[str]:
    """The report's closing lines: where the numbers came from and the weights they used."""
    df = analysis.results
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(weights_summary(df)["counts"].items()))
    return [
        f"Source: {df.attrs.get('source', analysis.cfg.source)}.",
        f"{runs_count(df)}; MLflow experiment {analysis.cfg.experiment}.",
        f"Weights used (results per kind): {counts}.",
    ]


def control_models(df: pd.DataFrame) -> list[str]:
    """The models of ``df`` that are random-init controls (their lineage says ``control``)."""
    if "control" not in df or df.empty:
        return []
    flags = df["control"].astype("boolean").fillna(False).astype(bool)
    return sorted({str(m) for m in df.loc[flags, "model"]})


def header_html(analysis: Any, *, max_open_runs: int = 40) -> str:
    """The top of the report, as HTML.

    ``analysis`` is stage 05's ``Analysis`` (its ``cfg``, ``results`` and ``notes``).

    Title, sources, the weights used (a red banner when any model that is not a control was
    random; a grey note naming the random-init controls, which are random by design), git
    commits, notes, and the run ids behind every number.
    """
    cfg = analysis.cfg
    df = analysis.results
    w = weights_summary(df)
    esc = html.escape
    parts = [f"<h1>{esc(cfg.title)}</h1>"]
    parts.append(
        "<p>Generated {when} from {src}: {n}, {m} models, {d} datasets ({ds}); modes: "
        "{modes}. Headline metric: <b>{metric}</b> (k={k}); confidence intervals: {ci}.</p>".format(
            when=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            src=esc(str(df.attrs.get("source", cfg.source))),
            n=esc(runs_count(df)),
            m=df["model"].nunique(),
            d=df["dataset"].nunique(),
            ds=esc(", ".join(sorted(df["dataset"].unique()))),
            modes=esc(", ".join(m for m in MODE_LABELS if m in set(df["mode"]))),
            metric=esc(cfg.metric),
            k=cfg.k,
            ci=(
                f"{cfg.confidence:.0%} bootstrap over queries, {cfg.n_boot} resamples"
                if cfg.n_boot
                else "not computed (n_boot = 0)"
            ),
        )
    )
    counts = ", ".join(f"{esc(str(k))}: {v}" for k, v in sorted(w["counts"].items()))
    controls = control_models(df)
    random_models = [m for m in w["random_models"] if m not in controls]
    if random_models:
        parts.append(
            '<div class="embbench-random-weights" style="border:3px solid #b42318;'
            "background:#fdecea;color:#7a1a12;padding:0.8em;margin:0.8em 0;font-size:1.15em;"
            'font-weight:bold">WARNING: RANDOM WEIGHTS. Results of '
            f"{esc(', '.join(random_models))} were computed with randomly initialised "
            "weights (pretrained weights were not requested or could not be downloaded). Their "
            "numbers say nothing about these models; rerun with weights: pretrained on a machine "
            "that can reach the model hub.</div>"
        )
    else:
        which = "Every result other than the control's" if controls else "Every result"
        parts.append(
            '<div class="embbench-weights" style="border:2px solid #1a7f37;background:#eaf6ec;'
            f'padding:0.6em;margin:0.8em 0">{which} used published pretrained weights or a '
            "checkpoint trained from them (no random initialisation).</div>"
        )
    if controls:
        parts.append(
            '<div class="embbench-control" style="border:2px solid #6e7781;background:#f3f4f6;'
            'color:#24292f;padding:0.6em;margin:0.8em 0">RANDOM-INIT CONTROL (by design): '
            f"{esc(', '.join(controls))} "
            f"{'is' if len(controls) == 1 else 'are'} the same architecture as a real model "
            "with seeded random weights (and, when tuned, trained from that random start). "
            "Their scores are the floor that pretraining is measured against, not results "
            "about a model.</div>"
        )
    parts.append(f"<p><b>Weights used</b> (results per kind): {counts}.</p>")
    if w["fell_back_models"]:
        parts.append(
            "<p><b>Fell back to random weights</b> (weights: auto): "
            f"{esc(', '.join(w['fell_back_models']))}.</p>"
        )
    shas = sorted({str(s) for s in df.get("git_sha", pd.Series(dtype=object)).dropna()})
    if shas:
        parts.append(f"<p><b>Code versions</b> (git): {esc(', '.join(s[:12] for s in shas))}.</p>")
    if analysis.notes:
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in analysis.notes) + "</ul>")
    runs = runs_summary(df).drop(columns=["entry"], errors="ignore")
    if "git_sha" in runs:
        runs["git_sha"] = runs["git_sha"].map(lambda v: v[:12] if isinstance(v, str) else v)
    runs = runs.rename(
        columns={"mlflow_run_id": "MLflow run id", "weights_kind": "weights", "git_sha": "git"}
    )
    table = runs.to_html(index=False, na_rep=MISSING, border=0, classes="embbench-runs")
    open_attr = " open" if len(runs) <= max_open_runs else ""
    parts.append(
        f"<details{open_attr}><summary><b>Runs behind these numbers</b> "
        f"({esc(runs_count(df))}; MLflow experiment {esc(cfg.experiment)!s})</summary>"
        f"{table}</details>"
    )
    return "\n".join(parts)


def show_header(analysis: Any) -> None:
    """Display :func:`header_html`."""
    from IPython.display import HTML, display

    display(HTML(header_html(analysis)))
