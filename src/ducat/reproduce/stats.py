"""Paired significance of a DUCAT run against its base run: exact McNemar tests, combined over seeds.

Both runs of a pair share the seed and the evaluated examples, so the question per example is paired:
which examples does one get right and the other wrong. The exact McNemar test is the two-sided binomial
test of the discordant counts (scipy's ``binomtest``). Seeds are independent repetitions; their evidence
is combined with Stouffer's method on one-sided mid-p values, so a gain in one seed and a loss in
another cancel instead of adding up, then reported two-sided.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05


@dataclass(frozen=True)
class McNemar:
    """``only_base``: examples the base gets right and the other run wrong; ``only_other``: the reverse;
    ``p``: exact two-sided p-value; ``n``: examples compared."""

    only_base: int
    only_other: int
    p: float
    n: int

    @property
    def difference(self) -> float:
        """Accuracy of the other run minus the base's, a fraction."""
        return (self.only_other - self.only_base) / self.n if self.n else 0.0

    def mid_p_gain(self) -> float:
        """One-sided mid-p for "the other run is better": P(X > k) + P(X = k) / 2, X ~ Bin(discordant, 1/2)."""
        k, m = self.only_other, self.only_base + self.only_other
        if m == 0:
            return 0.5
        return float(stats.binom.sf(k, m, 0.5) + 0.5 * stats.binom.pmf(k, m, 0.5))


def mcnemar(base: np.ndarray, other: np.ndarray) -> McNemar:
    """Exact McNemar test on per-example correctness ``(N,)`` (bool) of two runs on the same examples."""
    base, other = np.asarray(base, bool), np.asarray(other, bool)
    if base.shape != other.shape:
        raise ValueError(f"the runs were scored on different examples: {base.shape} vs {other.shape}")
    only_base, only_other = int(np.sum(base & ~other)), int(np.sum(~base & other))
    discordant = only_base + only_other
    p = float(stats.binomtest(only_other, discordant, 0.5).pvalue) if discordant else 1.0
    return McNemar(only_base, only_other, p, len(base))


def combined_p(tests: list[McNemar]) -> float:
    """Two-sided p-value of Stouffer's combination of the seeds' one-sided mid-p values (1.0 for none)."""
    if not tests:
        return 1.0
    one_sided = stats.combine_pvalues([t.mid_p_gain() for t in tests], method="stouffer").pvalue
    return float(min(1.0, 2 * min(one_sided, 1 - one_sided)))


def verdict(tests: list[McNemar]) -> str:
    """``gain``, ``loss`` or ``no significant difference`` at level 0.05 (combined over seeds)."""
    if combined_p(tests) >= ALPHA:
        return "no significant difference"
    return "gain" if sum(t.difference for t in tests) > 0 else "loss"
