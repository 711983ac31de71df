"""Dataset names, per-dataset constants, the error type and the in-memory split container."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ducat.errors import DataError

DATASET_NAMES = ("digits", "FashionMNIST", "CIFAR10", "CIFAR100", "TinyImageNet")

# Normalised spellings (lower case, without "-", "_", " ") -> canonical name.
_ALIASES = {
    "digits": "digits",
    "fashionmnist": "FashionMNIST",
    "fmnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "tinyimagenet": "TinyImageNet",
    "tinyimagenet200": "TinyImageNet",
}




@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset. ``mean``/``std`` are per-channel statistics of images scaled to
    [0, 1]; they are offered to the model builder (the paper itself trains without normalisation).
    ``train_size``: images in the standard training split (config validation sizes the train/val split
    from it before any data is read)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int


_INFO = {
    # digits: mean/std computed over all 1797 images of sklearn's load_digits() after the uint8
    # scaling used by the loader (round(v * 255 / 16)); its training split is the loader's first 1437
    # (readers.DIGITS_TRAIN_SIZE) of a fixed permutation.
    "digits": DatasetInfo("digits", 10, 1, 8, (0.3053,), (0.3759,), 1437),
    "FashionMNIST": DatasetInfo("FashionMNIST", 10, 1, 28, (0.2860,), (0.3530,), 60000),
    "CIFAR10": DatasetInfo("CIFAR10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), 50000),
    "CIFAR100": DatasetInfo("CIFAR100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 50000),
    "TinyImageNet": DatasetInfo("TinyImageNet", 200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821),
                                100000),
}


def canonical_name(name: str) -> str:
    """The canonical spelling of ``name`` (case-insensitive; ``-``, ``_`` and spaces ignored)."""
    key = str(name).lower().replace("-", "").replace("_", "").replace(" ", "")
    try:
        return _ALIASES[key]
    except KeyError:
        raise DataError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_NAMES)}") from None


def dataset_info(name: str) -> DatasetInfo:
    """Static facts about dataset ``name``; raises :class:`DataError` listing valid names if unknown."""
    return _INFO[canonical_name(name)]


@dataclass
class TensorData:
    """One split held in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} "
                            f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(f"labels must be an int64 (N,) tensor, got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.images.device != self.labels.device:
            raise DataError(f"images on {self.images.device} but labels on {self.labels.device}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def subset(self, idx: torch.Tensor) -> "TensorData":
        """The examples at ``idx`` (an index or boolean tensor), in that order."""
        idx = torch.as_tensor(idx, device=self.images.device)
        return TensorData(self.images[idx], self.labels[idx])

    def to(self, device: torch.device | str) -> "TensorData":
        return TensorData(self.images.to(device), self.labels.to(device))


def tensor_data(images: np.ndarray, labels: np.ndarray) -> TensorData:
    """A split from numpy arrays: uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``."""
    return TensorData(torch.from_numpy(np.require(images, np.uint8, ["C", "W"])),
                      torch.from_numpy(np.require(labels, np.int64, ["C", "W"])))


def need_root(name: str, root: Path | None, how: str) -> Path:
    """``root``, or a DataError saying that ``name`` needs one and ``how`` to get the data."""
    if root is None:
        raise DataError(f"{name} needs a data root (data.root / root=...) holding its files; {how}")
    return root
