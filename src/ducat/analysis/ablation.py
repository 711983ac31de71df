"""Figs. 7 and 9 of the paper: ablations of PGD-AT + DUCAT over one hyper-parameter.

Clean accuracy, PGD-10 under the paper's protocol and the adaptive worst case, against the
parameter's values (the paper shows only the first two).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ducat.analysis._figure import save_figure


def ablation_plot(param: str, values: list[float], clean: list[float], robust_paper: list[float],
                  robust_adaptive: list[float], path: Path) -> Path:
    """Three accuracy curves (fractions in, % on the axis) over ``values`` of ``param``."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    ax.plot(values, 100 * np.asarray(clean), "o-", label="clean")
    ax.plot(values, 100 * np.asarray(robust_paper), "s-", label="PGD-10, paper protocol")
    ax.plot(values, 100 * np.asarray(robust_adaptive), "^-", label="adaptive worst case")
    ax.set_xlabel(param)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"PGD-AT + DUCAT: ablation over {param}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
