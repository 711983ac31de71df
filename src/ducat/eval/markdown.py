"""``report.md``: the evaluation report as a table a reader can check, with what each column means."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ducat.eval.checks_markdown import checks_markdown
from ducat.eval.vocabulary import Protocol

if TYPE_CHECKING:  # for the annotation only: report.py renders itself with this module
    from ducat.eval.report import EvalReport

PAPER_HEADER = "paper protocol: attack on the raw 2C logits, scored after the projection"
ADAPTIVE_HEADER = "adaptive: attack that knows the projection, scored after the projection"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def report_markdown(report: "EvalReport") -> str:
    """The whole ``report.md`` body."""
    s = report.settings
    radius = f"{'L-inf' if report.norm == 'Linf' else report.norm} eps = {report.epsilon:.5g}"
    lines = [f"Robust accuracy (%) of the deployed classifier, {radius}, first {report.n_examples} test "
             f"examples, seed {s['seed']}, batches of at most {s['batch_size']} examples, at least one per worker "
             f"({s['workers']} worker{'s' if s['workers'] != 1 else ''}).", ""]
    if not report.dummy_classes:
        lines += ["The model has no dummy classes: the protocols coincide and ran once.", ""]
    lines += _table(report) + [""] + _legend(report)
    if report.sink_rate is not None:
        lines += ["", f"Sink rate: {pct(report.sink_rate)}% of the clean-correct examples attacked by the paper's "
                  "PGD-10 end up predicted as the dummy class of their own label (the paper's protocol counts them "
                  "as robust)."]
    if report.eps_sweep:
        lines += ["", "Eps sweep (PGD-10; at the evaluation eps it is the PGD-10 row): " + ", ".join(
            f"{row['eps']:.3g}: {pct(row['adaptive'])}" + (f" (paper {pct(row['paper'])})" if row.get("paper")
                                                          is not None else "") for row in report.eps_sweep)]
    lines += ["", "Sanity checks:"] + ([f"- {c['status']}: {c['check']}" for c in report.sanity]
                                       or ["- none applies to the attacks run"])
    if report.checks:
        lines += checks_markdown(report.checks)
    lines += _provenance(report.provenance)
    lines += ["", f"Wall time {report.wall_time_s:.1f} s."]
    return "\n".join(lines)


def _table(report: "EvalReport") -> list[str]:
    by_label: dict[str, dict[str, Any]] = {}
    for row in report.results:
        if row["protocol"] in ("paper", "adaptive"):
            by_label.setdefault(row["attack"], {})[row["protocol"]] = row
    lines = [f"| attack | {PAPER_HEADER} | {ADAPTIVE_HEADER} | note |", "|---|---|---|---|",
             f"| clean | {pct(report.clean_accuracy)} | {pct(report.clean_accuracy)} | projected prediction |"]
    for label, cells in by_label.items():
        note = next((c["note"] for c in cells.values() if c.get("note")), "")
        paper, adaptive = cells.get("paper"), cells.get("adaptive")
        lines.append(f"| {label} | {pct(paper and paper['robust_accuracy'])} | "
                     f"{pct(adaptive and adaptive['robust_accuracy'])} | {note} |")
    raw = next((r for r in report.results if r["protocol"] == Protocol.RAW_AUTOATTACK.value), None)
    if raw is not None:
        lines.append(f"| AutoAttack on the raw 2C logits, scored by the raw 2C argmax (raw-autoattack) | "
                     f"{pct(raw['robust_accuracy'])} | | the released code's call: no projection anywhere |")
    worst = report.worst_case
    aside = ", the checks' rows aside" if any(row.get("check") for row in report.results) else ""
    lines.append(f"| **worst case per example** | | **{pct(worst['robust_accuracy'])}** | "
                 f"robust only if it survived every attack above at this eps ({' and '.join(worst['protocols'])} "
                 f"protocol){aside} |")
    with_checks = report.checks.get("worst_case_with_checks")
    if with_checks is not None and with_checks < worst["robust_accuracy"]:
        lines.append(f"| **worst case with the checks' attacks** | | **{pct(with_checks)}** | the transfer row and "
                     "the Square follow-up counted too |")
    return lines


def _legend(report: "EvalReport") -> list[str]:
    """What every row's attack takes its gradients from and which examples it attacked."""
    lines = ["What each attack targets (all are scored on the deployed classifier unless said otherwise):"]
    seen = set()
    for row in report.results:
        if row["id"] in seen:
            continue
        seen.add(row["id"])
        lines.append(f"- `{row['id']}` ({row['attack']}): gradients from the {row['view']}; attacks "
                     f"{row['scope']}; scored by the {row['scoring']}.")
    return lines


def _provenance(provenance: dict[str, Any]) -> list[str]:
    if not provenance:
        return []
    lines = ["", "Provenance:"]
    checkpoint = provenance.get("checkpoint")
    if checkpoint:
        epoch = "" if checkpoint.get("epoch") is None else f"epoch {checkpoint['epoch']}, "
        lines.append(f"- checkpoint scored: `{checkpoint['path']}` ({epoch}SHA-256 {checkpoint['sha256']})")
    loaded, surrogate = provenance.get("loaded"), provenance.get("surrogate")
    if loaded:
        lines.append(f"- model scored: returned by `{loaded['function']}`, defined in `{loaded['module_file']}` "
                     f"(SHA-256 {loaded['sha256']})")
    if surrogate:
        lines.append(f"- transfer surrogate: `{surrogate['path']}` (SHA-256 {surrogate['sha256']})")
    for key in ("examples", "examples_sha256", "ducat", "git_commit", "torch", "pyautoattack", "device", "command"):
        if provenance.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: `{provenance[key]}`")
    return lines
