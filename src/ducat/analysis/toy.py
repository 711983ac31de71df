"""Fig. 4 of the paper: the toy case, hard dummy labels vs DUCAT's soft labels.

Grouped bars of accuracy under each evaluation, showing which attacks the robustness survives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ducat.analysis._figure import save_figure


def toy_case_plot(curves: dict[str, dict[str, float]], path: Path) -> Path:
    """Grouped bars: for each run (e.g. toy, DUCAT, PGD-AT), accuracy (fraction) under each evaluation."""
    runs = list(curves)
    metrics = list(dict.fromkeys(m for r in runs for m in curves[r]))
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [100 * curves[run].get(m, np.nan) for m in metrics]
        bars = ax.bar(np.arange(len(metrics)) + i * width - 0.4 + width / 2, values, width, label=run)
        for bar, v in zip(bars, values):
            if not np.isnan(v):
                ax.text(bar.get_x() + bar.get_width() / 2, v + 0.5, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(np.arange(len(metrics)), metrics, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Hard labels (toy case) vs soft labels (DUCAT): robustness that survives which attack")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
