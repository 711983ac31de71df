"""The checks of the evaluation itself, run after the plan (``docs/evaluation.md``):

- the attack-failure indicators of every attack (:mod:`ducat.eval.indicators`), with the *unbounded* rerun:
  every attack again without a budget on a few examples (Pintor et al.'s unconstrained-attack check of a bad
  initialisation or objective);
- the attack unit test (:mod:`ducat.eval.unit_test`);
- the transfer row's reading (it ran in the plan, uncounted);
- the convergence check: the attacks that set the worst case, steps and restarts doubled, on a subset;
- the Square follow-up: when Square removed points after AutoAttack's white-box attacks, Square with more
  queries on the worst-case survivors.

Each check is a run of :func:`~ducat.eval.runner.run_plan` with its own specs (keys carry the check's
variant), so workers, the cache and resuming work as for the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import ducat.eval.attacks as a
import ducat.eval.catalog as catalog
from ducat.eval.indicators import ADVICE, SQUARE_POINTS, summarise
from ducat.eval.report import square_gain
from ducat.eval.runner import Outcome, ResultCache, run_fingerprint, run_plan
from ducat.eval.settings import EvalSettings
from ducat.eval.unit_test import build_problem, unit_plan, verdicts
from ducat.eval.vocabulary import AttackSpec, Scope

CONVERGENCE_POINTS = 0.5  # the worst case may move this much (accuracy points) under the doubled attacks


@dataclass
class CheckRun:
    """What every check needs: the model (eval mode), the examples, the settings, the transfer surrogate, where
    the checks' results are cached (None: nowhere) and the progress callback."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    settings: EvalSettings
    surrogate: nn.Module | None
    cache_dir: Path | None
    progress: Callable[[str, int, int], None]

    def run(self, specs: list[AttackSpec], model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            survivors: np.ndarray | None = None) -> Outcome:
        """:func:`~ducat.eval.runner.run_plan` of a check's ``specs`` on ``model`` and ``(x, y)``, cached under the
        check's own fingerprint."""
        cache = ResultCache(self.cache_dir, run_fingerprint(model, x, y, self.settings, self.surrogate), len(y))
        return run_plan(specs, model, x, y, self.settings, cache, self.progress, self.surrogate, survivors)


def run_checks(plan: list[AttackSpec], outcome: Outcome, run: CheckRun) -> tuple[dict[str, Any], list[AttackSpec]]:
    """Every check of ``run.settings`` on a finished ``plan``: (the report's ``checks`` section, the specs of
    the follow-up attacks, whose results were added to ``outcome``)."""
    s = run.settings
    followups = square_followup(plan, outcome, run) if s.square_queries else []
    attacks = [spec for spec in plan if spec.factory is not None and spec.eps_factor == 1.0 and spec.counted]
    unbounded = unbounded_failures(attacks, run) if s.unbounded_examples else {}
    unit = unit_tests(plan, run) if s.unit_test_examples else None
    checks: dict[str, Any] = {
        "indicators": [indicator_row(spec, outcome, unbounded.get(spec.key), unit) for spec in plan + followups
                       if spec.factory is not None and spec.eps_factor == 1.0],
        "unit_test": unit, "transfer": transfer_summary(plan, outcome),
        "convergence": convergence(plan, outcome, run) if s.convergence_examples else None,
        "square_followup": _followup_summary(followups, outcome),
        "worst_case_with_checks": float(worst_with_checks(plan + followups, outcome).mean()),
        "silent_success_survivors": silent_survivors(plan, outcome) if s.indicators else None}
    checks["summary"] = summary(checks, plan, outcome)
    return checks, followups


def square_points(outcome: Outcome, key: str) -> float | None:
    """Accuracy points Square removed after the white-box attacks in AutoAttack row ``key`` (None: no Square)."""
    result = outcome.results.get(key)
    return None if result is None else square_gain(outcome.logs.get(key, []), int(result.attacked.sum()))


