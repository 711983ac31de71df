"""Per-channel input normalization as the first layer of a model."""

from collections.abc import Sequence

import torch
from torch import nn


class ImageNormalizer(nn.Module):
    """``(x - mean) / std`` per channel, as RobustBench's ``ImageNormalizer``.

    ``mean`` and ``std`` are buffers of shape (1, C, 1, 1), so they move with
    the model and are saved in its state dict. Input and output: (B, C, H, W).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32, device="cpu").flatten()  # checked on the CPU, then
        std_t = torch.as_tensor(std, dtype=torch.float32, device="cpu").flatten()    # placed where modules are made
        if mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(
                f"mean and std must be non-empty and of equal length, got {mean_t.numel()} and {std_t.numel()}"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        mean_t, std_t = mean_t.to(torch.empty(0).device), std_t.to(torch.empty(0).device)
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
