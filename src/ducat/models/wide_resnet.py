"""WideResNet as used in the TRADES and MART code (dropout 0).

Input (B, C, H, W), already normalized; output logits (B, num_classes).
Global average pooling before ``fc`` makes any input size work.

References:
    Zagoruyko, Komodakis. "Wide Residual Networks". BMVC 2016.
    Zhang et al. "Theoretically Principled Trade-off between Robustness and Accuracy" (TRADES). ICML 2019.
    Wang et al. "Improving Adversarial Robustness Requires Revisiting Misclassified Examples" (MART). ICLR 2020.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import PreActBlock  # the WRN block is the pre-activation block (dropout 0)


class WideResNet(nn.Module):
    """WRN-depth-widen: stem conv3x3(16), three groups of (depth-4)/6 blocks with
    16k/32k/64k channels (strides 1, 2, 2), BN + ReLU, global average pooling,
    ``fc``. Features: 64*widen_factor. Initialization as in TRADES."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = self._make_group(widths[0], widths[1], n, stride=1)
        self.block2 = self._make_group(widths[1], widths[2], n, stride=2)
        self.block3 = self._make_group(widths[2], widths[3], n, stride=2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_group(in_planes: int, out_planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *(PreActBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        out = out.mean(dim=(2, 3))  # global average pooling; deterministic on CUDA
        return self.fc(out)


def wrn28_10(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-28-10 (36,479,194 parameters for 10 classes); 640-d features."""
    return WideResNet(28, 10, num_classes, in_channels)


def wrn34_10(num_classes: int, in_channels: int = 3) -> WideResNet:
    """WRN-34-10, the TRADES/MART CIFAR model (46,160,474 parameters for 10
    classes); 640-d features. TRADES' unused ``sub_block1`` is omitted."""
    return WideResNet(34, 10, num_classes, in_channels)
