"""PGD-AT (Madry et al., ICLR 2018): train on PGD-10 adversarial examples.

Plain: ``CE(z(x'), y)`` (only the adversarial batch is forwarded). With DUCAT: one forward over
the concatenated ``[x; x']`` and the DUCAT term alone (method.md).
"""

from __future__ import annotations

import torch
from torch import nn

from ducat.objectives.base import Augment, Objective, StepOutput, register_method


@register_method
class PGDAT(Objective):
    name, label = "pgd_at", "PGD-AT"
    forwards_clean = False  # plain PGD-AT forwards only the adversarial batch

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, ducat_active: bool,
                 augment: Augment) -> StepOutput:
        x = augment(x)
        if not ducat_active:
            logits_adv = self.forward(model, self.craft(model, x, y))
            return StepOutput(self.plain_classification(None, logits_adv, y), None, logits_adv.detach())
        logits_clean, logits_adv = self.clean_and_adversarial(model, x, y)
        loss = self.classification(model, logits_clean, logits_adv, y, True)
        return StepOutput(loss, logits_clean.detach(), logits_adv.detach())
