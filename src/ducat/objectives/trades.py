"""TRADES (Zhang et al., ICML 2019): ``CE(z(x), y) + beta * KL(p(x) || p(x'))``, beta = 6.

The attack maximises the KL term from ``x + 0.001 N(0,1)``. With DUCAT the CE term is replaced by
the DUCAT term; the KL regulariser is kept, on the raw outputs (released code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ducat.attacks import TradesAttack, eval_mode
from ducat.objectives.base import Augment, Objective, StepOutput


def kl_clean_adv(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """``KL(p(x) || p(x'))`` per example, ``(B,)``."""
    log_p_clean = F.log_softmax(logits_clean.float(), dim=1)
    log_p_adv = F.log_softmax(logits_adv.float(), dim=1)
    return (log_p_clean.exp() * (log_p_clean - log_p_adv)).sum(dim=1)


class TRADES(Objective):
    label = "TRADES"

    def __init__(self, *args, beta: float = 6.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta

    @classmethod
    def from_config(cls, method, attack, ducat, generator, forward_module=None):
        return cls(attack, ducat, generator, forward_module, beta=method.trades_beta)

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
        loss = loss + self.beta * kl_clean_adv(logits_clean, logits_adv).mean()
        return StepOutput(loss, logits_clean.detach(), logits_adv.detach())
