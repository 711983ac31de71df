"""Tables 1 and 4 of the paper as markdown: the main results and the targeted attacks.

Cells are accuracy in %, ``mean ± sample std`` over seeds when there is more than one, ``-`` when missing.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "-"
    mean = 100 * float(np.mean(values))
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {100 * float(np.std(values, ddof=1)):.2f}"


def main_table(rows: list[dict[str, Any]]) -> str:
    """Table 1 layout: one line per method and DUCAT flag, mean ± std over seeds. ``rows``: dicts
    with ``method``, ``ducat``, ``seed``, ``clean``, ``paper`` ({attack: accuracy}) and
    ``adaptive_worst``."""
    attacks = list(dict.fromkeys(a for r in rows for a in r["paper"]))
    header = ["method", "clean"] + [f"{a} (paper)" for a in attacks] + ["adaptive worst case"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = list(dict.fromkeys((r["method"], r["ducat"]) for r in rows))
    for method, ducat in keys:
        group = [r for r in rows if r["method"] == method and r["ducat"] == ducat]
        cells = [method + (" + DUCAT" if ducat else ""), _mean_std([r["clean"] for r in group])]
        cells += [_mean_std([r["paper"].get(a) for r in group]) for a in attacks]
        cells.append(_mean_std([r["adaptive_worst"] for r in group]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targeted_table(results: dict[str, dict[str, float]]) -> str:
    """Table 4 layout: one row per run, one column per targeted attack (accuracy %)."""
    attacks = list(dict.fromkeys(a for r in results.values() for a in r))
    lines = ["| run | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for run, values in results.items():
        lines.append(f"| {run} | " + " | ".join(_mean_std([values.get(a)]) for a in attacks) + " |")
    return "\n".join(lines)
