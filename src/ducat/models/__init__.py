"""Model zoo: ``build_model`` returns ``normalizer -> net`` for inputs in [0, 1].

Every architecture takes normalized input (B, C, H, W) and returns logits
(B, num_classes); its classifier is the ``nn.Linear`` attribute ``fc``, which is
also the last ``nn.Linear`` in ``named_modules()`` order.
"""

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .mlp import MLP
from .normalizer import ImageNormalizer
from .pooling import MatrixAdaptiveAvgPool2d, deterministic_pooling, pooling_matrix
from .resnet import PreActResNet, ResNet, bottleneck_resnet18, preact_resnet18, resnet18
from .small_cnn import SmallCNN
from .wide_resnet import WideResNet, wrn28_10, wrn34_10

__all__ = [
    "MODEL_NAMES",
    "ImageNormalizer",
    "MLP",
    "MatrixAdaptiveAvgPool2d",
    "PreActResNet",
    "ResNet",
    "SmallCNN",
    "WideResNet",
    "build_model",
    "count_flops",
    "deterministic_pooling",
    "pooling_matrix",
]

_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "wrn28_10": wrn28_10,
    "wrn34_10": wrn34_10,
    "bottleneck_resnet18": bottleneck_resnet18,
    "small_cnn": SmallCNN,
    "mlp": MLP,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build ``nn.Sequential(normalizer=ImageNormalizer(mean, std), net=<name>)``.

    Input (B, in_channels, H, W) in [0, 1]; output logits (B, num_classes).
    ``mean``/``std`` default to 0/1 per channel (identity normalization) and
    must have ``in_channels`` entries.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    mean = [0.0] * in_channels if mean is None else list(mean)
    std = [1.0] * in_channels if std is None else list(std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need {in_channels} entries each, got {len(mean)} and {len(std)}")
    return nn.Sequential(
        OrderedDict(normalizer=ImageNormalizer(mean, std), net=_BUILDERS[name](num_classes, in_channels))
    )


def count_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs (2 x multiply-accumulates) of one forward pass on one (C, H, W) image.

    Counts only ``nn.Conv2d`` and ``nn.Linear`` layers, via forward hooks:
    conv: 2 * Cin/groups * kh * kw * Cout * Hout * Wout; linear: 2 * in * out
    (per output row). Biases, BN, activations and pooling are ignored. The
    model runs once in eval mode under ``no_grad``; training flags are restored.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += 2 * (m.in_channels // m.groups) * kh * kw * out[0].numel()

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * m.in_features * out[0].numel()

    modes = {m: m.training for m in model.modules()}
    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape) if param is None else param.new_zeros(1, *input_shape)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return total
