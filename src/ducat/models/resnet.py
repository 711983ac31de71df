"""CIFAR-style ResNets: 3x3 stride-1 stem, no max-pool, four stages.

Input (B, C, H, W), already normalized; output logits (B, num_classes).
Global average pooling before the classifier ``fc`` makes any input size work
(32x32 CIFAR gives 4x4 final maps, 64x64 Tiny-ImageNet gives 8x8).

References:
    He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition". CVPR 2016.
    He, Zhang, Ren, Sun. "Identity Mappings in Deep Residual Networks". ECCV 2016.
    Rice, Wong, Kolter. "Overfitting in adversarially robust deep learning". ICML 2020.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """1x1 conv + BN projection when the shape changes, identity otherwise."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs (post-activation). (B, in_planes, H, W) -> (B, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 convs. (B, in_planes, H, W) -> (B, 4*planes, H/stride, W/stride)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: stem conv3x3(64) + BN + ReLU, stages of 64/128/256/512 planes
    (strides 1, 2, 2, 2), global average pooling, ``fc``. Features: 512*expansion."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = out.mean(dim=(2, 3))  # global average pooling; deterministic on CUDA
        return self.fc(out)


class PreActBlock(nn.Module):
    """Pre-activation basic block (BN-ReLU-conv twice); the projection shortcut
    (1x1 conv, no BN) takes the pre-activated input, as in Rice et al.'s code."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """PreAct ResNet (He et al. 2016, "Identity Mappings") in the CIFAR form of
    Rice et al. 2020: stem conv3x3(64) without BN, pre-activation stages of
    64/128/256/512 planes, final BN + ReLU, global average pooling, ``fc``."""

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.bn = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = out.mean(dim=(2, 3))  # global average pooling; deterministic on CUDA
        return self.fc(out)


def resnet18(num_classes: int, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-18 with BasicBlocks [2, 2, 2, 2]; 512-d features
    (11,173,962 parameters for 10 classes)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


def bottleneck_resnet18(num_classes: int, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet with Bottleneck blocks (expansion 4) and block counts
    [2, 2, 2, 2]; 2048-d features.

    This is what the DUCAT authors' released code calls "resnet18" ("New Paradigm
    of Adversarial Training: Breaking Inherent Trade-Off between Accuracy and
    Robustness via Dummy Classes", under review). It is not the standard
    ResNet-18: it is deeper (26 weight layers) and has about 14M parameters.
    """
    return ResNet(Bottleneck, (2, 2, 2, 2), num_classes, in_channels)


def preact_resnet18(num_classes: int, in_channels: int = 3) -> PreActResNet:
    """PreAct ResNet-18 as in Rice et al. 2020; 512-d features."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels)
