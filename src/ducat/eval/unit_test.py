"""Attack unit tests: Zimmermann et al.'s binarization test ("Increasing Confidence in Adversarial Robustness
Evaluations", NeurIPS 2022), adapted to dummy-class heads.

For each test example ``x`` (label ``y``) a point ``x_known`` on the boundary of the eps-ball is drawn (an
L-inf vertex, or an L2 sphere point, clipped to [0,1], which only shortens it). The evaluated network is
kept; only its classifier layer (the last ``nn.Linear``) is refitted, on the network's own features, so
that the deployed classifier predicts the runner-up class ``t`` at ``x_known`` and ``y`` at ``x`` and at
:data:`INNER` random points of the ball. On a 2C model the refitted layer keeps 2C outputs and the model's
pairing, and is fitted and checked through the projection (logsumexp-merged logits for the fit, the
projected prediction for the check), so the dummy logits stay a place an attack can be lured into. An
example whose fitted problem holds (``x`` scored ``y``, ``x_known`` scored ``t``) has an adversarial example
within eps by construction; every attack of the plan, run on every such example, must find one.

Not applicable: models without an ``nn.Linear`` classifier layer, and the attacks that aim at a random
class (they find ``t`` only by chance).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ducat.eval.catalog as catalog
from ducat.dummy import DummyClassModel, find_last_linear, merge_logits
from ducat.eval.runner import Outcome
from ducat.eval.settings import EvalSettings
from ducat.eval.vocabulary import AttackSpec, Scope

INNER = 8  # random points of the eps-ball per example that the refitted head keeps at the true class
FIT_STEPS = 300  # Adam steps of the refit (lr 0.01), on (INNER + 2) x n feature vectors
RANDOM_TARGETS = tuple(e.id for e in (catalog.paper_targeted_original, catalog.paper_targeted_dummy,
                                      catalog.adaptive_targeted_original))  # no known target to find


@dataclass
class Problem:
    """A unit-test problem: ``model`` (the refitted copy), test examples ``x`` ``(n, C, H, W)`` with labels
    ``y`` ``(n,)``, the known adversarial points ``x_known`` (same shape) of class ``target`` ``(n,)``, and
    ``valid`` ``(n,)`` bool, where the fitted problem holds."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    x_known: torch.Tensor
    target: torch.Tensor
    valid: np.ndarray


def _ball_points(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator, boundary: bool) -> torch.Tensor:
    """Random points of the eps-balls around ``x`` in [0,1]: on the boundary (an L-inf vertex or the L2 sphere)
    or anywhere inside (uniform per coordinate, or a uniform direction at a uniform radius)."""
    noise = torch.rand(x.shape, generator=generator) * 2 - 1 if norm == "Linf" else torch.randn(x.shape,
                                                                                              generator=generator)
    noise = noise.to(x.device, x.dtype)
    if norm == "Linf":
        delta = noise.sign() if boundary else noise
    else:
        delta = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        if not boundary:
            delta = delta * torch.rand(len(x), generator=generator).to(x.device).view(-1, *[1] * (x.dim() - 1))
    return (x + eps * delta).clamp(0, 1)


def _merged(model: nn.Module, logits: torch.Tensor, mode: str) -> torch.Tensor:
    return merge_logits(logits, model.dummy_index, mode) if isinstance(model, DummyClassModel) else logits


def build_problem(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: EvalSettings) -> Problem:
    """The refitted model and its test problems for the examples ``x`` (labels ``y``), seeded by the settings'
    seed. Raises ValueError when the model has no ``nn.Linear`` classifier layer."""
    unit = copy.deepcopy(model).eval()
    net = unit.net if isinstance(unit, DummyClassModel) else unit
    head = net.get_submodule(find_last_linear(net))
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        target = _merged(unit, unit(x), "max").scatter(1, y[:, None], float("-inf")).argmax(1)
    x_known = _ball_points(x, settings.eps, settings.norm, generator, boundary=True)
    inner = torch.cat([_ball_points(x, settings.eps, settings.norm, generator, boundary=False) for _ in range(INNER)])
    features = _features(unit, head, torch.cat([x, x_known, inner]))
    labels = torch.cat([y, target, y.repeat(INNER)])
    weights = torch.cat([torch.ones_like(y), torch.full_like(y, INNER + 1), torch.ones_like(y).repeat(INNER)])
    _fit(unit, head, features, labels, weights.float())
    with torch.no_grad():
        scored = _merged(unit, unit(torch.cat([x, x_known])), "max").argmax(1)
    valid = (scored[:len(x)] == y) & (scored[len(x):] == target)
    return Problem(unit, x, y, x_known, target, valid.cpu().numpy())


def _features(model: nn.Module, head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The inputs of ``head`` when ``model`` runs on ``x``: ``(N, in_features)``."""
    captured = []
    hook = head.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    return captured[0]


def _fit(model: nn.Module, head: nn.Linear, features: torch.Tensor, labels: torch.Tensor,
         weights: torch.Tensor) -> None:
    """Refit ``head`` in place: weighted CE of the logsumexp-merged logits (the logits of a plain model)."""
    params = list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=0.01)
    for _ in range(FIT_STEPS):
        loss = (F.cross_entropy(_merged(model, head(features), "logsumexp"), labels, reduction="none") * weights).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p in params:
        p.requires_grad_(False)


def unit_plan(plan: list[AttackSpec]) -> list[AttackSpec]:
    """The attacks of ``plan`` to unit-test, each on every example (no early stop) under its own key."""
    return [replace(spec, scope=Scope.CLEAN_CORRECT, variant="unit-test") for spec in plan
            if spec.factory is not None and spec.eps_factor == 1.0 and spec.counted and spec.id not in RANDOM_TARGETS]


def verdicts(plan: list[AttackSpec], outcome: Outcome) -> dict[str, dict[str, Any]]:
    """Per attack id of ``plan`` (:func:`unit_plan`): ``found`` of ``tests`` known adversarial examples, and
    ``status`` PASS (all found) or FAIL."""
    out = {}
    for spec in plan:
        result = outcome.results[spec.key]
        tests, found = int(result.attacked.sum()), int((result.attacked & ~result.robust).sum())
        out[spec.id] = {"tests": tests, "found": found, "status": "PASS" if found == tests else "FAIL"}
    return out
