"""Attacks: objects called as ``attack(x, y)`` on models that take [0,1] inputs and return logits."""

from ducat.attacks.pgd import PGD, TradesAttack, dlr_loss, eval_mode, margin_loss, targeted_margin_loss

__all__ = ["PGD", "TradesAttack", "dlr_loss", "eval_mode", "margin_loss", "targeted_margin_loss"]
