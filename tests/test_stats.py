"""The paired tests of ``ducat reproduce``: the primary seeds x examples test on known answers and in the
simulation that picked it (false-positive rate with a true effect of 0, against the former per-seed McNemar +
Stouffer test), Holm's correction, the verdict rules, and how table and report print them.

The statsmodels candidate (a crossed mixed logistic model) takes minutes per fit at N = 500, so its comparison
is ``benchmarks/stats_simulation.py --mixed R``, not a test; the simulation here is the same code.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ducat.reproduce import text
from ducat.reproduce.results import Results, TableRow, fill_table
from ducat.reproduce.stats import (
    ALPHA,
    MIN_SEEDS,
    NO_DIFFERENCE,
    NOT_COMPUTABLE,
    TOO_FEW_SEEDS,
    SeedExampleTest,
    holm,
    seed_example_test,
    verdict,
)

ROOT = Path(__file__).resolve().parents[1]


def _simulation_module():
    spec = importlib.util.spec_from_file_location("stats_simulation", ROOT / "benchmarks" / "stats_simulation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("stats_simulation", module)
    spec.loader.exec_module(module)
    return module


SIMULATION = _simulation_module()
REPLICATES = 2000
EXAMPLES = 500
SEED_SDS = (0, 1, 2, 4)  # SD of the true per-seed effect, accuracy points
# Two Monte-Carlo standard errors of a rejection rate of exactly ALPHA over REPLICATES: a test at its level lands
# above ALPHA + TOLERANCE in about 2% of simulations (the RNG seeds are fixed, so every run gives the same rates).
TOLERANCE = 2 * math.sqrt(ALPHA * (1 - ALPHA) / REPLICATES)


def _runs(differences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Base and other correctness ``(S, N)`` whose other - base is ``differences`` (concordant: both wrong)."""
    d = np.array(differences)
    return d < 0, d > 0


def test_crossed_estimator_known_answers_by_hand():
    base, other = _runs([[1, 0, 0, 1], [0, 0, -1, 1], [1, 1, 0, 0]])
    test = seed_example_test(base, other)
    # seed means 1/2, 0, 1/2: variance 1/12, over S = 3 seeds 1/36; example means 2/3, 1/3, -1/3, 2/3:
    # variance 2/9, over N = 4 examples 1/18. SE^2 = 1/36 + 1/18 = 1/12; df = (1/12)^2 / ((1/36)^2/2 + (1/18)^2/3)
    assert (test.effect, test.seeds, test.examples) == (pytest.approx(1 / 3), 3, 4)
    assert test.df == pytest.approx(54 / 11)
    t_critical = scipy_stats.t.isf(0.025, 54 / 11)
    assert (test.ci_high - test.ci_low) / 2 == pytest.approx(t_critical * math.sqrt(1 / 12))
    assert test.p == pytest.approx(2 * scipy_stats.t.sf((1 / 3) / math.sqrt(1 / 12), 54 / 11))


def test_crossed_estimator_is_the_paired_t_test_at_either_extreme():
    # every example agrees within a seed: no example variance, the one-sample t-test of the seeds' differences
    per_seed = [1, 1, 0, 1, -1, 1]
    test = seed_example_test(*_runs([[d] * 7 for d in per_seed]))
    reference = scipy_stats.ttest_1samp(per_seed, 0.0)
    assert test.df == pytest.approx(len(per_seed) - 1) and test.p == pytest.approx(reference.pvalue)
    assert (test.ci_low, test.ci_high) == pytest.approx(tuple(reference.confidence_interval(0.95)))
    # every seed agrees: no seed variance, the one-sample t-test of the examples' differences
    per_example = [1, 0, 0, -1, 1, 1, 0, 1]
    test = seed_example_test(*_runs([per_example] * 5))
    reference = scipy_stats.ttest_1samp(per_example, 0.0)
    assert test.df == pytest.approx(len(per_example) - 1) and test.p == pytest.approx(reference.pvalue)


