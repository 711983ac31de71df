"""Train/validation split, batching on the data's device and vectorised crop/flip augmentation.

All shuffling and augmentation randomness is drawn from the ``torch.Generator`` passed in (the
global RNG only when none is given), so a run that saves and restores the generator's state resumes
bit-exactly.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from ducat.data.base import DataError, TensorData


def split_train_val(data: TensorData, val_fraction: float, seed: int) -> tuple[TensorData, TensorData]:
    """Split ``data`` into (train, val), stratified by class and determined by ``seed`` alone.

    The validation set holds ``round(len(data) * val_fraction)`` examples, shared between classes in
    proportion to their counts (largest remainders get the leftover examples). Which examples of a
    class go to validation is a seeded random choice. Both parts keep the original order of ``data``.
    ``val_fraction=0`` gives an empty validation set.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(data)
    n_val = round(n * val_fraction)
    if n_val == 0:
        return data, data.subset(torch.zeros(0, dtype=torch.long))
    labels = data.labels.cpu()
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    order = perm[torch.argsort(labels[perm], stable=True)]  # grouped by class, random within a class
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * (n_val / n)
    take = quota.floor().long()
    remainder = n_val - int(take.sum())
    if remainder > 0:
        frac = quota - take.double()
        # largest fractional parts first; ties by class order (stable sort of the negated parts)
        take[torch.argsort(-frac, stable=True)[:remainder]] += 1
    starts = torch.cumsum(counts, 0) - counts
    val_mask = torch.zeros(n, dtype=torch.bool)
    for start, k in zip(starts.tolist(), take.tolist()):
        val_mask[order[start:start + k]] = True
    idx = torch.arange(n)
    return data.subset(idx[~val_mask]), data.subset(idx[val_mask])


def _randint(high: int, size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (size,), generator=generator, device=gen_device).to(device)


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Per-image random crop (zero-pad by ``padding``, crop back to HxW) and random horizontal flip.

    ``x`` is ``(B, C, H, W)``. Vectorised with index arithmetic (no loop over images). Draws, in
    this order: B row offsets and B column offsets in ``[0, 2 * padding]`` (if ``padding > 0``),
    then B coin flips (if ``flip``). With ``padding=0`` and ``flip=False`` returns ``x`` itself; otherwise the
    result is laid out channels_last (``.contiguous()`` gives the NCHW layout where a caller needs it).
    """
    if padding < 0:
        raise DataError(f"crop padding must be >= 0, got {padding}")
    if padding == 0 and not flip:
        return x
    b, _, h, w = x.shape
    device = x.device
    rows = torch.arange(h, device=device).expand(b, h)
    cols = torch.arange(w, device=device).expand(b, w)
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
        rows = rows + _randint(2 * padding + 1, b, generator, device)[:, None]
        cols = cols + _randint(2 * padding + 1, b, generator, device)[:, None]
    if flip:
        flipped = _randint(2, b, generator, device).bool()
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)  # (B, C, H, W) in channels_last memory: no copy for a channels_last model


class TensorLoader:
    """Batches of ``(images, labels)`` from a :class:`TensorData`, on the data's device.

    Images are converted per batch from uint8 to float32 in ``[0, 1]``; with ``augment`` each batch
    goes through :func:`random_crop_flip`. With ``shuffle`` a fresh permutation is drawn from
    ``generator`` when iteration starts, so one epoch visits every example exactly once.
    """

    def __init__(self, data: TensorData, batch_size: int, shuffle: bool, augment: bool = False,
                 crop_padding: int = 4, flip: bool = True, drop_last: bool = False,
                 generator: torch.Generator | None = None):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.crop_padding = crop_padding
        self.flip = flip
        self.drop_last = drop_last
        self.generator = generator

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, device = len(self.data), self.data.device
        if self.shuffle:
            gen_device = self.generator.device if self.generator is not None else device
            order = torch.randperm(n, generator=self.generator, device=gen_device).to(device)
        else:
            order = None
        for i in range(len(self)):
            start, stop = i * self.batch_size, min((i + 1) * self.batch_size, n)
            if order is None:
                images, labels = self.data.images[start:stop], self.data.labels[start:stop]
            else:
                idx = order[start:stop]
                images, labels = self.data.images[idx], self.data.labels[idx]
            x = images.float().div_(255)
            if self.augment:
                x = random_crop_flip(x, self.crop_padding, self.flip, self.generator)
            yield x, labels
