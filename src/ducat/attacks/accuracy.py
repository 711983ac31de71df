"""Accuracy of the deployed classifier, clean or under an attack: the one helper every caller uses."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ducat.dummy import deployed_prediction

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def predictions(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(deployed prediction, raw argmax) of ``x`` ``(N, C, H, W)``, batched, no grad; two ``(N,)`` tensors.

    The deployed prediction is the projected one for a DUCAT model and the argmax otherwise."""
    projected, raw = [], []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(x[start:start + batch_size])
            raw.append(logits.argmax(1))
            projected.append(deployed_prediction(model, logits))
    return torch.cat(projected), torch.cat(raw)


def correct_under_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack | None = None,
                         batch_size: int = 256) -> torch.Tensor:
    """Per-example correctness ``(N,)`` bool of the deployed classifier on ``attack(x, y)`` (clean when None).

    The attack runs batch by batch; it decides which view of the model it targets."""
    correct = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        if attack is not None:
            xb = attack(xb, yb)
        correct.append(predictions(model, xb, batch_size)[0] == yb)
    return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool, device=y.device)
