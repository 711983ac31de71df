"""The evaluation report: rows keyed by attack id, the per-example worst case, the sink rate, the eps
sweep and sanity checks; written as ``report.json``, ``report.md`` and ``masks.npz``.

JSON contract (other tools read it): ``n_examples``, ``epsilon``, ``norm``, ``clean_accuracy``, a list
``results`` of ``{"id", "protocol", "attack", "robust_accuracy", ...}`` (fractions in [0,1]) and
``worst_case: {"protocol", "protocols", "attacks", "robust_accuracy"}`` (a result row of a check's attack has
``"check": true`` and is not counted there). ``checks`` holds the checks of the
evaluation itself (:func:`ducat.eval.checks.run_checks`; ``docs/evaluation.md``): ``indicators`` (per attack:
``id``, ``verdict``, ``fired``, ``advice``, ``counts``), ``unit_test``, ``transfer``, ``convergence``,
``square_followup``, ``worst_case_with_checks`` and ``summary`` (PASS/WARN lines).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import ducat.eval.catalog as catalog
from ducat.eval.markdown import report_markdown
from ducat.eval.registry import ATTACKS
from ducat.eval.runner import Outcome
from ducat.eval.settings import EvalSettings
from ducat.eval.vocabulary import AttackSpec, Protocol
from ducat.fileio import atomic_write_bytes


@dataclass
class EvalReport:
    """Results; accuracies are fractions in [0, 1]. ``masks`` maps result keys to boolean per-example
    robustness ``(N,)`` (plus ``labels``, ``clean``, ``worst_case`` and raw predictions)."""

    n_examples: int
    epsilon: float
    norm: str
    clean_accuracy: float
    results: list[dict[str, Any]]
    worst_case: dict[str, Any]
    sink_rate: float | None
    eps_sweep: list[dict[str, float | None]]
    sanity: list[dict[str, str]]
    settings: dict[str, Any]
    dummy_classes: bool
    wall_time_s: float
    dummy_index: list[int] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("masks")
        return data

    def accuracy(self, key: str) -> float | None:
        """Robust accuracy of the result with this id (``None`` if it did not run)."""
        return next((r["robust_accuracy"] for r in self.results if r["id"] == key), None)

    def to_markdown(self) -> str:
        return report_markdown(self)


def build_report(plan: list[AttackSpec], outcome: Outcome, labels: np.ndarray, settings: EvalSettings,
                 dummy_index: np.ndarray | None, wall_time_s: float) -> EvalReport:
    """Assemble the report of a finished plan. ``dummy_index``: ``(C,)`` pairing of a DUCAT model, else None."""
    is_dummy = dummy_index is not None
    rows, masks = [], {"labels": labels, "clean": outcome.clean, "clean/raw_predictions": outcome.clean_raw}
    for spec in plan:
        result = outcome.results[spec.key]
        masks[spec.key], masks[f"{spec.key}/raw_predictions"] = result.robust, result.raw
        if spec.eps_factor != 1.0:
            continue
        rows.append(_row(spec, spec.id, spec.protocol, float(result.robust.mean())))
        if not is_dummy:  # the protocols coincide: the same result is the paper protocol's too
            rows.append(_row(spec, ATTACKS[spec.id].counterpart or spec.id, Protocol.PAPER,
                             rows[-1]["robust_accuracy"]))
    masks["worst_case"] = outcome.worst
    counted = [s for s in plan if s.in_worst_case]
    protocols = sorted({s.protocol.value for s in counted} | ({Protocol.PAPER.value} if not is_dummy else set()))
    worst = {"protocol": Protocol.ADAPTIVE.value if Protocol.ADAPTIVE.value in protocols else Protocol.PAPER.value,
             "protocols": protocols, "attacks": [s.key for s in counted],
             "robust_accuracy": float(outcome.worst.mean())}
    report = EvalReport(
        n_examples=len(labels), epsilon=settings.eps, norm=settings.norm,
        clean_accuracy=float(outcome.clean.mean()), results=rows, worst_case=worst,
        sink_rate=_sink_rate(outcome, labels, dummy_index), eps_sweep=_sweep(plan, outcome, settings, is_dummy),
        sanity=[], settings=_settings_json(settings), dummy_classes=is_dummy, wall_time_s=wall_time_s,
        dummy_index=None if dummy_index is None else dummy_index.tolist(), masks=masks)
    report.sanity = sanity_checks(report, outcome.logs, {key: int(result.attacked.sum())
                                                         for key, result in outcome.results.items()})
    return report


def _row(spec: AttackSpec, key: str, protocol: Protocol, accuracy: float) -> dict[str, Any]:
    row = {"id": key, "protocol": protocol.value, "attack": spec.label, "view": spec.view.value,
           "scope": spec.scope.value, "scoring": spec.scoring.value, "robust_accuracy": accuracy}
    return row | ({"note": spec.note} if spec.note else {}) | ({} if spec.counted else {"check": True})


def _settings_json(settings: EvalSettings) -> dict[str, Any]:
    data = asdict(settings)
    data["protocols"] = [p.value for p in settings.protocols]
    data["step_size"] = settings.step
    return data


def _sink_rate(outcome: Outcome, labels: np.ndarray, dummy_index: np.ndarray | None) -> float | None:
    """Share of the attacked (clean-correct) examples that the paper's PGD-10 sends into the dummy of their label."""
    result = outcome.results.get(catalog.paper_pgd10.id)
    if dummy_index is None or result is None or not result.attacked.any():
        return None
    sunk = result.raw == dummy_index[labels]
    return float(sunk[result.attacked].mean())


