"""The built-in attacks of ``ducat eval``, one registered entry each (:mod:`ducat.eval.registry`), in plan order:
the paper's protocol, then the adaptive attacks on every clean-correct example, then the cumulative ones, then the
entries the plan or a check adds itself (not selectable by name). The factories are in :mod:`ducat.eval.attacks`.

Protocols (``docs/method.md``, "Evaluation protocols"): ``paper`` is the released code's evaluation (the attacks'
own losses on the raw 2C logits, projected scoring: an input pushed into the dummy class of its own label counts as
defended); ``raw-autoattack`` its AutoAttack call, scored by the raw 2C argmax; ``adaptive`` attacks know the
defense. On a model without dummy classes the protocols coincide: only the adaptive entries run, each standing for
its paper ``counterpart`` too.
"""

from __future__ import annotations

import ducat.eval.attacks as a
from ducat.eval.registry import Stage, register_attack
from ducat.eval.vocabulary import Protocol, Scoring, View

PAPER, ADAPTIVE, RAW, MERGED = Protocol.PAPER, Protocol.ADAPTIVE, View.RAW, View.MAX_MERGED


def _autoattack_label(settings) -> str:
    return settings.autoattack_label


# ---- the paper's protocol (models with dummy classes) ------------------------------------------------------------
@register_attack("paper-pgd10", name="pgd10", protocol=PAPER, view=RAW, label="PGD-10", dummy_only=True,
                 column="PGD-10, paper protocol (raw 2C logits attacked, projected scoring)")
def paper_pgd10(settings):
    return a.pgd(RAW, 10)


@register_attack("paper-pgd100", name="pgd100", protocol=PAPER, view=RAW, label="PGD-100", dummy_only=True,
                 fast=False, column="PGD-100, paper protocol")
def paper_pgd100(settings):
    return a.pgd(RAW, 100)


@register_attack("paper-autoattack", name="autoattack", protocol=PAPER, view=RAW, label=_autoattack_label,
                 dummy_only=True, fast=False, note="attacks the raw 2C logits, scored after the projection",
                 column="AutoAttack, paper protocol (raw 2C logits attacked, projected scoring)")
def paper_autoattack(settings):
    return a.autoattack(RAW)


@register_attack("raw-autoattack", name="autoattack", protocol=Protocol.RAW_AUTOATTACK, view=RAW,
                 label=_autoattack_label, scoring=Scoring.RAW_ARGMAX, rescores="paper-autoattack", dummy_only=True,
                 requires=(PAPER, Protocol.RAW_AUTOATTACK), fast=False, note="the released code's call",
                 column="AutoAttack, raw-autoattack (raw 2C logits attacked, raw 2C argmax scored)")
def raw_autoattack(settings):
    return None  # rescores the paper-protocol AutoAttack's inputs with the raw argmax


@register_attack("paper-targeted-original", name="targeted", protocol=PAPER, view=RAW, dummy_only=True,
                 label="targeted PGD-10 (original classes)")
def paper_targeted_original(settings):
    return a.targeted_random(RAW, dummy_targets=False)


@register_attack("paper-targeted-dummy", name="targeted", protocol=PAPER, view=RAW, dummy_only=True,
                 label="targeted PGD-10 (dummy classes)")
def paper_targeted_dummy(settings):
    return a.targeted_random(RAW, dummy_targets=True)


@register_attack("paper-original-logits", name="targeted", protocol=PAPER, view=View.ORIGINAL, dummy_only=True,
                 label="PGD-10 on original logits")
def paper_original_logits(settings):
    return a.pgd(View.ORIGINAL, 10)


# ---- adaptive attacks on every clean-correct example -----------------------------------------------------------
@register_attack("adaptive-pgd10", name="pgd10", protocol=ADAPTIVE, view=MERGED, label="PGD-10",
                 counterpart="paper-pgd10")
def adaptive_pgd10(settings):
    return a.pgd(MERGED, 10)


@register_attack("adaptive-pgd100", name="pgd100", protocol=ADAPTIVE, view=MERGED, label="PGD-100", fast=False,
                 counterpart="paper-pgd100")
