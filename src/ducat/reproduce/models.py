"""The parts of stage 1 that need the trained models themselves: transfer between models, and features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ducat import analysis
from ducat.attacks import PGD, correct_under_attack, eval_mode
from ducat.config import TrainConfig
from ducat.data import load_split
from ducat.dummy import DummyClassModel
from ducat.objectives import METHODS
from ducat.reproduce.scales import Scale
from ducat.runs import model_from_checkpoint, select_device


def _test_tensors(config: TrainConfig, data_root: str | None, n: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_split(config.data.dataset, data_root, train=False)
    return (test.images[:n].float() / 255).to(device), test.labels[:n].to(device)


def _load(path: Path) -> tuple[torch.nn.Module, TrainConfig, torch.device]:
    """A trained run's model in eval mode on the device its config names (``auto``: a GPU where there is one)."""
    model, config, _ = model_from_checkpoint(path)
    device = select_device(config.run.device)
    return model.to(device).eval(), config, device


def _pgd10(model: torch.nn.Module, config: TrainConfig) -> PGD:
    """PGD-10 on the model's raw outputs (the paper's attack), fixed seed."""
    return PGD(model, config.attack.eps, config.attack.eps / 4, 10, generator=torch.Generator().manual_seed(0))


def transfer_between(runs: list[str], out: Path, scale: Scale, data_root: str | None) -> dict[str, Any]:
    """PGD-10 examples crafted on each of the base models ``runs`` (run names, one per method), and whether
    they fool each other base model (fig. 3)."""
    models = {}
    for name in runs:
        model, config, device = _load(out / "runs" / name)
        models[METHODS[config.method.name].label] = model
    x, y = _test_tensors(config, data_root, scale.transfer_examples, device)
    on_surrogate, on_target = {}, {}
    for surrogate, model in models.items():
        x_adv = torch.cat([_pgd10(model, config)(x[i:i + 256], y[i:i + 256]) for i in range(0, len(y), 256)])
        on_surrogate[surrogate] = ~correct_under_attack(model, x_adv, y).cpu().numpy()
        for target, other in models.items():
            if target != surrogate:
                on_target[(surrogate, target)] = ~correct_under_attack(other, x_adv, y).cpu().numpy()
    return analysis.transfer_matrix(on_surrogate, on_target)


def tsne_features(out: Path, scale: Scale, data_root: str | None) -> dict[str, tuple]:
    """Penultimate features of clean and paper-protocol PGD-10 inputs, PGD-AT vs PGD-AT + DUCAT (fig. 10):
    panel name -> (features ``(2N, d)``, labels ``(2N,)``, is-adversarial ``(2N,)``, has dummy classes)."""
    panels = {}
    for label, name in (("PGD-AT", "pgd_at-s0"), ("PGD-AT + DUCAT", "pgd_at-ducat-s0")):
        model, config, device = _load(out / "runs" / name)
        with eval_mode(model):
            x, y = _test_tensors(config, data_root, scale.tsne_examples, device)
            x_adv = _pgd10(model, config)(x, y)
            features = np.concatenate([analysis.penultimate_features(model, x),
                                       analysis.penultimate_features(model, x_adv)])
        is_adv = np.r_[np.zeros(len(y), bool), np.ones(len(y), bool)]
        labels = y.cpu().numpy()
        panels[label] = (features, np.r_[labels, labels], is_adv, isinstance(model, DummyClassModel))
    return panels
