#!/usr/bin/env python
"""How often does each paired test of DUCAT against its base say "different" when training it changes nothing?

The scenario of issue 21, simulated: S seeds x N test examples, the same N examples for every seed and both
runs. A run gets example i right when ``difficulty[i] + noise < threshold +- shift / 2`` (the other run
``+``, the base ``-``; noise N(0, 1), new for every run, seed and example), where

- ``difficulty[i]`` (SD ``DIFFICULTY_SD``) is shared by both runs and all seeds, so examples are correlated
  across seeds; with ``PREFERENCE_SD`` it sets about 12% discordant pairs at 70% accuracy, as in ``mini``;
- ``shift = preference[i] + seed_shift[s]``: ``preference[i]`` (SD ``PREFERENCE_SD``, mean 0) is an example's
  lasting preference for one of the two runs (the test set is a sample too); ``seed_shift[s]`` is seed-to-seed
  training noise, scaled so that the true per-seed accuracy difference has mean ``--effect`` and SD
  ``--seed-sd`` accuracy points.

The construction is symmetric in the two runs, so with ``--effect 0`` the true difference is exactly 0 and
every rejection is a false positive. Methods compared, each at level 0.05:

- ``crossed``: the primary test of ``ducat.reproduce.stats`` (crossed random-effects SE, Welch-Satterthwaite t);
- ``mcnemar+stouffer``: the former test, exact McNemar per seed combined with Stouffer's method on one-sided
  mid-p values (its numerical defects fixed: two-sided p from |Z|);
- ``mixed logistic`` (``--mixed R``, needs ``pip install statsmodels``): statsmodels' ``BinomialBayesMixedGLM``
  with crossed random effects (example, seed, seed x run, example x run) fitted by variational Bayes, p from the
  posterior mean and SD of the run effect. One fit takes minutes at N = 500 on this CPU, so it runs on its own
  smaller simulation (``--mixed-examples``), beside the other two methods on the same data.

    python benchmarks/stats_simulation.py                                 # 2000 replicates, S = 5 and 10
    python benchmarks/stats_simulation.py --mixed 100 --mixed-examples 100 --mixed-seed-sd 0 4
    python benchmarks/stats_simulation.py --effect 3                      # rejection rate with a true effect
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy import sparse, special, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ducat.reproduce.stats import ALPHA, seed_example_test  # noqa: E402

ACCURACY = 0.70  # mean accuracy of both runs
DIFFICULTY_SD = 3.4  # latent SD of the per-example difficulty shared by both runs and every seed
PREFERENCE_SD = 0.5  # latent SD of a per-example preference for one run, shared by every seed
_LATENT_SD = math.sqrt(DIFFICULTY_SD ** 2 + PREFERENCE_SD ** 2 / 4 + 1)
_THRESHOLD = float(stats.norm.ppf(ACCURACY)) * _LATENT_SD
_SLOPE = float(stats.norm.pdf(_THRESHOLD / _LATENT_SD)) / _LATENT_SD  # accuracy per unit of latent shift


def simulate(rng: np.random.Generator, replicates: int, seeds: int, examples: int, seed_sd_points: float,
             effect_points: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-example correctness of the base and the other run, two ``(replicates, seeds, examples)`` bool arrays;
    the true accuracy difference (other - base) of a seed has mean ``effect_points`` and SD ``seed_sd_points``."""
    difficulty = rng.normal(0.0, DIFFICULTY_SD, (replicates, 1, examples)).astype(np.float32)
    preference = rng.normal(0.0, PREFERENCE_SD, (replicates, 1, examples)).astype(np.float32)
    seed_shift = rng.normal(effect_points, seed_sd_points, (replicates, seeds, 1)).astype(np.float32) / 100 / _SLOPE
    half_shift = (preference + seed_shift) / 2
    shape = (replicates, seeds, examples)
    base = rng.random(shape, dtype=np.float32) < special.ndtr(_THRESHOLD - difficulty - half_shift)
    other = rng.random(shape, dtype=np.float32) < special.ndtr(_THRESHOLD - difficulty + half_shift)
    return base, other


