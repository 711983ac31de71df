"""Tables 1 and 4 of the paper as markdown: the main results, their significance, and the targeted attacks.

Cells are accuracy in %, ``mean ± sample std`` over seeds when there is more than one, ``-`` when missing.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def mean_std(values: list[float | None]) -> str:
    """``mean ± sample std`` in % of the values present (one value: just it; none: ``-``)."""
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "-"
    mean = 100 * float(np.mean(values))
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {100 * float(np.std(values, ddof=1)):.2f}"


def main_table(headers: list[str], rows: list[tuple[str, list[list[float | None]]]]) -> str:
    """Table 1: one line per ``(label, cells)`` row, each cell the per-seed accuracies of one column
    shown as mean ± std; ``headers`` name the columns after the first (``run``)."""
    lines = ["| run | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    for label, cells in rows:
        lines.append(f"| {label} | " + " | ".join(mean_std(values) for values in cells) + " |")
    return "\n".join(lines)


def _p(value: float) -> str:
    """A p-value for a table: two significant digits, scientific below 0.001, a bound below 1e-16 (the
    precision of the normal tail that Stouffer's combination goes through)."""
    if value < 1e-16:
        return "< 1e-16"
    return f"{value:.2g}" if value >= 0.001 else f"{value:.1e}"


def significance_table(rows: list[tuple[str, dict[str, dict[str, Any]]]]) -> str:
    """Paired tests of each run against its base, per measure (``clean``, ``worst``): the mean difference in
    points, each seed's exact McNemar p (discordant counts base-only/other-only), the combined p, the reading."""
    header = ("| run vs its base | measure | difference (points) | per seed: p (base only / run only) | "
              "combined p | reading |")
    lines = [header, "|---|---|---|---|---|---|"]
    for label, measures in rows:
        for measure, stats in measures.items():
            seeds = ", ".join(f"{_p(t['p'])} ({t['only_base']}/{t['only_other']})" for t in stats["per_seed"])
            lines.append(f"| {label} | {measure} | {100 * stats['difference']:+.2f} | {seeds} | "
                         f"{_p(stats['combined_p'])} | {stats['verdict']} |")
    return "\n".join(lines)


def targeted_table(results: dict[str, dict[str, float]]) -> str:
    """Table 4 layout: one row per run, one column per targeted attack (accuracy %)."""
    attacks = list(dict.fromkeys(a for r in results.values() for a in r))
    lines = ["| run | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for run, values in results.items():
        lines.append(f"| {run} | " + " | ".join(mean_std([values.get(a)]) for a in attacks) + " |")
    return "\n".join(lines)