def adaptive_pgd100(settings):
    return a.pgd(MERGED, 100)


@register_attack("adaptive-autoattack", name="autoattack", protocol=ADAPTIVE, view=MERGED, label=_autoattack_label,
                 fast=False, counterpart="paper-autoattack",
                 column="AutoAttack, adaptive (projected classifier attacked and scored)")
def adaptive_autoattack(settings):
    return a.autoattack(MERGED)


@register_attack("adaptive-targeted-original", name="targeted", protocol=ADAPTIVE, view=MERGED,
                 label="targeted PGD-10 (original classes)", counterpart="paper-targeted-original")
def adaptive_targeted_original(settings):
    return a.targeted_random(MERGED, dummy_targets=False)


def _dawa_label(settings) -> str:
    weights = ", ".join(f"{w:g}" for w in settings.dawa_weights)
    return f"DAWA-style PGD-{settings.dawa_steps}, w in {{{weights}}}"


@register_attack("adaptive-dawa", name="dawa", protocol=ADAPTIVE, view=RAW, dummy_only=True, label=_dawa_label,
                 runs=lambda s: len(s.dawa_weights),
                 note="w CE(z, y) + (1-w) CE(z, dummy(y)) on raw 2C logits; first success over the weights",
                 column="DAWA-style weighted CE, adaptive (raw 2C logits, projected scoring)")
def adaptive_dawa(settings):
    return a.dawa()


# ---- cumulative adaptive attacks (on the survivors of every attack above, with early stopping) ------------------
@register_attack("adaptive-lse-pgd100", name="logsumexp", protocol=ADAPTIVE, view=View.LSE_MERGED,
                 stage=Stage.CUMULATIVE, dummy_only=True, label="PGD-100, logsumexp-merged gradients")
def adaptive_lse_pgd100(settings):
    return a.pgd(View.LSE_MERGED, 100)


@register_attack("adaptive-lse-autoattack", name="logsumexp-autoattack", protocol=ADAPTIVE, view=View.LSE_MERGED,
                 stage=Stage.CUMULATIVE, dummy_only=True, fast=False,
                 label="AutoAttack's white-box attacks (APGD-CE, APGD-T, FAB-T), logsumexp-merged gradients",
                 note="no Square: it takes no gradient, and it runs on the projected classifier in the AutoAttack row")
def adaptive_lse_autoattack(settings):
    return a.autoattack(View.LSE_MERGED, white_box=True)


@register_attack("adaptive-margin", name="margin", protocol=ADAPTIVE, view=MERGED, stage=Stage.CUMULATIVE,
                 label=lambda s: f"PGD-100 margin, {s.margin_restarts} restarts", runs=lambda s: s.margin_restarts)
def adaptive_margin(settings):
    return a.margin_restarts()


@register_attack("adaptive-targeted-top", name="targeted", protocol=ADAPTIVE, view=MERGED, stage=Stage.CUMULATIVE,
                 label=lambda s: f"PGD-100 targeted margin, top-{s.n_targets} classes", runs=lambda s: s.n_targets)
def adaptive_targeted_top(settings):
    return a.targeted_top()


# ---- added by the plan or a check, never selected by name ---------------------------------------------------------
@register_attack("adaptive-extra-restarts", name=None, protocol=ADAPTIVE, view=MERGED, stage=Stage.CUMULATIVE)
def adaptive_extra_restarts(settings):
    return None  # the plan sets the restarts (ducat.eval.plan.equal_effort_specs)


@register_attack("adaptive-transfer", name=None, protocol=ADAPTIVE, view=View.ORIGINAL)
def adaptive_transfer(settings):
    return None  # the plan sets the surrogate and the steps (ducat.eval.plan.transfer_spec)


@register_attack("adaptive-square-followup", name=None, protocol=ADAPTIVE, view=MERGED, stage=Stage.CUMULATIVE)
def adaptive_square_followup(settings):
    return None  # the Square follow-up check sets the queries (ducat.eval.checks.square_followup)