def square_followup(plan: list[AttackSpec], outcome: Outcome, run: CheckRun) -> list[AttackSpec]:
    """When an AutoAttack row's Square removed more than :data:`SQUARE_POINTS`: Square with ``square_queries``
    on the worst-case survivors, on the deployed classifier. Returns the specs run (none otherwise)."""
    hinted = [spec.key for spec in plan if spec.id in (catalog.adaptive_autoattack.id, catalog.paper_autoattack.id)
              and (square_points(outcome, spec.key) or 0) > SQUARE_POINTS]
    if not hinted:
        return []
    queries = run.settings.square_queries
    spec = catalog.adaptive_square_followup.spec(
        run.settings, label=f"Square, {queries} queries, on the worst-case survivors", factory=a.square(queries),
        scope=Scope.SURVIVORS, counted=False,
        note=f"follow-up to the Square hint of {', '.join(hinted)}; a check: not counted in the worst case")
    extra = run.run([spec], run.model, run.x, run.y, survivors=outcome.worst)
    outcome.results.update(extra.results)
    outcome.logs.update(extra.logs)
    return [spec]


def unbounded_budget_factor(settings: EvalSettings, x: torch.Tensor) -> float:
    """The eps factor of a budget that is no bound on ``x``'s [0,1] box: L-inf radius 1, L2 twice its diagonal."""
    return 2.0 / settings.eps if settings.norm == "Linf" else 2.0 * math.sqrt(x[0].numel()) / settings.eps


def unbounded_failures(attacks: list[AttackSpec], run: CheckRun) -> dict[str, dict[str, int]]:
    """Every attack again without a budget on the first ``unbounded_examples`` examples: per key, the clean-correct
    examples it attacked and those it still did not break (Pintor et al.'s unconstrained attack failure)."""
    n = min(run.settings.unbounded_examples, len(run.y))
    factor = unbounded_budget_factor(run.settings, run.x)
    specs = [replace(spec, scope=Scope.CLEAN_CORRECT, eps_factor=factor, variant="unbounded") for spec in attacks]
    sub = run.run(specs, run.model, run.x[:n], run.y[:n])
    return {spec.key: {"attacked": int(sub.results[unb.key].attacked.sum()),
                       "failed": int(sub.results[unb.key].robust.sum())} for spec, unb in zip(attacks, specs)}


def unit_tests(plan: list[AttackSpec], run: CheckRun) -> dict[str, Any]:
    """The attack unit test on the first ``unit_test_examples`` examples (:mod:`ducat.eval.unit_test`)."""
    n = min(run.settings.unit_test_examples, len(run.y))
    try:
        problem = build_problem(run.model, run.x[:n], run.y[:n], run.settings)
    except ValueError as exc:  # no nn.Linear classifier layer to refit
        return {"applicable": False, "reason": str(exc), "attacks": {}}
    valid = torch.as_tensor(problem.valid, device=run.x.device)
    specs = unit_plan(plan)
    if not valid.any():
        return {"applicable": False, "reason": f"no valid test among {n} examples", "attacks": {}}
    sub = run.run(specs, problem.model, problem.x[valid], problem.y[valid])
    return {"applicable": True, "examples": n, "valid": int(valid.sum()), "attacks": verdicts(specs, sub)}


def indicator_row(spec: AttackSpec, outcome: Outcome, unbounded: dict[str, int] | None,
                  unit: dict[str, Any] | None) -> dict[str, Any]:
    """One attack's indicators, verdict (PASS, or WARN naming what fired) and what to do about each."""
    row = {"id": spec.key, "attack": spec.label}
    if spec.rescores is not None:
        return row | {"verdict": "n/a", "fired": [], "advice": [], "counts": {},
                      "note": f"rescores {spec.rescores}: see that row"}
    found = summarise(outcome.results[spec.key], outcome.logs.get(spec.key, []), square_points(outcome, spec.key))
    counts, fired = found["counts"], found["fired"]
    counts["unbounded_failure"] = None if unbounded is None else unbounded["failed"]
    if unbounded and unbounded["failed"]:
        fired.append("unbounded_failure")
    test = (unit or {}).get("attacks", {}).get(spec.key)
    counts["unit_test"] = None if test is None else f"{test['found']}/{test['tests']} {test['status']}"
    if test is not None and test["status"] == "FAIL":
        fired.append("unit_test")
    measured = [v for k, v in counts.items() if k not in ("attacked", "traced") and v is not None]
    verdict = "WARN" if fired else "PASS" if measured else "n/a"  # n/a: no indicator applied or none was run
    return row | {"verdict": verdict, "fired": fired, "advice": [ADVICE[f] for f in fired], "counts": counts}


