"""``ducat reproduce``: the grid plan, its input checks, and (slow) the smoke grid end to end."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ducat import reproduce as rp
from ducat.cli import main


@pytest.mark.parametrize("scale", ["smoke", "mini", "paper"])
def test_plan_is_valid_and_forks_from_saved_base_epochs(scale, tmp_path):
    runs = rp.plan(rp.SCALES[scale])
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    by_name = {r.name: r for r in runs}
    main_runs = [r for r in runs if r.group == "main"]
    assert len(main_runs) == 8 * rp.SCALES[scale].seeds  # 4 methods x with/without DUCAT x seeds
    for run in runs:
        config = rp.run_config(run, tmp_path, None)  # every preset + override combination validates
        assert config.optim.epochs == rp.SCALES[scale].epochs
        if run.fork_from is None:
            assert not run.ducat
            continue
        base, epoch = run.fork_from
        assert names.index(base) < names.index(run.name)  # the base is trained first
        base_config = rp.run_config(by_name[base], tmp_path, None)
        assert epoch in base_config.run.save_epochs  # the base keeps the checkpoint the fork needs
        assert config.finetune.start_epoch == epoch + 1
        start = run.ablation[1] if run.ablation and run.ablation[0] == "start_epoch" else rp.SCALES[scale].start_epoch
        assert config.ducat.start_epoch == start == epoch + 1


@pytest.mark.parametrize("args, needle", [
    (["reproduce", "--scale", "huge"], "invalid choice"),
    (["reproduce", "--scale", "smoke", "--seeds", "0"], "--seeds must be >= 1"),
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


@pytest.mark.slow
def test_smoke_grid_end_to_end_then_rerun_skips_training(tmp_path):
    out = tmp_path / "grid"
    lines: list[str] = []
    report = rp.reproduce("smoke", out, log=lines.append).read_text()
    runs = rp.plan(rp.SCALES["smoke"])
    assert sum("training" in line for line in lines) == len(runs)

    # every section and figure of the paper is there, and every figure is a real PNG
    for heading in ("table 1", "fig. 2", "fig. 3", "fig. 4", "fig. 5", "fig. 6", "figs. 7 and 9", "fig. 8",
                    "fig. 10", "table 4"):
        assert heading in report, heading
    figures = re.findall(r"!\[\]\((figures/[^)]+)\)", report)
    assert len(figures) >= 10
    for figure in figures:
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure

    # table 1 is the per-run evaluation, not something else: clean and worst case match report.json
    table = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[1].replace(".", "").isdigit():
            table[cells[0]] = cells
    assert len(table) == 8
    for run in (r for r in runs if r.group == "main"):
        evaluation = json.loads((out / "runs" / run.name / "eval" / "report.json").read_text())
        row = table[rp.METHOD_LABELS[run.method] + (" + DUCAT" if run.ducat else "")]
        assert float(row[1]) == pytest.approx(100 * evaluation["clean_accuracy"], abs=0.006)
        assert float(row[5]) == pytest.approx(100 * evaluation["worst_case"]["robust_accuracy"], abs=0.006)
        if run.ducat:  # the worst case includes the paper's own attack scored the same way, so it is never higher
            assert float(row[5]) <= float(row[3]) + 1e-9

    # a rerun trains nothing and rewrites the same tables from the cached evaluations
    lines.clear()
    again = rp.reproduce("smoke", out, log=lines.append).read_text()
    assert sum("finished, skipped" in line for line in lines) == len(runs)
    assert not any(line.endswith(": training") for line in lines)
    strip = lambda text: text.split("## Training time")[0]  # noqa: E731
    assert strip(again) == strip(report)
