"""Fine-tuning curves for the report: train loss, validation mMP@k and mR@1 per epoch.

Each retrieval curve is drawn beside the pretrained start's value (the line fine-tuning has to
beat), and the epoch the recipe kept (model selection on validation mMP@k) is marked.

The curves come from each fine-tuning's ``summary.json`` (its ``history`` and ``selection``),
found through the record's ``run_dir``; the same values are logged to MLflow (step = epoch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from embbench.analysis._plotkit import _done, _plt

__all__ = ["finetune_curves", "finetune_curves_figure"]


def finetune_curves(df: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """Long table of the fine-tuned results' curves.

    Args:
        df: The results table (rows of mode ``fine-tuned`` with a ``run_dir`` are read).
        k: The metric cut-off.

    Returns:
        Columns ``dataset``, ``model`` (the registered fine-tuned name), ``recipe``,
        ``quantity`` (``train_loss``, ``val_mMP@k``, ``val_mR@1``), ``epoch``, ``value``,
        ``start`` (the pretrained start's value, NaN for the loss) and ``selected`` (the
        epoch kept).
    """
    rows: list[dict[str, Any]] = []
    if df.empty or "run_dir" not in df:
        return pd.DataFrame(rows)
    sub = df[(df["mode"] == "fine-tuned") & df["run_dir"].notna()]
    for _, r in sub.drop_duplicates("run_dir").iterrows():
        path = Path(str(r["run_dir"])) / "summary.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        selection = summary.get("selection") or {}
        start = selection.get("start") or {}
        for h in summary.get("history", []):
            for q in ("train_loss", f"val_mMP@{k}", "val_mR@1"):
                if q in h:
                    rows.append(
                        {
                            "dataset": r["dataset"],
                            "model": r.get("finetuned_model") or r["model"],
                            "recipe": summary.get("recipe"),
                            "quantity": q,
                            "epoch": int(h["epoch"]),
                            "value": float(h[q]),
                            "start": float(start.get(q, float("nan"))),
                            "selected": selection.get("epoch"),
                        }
                    )
    return pd.DataFrame(rows)


def finetune_curves_figure(curves: pd.DataFrame) -> Any:
    """One panel per (dataset, quantity): a line per fine-tuned model.

    Its pretrained start is a dashed line of the same colour; the kept epoch is circled.
    """
    if curves.empty:
        return None
    panels = list(curves.groupby(["dataset", "quantity"], sort=True))
    fig, axes = _plt().subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, ((dataset, quantity), part) in zip(axes[0], panels, strict=True):
        for i, (model, line) in enumerate(part.groupby("model", sort=True)):
            colour = f"C{i}"
            line = line.sort_values("epoch")
            ax.plot(line["epoch"], line["value"], marker="o", color=colour, label=model)
            start = line["start"].iloc[0]
            if pd.notna(start):
                ax.axhline(start, ls="--", color=colour, lw=1, label=f"{model}: pretrained start")
            kept = line[line["epoch"] == line["selected"]]
            ax.scatter(kept["epoch"], kept["value"], s=160, facecolors="none", edgecolors="k")
        ax.set_title(f"{dataset} · {quantity}")
        ax.set_xlabel("epoch")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _done(fig)
