"""The ``report.md`` section of the checks of the evaluation itself (:mod:`ducat.eval.checks`)."""

from __future__ import annotations

from typing import Any

from ducat.eval.indicators import ADVICE

INDICATOR_COLUMNS = (("silent_success", "silent success"), ("not_converged", "loss still rising"),
                     ("vanishing_gradient", "zero/vanishing gradient"), ("transfer_failure", "transfer failure"),
                     ("unbounded_failure", "fails without a budget"), ("unit_test", "unit test found"),
                     ("square_points", "Square points"))
NAMES = {"silent_success": "silent success", "not_converged": "loss still rising",
         "vanishing_gradient": "zero or vanishing gradients", "transfer_failure": "transfer failure",
         "unbounded_failure": "fails without a budget (bad initialisation)", "square": "Square beat the white-box "
         "attacks", "unit_test": "failed its unit test"}

SQUARE_EXPLANATION = (
    "Why Square can beat the white-box attacks on the projected classifier: its merged logit "
    "m_k = max(z_k, z_dummy(k)) sends the gradient through the larger of the two logits only. Where the true "
    "class is held up by its original and its dummy logit alike, a gradient step that lowers one hands the "
    "maximum to the other, so the white-box attacks stall, while Square, which compares outputs and takes no "
    "gradient, can still find points where both fall. Follow-ups: the logsumexp-merged rows (both logits get a "
    "gradient) and Square with more queries on the worst-case survivors (the Square follow-up row).")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def checks_markdown(checks: dict[str, Any]) -> list[str]:
    """The lines of the section: the PASS/WARN summary, the indicator table, what to do about what fired, the
    Square explanation when it fired, and the convergence figures."""
    lines = ["", "Checks of the evaluation itself (docs/evaluation.md):"]
    lines += [f"- {c['status']}: {c['check']}" for c in checks["summary"]]
    rows = [r for r in checks["indicators"] if r["verdict"] != "n/a"]
    if rows:
        lines += ["", "Attack-failure indicators (Pintor et al. 2022), examples per attack (`-`: does not apply; "
                  "rising: among the examples it did not break):", "",
                  "| attack | verdict | attacked | " + " | ".join(title for _, title in INDICATOR_COLUMNS) + " |",
                  "|---|---|---|" + "---|" * len(INDICATOR_COLUMNS)]
        lines += [f"| `{r['id']}` | {r['verdict']} | {r['counts']['attacked']} | "
                  + " | ".join(_cell(r["counts"].get(name)) for name, _ in INDICATOR_COLUMNS) + " |" for r in rows]
    fired = sorted({name for r in rows for name in r["fired"]}, key=list(NAMES).index)
    if fired:
        lines += ["", "What to do when an indicator fires:"]
        lines += [f"- {NAMES[name]} ({', '.join(r['id'] for r in rows if name in r['fired'])}): {ADVICE[name]}."
                  for name in fired]
    if "square" in fired:
        lines += ["", SQUARE_EXPLANATION]
    conv = checks.get("convergence")
    if conv is not None and conv["attacks"]:
        broke = ", ".join(f"{key} x2 broke {n}" for key, n in conv["broke"].items())
        lines += ["", f"Convergence check: the attacks that set the worst case, rerun with doubled steps and restarts "
                  f"on the worst-case survivors among the first {conv['examples']} examples: {broke}; worst case "
                  f"{100 * conv['worst_case_before']:.2f} -> {100 * conv['worst_case_after']:.2f} "
                  f"({conv['moved_points']:.2f} points, {conv['status']})."]
    return lines
