"""Fig. 6 of the paper: training time per epoch with and without DUCAT.

Bars of measured seconds per epoch, with DUCAT's relative overhead written over each pair.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ducat.analysis._figure import save_figure


def training_time_bars(times: dict[str, dict[str, float]], path: Path) -> Path:
    """``times[method] = {"base": s/epoch, "ducat": s/epoch}``; bars with the overhead annotated."""
    methods = list(times)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    x = np.arange(len(methods))
    base = [times[m]["base"] for m in methods]
    ducat = [times[m]["ducat"] for m in methods]
    ax.bar(x - 0.2, base, 0.4, label="base method")
    ax.bar(x + 0.2, ducat, 0.4, label="+ DUCAT")
    for i, (b, d) in enumerate(zip(base, ducat)):
        ax.text(i + 0.2, d, f"{100 * (d / b - 1):+.0f}%", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, methods)
    ax.set_ylabel("seconds per epoch (measured)")
    ax.set_title("Training time with and without DUCAT")
    ax.legend()
    return save_figure(fig, path)
