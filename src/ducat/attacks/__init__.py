"""Attacks: objects called as ``attack(x, y)`` on models that take [0,1] inputs and return logits."""

from ducat.attacks.accuracy import correct_under_attack, predictions
from ducat.attacks.dummy_aware import dummy_aware_weighted_ce
from ducat.attacks.pgd import (
    NORMS,
    PGD,
    Norm,
    PGDTrace,
    TradesAttack,
    cross_entropy,
    eval_mode,
    margin_loss,
    targeted_margin_loss,
)

__all__ = ["NORMS", "PGD", "Norm", "PGDTrace", "TradesAttack", "correct_under_attack", "cross_entropy",
           "dummy_aware_weighted_ce", "eval_mode", "margin_loss", "predictions", "targeted_margin_loss"]
