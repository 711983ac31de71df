"""The one save step every figure shares: create the parent directory, lay out, write a PNG.

Figures are built as ``matplotlib.figure.Figure`` objects, never through ``pyplot``, so importing or
using ``ducat.analysis`` leaves the caller's matplotlib backend and pyplot state alone:
``Figure.savefig`` renders a PNG with the Agg canvas by itself, and an unreferenced ``Figure`` is
garbage-collected (there is no pyplot figure manager to close).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

DPI = 120


def save_figure(fig: Figure, path: Path, *, tight_bbox: bool = False) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created) and return the path. ``tight_bbox``
    crops to the drawn content instead of ``tight_layout`` (for figures with a shared colorbar,
    which ``tight_layout`` cannot place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight_bbox:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    else:
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    return path
