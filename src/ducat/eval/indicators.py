"""Indicators of attack failure (Pintor et al., "Indicators of Attack Failure: Debugging and Improving
Optimization of Adversarial Examples", NeurIPS 2022), per attack of the plan.

Each indicator marks examples on which the attack may have failed for a reason other than robustness:

- ``silent_success``: an iterate of a PGD run was adversarial for the deployed classifier, the returned point
  is not (PGD returns its last iterate). Judged from the run's own logits, so only where they give the
  deployed decision exactly: the max-merged view, and the raw 2C logits through the projection.
- ``not_converged``: on an example the attack did not break, its objective (best so far, scaled to the run's
  range) still rose by more than :data:`RISE` over the last tenth of its steps.
- ``vanishing_gradient``: the objective's input gradient at the start has an L2 norm below :data:`VANISHING`
  (zero or vanishing gradients: saturation, a non-differentiable layer). For AutoAttack: the zero-gradient
  warnings of its own APGD-T.
- ``view_fooled``: the attacked view's own decision at the returned point is not ``y`` (with the deployed
  classifier still correct: a transfer failure, e.g. a raw 2C argmax moved into ``dummy(y)``).

Flags are computed per batch (:func:`batch_flags`) from the PGD traces the attack context collected, and
summarised per attack by :func:`summarise`; the unbounded rerun, the unit test and the Square count are
added by :mod:`ducat.eval.checks`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ducat.dummy import DummyClassModel
from ducat.eval.attacks import AttackContext
from ducat.vocabulary import View

if TYPE_CHECKING:
    from ducat.attacks import PGDTrace

RISE = 0.05  # share of the run's objective range gained in its last tenth of steps: still rising
VANISHING = 1e-10  # L2 norm of the input gradient at the start, in objective units per [0,1] pixel unit
NOT_CONVERGED_SHARE = 0.05  # fires when more than this share of the examples the attack did not break still rose
SQUARE_POINTS = 0.5  # accuracy points Square may remove after the white-box attacks of AutoAttack

ADVICE = {
    "silent_success": "it passed through adversarial points and returned a non-adversarial one: keep the best "
                      "iterate (APGD does) or add restarts",
    "not_converged": "its loss was still rising at the last step: run more steps (PGD-100 or the convergence "
                     "check) before trusting its robust accuracy",
    "vanishing_gradient": "zero or vanishing input gradients: gradient masking (saturated softmax, a flat or "
                          "non-differentiable layer); use a margin loss or the logsumexp view, and trust black-box "
                          "results (Square) over it",
    "transfer_failure": "its own view was fooled, the deployed classifier was not (a raw argmax in dummy(y), a "
                        "surrogate that does not transfer): attack the deployed classifier itself",
    "unbounded_failure": "it fails even without a budget: its loss or start cannot reach a misclassification of "
                         "the deployed classifier (bad initialisation or objective); do not read its robust "
                         "accuracy as robustness",
    "square": "black-box Square broke points the white-box attacks missed: a gradient-masking hint; see the "
              "logsumexp rows and the Square follow-up",
    "unit_test": "it failed its unit test: it misses adversarial examples known to exist, so its robust accuracy "
                 "does not count toward a robust verdict",
}


def deployed_decision(model: torch.nn.Module, view: View) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Maps the argmax of ``view``'s logits to the deployed (projected) prediction, where that is exact; None
    for the views whose argmax does not determine it (logsumexp-merged, original C logits, a surrogate)."""
    if not isinstance(model, DummyClassModel):
        return (lambda pred: pred) if view in (View.RAW, View.MAX_MERGED) else None
    if view is View.MAX_MERGED:
        return lambda pred: pred
    if view is not View.RAW:
        return None
    c = model.num_classes
    back = torch.empty(2 * c, dtype=torch.long, device=model.dummy_index.device)
    back[:c] = torch.arange(c, device=back.device)
    back[model.dummy_index] = torch.arange(c, device=back.device)
    return lambda pred: back.to(pred.device)[pred]


