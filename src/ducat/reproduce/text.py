"""Stage 3 of a report: the markdown, from the computed results and the drawn figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import ducat.eval.catalog as catalog
from ducat import analysis
from ducat.analysis.tables import effect_text, p_text
from ducat.eval import table_columns
from ducat.reproduce.results import Results, TableRow
from ducat.reproduce.scales import VARIANTS, Scale
from ducat.reproduce.stats import ALPHA, MIN_SEEDS, TOO_FEW_SEEDS


def report_markdown(results: Results, figures: dict[str, Path], scale: Scale, footer: str) -> str:
    """The whole ``report.md``; figure links are relative to the report's directory."""
    link = {name: f"figures/{path.name}" for name, path in figures.items()}
    sections = [_header(scale), _table1(results, scale), _significance(results), _reading(results),
                _paper_figures(results, link, scale), footer]
    return "\n\n".join(sections) + "\n"


def _header(scale: Scale) -> str:
    lines = [f"# DUCAT reproduction, scale `{scale.name}`", "",
             f"Preset family `{scale.family}` with `{' '.join(scale.overrides) or '(no overrides)'}`; {scale.epochs} "
             f"epochs, lr x0.1 after epochs {list(scale.milestones)}, DUCAT from epoch {scale.start_epoch}; "
             f"{scale.seeds} seed(s); every run evaluated on the same first {scale.eval_examples} test examples.", "",
             "Schedule as the paper specifies it: every DUCAT run has the 2C head from epoch 1 and trains with hard "
             "labels before its DUCAT start epoch t, with one optimizer state throughout. The hard-label epochs are "
             "trained once per method, seed and variant (a *trunk*) and each DUCAT run continues a copy of the trunk's "
             "epoch t-1 checkpoint (weights, optimizer and RNG state): the same run as one trained from scratch.", "",
             "Protocols: the **paper** protocol attacks the raw 2C logits with the attack's own objective and scores "
             "after the projection (an input pushed into the dummy class of its own label counts as robust). "
             "**raw-autoattack** is the released code's AutoAttack call: raw 2C logits attacked and scored, no "
             "projection. **Adaptive** attacks know the projection: PGD and AutoAttack on the max- and "
             "logsumexp-merged logits, a DAWA-style weighted cross-entropy over y and dummy(y) on the raw logits, "
             "margin and targeted attacks. The **worst case** counts an example as robust only if it survived every "
             "attack of both protocols, scored on the deployed classifier."]
    if scale.equal_effort:
        lines += ["", "Equal effort: a base run (no dummy classes) meets fewer attacks than its DUCAT runs, and random "
                  "restarts alone would tilt the worst case against DUCAT, so every base run's worst case also counts "
                  "extra PGD-100 margin restarts on its survivors, as many as make its attack runs per example equal "
                  "to a DUCAT run's (the `adaptive-extra-restarts` row of each base run's `eval/report.md`)."]
    if scale.cuts:
        lines += ["", f"Cut to fit this scale's time: {scale.cuts}."]
    return "\n".join(lines)


def _table1(results: Results, scale: Scale) -> str:
    columns = table_columns()
    rows = [(r.label, [r.values[c] for c, _ in columns]) for r in results.rows]
    lines = ["## Main results (layout of the paper's table 1; accuracy %, mean ± std over seeds)", "",
             analysis.main_table([h for _, h in columns], rows), "",
             "'-': not run at this scale, or not applicable (a model without dummy classes has no dummy-aware attack; "
             "its raw-autoattack column is its AutoAttack)."]
    variants = [VARIANTS[v] for v in scale.variants]
    if variants:
        lines += ["", "Variants (rows below the paper's grid), and why each is tested:"]
        lines += [f"- {v.label} (`{' '.join(v.overrides)}`): {v.why}." for v in variants]
    return "\n".join(lines)


def _significance(results: Results) -> str:
    rows = [(r.label, r.stats()) for r in results.rows if r.base is not None]
    return "\n".join([
        "## Does DUCAT change accuracy? Paired tests against the base run (same seed, same examples)", "",
        "The unit is the trained model: the effect (run minus base, accuracy points, averaged over seeds and "
        "examples) has a standard error that counts both the seed-to-seed training noise and the test-example "
        "noise (crossed random effects, Welch-Satterthwaite t, 95% CI). "
        f"Holm's correction adjusts p across all {sum(len(m) for _, m in rows)} tests of the table, and a verdict "
        f"needs Holm p < {ALPHA} and at least {MIN_SEEDS} seeds; fewer seeds get none. Per-seed exact McNemar tests "
        "are descriptive: a small p says that seed's two networks differ beyond test noise, not that the training "
        "methods do. Measures: **clean** accuracy and the adaptive **worst case**.", "",
        analysis.significance_table(rows)])


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _reading(results: Results) -> str:
    """One sentence per compared row, from the tests, and the paper-vs-adaptive gap per row."""
    by_key = {r.key: r for r in results.rows}
    lines = ["## Reading, generated from the tests above", ""]
    for row in (r for r in results.rows if r.base is not None):
        stats = row.stats()
        base = by_key[row.base]
        lines.append(f"- **{row.label}** vs {base.label}: clean {_said(stats['clean'])}; worst case "
                     f"{_said(stats['worst'])}. Paper-protocol minus worst case: {_gap(row)} "
                     f"(base: {_gap(base)}).")
    lines += ["", _open_question(results)]
    return "\n".join(lines)


