"""Fig. 3 of the paper: transfer of adversarial examples between robust models.

Attack success on each target model, split by whether the example fooled its surrogate: the paper
reads high transfer among surrogate successes as "the same examples fail everywhere".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ducat.analysis._figure import save_figure


def transfer_matrix(on_surrogate: dict[str, np.ndarray],
                    on_target: dict[tuple[str, str], np.ndarray]) -> dict[str, Any]:
    """Attack success rate on each target among examples that fooled the surrogate
    (``given_success[i, j]``) and among those that did not (``given_failure[i, j]``); NaN on the
    diagonal. Inputs are boolean success masks ``(N,)``."""
    names = list(on_surrogate)
    m = len(names)
    success, failure = np.full((m, m), np.nan), np.full((m, m), np.nan)
    for i, s in enumerate(names):
        fooled = np.asarray(on_surrogate[s], bool)
        for j, t in enumerate(names):
            if (s, t) not in on_target:
                continue
            hit = np.asarray(on_target[(s, t)], bool)
            success[i, j] = hit[fooled].mean() if fooled.any() else np.nan
            failure[i, j] = hit[~fooled].mean() if (~fooled).any() else np.nan
    return {"names": names, "given_success": success, "given_failure": failure}


def plot_transfer_matrix(result: dict[str, Any], path: Path) -> Path:
    """Two heat maps (%) of ``transfer_matrix``'s result, surrogate rows by target columns, one shared colorbar."""
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    names = result["names"]
    for ax, key, title in ((axes[0], "given_success", "fooled the surrogate"),
                           (axes[1], "given_failure", "did not fool the surrogate")):
        grid = result[key]
        image = ax.imshow(100 * grid, vmin=0, vmax=100, cmap="viridis")
        for i in range(len(names)):
            for j in range(len(names)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", color="w", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("target model")
        if ax is axes[0]:
            ax.set_ylabel("surrogate model")
        ax.set_title(f"transfer success (%), examples that\n{title}", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8, label="%")
    return save_figure(fig, path, tight_bbox=True)
