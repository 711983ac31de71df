"""Fig. 5 and table 2 of the paper: the accuracy-robustness trade-off.

Clean vs robust accuracy of this grid's runs, drawn over the SOTA points the paper's table 2 lists
(shipped as ``sota_table2.csv``); an arrow joins a run's paper-protocol point to its adaptive worst case.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ducat.analysis._figure import save_figure


def sota_points() -> list[dict[str, Any]]:
    """The SOTA rows of the paper's table 2 (CIFAR-10, ResNet-18, no extra data; clean and
    AutoAttack accuracy in %, with the record source the paper cites). The paper's text says 14;
    its table lists 16, all shipped here."""
    text = (resources.files("ducat.analysis") / "sota_table2.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    for row in rows:
        row["clean"], row["autoattack"], row["year"] = float(row["clean"]), float(row["autoattack"]), int(row["year"])
    return rows


def _draw_sota(ax: Axes) -> None:
    sota = sota_points()
    ax.scatter([r["clean"] for r in sota], [r["autoattack"] for r in sota], c="grey", marker="s", s=20,
               label="SOTA, paper table 2 (CIFAR-10, AutoAttack)")
    for r in sota:
        ax.annotate(r["method"], (r["clean"], r["autoattack"]), fontsize=6, color="grey")


def tradeoff_scatter(points: list[dict[str, Any]], path: Path, include_sota: bool = True) -> Path:
    """Clean vs robust accuracy. ``points``: dicts with ``name``, ``clean``, ``robust`` (fractions)
    and ``group`` (e.g. the protocol); points of the same name are joined by an arrow from the
    first group to the second (paper protocol -> adaptive worst case)."""
    fig = Figure(figsize=(7.5, 5.5))
    ax = fig.subplots()
    if include_sota:
        _draw_sota(ax)
    groups = list(dict.fromkeys(p["group"] for p in points))
    markers = ["o", "x", "^", "v"]
    for g, marker in zip(groups, markers):
        sel = [p for p in points if p["group"] == g]
        ax.scatter([100 * p["clean"] for p in sel], [100 * p["robust"] for p in sel], marker=marker, s=40,
                   label=f"this grid: {g}")
    by_name: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_name.setdefault(p["name"], []).append(p)
    for name, ps in by_name.items():
        ax.annotate(name, (100 * ps[0]["clean"], 100 * ps[0]["robust"]), fontsize=7)
        if len(ps) >= 2:
            ax.annotate("", xy=(100 * ps[1]["clean"], 100 * ps[1]["robust"]),
                        xytext=(100 * ps[0]["clean"], 100 * ps[0]["robust"]),
                        arrowprops={"arrowstyle": "->", "color": "tab:red", "alpha": 0.6})
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title("Accuracy-robustness trade-off")
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)
