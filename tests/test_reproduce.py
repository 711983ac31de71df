"""``ducat reproduce``: the grid plan (trunks and forks), its input checks, the statistics, and (slow) the
smoke grid end to end."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ducat import reproduce as rp
from ducat.cli import main
from ducat.reproduce.stats import TOO_FEW_SEEDS, holm, mcnemar, seed_example_test, verdict
from ducat.train import trunk_key

BACKGROUND_READS = ("smoke_grid",)  # conftest.py's background lane


@pytest.mark.parametrize("scale", list(rp.SCALES))
def test_plan_forks_every_ducat_run_from_a_trunk_it_can_share(scale, tmp_path):
    s = rp.SCALES[scale]
    runs = rp.plan(s)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    by_name = {r.name: r for r in runs}
    assert sum(r.group == "main" for r in runs) == 2 * len(s.methods) * s.seeds  # methods x +-DUCAT x seeds
    assert sum(r.group == "toy" for r in runs) == s.toy
    assert sum(r.group == "variant" for r in runs) == len(s.variants) * s.seeds
    for run in runs:
        config = rp.run_config(run, tmp_path, None)  # every preset + override combination validates
        assert config.optim.epochs == s.epochs
        assert config.ducat.enabled == run.ducat
        if run.trunk is None:
            continue
        trunk = by_name[run.trunk]
        trunk_config = rp.run_config(trunk, tmp_path, None)
        assert names.index(trunk.name) < names.index(run.name)  # the trunk is trained first
        assert run.fork_epoch in trunk_config.run.save_epochs and run.fork_epoch <= trunk.fork_epoch
        assert config.ducat.start_epoch == run.fork_epoch + 1 < trunk_config.ducat.start_epoch + 1
        assert trunk_key(config) == trunk_key(trunk_config)  # identical before the DUCAT start: exact sharing


@pytest.mark.parametrize("args, needle", [
    (["reproduce", "--scale", "huge"], "invalid choice"),
    (["reproduce", "--scale", "smoke", "--seeds", "0"], "--seeds must be >= 1"),
    (["reproduce", "--scale", "smoke", "--variants", "pgd_at-ducat-merged,magic"], "unknown variant 'magic'"),
    (["reproduce", "--scale", "paper", "--data-root", "EMPTY"], "CIFAR"),
])
def test_reproduce_bad_input_is_one_line_and_exit_2(args, needle, tmp_path, capsys):
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args] + ["--out", str(tmp_path / "out")]
    (tmp_path / "empty").mkdir()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ducat: error: ") or "usage:" in err, err
    assert needle in err
    assert not (tmp_path / "out" / "runs").exists()  # no compute, nothing written


def test_grid_cost_counts_each_trunk_once_and_each_fork_from_its_fork_epoch(tmp_path):
    from dataclasses import replace

    from ducat.presets import ONE_GPU, Work, estimate_seconds, training_work
    from ducat.reproduce.grid import grid_seconds

    ducat_run = next(r for r in rp.plan(rp.SCALES["paper"]) if r.name == "pgd_at-ducat-s0")
    ducat_config = rp.run_config(ducat_run, tmp_path, None)
    assert ducat_config.ducat.start_epoch == 105
    for split in (1, 50, 104, 105, 129):  # a run is its first epochs plus the rest, DUCAT epochs included
        parts = training_work(ducat_config, 1, split) + training_work(ducat_config, split + 1)
        whole = training_work(ducat_config)
        assert parts.flops == whole.flops and parts.passes == whole.passes
    assert training_work(ducat_config, 131).flops == 0
    scale = replace(rp.SCALES["paper"], seeds=1, variants=(), ablations={})
    runs = rp.plan(scale)
    full = {r.name: estimate_seconds(rp.run_config(r, tmp_path, None), ONE_GPU) for r in runs if r.group != "trunk"}
    trunk_share = {r.name: training_work(rp.run_config(r, tmp_path, None), 1, r.fork_epoch) for r in runs
                   if r.group == "trunk"}
    forks = [r for r in runs if r.trunk is not None]
    shared = sum((trunk_share[r.trunk] for r in forks), Work(0.0, 0.0)).seconds(ONE_GPU) - sum(
        t.seconds(ONE_GPU) for t in trunk_share.values())  # trunk epochs every fork but one would repeat
    assert len(forks) == 5 and len(trunk_share) == 4  # pgd_at's trunk is shared by its DUCAT run and the toy case
    assert grid_seconds(scale, ONE_GPU) == pytest.approx(sum(full.values()) - shared, rel=1e-9)
    assert shared > 0


def test_exact_mcnemar_known_answers():
    base = np.array([1, 1, 0, 0, 1] + [0] * 9 + [1] * 6, bool)
    other = np.array([1, 0, 0, 1, 1] + [1] * 9 + [1] * 6, bool)
    test = mcnemar(base, other)
    assert (test.only_base, test.only_other, test.n) == (1, 10, 20)
    assert test.p == pytest.approx(2 * (1 + 11) / 2 ** 11)  # two-sided exact binomial, by hand
    assert test.difference == pytest.approx(9 / 20)
    assert mcnemar(base, base).p == 1.0
    with pytest.raises(ValueError, match="different examples"):
        mcnemar(base, other[:-1])


def test_seeds_combine_with_direction():
    """Per seed, the other run is right on about 10 points more of the examples (gain) or 15 fewer (loss)."""
    rng = np.random.default_rng(0)
    base = rng.random((6, 500)) < 0.6
    flips = rng.random((6, 500)) < 0.25
    better, worse = base | flips, base & ~flips
    alternating = np.where(np.arange(6)[:, None] % 2 == 0, better, worse)
    gains, losses, mixed = (seed_example_test(base, o) for o in (better, worse, alternating))
    assert mixed.p > 0.5 and mixed.ci_low < 0 < mixed.ci_high  # opposite seeds cancel, never add up
    assert gains.p < seed_example_test(base[:5], better[:5]).p < 1e-6  # consistent seeds strengthen each other
    se = (gains.ci_high - gains.effect) / scipy_stats.t.isf(0.025, gains.df)
    assert se > np.std(better.mean(1) - base.mean(1), ddof=1) / np.sqrt(6)  # examples count as noise beside seeds
    adjusted = holm([gains.p, losses.p, mixed.p])
    assert [verdict(t, p) for t, p in zip((gains, losses, mixed), adjusted)] == ["gain", "loss",
                                                                                   "no significant difference"]
    assert verdict(seed_example_test(base[:4], better[:4]), 1e-12) == TOO_FEW_SEEDS


@pytest.mark.slow
def test_smoke_grid_end_to_end_then_rerun_skips_everything(background):
    """The shared smoke grid (conftest.py: one seed, single-threaded, one evaluation worker)."""
    done = background.result("smoke_grid")
    assert done.returncode == 0, done.stderr[-3000:]
    out, lines = done.out, done.stdout.splitlines()
    report = (out / "report.md").read_text()
    scale = rp.SCALES["smoke"].with_seeds(1)
    runs = rp.plan(scale)
    assert sum(line.endswith(": training") for line in lines) == sum(r.trunk is None for r in runs)
    assert sum("forked from" in line for line in lines) == sum(r.trunk is not None for r in runs)

    # every section and figure is there, and every figure is a real PNG
    for heading in ("table 1", "Paired tests", "Reading", "fig. 2", "fig. 3", "fig. 4", "fig. 5", "fig. 6",
                    "figs. 7 and 9", "fig. 8", "fig. 10", "table 4", "Training curves"):
        assert heading in report, heading
    figures = re.findall(r"!\[\]\((figures/[^)]+)\)", report)
    assert len(figures) >= 10
    for figure in figures:
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure

    # table 1 is the per-run evaluation, and AutoAttack and the DAWA-style attack ran
    results = json.loads((out / "results.json").read_text())
    rows = {r["key"]: r for r in results["table1"]}
    assert len(rows) == 8 + 1
    for row in rows.values():
        reports = [json.loads((out / "runs" / name / "eval" / "report.json").read_text()) for name in row["runs"]]
        assert len(reports) == 1
        assert row["values"]["clean"] == [r["clean_accuracy"] for r in reports]
        assert row["values"]["worst"] == [r["worst_case"]["robust_accuracy"] for r in reports]
        assert all(v is not None for v in row["values"]["adaptive-autoattack"])
        if row["base"] is not None:
            assert all(v is not None for v in row["values"]["adaptive-dawa"])
            stats = row["stats"]
            assert len(stats["clean"]["per_seed"]) == 1 and stats["clean"]["seeds"] == 1
            assert stats["worst"]["p"] is None and stats["worst"]["ci_low"] is None  # one seed: no seed variance
            assert stats["clean"]["verdict"] == stats["worst"]["verdict"] == TOO_FEW_SEEDS
    tested = report.split("## Does DUCAT change accuracy?")[1].split("## Always-failed")[0]
    assert TOO_FEW_SEEDS in tested and not re.search(r"\b(gain|loss)\b", report, flags=re.IGNORECASE)  # anywhere
    table = report.split("## Main results")[1].split("##")[0]
    assert "PGD-AT + DUCAT, merged training attack" in table

    # a rerun trains and evaluates nothing new, and writes the same tables
    lines = []
    again = rp.reproduce("smoke", out, seeds=1, workers=1, log=lines.append).read_text()
    assert sum("finished, skipped" in line for line in lines) == len(runs)
    assert not any(line.endswith(": training") or "forked" in line for line in lines)
    strip = lambda text: text.split("## Training time")[0]  # noqa: E731
    assert strip(again) == strip(report)

    # another setting in the same directory is refused, not mixed in
    assert main(["reproduce", "--scale", "smoke", "--seeds", "3", "--out", str(out)]) == 2
