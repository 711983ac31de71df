"""Fig. 2 of the paper: adversarial examples that every defense fails on ("always failed").

For M defenses' per-example robustness masks, count per class how many defenses each adversarial
example beats; the paper's point is that a large share beats all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ducat.analysis._figure import save_figure


def always_failed_overlap(robust: dict[str, np.ndarray], labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """For M defenses' per-example robustness masks (``(N,)`` bool each): ``counts[c, k]`` = number of
    class-c examples whose adversarial version beats exactly k defenses; the shares of examples
    defended by all M (``uniform_defended``) and beating all M (``uniform_failed``)."""
    names = list(robust)
    stacked = np.stack([np.asarray(robust[n], bool) for n in names])
    beaten = (~stacked).sum(0)
    m = len(names)
    counts = np.zeros((num_classes, m + 1), dtype=int)
    np.add.at(counts, (np.asarray(labels), beaten), 1)
    return {"defenses": names, "counts": counts, "uniform_defended": float(np.mean(beaten == 0)),
            "uniform_failed": float(np.mean(beaten == m))}


def plot_always_failed_overlap(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars of ``always_failed_overlap``'s ``counts``: per class, one bar per number of defenses beaten."""
    counts = result["counts"]
    c, k = counts.shape
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    width = 0.8 / k
    for j in range(k):
        ax.bar(np.arange(c) + j * width - 0.4 + width / 2, counts[:, j], width, label=f"beats {j}")
    ax.set_xticks(np.arange(c))
    ax.set_xlabel("class")
    ax.set_ylabel("test examples")
    ax.set_title(f"How many of the {k - 1} defenses each adversarial example beats\n"
                 f"uniformly defended {100 * result['uniform_defended']:.1f}%, "
                 f"uniformly failed {100 * result['uniform_failed']:.1f}%")
    ax.legend(ncol=k, fontsize=8)
    return save_figure(fig, path)