def _sweep(plan: list[AttackSpec], outcome: Outcome, settings: EvalSettings, is_dummy: bool) -> list[dict]:
    """Robust accuracy of PGD-10 against eps (adaptive and, on a DUCAT model, paper), from eps 0 (clean) up."""
    factors = sorted({s.eps_factor for s in plan if s.eps_factor != 1.0})
    if not factors:
        return []
    rows = [{"eps": 0.0, "adaptive": float(outcome.clean.mean()),
             "paper": float(outcome.clean.mean()) if is_dummy else None}]
    for factor in sorted({*factors, 1.0}):
        row: dict[str, float | None] = {"eps": settings.budget(factor)}
        for protocol, entry in (("adaptive", catalog.adaptive_pgd10), ("paper", catalog.paper_pgd10)):
            key = entry.spec(settings, eps_factor=factor).key
            result = outcome.results.get(key)
            row[protocol] = None if result is None else float(result.robust.mean())
        rows.append(row)
    return rows


def sanity_checks(report: EvalReport, aa_logs: dict[str, list[str]],
                  attacked: dict[str, int] | None = None) -> list[dict[str, str]]:
    """PASS/WARN/NOTE signals that an evaluation may be too weak (Carlini et al. 2019, Tramer et al. 2020).

    ``aa_logs``: AutoAttack's log lines by result key; ``attacked``: how many examples each result attacked."""
    checks = []
    acc = report.accuracy
    for protocol, (a10, a100) in {"paper": (catalog.paper_pgd10.id, catalog.paper_pgd100.id),
                                  "adaptive": (catalog.adaptive_pgd10.id, catalog.adaptive_pgd100.id)}.items():
        if acc(a10) is not None and acc(a100) is not None:
            ok = acc(a100) <= acc(a10) + 0.005
            checks.append(_check(ok, f"{protocol}: PGD-100 ({100 * acc(a100):.2f}) not above PGD-10 "
                                     f"({100 * acc(a10):.2f})"))
    paper_aa = acc(catalog.paper_autoattack.id)
    paper_pgd = [acc(k) for k in (catalog.paper_pgd10.id, catalog.paper_pgd100.id) if acc(k) is not None]
    if report.dummy_classes and paper_aa is not None and paper_pgd and paper_aa > min(paper_pgd) + 0.005:
        checks.append({"status": "WARN", "check": (
            f"paper protocol: AutoAttack ({100 * paper_aa:.2f}) above PGD ({100 * min(paper_pgd):.2f}), a symptom of "
            "the protocol: AutoAttack stops on an example as soon as the raw 2C argmax leaves y, also when it moves "
            "into dummy(y), which the projection then scores as correct")})
    for name, log in aa_logs.items():
        gain = square_gain(log, (attacked or {}).get(name, 0))
        if gain is not None:
            checks.append(_check(gain <= 0.5, f"{name}: black-box Square removed {gain:.2f} points after the "
                                              "white-box attacks (more than 0.5 suggests gradient masking)"))
    if report.eps_sweep:
        values = [s["adaptive"] for s in report.eps_sweep]
        checks.append(_check(all(b <= a + 0.005 for a, b in zip(values, values[1:])),
                             "adaptive robust accuracy does not rise with eps"))
        last = report.eps_sweep[-1]
        checks.append(_check(last["adaptive"] <= 0.05, f"adaptive robust accuracy at the largest eps "
                                                        f"({last['eps']:.3g}) is {100 * last['adaptive']:.2f}% "
                                                        "(should be near 0)"))
    return checks


def _check(ok: bool, text: str) -> dict[str, str]:
    return {"check": text, "status": "PASS" if ok else "WARN"}


def square_gain(log: list[str], attacked: int) -> float | None:
    """Accuracy points (of the ``attacked`` examples) that Square, the black-box attack, removed after the
    white-box attacks of one AutoAttack run, summed over its batches; None when Square did not run."""
    broken = [int(m.group(1)) for m in (re.match(r"square - \d+/\d+ - (\d+) out of \d+ successfully perturbed",
                                                 line) for line in log) if m]
    ran = any(re.match(r"running square", line) for line in log)
    if not ran or not attacked:
        return None
    return 100 * sum(broken) / attacked


def write_report(report: EvalReport, out: Path) -> None:
    """``report.json``, ``report.md`` and ``masks.npz`` in ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "report.json", json.dumps(report.to_json(), indent=2).encode())
    atomic_write_bytes(out / "report.md", ("# ducat eval\n\n" + report.to_markdown() + "\n").encode())
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **report.masks)
    atomic_write_bytes(out / "masks.npz", buffer.getvalue())


__all__ = ["EvalReport", "build_report", "sanity_checks", "square_gain", "write_report"]
