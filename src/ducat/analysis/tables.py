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


def p_text(value: float | None) -> str:
    """A p-value for a table or a sentence: two significant digits, scientific below 0.001; a stated floor,
    ``< 1e-300``, where float64 would underflow; ``-`` when not computable (None or NaN)."""
    if value is None or np.isnan(value):
        return "-"
    if value < 1e-300:
        return "< 1e-300"
    return f"{value:.2g}" if value >= 0.001 else f"{value:.1e}"


def _points(value: float | None) -> str:
    """A signed difference, a fraction, in accuracy points (``+1.60``); ``-`` when not computable."""
    return "-" if value is None or np.isnan(value) else f"{100 * value:+.2f}"


def effect_text(stats: dict[str, Any]) -> tuple[str, str]:
    """The effect (run - base) of a paired test and its 95% CI, in accuracy points, from its fractions
    ``effect``, ``ci_low``, ``ci_high``: ``("+1.60", "[-0.40, +3.60]")``; ``-`` for a value not computable."""
    interval = "-" if stats["ci_low"] is None else f"[{_points(stats['ci_low'])}, {_points(stats['ci_high'])}]"
    return _points(stats["effect"]), interval


def significance_table(rows: list[tuple[str, dict[str, dict[str, Any]]]]) -> str:
    """Paired tests of each run against its base, per measure (``clean``, ``worst``): the effect in points (run -
    base, mean over seeds and examples), its 95% CI, p and Holm-adjusted p of the seeds x examples test, the
    verdict; then, descriptive only, each seed's exact McNemar p (discordant counts base-only/run-only)."""
    header = ("| run vs its base | measure | effect (points) | 95% CI (points) | p | Holm p | verdict | "
              "per seed, McNemar (descriptive): p (base only / run only) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for label, measures in rows:
        for measure, stats in measures.items():
            effect, interval = effect_text(stats)
            seeds = ", ".join(f"{p_text(t['p'])} ({t['only_base']}/{t['only_other']})" for t in stats["per_seed"])
            lines.append(f"| {label} | {measure} | {effect} | {interval} | {p_text(stats['p'])} | "
                         f"{p_text(stats['p_holm'])} | {stats['verdict']} | {seeds} |")
    return "\n".join(lines)


def targeted_table(results: dict[str, dict[str, float]]) -> str:
    """Table 4 layout: one row per run, one column per targeted attack (accuracy %)."""
    attacks = list(dict.fromkeys(a for r in results.values() for a in r))
    lines = ["| run | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for run, values in results.items():
        lines.append(f"| {run} | " + " | ".join(mean_std([values.get(a)]) for a in attacks) + " |")
    return "\n".join(lines)
