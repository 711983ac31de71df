"""A BatchNorm-free multi-layer perceptron: the smallest baseline, and a model whose training step
is the same whether the batch is split across processes or not (no batch statistics)."""

import torch
from torch import nn


class MLP(nn.Module):
    """Adaptive average pool to 8x8, flatten, fc 256, ReLU, fc 256, ReLU, ``fc``.

    Input (B, in_channels, H, W) with any H, W (8x8 digits pass through unchanged); output logits
    (B, num_classes)."""

    def __init__(self, num_classes: int, in_channels: int = 1, hidden: int = 256) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.hidden = nn.Sequential(nn.Linear(in_channels * 64, hidden), nn.ReLU(),
                                    nn.Linear(hidden, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(torch.flatten(self.pool(x), 1)))
