"""Per-epoch validation: clean and PGD accuracy of the deployed (projected) classifier."""

from __future__ import annotations

import torch
from torch import nn

from ducat.attacks import PGD, correct_under_attack, eval_mode
from ducat.attacks.fold import folded
from ducat.config import TrainConfig
from ducat.data import TensorData
from ducat.distributed import DistContext
from ducat.dummy import deployed


def epoch_validation(model: nn.Module, val: TensorData, test: TensorData | None, config: TrainConfig,
                     dist: DistContext) -> tuple[dict[str, float], float]:
    """An epoch's validation columns (``val_*``, and ``test_*`` when the test split selects) and the score
    that selects the best checkpoint (PGD accuracy on the selecting split)."""
    eval_split = val if len(val) else test
    metrics = validate_model(model, eval_split, config, dist=dist)
    row = {f"val_{k}": v for k, v in metrics.items()}
    if config.validation.select != "test" or eval_split is test:
        return row, metrics["pgd_acc"]
    test_metrics = validate_model(model, test, config, dist=dist)
    return row | {f"test_{k}": v for k, v in test_metrics.items()}, test_metrics["pgd_acc"]


def validate_model(model: nn.Module, data: TensorData, config: TrainConfig, seed: int = 0,
                   dist: DistContext = DistContext()) -> dict[str, float]:
    """Clean and PGD accuracy (fractions) of the deployed classifier on the first ``validation.n_examples``
    of ``data``, sharded across ranks and the counts summed.

    The PGD attack targets the projected classifier (CE on max-merged logits) with the training attack's
    norm and eps, ``validation.pgd_steps`` steps of eps/4, in fp32 (reduced precision could weaken the attack and
    flatter the model). Its own seeded generator never moves the training RNG."""
    v, a = config.validation, config.attack
    n = len(data) if v.n_examples is None else min(len(data), v.n_examples)
    mine = dist.shard(n)
    x, y = data.images[mine].float() / 255, data.labels[mine]
    generator = torch.Generator(device=data.images.device).manual_seed(seed + dist.rank)
    with eval_mode(model):
        attack = PGD(folded(deployed(model)), a.eps, a.eps / 4, v.pgd_steps, generator=generator, norm=a.norm)
        clean = correct_under_attack(model, x, y, None, v.batch_size).sum()
        robust = correct_under_attack(model, x, y, attack, v.batch_size).sum()
    counts = dist.all_reduce_sum(torch.stack([clean, robust]).float())
    clean_count, robust_count = counts.tolist()
    return {"clean_acc": clean_count / max(n, 1), "pgd_acc": robust_count / max(n, 1), "n": n}
