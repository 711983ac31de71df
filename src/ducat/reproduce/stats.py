"""Paired significance of a DUCAT run against its base run, with the trained model as the unit.

Design of one table cell: S seeds x N examples. Seed s of the base run and of the other run share the seed, and
every run is scored on the same N test examples, so ``D[s, i] = other - base`` (in {-1, 0, 1}) is paired twice
over. The primary test is the crossed random-effects estimator: the effect is ``mean(D)`` and its variance counts
both sources of noise, the seeds (training noise: another seed trains another network) and the examples (test
noise: another test set), ``SE^2 = var(seed means of D) / S + var(example means of D) / N`` with Welch-Satterthwaite
degrees of freedom and a t reference. It counts the interaction twice, so it errs on the safe side; the simulation
in ``tests/test_stats.py`` holds its false-positive rate at or below 5% with a seed SD of the true effect up to 4
points, where exact McNemar tests combined over seeds do not.

Holm's step-down correction adjusts the p-values of all tests of a table together. A verdict needs the adjusted
p < 0.05 and at least ``MIN_SEEDS`` seeds; its sign is the estimated effect's. The exact McNemar test of each seed
stays as a description ("these two networks differ beyond test noise"), never as the verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05  # level of every test and of the verdict; confidence intervals are 1 - ALPHA = 95%
MIN_SEEDS = 5  # fewer seeds estimate the seed-to-seed variance too poorly for a verdict
TOO_FEW_SEEDS = "too few seeds for a verdict"
NOT_COMPUTABLE = "not computable"
NO_DIFFERENCE = "no significant difference"


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


def mcnemar(base: np.ndarray, other: np.ndarray) -> McNemar:
    """Exact McNemar test on per-example correctness ``(N,)`` (bool) of two runs on the same examples: do these
    two networks differ beyond test noise? A description of one seed, not a test of the training method."""
    base, other = np.asarray(base, bool), np.asarray(other, bool)
    if base.shape != other.shape:
        raise ValueError(f"the runs were scored on different examples: {base.shape} vs {other.shape}")
    only_base, only_other = int(np.sum(base & ~other)), int(np.sum(~base & other))
    discordant = only_base + only_other
    p = float(stats.binomtest(only_other, discordant, 0.5).pvalue) if discordant else 1.0
    return McNemar(only_base, only_other, p, len(base))


@dataclass(frozen=True)
class SeedExampleTest:
    """The primary test of one cell. ``effect``: mean accuracy of the other run minus the base's, a fraction;
    ``ci_low``, ``ci_high``: its 95% confidence interval (fractions); ``p``: two-sided p-value of effect = 0;
    ``df``: Welch-Satterthwaite degrees of freedom; ``seeds``: S; ``examples``: N. NaN where the data cannot
    give a value (fewer than 2 seeds or 2 examples; no variation at all leaves ``df`` NaN)."""

    effect: float
    ci_low: float
    ci_high: float
    p: float
    df: float
    seeds: int
    examples: int


def seed_example_test(base: np.ndarray, other: np.ndarray) -> SeedExampleTest:
    """The crossed random-effects test of per-example correctness ``(S, N)`` (bool) of a base and another run:
    row s of both is seed s, column i of both is test example i."""
    base, other = np.asarray(base, bool), np.asarray(other, bool)
    if base.ndim != 2 or base.shape != other.shape:
        raise ValueError(f"need (seeds, examples) of the same examples for both runs: {base.shape} vs {other.shape}")
    d = other.astype(float) - base
    seeds, examples = d.shape
    effect = float(d.mean()) if d.size else math.nan
    if seeds < 2 or examples < 2:
        return SeedExampleTest(effect, math.nan, math.nan, math.nan, math.nan, seeds, examples)
    seed_part = float(d.mean(axis=1).var(ddof=1)) / seeds
    example_part = float(d.mean(axis=0).var(ddof=1)) / examples
    se = math.sqrt(seed_part + example_part)
    if se == 0:  # every D[s, i] equal: no difference at all (p = 1), or a constant one with no noise to test against
        p, bound = (1.0, effect) if effect == 0 else (math.nan, math.nan)
        return SeedExampleTest(effect, bound, bound, p, math.nan, seeds, examples)
    df = (seed_part + example_part) ** 2 / (seed_part ** 2 / (seeds - 1) + example_part ** 2 / (examples - 1))
    half_width = float(stats.t.isf(ALPHA / 2, df)) * se
    p = float(2 * stats.t.sf(abs(effect) / se, df))  # survival function: a tiny p stays a real number
    return SeedExampleTest(effect, effect - half_width, effect + half_width, p, df, seeds, examples)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in their order. A NaN p-value counts in the family
    size (the safe side) and stays NaN."""
    p = np.asarray(p_values, float)
    order = np.argsort(np.where(np.isnan(p), np.inf, p), kind="stable")
    scaled = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))  # NaNs sort last and propagate only to NaNs
    return adjusted.tolist()


def verdict(test: SeedExampleTest, adjusted_p: float) -> str:
    """``gain`` or ``loss`` (the sign of the estimated effect) when the Holm-adjusted p < ALPHA and there are at
    least MIN_SEEDS seeds; otherwise why not: too few seeds, not computable (NaN), or no significant difference."""
    if test.seeds < MIN_SEEDS:
        return TOO_FEW_SEEDS
    if math.isnan(test.effect) or math.isnan(adjusted_p):
        return NOT_COMPUTABLE
    if adjusted_p >= ALPHA:
        return NO_DIFFERENCE
    return "gain" if test.effect > 0 else "loss"
