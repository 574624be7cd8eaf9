"""What the figures of :mod:`embbench.analysis.plots` share: colours, lazy pyplot/seaborn, legends.

matplotlib and seaborn are imported on first use, so importing the analysis package stays light.
"""

from __future__ import annotations

import numpy as np

from embbench.analysis._common import FAMILY_LABELS

FAMILY_PALETTE = {
    "supervised": "#4C72B0",
    "ssl": "#DD8452",
    "text-image": "#55A868",
    "unknown": "#8C8C8C",
}
MISSING_COLOUR = "#E6E6E6"


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _sns():
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return sns


def _done(fig):
    """Detach ``fig`` from pyplot (no automatic second display) and return it."""
    _plt().close(fig)
    return fig


def _palette(families) -> dict[str, str]:
    return {f: FAMILY_PALETTE.get(f, FAMILY_PALETTE["unknown"]) for f in families}


def _family_legend(ax, families, *, control: bool = False) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Patch(color=FAMILY_PALETTE.get(f, FAMILY_PALETTE["unknown"]), label=FAMILY_LABELS.get(f, f))
        for f in families
    ]
    if control:
        handles.append(
            Line2D(
                [],
                [],
                marker="X",
                linestyle="",
                markersize=8,
                markerfacecolor=CONTROL_COLOUR,
                markeredgecolor="black",
                label="random-init control",
            )
        )
    ax.legend(handles=handles, title="type", loc="best", fontsize="small")


CONTROL_COLOUR = "#6e7781"


def _is_control(value: object) -> bool:
    return value is True or (isinstance(value, (bool, np.bool_)) and bool(value))


def _spread(values: list[float], gap: float) -> list[float]:
    """Label heights near ``values`` (sorted ascending) at least ``gap`` apart."""
    out: list[float] = []
    for v in values:
        out.append(max(v, out[-1] + gap) if out else v)
    return out