def run_flags(trace: "PGDTrace", y: torch.Tensor, decide: Callable | None) -> dict[str, torch.Tensor]:
    """Flags ``(b,)`` of one traced PGD run on examples with labels ``y``: ``silent`` (an iterate before the
    returned one fooled the deployed classifier; absent when ``decide`` is None), ``rising``, ``vanishing``."""
    steps = trace.objective.shape[0] - 1
    best = trace.objective.cummax(dim=0).values
    span = trace.objective.amax(0) - trace.objective.amin(0)
    window = max(1, steps // 10)
    rise = (best[-1] - best[max(0, steps - window)]) / span.clamp_min(1e-30)
    flags = {"rising": (span > 0) & (rise > RISE) if steps else torch.zeros_like(y, dtype=torch.bool),
             "vanishing": trace.grad_norm < VANISHING if steps else torch.zeros_like(y, dtype=torch.bool)}
    if decide is not None:
        flags["silent"] = (decide(trace.prediction[:-1]) != y[None]).any(0)
    return flags


def batch_flags(ctx: AttackContext, view: View, x_adv: torch.Tensor, y: torch.Tensor, raw: torch.Tensor,
                robust: torch.Tensor) -> dict[str, np.ndarray]:
    """The indicator flags ``(B,)`` of one attacked batch: ``x_adv`` returned for labels ``y``, ``raw`` argmax and
    deployed correctness ``robust`` there, and the PGD traces ``ctx.traced`` (with their batch positions)."""
    n = len(y)
    traced, vanishing, rising = (torch.zeros(n, dtype=torch.bool, device=y.device) for _ in range(3))
    decide = deployed_decision(ctx.model, view)
    silent = torch.zeros(n, dtype=torch.bool, device=y.device) if decide is not None else None
    for attack, positions in ctx.traced:
        if attack.trace is None:
            continue
        at = torch.arange(n, device=y.device) if positions is None else positions
        flags = run_flags(attack.trace, y[at], decide)
        traced[at], rising[at] = True, flags["rising"]  # the last run on an example returned its point
        vanishing[at] |= flags["vanishing"]
        if silent is not None:
            silent[at] |= flags["silent"]
    out = {"traced": traced, "not_converged": rising & robust, "vanishing_gradient": vanishing}
    if silent is not None:
        out["silent_success"] = silent & robust
    if view is View.SURROGATE or (isinstance(ctx.model, DummyClassModel) and view is not View.MAX_MERGED):
        out["view_fooled"] = _view_decision(ctx, view, x_adv, raw) != y  # else it is the deployed decision
    return {name: flag.cpu().numpy() for name, flag in out.items()}


@torch.no_grad()
def _view_decision(ctx: AttackContext, view: View, x_adv: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """The argmax of the attacked view's logits at the returned points ``(B,)`` (the raw argmax for the raw view)."""
    if view is View.RAW:
        return raw
    return torch.cat([ctx.views[view](part).argmax(1) for part in x_adv.split(ctx.settings.batch_size)])


def zero_gradient_points(log: list[str]) -> int | None:
    """Points AutoAttack's APGD-T reported with a zero gradient, summed over its log; None when APGD-T never ran."""
    if not any(line.startswith("running apgd-t") for line in log):
        return None
    return sum(int(m.group(1)) for m in (re.match(r"there are (\d+) points with zero gradient", line)
                                         for line in log) if m)


def summarise(result: Any, log: list[str], square: float | None) -> dict[str, Any]:
    """One attack's indicator counts (None: the indicator does not apply) and the ones that fired. ``result``:
    its :class:`~ducat.eval.runner.AttackResult`; ``square``: the points Square removed (AutoAttack) or None."""
    flags, robust = result.indicators, result.robust
    traced = flags.get("traced", np.zeros_like(robust))
    failed = traced & robust
    counts: dict[str, Any] = {
        "attacked": int(result.attacked.sum()), "traced": int(traced.sum()),
        "silent_success": int(flags["silent_success"].sum()) if "silent_success" in flags else None,
        "not_converged": int(flags["not_converged"].sum()) if traced.any() else None,
        "vanishing_gradient": int(flags["vanishing_gradient"].sum()) if traced.any() else None,
        "transfer_failure": int((flags["view_fooled"] & robust).sum())
        if "view_fooled" in flags else None,
        "square_points": square}
    if zero := zero_gradient_points(log):
        counts["vanishing_gradient"] = (counts["vanishing_gradient"] or 0) + zero
    fired = [name for name in ("silent_success", "vanishing_gradient", "transfer_failure") if counts[name]]
    if counts["not_converged"] and counts["not_converged"] > NOT_CONVERGED_SHARE * max(1, int(failed.sum())):
        fired.insert(1, "not_converged")
    if square is not None and square > SQUARE_POINTS:
        fired.append("square")
    return {"counts": counts, "fired": fired}
