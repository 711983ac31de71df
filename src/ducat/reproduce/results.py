"""Stage 1 of a report: evaluate every run and compute everything the tables and figures show.

The output is plain data (:class:`Results`): no figure is drawn and no text written here. Evaluations
are cached per run (``RUN/eval``), so a rerun only computes what is missing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import ducat.eval.catalog as catalog
from ducat import analysis
from ducat.eval import table_columns
from ducat.objectives import METHODS
from ducat.reproduce.evaluation import evaluate_run
from ducat.reproduce.grid import GridRun
from ducat.reproduce.models import transfer_between, tsne_features
from ducat.reproduce.scales import VARIANTS, Scale
from ducat.reproduce.stats import McNemar, SeedExampleTest, holm, mcnemar, seed_example_test, verdict

MEASURES = {"clean": "clean", "worst": "worst_case"}  # measure of the paired tests -> its key in masks.npz


@dataclass
class TableRow:
    """One row of table 1: a method with or without DUCAT (or a variant), one run per seed."""

    key: str
    label: str
    runs: list[str]
    base: str | None = None  # the row this one is compared with
    values: dict[str, list[float | None]] = field(default_factory=dict)  # column -> per-seed accuracy
    tests: dict[str, SeedExampleTest] = field(default_factory=dict)  # measure -> primary test, seeds x examples
    holm_p: dict[str, float] = field(default_factory=dict)  # measure -> its p, Holm-adjusted over the whole table
    per_seed: dict[str, list[McNemar]] = field(default_factory=dict)  # measure -> McNemar per seed (descriptive)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per measure: the primary test (``effect``, ``ci_low``, ``ci_high``: fractions; ``p``, ``p_holm``, ``df``,
        ``seeds``, ``examples``), its ``verdict`` and each seed's McNemar test; None where not computable."""
        return {name: {**{k: _number(v) for k, v in test.__dict__.items()}, "p_holm": _number(self.holm_p[name]),
                       "verdict": verdict(test, self.holm_p[name]),
                       "per_seed": [t.__dict__ for t in self.per_seed[name]]}
                for name, test in self.tests.items()}


def _number(value: float) -> float | None:
    """A statistic for ``results.json``: None for NaN (not computable), which strict JSON cannot hold."""
    return None if math.isnan(value) else value


@dataclass
class Results:
    """Everything the report shows, as plain data; figures are drawn from it in stage 2."""

    rows: list[TableRow]
    figures: dict[str, Any]
    reports: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        rows = [{"key": r.key, "label": r.label, "runs": r.runs, "base": r.base, "values": r.values,
                 "stats": r.stats()} for r in self.rows]
        return {"table1": rows, "columns": [c for c, _ in table_columns()]}


def evaluate_runs(runs: list[GridRun], scale: Scale, out: Path, data_root: str | None,
                  log: Callable[[str], None], workers: int | None = None) -> None:
    """Evaluate every finished run (not the trunks) under both protocols; cached in ``RUN/eval``."""
    for run in runs:
        if run.group != "trunk":
            log(f"  {run.name}: evaluating")
            evaluate_run(run, scale, out, data_root, workers)


def report_of(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / "runs" / name / "eval" / "report.json").read_text())