def crossed_p(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``(R,)`` p-values of ducat's primary test, one per replicate of ``(R, S, N)`` correctness."""
    return np.array([seed_example_test(b, o).p for b, o in zip(base, other)])


def mcnemar_stouffer_p(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``(R,)`` two-sided p-values of the former test: per seed, the one-sided mid-p of "the other run is
    better" under Bin(discordant, 1/2); seeds combined by Stouffer's Z = sum(z_s) / sqrt(S)."""
    only_base, only_other = (base & ~other).sum(-1), (~base & other).sum(-1)
    discordant = only_base + only_other
    mid_p = stats.binom.sf(only_other, discordant, 0.5) + 0.5 * stats.binom.pmf(only_other, discordant, 0.5)
    z = stats.norm.isf(mid_p).sum(-1) / math.sqrt(base.shape[1])
    return 2 * stats.norm.sf(np.abs(z))


def _mixed_design(seeds: int, examples: int) -> tuple[np.ndarray, sparse.csr_matrix, np.ndarray]:
    """Fixed effects (intercept, other run) and the sparse random-effects design of the stacked rows
    ``[base (S*N), other (S*N)]``: example, seed, seed x run, example x run; ``ident`` names each column's group."""
    rows = 2 * seeds * examples
    seed = np.tile(np.repeat(np.arange(seeds), examples), 2)
    example = np.tile(np.arange(examples), 2 * seeds)
    is_other = np.repeat([0.0, 1.0], seeds * examples)

    def block(level: np.ndarray, levels: int, weight: np.ndarray) -> sparse.csr_matrix:
        return sparse.csr_matrix((weight, (np.arange(rows), level)), shape=(rows, levels))

    everyone = np.ones(rows)
    design = sparse.hstack([block(example, examples, everyone), block(seed, seeds, everyone),
                            block(seed, seeds, is_other), block(example, examples, is_other)]).tocsr()
    ident = np.repeat([0, 1, 2, 3], [examples, seeds, seeds, examples])
    return np.column_stack([np.ones(rows), is_other]), design, ident


def mixed_logistic_p(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``(R,)`` two-sided p-values of the run effect in statsmodels' crossed mixed logistic model (variational
    Bayes; z = posterior mean / posterior SD), one fit per replicate of ``(R, S, N)`` correctness."""
    from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

    fixed, design, ident = _mixed_design(*base.shape[1:])
    p = []
    for b, o in zip(base, other):
        outcome = np.concatenate([b.ravel(), o.ravel()]).astype(float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter of the optimizer
            fit = BinomialBayesMixedGLM(outcome, fixed, design, ident).fit_vb()
        p.append(2 * stats.norm.sf(abs(fit.fe_mean[1] / fit.fe_sd[1])))
    return np.array(p)


def rejection_table(methods: dict, replicates: int, seed_counts: list[int], examples: int,
                    seed_sds: list[float], effect: float, rng: np.random.Generator) -> list[str]:
    """Markdown rows: the share of replicates with p < ALPHA per method, seed count and seed SD."""
    rates: dict[tuple[str, int], list[str]] = {}
    discordant = []
    for seeds in seed_counts:
        for sd in seed_sds:
            base, other = simulate(rng, replicates, seeds, examples, sd, effect)
            discordant.append(float(np.mean(base != other)))
            for name, test in methods.items():
                rates.setdefault((name, seeds), []).append(f"{np.mean(test(base, other) < ALPHA):.3f}")
    lines = [f"N = {examples} examples, {replicates} replicates, true effect {effect:+g} points, "
             f"{100 * np.mean(discordant):.1f}% discordant pairs; Monte-Carlo SE at 5%: "
             f"{math.sqrt(ALPHA * (1 - ALPHA) / replicates):.4f}", "",
             "| method | seeds | " + " | ".join(f"seed SD {sd:g}" for sd in seed_sds) + " |",
             "|---|---|" + "---|" * len(seed_sds)]
    lines += [f"| {name} | {seeds} | " + " | ".join(cells) + " |" for (name, seeds), cells in rates.items()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--seed-sd", type=float, nargs="+", default=[0, 1, 2, 4], help="accuracy points")
    parser.add_argument("--effect", type=float, default=0.0, help="true mean difference, accuracy points")
    parser.add_argument("--mixed", type=int, default=0, help="replicates of the mixed logistic model (0: skip)")
    parser.add_argument("--mixed-examples", type=int, default=100)
    parser.add_argument("--mixed-seed-sd", type=float, nargs="+", default=[0, 4])
    parser.add_argument("--rng-seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.rng_seed)
    methods = {"crossed": crossed_p, "mcnemar+stouffer": mcnemar_stouffer_p}
    print("\n".join(rejection_table(methods, args.replicates, args.seeds, args.examples, args.seed_sd, args.effect,
                                    rng)), flush=True)
    if args.mixed:
        methods["mixed logistic"] = mixed_logistic_p
        print("\n" + "\n".join(rejection_table(methods, args.mixed, args.seeds[:1], args.mixed_examples,
                                               args.mixed_seed_sd, args.effect, rng)))


if __name__ == "__main__":
    main()