def transfer_summary(plan: list[AttackSpec], outcome: Outcome) -> dict[str, Any] | None:
    """The transfer row's reading: its robust accuracy, the worst-case survivors it broke (a gradient-masking
    sign: a surrogate found what the white-box attacks on the model itself missed), and its transfer failures."""
    spec = next((s for s in plan if s.id == catalog.adaptive_transfer.id), None)
    if spec is None:
        return None
    result = outcome.results[spec.key]
    broke = int((result.attacked & ~result.robust & outcome.worst).sum())
    fooled = result.indicators.get("view_fooled")
    return {"id": spec.key, "source": spec.view.value, "robust_accuracy": float(result.robust.mean()),
            "broke_worst_case_survivors": broke,
            "transfer_failures": None if fooled is None else int((fooled & result.robust).sum())}


def worst_case_setters(plan: list[AttackSpec], outcome: Outcome) -> list[AttackSpec]:
    """The attacks counted in the worst case that were the first, in plan order, to break some example; all of
    them when none broke any (then every attack alike set the worst case at the clean accuracy)."""
    unbroken = outcome.clean.copy()
    counted, setters = [spec for spec in plan if spec.in_worst_case], []
    for spec in counted:
        result = outcome.results[spec.key]
        broke = unbroken & result.attacked & ~result.robust
        if broke.any():
            setters.append(spec)
        unbroken &= ~broke
    return setters or counted


def convergence(plan: list[AttackSpec], outcome: Outcome, run: CheckRun) -> dict[str, Any]:
    """The attacks that set the worst case, steps and restarts doubled, on the worst-case survivors among the
    first ``convergence_examples`` examples (each on the survivors of those before it): how far the worst case
    moved there (accuracy points)."""
    n = min(run.settings.convergence_examples, len(run.y))
    specs = [replace(spec, scope=Scope.SURVIVORS, strength=2, variant="x2") for spec in
             worst_case_setters(plan, outcome)]
    before = outcome.worst[:n]
    sub = run.run(specs, run.model, run.x[:n], run.y[:n], survivors=before)
    moved = 100 * (before.mean() - sub.worst.mean())
    broke = {spec.id: int((sub.results[spec.key].attacked & ~sub.results[spec.key].robust).sum())
             for spec in specs}
    return {"examples": n, "attacks": [spec.id for spec in specs], "broke": broke,
            "worst_case_before": float(before.mean()), "worst_case_after": float(sub.worst.mean()),
            "moved_points": float(moved), "status": "PASS" if moved <= CONVERGENCE_POINTS else "WARN"}


def silent_survivors(plan: list[AttackSpec], outcome: Outcome) -> int:
    """Worst-case survivors that an iterate of some PGD run of the plan misclassified (silent successes): the
    worst case counts them as robust though an adversarial point was seen (and not kept)."""
    seen = np.zeros_like(outcome.worst)
    for spec in plan:
        if spec.eps_factor == 1.0 and spec.key in outcome.results:
            seen |= outcome.results[spec.key].indicators.get("silent_success", np.zeros_like(seen))
    return int((seen & outcome.worst).sum())


def worst_with_checks(specs: list[AttackSpec], outcome: Outcome) -> np.ndarray:
    """The worst case ``(N,)`` with the uncounted attacks of the checks (transfer, Square follow-up) counted too."""
    worst = outcome.worst.copy()
    for spec in specs:
        if spec.eps_factor == 1.0 and not spec.counted and spec.key in outcome.results:
            result = outcome.results[spec.key]
            worst &= result.robust | ~result.attacked
    return worst