def masks_of(out: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(out / "runs" / name / "eval" / "masks.npz") as data:
        return dict(data)


def accuracy(report: dict[str, Any], column: str) -> float | None:
    """A table-1 cell of one run: clean, the worst case or a result id (raw-autoattack of a plain model is
    its AutoAttack: without dummy classes the raw argmax is the prediction)."""
    if column == "clean":
        return report["clean_accuracy"]
    if column == "worst":
        return report["worst_case"]["robust_accuracy"]
    if column == catalog.raw_autoattack.id and not report["dummy_classes"]:
        column = catalog.paper_autoattack.id
    return next((r["robust_accuracy"] for r in report["results"] if r["id"] == column), None)


def table_rows(scale: Scale) -> list[TableRow]:
    """Table 1's rows: each method without and with DUCAT, then the variants, each over the scale's seeds."""
    seeds = range(scale.seeds)
    rows = []
    for method in scale.methods:
        objective = METHODS[method]
        rows.append(TableRow(method, objective.label, [f"{method}-s{s}" for s in seeds]))
        rows.append(TableRow(f"{method}-ducat", f"{objective.label} + DUCAT", [f"{method}-ducat-s{s}" for s in seeds],
                             base=method))
    for name in scale.variants:
        rows.append(TableRow(name, VARIANTS[name].label, [f"{name}-s{s}" for s in seeds], base=VARIANTS[name].method))
    return rows


def fill_table(rows: list[TableRow], out: Path) -> None:
    """Per-seed accuracies of every row, and the paired tests of every row against its base, their p-values
    Holm-adjusted across every test of the table."""
    by_key = {r.key: r for r in rows}
    for row in rows:
        reports = [report_of(out, name) for name in row.runs]
        row.values = {c: [accuracy(r, c) for r in reports] for c, _ in table_columns()}
        if row.base is not None:
            _compare(row, by_key[row.base], out)
    family = [(row, measure) for row in rows for measure in row.tests]
    for (row, measure), adjusted in zip(family, holm([row.tests[measure].p for row, measure in family])):
        row.holm_p[measure] = adjusted


def _compare(row: TableRow, base: TableRow, out: Path) -> None:
    """Per measure, the primary test of ``row`` against ``base`` on the ``(seeds, examples)`` masks of all their
    seeds (seed s of one paired with seed s of the other), and each seed's McNemar test."""
    base_masks, row_masks = [masks_of(out, n) for n in base.runs], [masks_of(out, n) for n in row.runs]
    for measure, key in MEASURES.items():
        base_correct, row_correct = np.stack([m[key] for m in base_masks]), np.stack([m[key] for m in row_masks])
        row.tests[measure] = seed_example_test(base_correct, row_correct)
        row.per_seed[measure] = [mcnemar(b, o) for b, o in zip(base_correct, row_correct)]


def collect(runs: list[GridRun], scale: Scale, out: Path, data_root: str | None) -> Results:
    """Stage 1: table 1 with its statistics, and the data of every figure (seed 0 where one run is shown)."""
    rows = table_rows(scale)
    fill_table(rows, out)
    several = len(scale.methods) > 1  # figs. 2 and 3 compare the base defenses with each other
    figures: dict[str, Any] = {
        "overlap": _overlap(out, scale) if several else None,
        "transfer": transfer_between([f"{m}-s0" for m in scale.methods], out, scale, data_root) if several else None,
        "toy": _toy_curves(out, scale) if scale.toy else None,
        "tradeoff": _tradeoff_points(rows),
        "timing": _timing(out, scale),
        "ablations": _ablations(runs, out, scale),
        "confusion": _confusion(out),
        "tsne": tsne_features(out, scale, data_root),
        "targeted": targeted_columns(out, scale),
        "curves": {name: analysis.read_metrics(out / "runs" / name)
                   for name in ("pgd_at-s0", "pgd_at-ducat-s0", *[f"{v}-s0" for v in scale.variants])},
    }
    reports = {r.name: report_of(out, r.name) for r in runs if r.group != "trunk"}
    return Results(rows, figures, reports)


def _overlap(out: Path, scale: Scale) -> dict[str, Any]:
    """Fig. 2: examples every base defense defends or fails alike under the adaptive PGD-10 (seed 0)."""
    labels = masks_of(out, f"{scale.methods[0]}-s0")["labels"]
    return analysis.always_failed_overlap(
        {METHODS[m].label: masks_of(out, f"{m}-s0")[catalog.adaptive_pgd10.id] for m in scale.methods}, labels,
        int(labels.max()) + 1)


def _toy_curves(out: Path, scale: Scale) -> dict[str, dict[str, float | None]]:
    strongest, title = ((catalog.paper_autoattack.id, "AutoAttack (paper)") if "autoattack" in scale.eval_attacks
                        else (catalog.paper_pgd100.id, "PGD-100 (paper)"))
    curves = {}
    for label, name in (("toy (hard labels)", "pgd_at-toy-s0"), ("DUCAT (soft labels)", "pgd_at-ducat-s0"),
                        ("PGD-AT", "pgd_at-s0")):
        report = report_of(out, name)
        values = {"clean": accuracy(report, "clean"), "PGD-10 (paper)": accuracy(report, catalog.paper_pgd10.id),
                  title: accuracy(report, strongest), "adaptive worst": accuracy(report, "worst")}
        curves[label] = {k: v for k, v in values.items() if v is not None}
    return curves


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _tradeoff_points(rows: list[TableRow]) -> list[dict[str, Any]]:
    points = []
    for row in rows:
        paper_aa = catalog.paper_autoattack.id
        strongest = paper_aa if _mean(row.values[paper_aa]) is not None else catalog.paper_pgd100.id
        clean = _mean(row.values["clean"])
        points.append({"name": row.label, "clean": clean, "robust": _mean(row.values[strongest]),
                       "group": "paper protocol, " + ("AutoAttack" if "auto" in strongest else "PGD-100")})
        points.append({"name": row.label, "clean": clean, "robust": _mean(row.values["worst"]),
                       "group": "adaptive worst case"})
    return points


def _timing(out: Path, scale: Scale) -> dict[str, dict[str, float]]:
    """Median epoch time (training only) of each method's seed-0 base run and of its DUCAT run's DUCAT epochs,
    each run's first epoch left out as warm-up."""
    times = {}
    for method in scale.methods:
        objective = METHODS[method]
        base = analysis.read_metrics(out / "runs" / f"{method}-s0")[1:]
        ducat = [r for r in analysis.read_metrics(out / "runs" / f"{method}-ducat-s0") if r["ducat_active"]][1:]
        times[objective.label] = {"base": float(np.median([r["epoch_time_s"] for r in base])),
                                  "ducat": float(np.median([r["epoch_time_s"] for r in ducat or base]))}
    return times


def _ablations(runs: list[GridRun], out: Path, scale: Scale) -> dict[str, dict[str, list[float | None]]]:
    defaults = {"start_epoch": scale.start_epoch, "beta1": 0.75, "beta2": 1.0, "alpha": 0.5}
    result = {}
    for param in scale.ablations:
        entries = sorted([(defaults[param], "pgd_at-ducat-s0")] + [
            (r.ablation[1], r.name) for r in runs if r.group == "ablation" and r.ablation[0] == param])
        reports = [report_of(out, name) for _, name in entries]
        result[param] = {"values": [v for v, _ in entries], "clean": [accuracy(r, "clean") for r in reports],
                         "paper": [accuracy(r, catalog.paper_pgd10.id) for r in reports],
                         "adaptive": [accuracy(r, "worst") for r in reports]}
    return result


def _confusion(out: Path) -> dict[str, Any]:
    masks = masks_of(out, "pgd_at-ducat-s0")
    report = report_of(out, "pgd_at-ducat-s0")
    dummy_index = np.asarray(report["dummy_index"])
    raw = masks[f"{catalog.paper_pgd10.id}/raw_predictions"]
    matrix = analysis.confusion_under_attack(masks["labels"], raw, len(dummy_index), dummy_index)
    return {"matrix": matrix, "sink_rate": report["sink_rate"]}


def targeted_columns(out: Path, scale: Scale) -> dict[str, dict[str, float | None]]:
    """Table 4: accuracy under the targeted attacks, PGD-AT and PGD-AT + DUCAT (seed 0)."""
    columns = ((catalog.paper_targeted_original.id, "random other class, paper protocol"),
               (catalog.adaptive_targeted_original.id, "random other class, projected"),
               (catalog.paper_targeted_dummy.id, "dummy of a random other class, paper protocol"),
               (catalog.adaptive_targeted_top.id, f"PGD-100 margin to the top-{scale.n_targets} classes, projected"))
    return {label: {title: accuracy(report_of(out, name), key) for key, title in columns}
            for label, name in (("PGD-AT", "pgd_at-s0"), ("PGD-AT + DUCAT", "pgd_at-ducat-s0"))}