def test_crossed_estimator_edge_cases_are_stated_not_guessed():
    same = np.ones((5, 20), bool)
    identical = seed_example_test(same, same)
    assert (identical.effect, identical.p, identical.ci_low, identical.ci_high) == (0, 1, 0, 0)
    assert verdict(identical, holm([identical.p])[0]) == NO_DIFFERENCE
    always_better = seed_example_test(~same, same)  # every example flips in every seed: no noise to test against
    assert always_better.effect == 1 and math.isnan(always_better.p)
    assert verdict(always_better, holm([always_better.p])[0]) == NOT_COMPUTABLE  # nan >= 0.05 is False: guarded
    one_seed = seed_example_test(*_runs([[1, 1, 0, 1]]))
    assert one_seed.effect == 0.75 and math.isnan(one_seed.p) and math.isnan(one_seed.ci_low)
    with pytest.raises(ValueError, match="same examples"):
        seed_example_test(same, same[:, :-1])
    with pytest.raises(ValueError, match="seeds, examples"):
        seed_example_test(same[0], same[0])


def test_tiny_p_values_are_real_numbers():
    base = np.zeros((5, 500), bool)
    other = base.copy()
    other[:, :400] = True  # +80 points in every seed
    other[np.arange(5), 400 + np.arange(5)] = True  # a little seed-to-seed variation
    test = seed_example_test(base, other)
    assert 0 < test.p < 1e-100  # a survival function, not 1 - cdf: no floor at the float epsilon


def test_holm_known_answers():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    adjusted = holm([0.01, math.nan, 0.04])  # a NaN counts in the family (m = 3) and stays NaN
    assert adjusted[0] == pytest.approx(0.03) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.08)
    assert holm([]) == [] and holm([0.2]) == [0.2]


def _test(effect: float, seeds: int) -> SeedExampleTest:
    return SeedExampleTest(effect, effect - 0.01, effect + 0.01, 1e-9, seeds - 1.0, seeds, 500)


def test_verdict_needs_holm_p_below_alpha_and_enough_seeds():
    assert verdict(_test(0.05, MIN_SEEDS), 1e-9) == "gain" and verdict(_test(-0.05, MIN_SEEDS), 1e-9) == "loss"
    assert verdict(_test(0.05, MIN_SEEDS), ALPHA) == NO_DIFFERENCE
    assert verdict(_test(0.05, MIN_SEEDS - 1), 1e-9) == TOO_FEW_SEEDS == "too few seeds for a verdict"
    assert verdict(_test(0.05, MIN_SEEDS), math.nan) == NOT_COMPUTABLE
    assert verdict(_test(math.nan, MIN_SEEDS), 1e-9) == NOT_COMPUTABLE


def test_the_sign_of_a_verdict_is_the_estimated_effects():
    # the seeds: counts (base only / other only) 2/40 and 200/155 sum to -7 while Stouffer's z was +2.8
    d = np.zeros((2, 500), int)
    d[0, :2], d[0, 2:42], d[1, :200], d[1, 200:355] = -1, 1, -1, 1
    test = seed_example_test(*_runs(d.tolist()))
    assert test.effect == pytest.approx(-7 / 1000) and test.ci_low < 0 < test.ci_high
    assert verdict(test, holm([test.p])[0]) == TOO_FEW_SEEDS  # and 2 seeds get no verdict at all


@pytest.mark.parametrize("seeds", [5, 10])
def test_false_positive_rate_stays_at_alpha_where_mcnemar_stouffer_does_not(seeds):
    """True effect 0; N = 500 examples shared by every seed; ~12% discordant pairs; seed SD 0-4 points."""
    rng = np.random.default_rng(seeds)
    for seed_sd in SEED_SDS:
        base, other = SIMULATION.simulate(rng, REPLICATES, seeds, EXAMPLES, seed_sd)
        discordant = float(np.mean(base != other))
        assert abs(discordant - 0.12) < 0.01  # the scenario
        per_seed = 100 * (other.mean(-1) - base.mean(-1))  # observed differences: seed noise + test noise
        expected_sd = math.sqrt(seed_sd ** 2 + 100 ** 2 * discordant / EXAMPLES)
        assert np.std(per_seed, ddof=1) == pytest.approx(expected_sd, rel=0.1)
        crossed = float(np.mean(SIMULATION.crossed_p(base, other) < ALPHA))
        former = float(np.mean(SIMULATION.mcnemar_stouffer_p(base, other) < ALPHA))
        assert crossed <= ALPHA + TOLERANCE, (seeds, seed_sd, crossed)
        if seed_sd >= 2:
            assert former > ALPHA + TOLERANCE, (seeds, seed_sd, former)