def _followup_summary(followups: list[AttackSpec], outcome: Outcome) -> dict[str, Any] | None:
    if not followups:
        return None
    result = outcome.results[followups[0].key]
    return {"id": followups[0].key, "attacked": int(result.attacked.sum()),
            "broke": int((result.attacked & ~result.robust).sum())}


def summary(checks: dict[str, Any], plan: list[AttackSpec], outcome: Outcome) -> list[dict[str, str]]:
    """PASS/WARN/NOTE lines of the checks, as the report's sanity checks are."""
    rows = [row for row in checks["indicators"] if row["verdict"] != "n/a"]
    calm = [row["id"] for row in rows if not row["fired"]]
    lines = [_line(len(calm) == len(rows), f"attack-failure indicators fired for {len(rows) - len(calm)} of "
                                           f"{len(rows)} attacks (table below); none for " + (", ".join(calm) or
                                                                                              "any attack"))
             ] if rows else [{"status": "NOTE", "check": "attack-failure indicators: not run (--no-indicators)"}]
    silent = checks["silent_success_survivors"]
    if silent is not None:
        lines.append(_line(not silent, f"{silent} examples the worst case counts as robust were misclassified at an "
                                       "iterate of a PGD run that returned another point (silent success)"))
    lines += _unit_test_lines(checks["unit_test"], [spec.key for spec in plan if spec.in_worst_case])
    transfer = checks["transfer"]
    if transfer is not None:
        lines.append(_line(not transfer["broke_worst_case_survivors"], (
            f"transfer ({transfer['source']}) broke {transfer['broke_worst_case_survivors']} examples the worst case "
            "counts as robust (a surrogate finding what white-box attacks on the model missed suggests gradient "
            "masking)")))
    conv = checks["convergence"]
    if conv is not None:
        lines.append({"status": conv["status"], "check": (
            f"convergence: with doubled steps and restarts of {', '.join(conv['attacks']) or 'no attack'} the worst "
            f"case on the first {conv['examples']} examples moved {conv['moved_points']:.2f} points "
            f"({100 * conv['worst_case_before']:.2f} -> {100 * conv['worst_case_after']:.2f}; more than "
            f"{CONVERGENCE_POINTS} means it has not converged)")})
    follow = checks["square_followup"]
    if follow is not None:
        lines.append(_line(not follow["broke"], f"Square follow-up broke {follow['broke']} of the {follow['attacked']} "
                                                "worst-case survivors"))
    if checks["worst_case_with_checks"] < outcome.worst.mean():
        lines.append({"status": "WARN", "check": (
            f"the worst case with the checks' attacks counted is {100 * checks['worst_case_with_checks']:.2f}, "
            f"below the worst case of the table ({100 * outcome.worst.mean():.2f}): read the lower figure")})
    return lines


def _unit_test_lines(unit: dict[str, Any] | None, counted: list[str]) -> list[dict[str, str]]:
    if unit is None:
        return []
    if not unit["applicable"]:
        return [{"status": "NOTE", "check": f"attack unit test not applicable: {unit['reason']}"}]
    failed = [f"{key} ({test['found']}/{test['tests']})" for key, test in unit["attacks"].items()
              if test["status"] == "FAIL"]
    in_worst = [key for key, test in unit["attacks"].items() if test["status"] == "FAIL" and key in counted]
    text = (f"attack unit test ({unit['valid']} valid of {unit['examples']} examples): " +
            ("every attack found every known adversarial example" if not failed else
             "failed: " + "; ".join(failed) + (". The worst case counts " + ", ".join(in_worst) + ", which do not "
                                               "support a robust verdict" if in_worst else "")))
    return [_line(not failed, text)]


def _line(ok: bool, text: str) -> dict[str, str]:
    return {"status": "PASS" if ok else "WARN", "check": text}
