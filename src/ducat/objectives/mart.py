"""MART (Wang et al., ICLR 2020): boosted CE on x' plus a misclassification-weighted KL, beta = 6.

``L = CE(z(x'), y) - log(1 - max_{j != y} p_j(x')) + beta * KL(p(x) || p(x')) * (1 - p_y(x))``.

With DUCAT the CE term is replaced by the DUCAT term and the rest is kept. On 2C outputs the
most likely wrong class is often dummy(y), which the DUCAT term pushes *up*; by default
(``method.exclude_dummy=true``) the margin term excludes dummy(y) and the KL weight uses the projected
probability ``p_y(x) + p_dummy(y)(x)``, so MART does not fight DUCAT. ``method.exclude_dummy=false`` is
the literal transplant of MART's terms onto the 2C outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ducat.dummy import DummyClassModel
from ducat.objectives.base import Augment, Objective, StepOutput, dummy_mask_probability, register_method
from ducat.objectives.trades import TradesParams, kl_clean_adv


@dataclass(frozen=True)
class MartParams(TradesParams):
    """``beta``: weight of the KL term (>= 0, checked as TRADES' is); ``exclude_dummy``: see the module
    docstring."""

    exclude_dummy: bool = True


@register_method
class MART(Objective):
    name, label = "mart", "MART"
    Params = MartParams

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, ducat_active: bool,
                 augment: Augment) -> StepOutput:
        logits_clean, logits_adv = self.clean_and_adversarial(model, augment(x), y)
        loss = self.classification(model, logits_clean, logits_adv, y, ducat_active)

        probs_adv = F.softmax(logits_adv.float(), dim=1)
        exclude = y[:, None]
        pair = ducat_active and self.params.exclude_dummy and isinstance(model, DummyClassModel)
        if pair:
            exclude = torch.cat([exclude, model.dummy_index[y][:, None]], dim=1)
        wrong = probs_adv.scatter(1, exclude, 0.0).amax(dim=1)
        margin = -torch.log(1.0001 - wrong + 1e-12)

        probs_clean = F.softmax(logits_clean.float(), dim=1)
        p_true = dummy_mask_probability(probs_clean, y, model) if pair else probs_clean.gather(1, y[:, None]).squeeze(1)
        kl = kl_clean_adv(logits_clean, logits_adv) * (1.0000001 - p_true)
        loss = loss + margin.mean() + self.params.beta * kl.mean()
        return StepOutput(loss, logits_clean.detach(), logits_adv.detach())
