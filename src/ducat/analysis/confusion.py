"""Fig. 8 of the paper: where an attack sends each class (confusion matrix under attack).

With DUCAT's raw 2C outputs the dummy columns are reordered so that the diagonal of the right half
is the "sink" into the true class's own dummy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ducat.analysis._figure import save_figure


def confusion_under_attack(labels: np.ndarray, predictions: np.ndarray, num_classes: int,
                           dummy_index: np.ndarray | None = None) -> np.ndarray:
    """Row-normalised confusion matrix. With raw 2C predictions and a pairing (``dummy_index``,
    ``(C,)``), returns ``(C, 2C)`` with columns ``[0..C-1, dummy(0)..dummy(C-1)]`` so that the
    diagonal of the right half is the "sink" into the dummy of the true class; else ``(C, C)``."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    width = num_classes if dummy_index is None else 2 * num_classes
    column = np.arange(width)
    if dummy_index is not None:
        column[np.asarray(dummy_index)] = num_classes + np.arange(num_classes)
    matrix = np.zeros((num_classes, width))
    valid = predictions >= 0
    np.add.at(matrix, (labels[valid], column[predictions[valid]]), 1)
    return matrix / np.maximum(matrix.sum(1, keepdims=True), 1)


def plot_confusion(matrix: np.ndarray, path: Path) -> Path:
    """Heat map (% of each row) of a ``(C, C)`` or ``(C, 2C)`` matrix from ``confusion_under_attack``."""
    c, width = matrix.shape
    fig = Figure(figsize=(max(5, width * 0.45), 4))
    ax = fig.subplots()
    image = ax.imshow(100 * matrix, cmap="magma", vmin=0, vmax=100)
    ax.set_xlabel("prediction under attack" + (" (right half: dummy of class k)" if width == 2 * c else ""))
    ax.set_ylabel("true class")
    ticks = [str(k) for k in range(c)] + ([f"d{k}" for k in range(c)] if width == 2 * c else [])
    ax.set_xticks(range(width), ticks, fontsize=7)
    ax.set_yticks(range(c), [str(k) for k in range(c)], fontsize=7)
    if width == 2 * c:
        ax.axvline(c - 0.5, color="w", lw=1)
    fig.colorbar(image, ax=ax, label="% of the row")
    ax.set_title("Where the attack sends each class")
    return save_figure(fig, path)
