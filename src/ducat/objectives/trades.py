"""TRADES (Zhang et al., ICML 2019): ``CE(z(x), y) + beta * KL(p(x) || p(x'))``, beta = 6.

The attack maximises the KL term from ``x + 0.001 N(0,1)``. With DUCAT the CE term is replaced by
the DUCAT term; the KL regulariser is kept, on the raw outputs (released code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ducat.attacks import TradesAttack, eval_mode
from ducat.objectives.base import Augment, Objective, StepOutput, register_method


def kl_clean_adv(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """``KL(p(x) || p(x'))`` per example, ``(B,)``."""
    log_p_clean = F.log_softmax(logits_clean.float(), dim=1)
    log_p_adv = F.log_softmax(logits_adv.float(), dim=1)
    return (log_p_clean.exp() * (log_p_clean - log_p_adv)).sum(dim=1)


@dataclass(frozen=True)
class TradesParams:
    """``beta``: weight of the KL term (>= 0)."""

    beta: float = 6.0

    def __post_init__(self) -> None:
        if not self.beta >= 0:
            raise ValueError(f"method.beta must be >= 0, got {self.beta}")


@register_method
class TRADES(Objective):
    name, label = "trades", "TRADES"
    Params = TradesParams
    extra_forwards = 1  # the attack's clean target p(x)

    def plain_classification(self, logits_clean, logits_adv, y):
        return F.cross_entropy(logits_clean.float(), y)

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.attack
        with eval_mode(model, a.bn_eval):
            attack = TradesAttack(self.attack_target(model), a.eps, a.step_size, a.steps, self.generator, norm=a.norm)
            return attack(x)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, ducat_active: bool,
                 augment: Augment) -> StepOutput:
        logits_clean, logits_adv = self.clean_and_adversarial(model, augment(x), y)
        loss = self.classification(model, logits_clean, logits_adv, y, ducat_active)
        loss = loss + self.params.beta * kl_clean_adv(logits_clean, logits_adv).mean()
        return StepOutput(loss, logits_clean.detach(), logits_adv.detach())
