"""State dicts of the DUCAT authors' released code, loaded into ducat's models.

Their "resnet18" is a CIFAR ResNet with Bottleneck blocks [2, 2, 2, 2] and 2048-d features: ducat's
``bottleneck_resnet18``, layer for layer. Their checkpoint is the bare ``state_dict()`` of that network:

- ``conv1.weight`` (64, 3, 3, 3) and ``bn1.*``: the 3x3 stem (stride 1; stride 2 for their Tiny-ImageNet runs);
- ``layer{1..4}.{0,1}.conv{1,2,3}.weight`` and ``.bn{1,2,3}.*`` for 64/128/256/512 planes (1x1, 3x3, 1x1 convs,
  expansion 4), and ``layer{1..4}.0.shortcut.0.weight`` / ``.shortcut.1.*`` (1x1 conv + BatchNorm) in the first
  block of every stage, where the width or the stride changes;
- ``linear.weight`` (2C, 2048) and ``linear.bias`` (2C,): the 2C head after a 4x4 average pooling (global on
  the 4x4 maps of 32x32 inputs), class k paired with the dummy class k + C.

Every BatchNorm has ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``num_batches_tracked``. Their
code applies no normalisation: inputs are the [0,1] images themselves (a ToTensor transform only), which is
what ducat's identity :class:`~ducat.models.ImageNormalizer` does. Only the head's name differs from ducat's
(``linear`` there, ``fc`` here), and ducat's model sits under ``net.`` after its normaliser.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ducat.checkpoint import checkpoint_size_limit, load_checkpoint, load_weights

from . import build_model


def authors_pairing(num_classes: int) -> torch.Tensor:
    """Their pairing: class k with dummy class k + C, ``(C,)`` int64."""
    return torch.arange(num_classes, 2 * num_classes)


def authors_to_ducat(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their state dict's keys renamed to ducat's ``bottleneck_resnet18`` inside ``build_model``'s wrapper."""
    return {"net." + ("fc" + name[len("linear"):] if name.startswith("linear.") else name): value
            for name, value in state.items()}


def authors_resnet18(num_classes: int, stem_stride: int = 1) -> nn.Module:
    """The network of their "resnet18" with 2C outputs (random weights), inputs in [0,1] ``(B, 3, H, W)``, raw 2C
    logits out. ``stem_stride`` 2 for their Tiny-ImageNet runs."""
    model = build_model("bottleneck_resnet18", 2 * num_classes, 3)
    model.net.conv1.stride = (stem_stride, stem_stride)
    return model


def load_authors_resnet18(path: str | Path, num_classes: int,
                          stem_stride: int = 1) -> tuple[nn.Module, torch.Tensor]:
    """``(module, dummy_index)`` from a checkpoint of their "resnet18" (a ``.pt`` state dict), ready for
    ``ducat eval --load``; CheckpointError if the file does not hold exactly their layout for ``num_classes``."""
    model = authors_resnet18(num_classes, stem_stride)
    state = load_checkpoint(path, max_bytes=checkpoint_size_limit(model))["model"]
    weights = authors_to_ducat(state)
    for name in ("normalizer.mean", "normalizer.std"):  # not in their layout: ducat's identity normaliser
        weights[name] = model.state_dict()[name]
    load_weights(model, weights, str(path))
    return model, authors_pairing(num_classes)
