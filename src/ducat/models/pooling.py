"""Adaptive average pooling as a fixed linear map: the same function, with a deterministic backward on CUDA.

``F.adaptive_avg_pool2d`` has no deterministic CUDA backward (it accumulates with atomics), so a run with
``run.deterministic=true`` on a GPU would stop at the first backward through small_cnn's or the MLP's pooling.
Each output cell of adaptive pooling is the mean of a fixed window of input cells, so the whole pooling of an
``H x W`` map is one ``(H*W, h*w)`` matrix; its backward is a matrix product, deterministic everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair


def pooling_matrix(height: int, width: int, size: int | tuple[int, int], dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """``(height*width, h*w)``: column j holds the share of each input cell in output cell j of
    ``adaptive_avg_pool2d(., size)`` (found by pooling each basis cell, a forward pass only)."""
    basis = torch.eye(height * width, dtype=dtype, device=device).view(height * width, 1, height, width)
    return F.adaptive_avg_pool2d(basis, size).flatten(1)


class MatrixAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` computed as ``x.flatten(2) @ pooling_matrix``: input ``(B, C, H, W)``, output
    ``(B, C, h, w)``, equal to the pooling up to float rounding. The matrix is cached per input size."""

    def __init__(self, output_size) -> None:
        super().__init__(output_size)
        self._matrices: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), (height, width) = _pair(self.output_size), x.shape[-2:]
        key = (height, width, x.dtype, x.device)
        if key not in self._matrices:
            self._matrices[key] = pooling_matrix(height, width, (h, w), x.dtype, x.device)
        return (x.flatten(2) @ self._matrices[key]).view(*x.shape[:2], h, w)


def deterministic_pooling(model: nn.Module) -> nn.Module:
    """Replace every ``nn.AdaptiveAvgPool2d`` of ``model`` (in place) by a :class:`MatrixAdaptiveAvgPool2d` of the
    same size; returns ``model``. Parameters, buffers and state-dict keys are unchanged."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.AdaptiveAvgPool2d:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, MatrixAdaptiveAvgPool2d(module.output_size))
    return model
