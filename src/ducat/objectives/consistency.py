"""Consistency-AT (Tack et al., AAAI 2022): PGD-AT on two augmentations of each image plus a
Jensen-Shannon consistency term between the two adversarial views' tempered predictions.

``L = CE over both adversarial views + lambda * JS(p_T(x'_1), p_T(x'_2))``, lambda = 1, T = 0.5.
With DUCAT the CE term is the DUCAT term over the clean and adversarial views of both
augmentations (one forward over ``[x_1; x_2; x'_1; x'_2]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ducat.objectives.base import Augment, Objective, StepOutput, register_method


def jensen_shannon(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """``JS(p_T(a), p_T(b))`` per example, ``(B,)``, with ``p_T = softmax(z / T)``."""
    p_a = F.softmax(logits_a.float() / temperature, dim=1)
    p_b = F.softmax(logits_b.float() / temperature, dim=1)
    log_m = torch.log(((p_a + p_b) / 2).clamp_min(1e-12))
    kl_a = (p_a * (torch.log(p_a.clamp_min(1e-12)) - log_m)).sum(dim=1)
    kl_b = (p_b * (torch.log(p_b.clamp_min(1e-12)) - log_m)).sum(dim=1)
    return (kl_a + kl_b) / 2


@dataclass(frozen=True)
class ConsistencyParams:
    """``lam``: weight of the consistency term (lambda, >= 0); ``temperature``: T of the tempered softmax (> 0)."""

    lam: float = 1.0
    temperature: float = 0.5

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise ValueError(f"method.lam must be >= 0, got {self.lam}")
        if not self.temperature > 0:
            raise ValueError(f"method.temperature must be > 0, got {self.temperature}")


@register_method
class ConsistencyAT(Objective):
    name, label = "consistency", "Consistency-AT"
    Params = ConsistencyParams
    views, forwards_clean = 2, False  # two augmentations; the plain step forwards their adversarial views only

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, ducat_active: bool,
                 augment: Augment) -> StepOutput:
        views = torch.cat([augment(x), augment(x)])
        yy = torch.cat([y, y])
        views_adv = self.craft(model, views, yy)
        if ducat_active:
            logits_clean, logits_adv = self.forward(model, torch.cat([views, views_adv])).chunk(2)
            loss = self.classification(model, logits_clean, logits_adv, yy, True)
        else:
            logits_clean, logits_adv = None, self.forward(model, views_adv)
            loss = F.cross_entropy(logits_adv.float(), yy)
        adv_1, adv_2 = logits_adv.chunk(2)
        loss = loss + self.params.lam * jensen_shannon(adv_1, adv_2, self.params.temperature).mean()
        detached_clean = None if logits_clean is None else logits_clean[: len(y)].detach()
        return StepOutput(loss, detached_clean, adv_1.detach())
