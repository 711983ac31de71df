"""One vocabulary for every layer: the views of a dummy-class model an attack can target, the threat models, the
device names and the seed range. Free of torch and of every other ducat module, so that configs, attacks,
training and evaluation all say the same thing with the same word."""

from __future__ import annotations

import re
from enum import Enum
from typing import Literal

Norm = Literal["Linf", "L2"]
NORMS: tuple[Norm, ...] = ("Linf", "L2")  # the threat models of training and evaluation attacks

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")  # run.device, ducat eval --device
DEVICES_TEXT = "auto, cpu, cuda or cuda:N"

SEED_RANGE = (-2**63, 2**63)  # every seed ducat accepts fits torch's generator (int64)
SEEDS_TEXT = "[-2**63, 2**63)"


def valid_seed(seed: int) -> bool:
    """Whether ``seed`` is in :data:`SEED_RANGE`."""
    return SEED_RANGE[0] <= seed < SEED_RANGE[1]


class View(str, Enum):
    """The function of the input an attack takes its gradients from: the training attack (``attack.mode``, by
    :data:`TRAINING_VIEWS`) and every evaluation attack alike."""

    RAW = "raw 2C logits"
    ORIGINAL = "original C logits"
    MAX_MERGED = "projected classifier (max-merged logits)"
    LSE_MERGED = "logsumexp-merged logits"
    SURROGATE = "surrogate model (--surrogate)"


# attack.mode -> the view the training attack maximises its loss on (raw: the released code; original: the
# paper's eq. 7; merged: the deployed classifier)
TRAINING_VIEWS = {"raw": View.RAW, "original": View.ORIGINAL, "merged": View.MAX_MERGED}
