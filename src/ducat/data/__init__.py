"""Datasets held whole in memory as tensors, batched on the training device.

Each split is a :class:`TensorData` (uint8 images ``(N, C, H, W)`` and int64 labels); a
:class:`TensorLoader` indexes batches out of it on its device, converts them to float in ``[0, 1]``
and optionally applies the vectorised :func:`random_crop_flip`; there are no per-image PIL
transforms in the training loop. Every dataset is read from its real on-disk format (see
:mod:`ducat.data.readers`); missing or malformed data raises :class:`DataError`.
"""

from ducat.data.base import DATASET_NAMES, DataError, DatasetInfo, TensorData, canonical_name, dataset_info
from ducat.data.loader import TensorLoader, random_crop_flip, split_train_val
from ducat.data.readers import load_split, read_idx

__all__ = [
    "DATASET_NAMES",
    "DataError",
    "DatasetInfo",
    "TensorData",
    "TensorLoader",
    "canonical_name",
    "dataset_info",
    "load_split",
    "random_crop_flip",
    "read_idx",
    "split_train_val",
]
