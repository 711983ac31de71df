"""The evaluation as data: which attacks run, on which view of the model, on which examples, scored how.

Modelled on AutoAttack's ``attacks_to_run``, but typed: :func:`build_plan` returns the ordered list of
:class:`~ducat.eval.vocabulary.AttackSpec` of the registered attacks the settings select
(:mod:`ducat.eval.registry`, the built-in ones in :mod:`ducat.eval.catalog`); :mod:`ducat.eval.runner` runs any
such list with one loop. Results are keyed by :attr:`AttackSpec.key`, and so is everything that reads them
(reports, ``ducat reproduce``).
"""

from __future__ import annotations

import ducat.eval.attacks as a
import ducat.eval.catalog as catalog
from ducat.eval.registry import ATTACKS, SWEEP, AttackEntry, Stage
from ducat.eval.settings import SWEEP_FACTORS, EvalSettings
from ducat.eval.vocabulary import AttackSpec, Protocol, Scope, View


def selected(entry: AttackEntry, settings: EvalSettings, is_dummy: bool) -> bool:
    """Whether the plan of ``settings`` runs ``entry`` on a model with (``is_dummy``) or without dummy classes: its
    name is asked for and its protocols are (on a model without dummy classes the protocols coincide, so only
    the adaptive entries run, each standing for its paper counterpart too)."""
    if entry.name not in settings.attacks:
        return False
    if not is_dummy:
        return not entry.dummy_only and entry.protocol is Protocol.ADAPTIVE
    return all(p in settings.protocols for p in entry.requires or (entry.protocol,))


def build_plan(settings: EvalSettings, is_dummy: bool, surrogate: bool = False) -> list[AttackSpec]:
    """The ordered attack sequence for ``settings`` on a model with (``is_dummy``) or without dummy classes.

    The selected attacks in registration order, standalone ones (on every clean-correct example) before the
    cumulative ones (on the survivors of everything before them when ``early_stop``); then the equal-effort
    restarts of a model without dummy classes; then the eps sweep; last the transfer row (from the ``surrogate``
    model when there is one, else from the original C logits of a DUCAT model), which the worst case does not
    count."""
    entries = [e for e in ATTACKS.values() if selected(e, settings, is_dummy)]
    plan = [e.spec(settings) for stage in Stage for e in entries if e.stage is stage]
    if settings.equal_effort and not is_dummy:
        plan += equal_effort_specs(settings, plan)
    if SWEEP in settings.attacks:
        plan += sweep_specs(settings, is_dummy)
    if settings.transfer_steps and (surrogate or is_dummy):
        plan.append(transfer_spec(settings, surrogate))
    return plan


def effort(plan: list[AttackSpec]) -> int:
    """Attack runs per example that the worst case of ``plan`` counts (a restart, a DAWA weight, a target of the
    targeted attack each count one)."""
    return sum(spec.runs for spec in plan if spec.in_worst_case)


def equal_effort_specs(settings: EvalSettings, plan: list[AttackSpec]) -> list[AttackSpec]:
    """For a model without dummy classes: the margin restarts that bring its worst case to the effort a DUCAT model
    meets under the same settings (``equal_effort``), on the survivors; random restarts alone would otherwise tilt
    a comparison of worst cases against the model that faces more attacks."""
    extra = effort(build_plan(settings, is_dummy=True)) - effort(plan)
    if extra < 1:
        return []
    return [catalog.adaptive_extra_restarts.spec(
        settings, label=f"PGD-100 margin, {extra} more random restarts (equal effort)",
        factory=a.margin_restarts(extra), runs=extra,
        note=f"equal effort: {effort(plan) + extra} attack runs per example, as a DUCAT model meets")]


def transfer_spec(settings: EvalSettings, surrogate: bool) -> AttackSpec:
    """PGD on CE over the surrogate (or the original C logits), scored on the deployed classifier."""
    view, source = (View.SURROGATE, "the surrogate") if surrogate else (View.ORIGINAL, "the original C logits")
    return catalog.adaptive_transfer.spec(
        settings, view=view, label=f"transfer: PGD-{settings.transfer_steps} on {source}",
        factory=a.pgd(view, settings.transfer_steps), counted=False,
        note="crafted on a surrogate, scored on the deployed classifier; a check: not counted in the worst case")


def sweep_specs(settings: EvalSettings, is_dummy: bool) -> list[AttackSpec]:
    """PGD-10 at eps x each factor; at x1 it is the PGD-10 row itself (same spec, same seeds)."""
    entries = [catalog.adaptive_pgd10] + ([catalog.paper_pgd10] if is_dummy and Protocol.PAPER in settings.protocols
                                          else [])
    plan, budgets = [], set()
    for factor in SWEEP_FACTORS:
        if settings.budget(factor) in budgets:
            continue  # an L-inf radius saturates at 1
        budgets.add(settings.budget(factor))
        for entry in entries:
            if factor == 1.0 and entry.name in settings.attacks:
                continue  # already in the plan
            plan.append(entry.spec(settings, eps_factor=factor, scope=Scope.CLEAN_CORRECT))
    return plan

