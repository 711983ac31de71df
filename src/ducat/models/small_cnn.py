"""Small CNN: the CPU-scale model for 28x28, 32x32 and 8x8 inputs."""

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    """conv16-conv16-maxpool-conv32-conv32-maxpool (3x3 convs, each with BN
    and ReLU), adaptive average pooling to 4x4, fc 512 -> 512, ReLU, ``fc``.

    Input (B, in_channels, H, W) with H, W >= 4 (8x8 digits, 28x28 MNIST-like,
    32x32 CIFAR-like); output logits (B, num_classes). Adaptive pooling makes
    the classifier independent of H, W: 32x32 pools exactly to 4x4, 28x28 maps
    (7x7 after two max-pools) use overlapping windows, and 8x8 inputs (2x2 after
    two max-pools) have each cell replicated. The layout follows the
    conv-conv-pool CNNs of Carlini & Wagner (S&P 2017) and TRADES (ICML 2019)
    at half their width, which keeps PGD-10 training on Fashion-MNIST at a few
    minutes per epoch on 2 CPU cores (about 0.28M parameters and 9.8 MFLOPs per
    1x28x28 image for 10 classes).
    """

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 16),
            *_conv_bn_relu(16, 16),
            nn.MaxPool2d(2),
            *_conv_bn_relu(16, 32),
            *_conv_bn_relu(32, 32),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.hidden = nn.Sequential(nn.Linear(32 * 4 * 4, 512), nn.ReLU())
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(torch.flatten(self.features(x), 1)))