def test_the_primary_test_finds_a_real_effect():
    base, other = SIMULATION.simulate(np.random.default_rng(1), 200, 5, EXAMPLES, 1, effect_points=4)
    assert np.mean(SIMULATION.crossed_p(base, other) < ALPHA) > 0.85  # power ~0.94 in 400 replicates


def _write_run(out: Path, name: str, clean: np.ndarray, worst: np.ndarray) -> None:
    run = out / "runs" / name / "eval"
    run.mkdir(parents=True)
    report = {"clean_accuracy": float(clean.mean()), "worst_case": {"robust_accuracy": float(worst.mean())},
              "results": [], "dummy_classes": "ducat" in name}
    (run / "report.json").write_text(json.dumps(report))
    np.savez(run / "masks.npz", clean=clean, worst_case=worst)


def _table(out: Path, seeds: int) -> Results:
    """Two methods with and without DUCAT; PGD-AT + DUCAT gains 10 points of clean accuracy in every seed."""
    rng = np.random.default_rng(seeds)
    rows = []
    for method, label in (("pgd_at", "PGD-AT"), ("trades", "TRADES")):
        rows += [TableRow(method, label, [f"{method}-s{s}" for s in range(seeds)]),
                 TableRow(f"{method}-ducat", f"{label} + DUCAT", [f"{method}-ducat-s{s}" for s in range(seeds)],
                          base=method)]
        for s in range(seeds):
            clean, worst = rng.random(EXAMPLES) < 0.7, rng.random(EXAMPLES) < 0.4
            _write_run(out, f"{method}-s{s}", clean, worst)
            extra = (rng.random(EXAMPLES) < 0.35) if method == "pgd_at" else np.zeros(EXAMPLES, bool)
            _write_run(out, f"{method}-ducat-s{s}", clean | extra, worst)
    fill_table(rows, out)
    return Results(rows, {}, {})


def _verdict_words(markdown: str) -> list[str]:
    return re.findall(r"\b(?:gain|loss)\b", markdown, flags=re.IGNORECASE)


def test_report_below_five_seeds_gives_no_verdict_anywhere(tmp_path):
    results = _table(tmp_path, MIN_SEEDS - 2)
    markdown = text._significance(results) + text._reading(results)
    assert not _verdict_words(markdown), _verdict_words(markdown)
    assert markdown.count(TOO_FEW_SEEDS) >= 4 + 4 + 1  # table cells, reading sentences, the open question
    assert "Holm's correction adjusts p across all 4 tests" in markdown
    stats = results.rows[1].stats()["clean"]
    assert stats["seeds"] == MIN_SEEDS - 2 and stats["p"] < ALPHA and stats["verdict"] == TOO_FEW_SEEDS
    assert results.rows[1].stats()["worst"]["df"] is None  # identical worst cases: no variation, df undefined
    json.dumps(results.to_json(), allow_nan=False)  # strict JSON: a statistic not computable is null, never NaN


def test_report_with_enough_seeds_prints_effect_interval_holm_and_mcnemar(tmp_path):
    results = _table(tmp_path, MIN_SEEDS)
    all_stats = [r.stats()[m] for r in results.rows if r.base is not None for m in ("clean", "worst")]
    assert [s["p_holm"] for s in all_stats] == pytest.approx(holm([s["p"] for s in all_stats]))
    gain = all_stats[0]
    assert gain["verdict"] == "gain" and gain["ci_low"] < gain["effect"] < gain["ci_high"]
    assert len(gain["per_seed"]) == MIN_SEEDS and all(t["only_base"] == 0 for t in gain["per_seed"])
    table = text._significance(results)
    row = next(line for line in table.splitlines() if line.startswith("| PGD-AT + DUCAT | clean |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{100 * gain['effect']:+.2f}"
    assert cells[3] == f"[{100 * gain['ci_low']:+.2f}, {100 * gain['ci_high']:+.2f}]"
    assert cells[6] == "gain" and cells[7].count("(0/") == MIN_SEEDS  # McNemar per seed, descriptive
    reading = text._reading(results)
    assert "**PGD-AT + DUCAT** vs PGD-AT: clean gain (+" in reading and "Holm p" in reading
    assert "At this scale: **PGD-AT + DUCAT**." in reading  # the only row with a clean verdict above its base