def _said(stats: dict[str, Any]) -> str:
    """The verdict of one paired test with its effect, 95% CI, p and Holm p: ``loss (-2.10 points, 95% CI
    [-3.50, -0.70], p 0.0031, Holm p 0.025)``."""
    effect, interval = effect_text(stats)
    return (f"{stats['verdict']} ({effect} points, 95% CI {interval}, p {p_text(stats['p'])}, "
            f"Holm p {p_text(stats['p_holm'])})")


def _gap(row: TableRow) -> str:
    paper = _mean(row.values[catalog.paper_autoattack.id]) or _mean(row.values[catalog.paper_pgd100.id]) \
        or _mean(row.values[catalog.paper_pgd10.id])
    worst = _mean(row.values["worst"])
    return "-" if paper is None or worst is None else f"{100 * (paper - worst):.2f} points"


def _open_question(results: Results) -> str:
    """Does any dummy-class row have a clean-accuracy verdict above its base with honest robustness >= PGD-AT's?
    Only a verdict counts; with too few seeds for any, the answer says so."""
    pgd_at = next(r for r in results.rows if r.key == "pgd_at")
    floor = _mean(pgd_at.values["worst"])
    verdicts = {row.label: (row.stats()["clean"]["verdict"], _mean(row.values["worst"]) or 0)
                for row in results.rows if row.base is not None}
    keepers = [label for label, (said, worst) in verdicts.items() if said == "gain" and worst >= (floor or 0)]
    if keepers:
        answer = ", ".join(keepers)
    else:
        answer = f"no answer, {TOO_FEW_SEEDS}" if all(s == TOO_FEW_SEEDS for s, _ in verdicts.values()) else "none"
    return (f"Open question: which dummy-class runs have clean accuracy significantly above their base's (a verdict: "
            f"Holm p < {ALPHA}, at least {MIN_SEEDS} seeds) while their adaptive worst case is at least PGD-AT's "
            f"({100 * (floor or 0):.2f}%)? At this scale: **{answer}**.")


def _paper_figures(results: Results, link: dict[str, str], scale: Scale) -> str:
    f = results.figures
    sink = f["confusion"]["sink_rate"]
    lines = _defense_figures(f, link, scale)
    lines += ["## Accuracy-robustness trade-off (paper fig. 5 / table 2)", "",
              "SOTA points are the paper's table 2 (CIFAR-10, ResNet-18, AutoAttack); this grid's points are only "
              "comparable among themselves.", "", f"![]({link['fig5']})", "",
              "## Training time per epoch, measured (paper fig. 6)", "",
              "Median epoch time (training only), each run's first epoch left out; DUCAT: its DUCAT epochs only.", "",
              f"![]({link['fig6']})", "", "## Ablations of PGD-AT + DUCAT, seed 0 (paper figs. 7 and 9)", ""]
    lines += [f"![]({link[f'fig7_{param}']})" for param in f["ablations"]] or [_NOT_HERE + "no ablation runs."]
    lines += ["", "## Where the paper's attack sends inputs (paper fig. 8)", "",
              f"Raw 2C predictions of PGD-AT + DUCAT (seed 0) under the paper-protocol PGD-10. Sink rate: "
              f"{'n/a' if sink is None else f'{100 * sink:.1f}%'} of the attacked examples land in the dummy of "
              "their own class.", "", f"![]({link['fig8']})", "",
              "## Penultimate features, t-SNE (paper fig. 10)", "", f"![]({link['fig10']})", "",
              "## Targeted attacks (paper table 4)", "", analysis.targeted_table(f["targeted"]), "",
              "## Training curves (seed 0)", "", f"![]({link['curves']})"]
    return "\n".join(lines)


_NOT_HERE = "Not at this scale: "


def _defense_figures(f: dict[str, Any], link: dict[str, str], scale: Scale) -> list[str]:
    """Figs. 2-4: the base defenses compared with each other, and the toy case (where the scale has them)."""
    overlap, only = f["overlap"], f"the grid trains {', '.join(scale.methods)} only."
    lines = ["## Always-failed examples across the base defenses (paper fig. 2)", ""]
    lines += [f"Uniformly defended by all {len(scale.methods)}: {100 * overlap['uniform_defended']:.1f}%; uniformly "
              f"failed: {100 * overlap['uniform_failed']:.1f}% (the paper reports > 80% together on CIFAR-10).", "",
              f"![]({link['fig2']})"] if overlap is not None else [_NOT_HERE + only]
    lines += ["", "## Transfer between robust models (paper fig. 3)", "",
              f"![]({link['fig3']})" if f["transfer"] is not None else _NOT_HERE + only, "",
              "## The hard-label toy case (paper fig. 4)", "",
              f"![]({link['fig4']})" if f["toy"] is not None else _NOT_HERE + "no toy run.", ""]
    return lines
