"""Factories of the evaluation attacks: each returns ``factory(context) -> craft(x, y, seed) -> x_adv``.

``x``: ``(B, C, H, W)`` in [0,1], ``y``: ``(B,)``; ``seed`` is derived by the runner from the spec and
the batch, so every attack is reproducible and independent of the others. The attacks themselves
are :class:`ducat.attacks.PGD` (hand-written: it is also the training attack) and AutoAttack from
``pyautoattack`` (the official code, repackaged).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ducat.attacks import PGD, dummy_aware_weighted_ce
from ducat.attacks.fold import folded
from ducat.dummy import DummyClassModel, OriginalLogits, deployed
from ducat.eval.plan import EvalSettings, Factory, View

Craft = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def model_views(model: nn.Module) -> dict[View, nn.Module]:
    """Every view an attack may take gradients from (a plain model has one: itself), each with its eval-mode
    BatchNorms folded into the preceding convolutions (:mod:`ducat.attacks.fold`): the same function to
    float rounding, computed faster. Adversarial inputs are always scored on the model itself."""
    if not isinstance(model, DummyClassModel):
        view = folded(model)
        return {View.RAW: view, View.MAX_MERGED: view}
    views = {View.RAW: model, View.ORIGINAL: OriginalLogits(model), View.MAX_MERGED: deployed(model),
             View.LSE_MERGED: model.projected("logsumexp")}
    return {name: folded(view) for name, view in views.items()}


@dataclass
class AttackContext:
    """What a factory may use: the model (eval mode), its views, the settings and this attack's budget."""

    model: nn.Module
    views: dict[View, nn.Module]
    settings: EvalSettings
    eps: float
    log: list[str] = field(default_factory=list)  # AutoAttack's log lines, for the sanity checks

    @property
    def step(self) -> float:
        return self.settings.step if self.eps == self.settings.eps else self.eps / 4

    def pgd(self, view: View, steps: int, seed: int, device: torch.device, **kwargs) -> PGD:
        """PGD on ``view`` with this attack's budget, step and norm; random start from ``seed`` on ``device``."""
        generator = torch.Generator(device=device).manual_seed(seed)
        return PGD(self.views[view], self.eps, self.step, steps, generator=generator, norm=self.settings.norm,
                   **kwargs)


def sub_seed(seed: int, part: int | str) -> int:
    """A seed for one part of an attack (a restart, a target rank), independent of the others: 63 bits."""
    digest = hashlib.sha256(f"{seed}/{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def first_success(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, runs: int,
                  run: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run ``run(i, idx)`` for i < runs on the examples ``idx`` not yet fooled; keep each one's first success.

    Success = the deployed (projected) prediction differs from ``y``."""
    best = x.clone()
    alive = torch.ones(len(y), dtype=torch.bool, device=x.device)
    for i in range(runs):
        idx = alive.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        x_adv = run(i, idx)
        with torch.no_grad():
            fooled = ctx.views[View.MAX_MERGED](x_adv).argmax(1) != y[idx]
        best[idx[fooled]] = x_adv[fooled]
        alive[idx[fooled]] = False
    return best


def pgd(view: View, steps: int) -> Factory:
    """Untargeted PGD on CE over ``view``, step eps/4 (the spec's budget)."""
    def factory(ctx: AttackContext) -> Craft:
        return lambda x, y, seed: ctx.pgd(view, steps, seed, x.device)(x, y)
    return factory


def targeted_random(view: View, dummy_targets: bool) -> Factory:
    """Targeted PGD-10 (CE) toward a random other class, or toward that class's dummy (paper table 4)."""
    def factory(ctx: AttackContext) -> Craft:
        def craft(x, y, seed):
            with torch.no_grad():
                c = ctx.views[View.MAX_MERGED](x[:1]).shape[1]
            drawn = torch.randint(1, c, (len(y),), generator=torch.Generator().manual_seed(seed))
            target = ((y.cpu() + drawn) % c).to(y.device)
            if dummy_targets:
                target = ctx.model.dummy_index[target]
            return ctx.pgd(view, 10, seed, x.device, targeted=True)(x, y, target)
        return craft
    return factory


def targeted_top() -> Factory:
    """Targeted PGD-100 margin toward each of the top-k merged classes, first success kept."""
    def factory(ctx: AttackContext) -> Craft:
        view = View.MAX_MERGED

        def craft(x, y, seed):
            with torch.no_grad():
                scores = ctx.views[view](x).scatter(1, y[:, None], float("-inf"))
            k = min(ctx.settings.n_targets, scores.shape[1] - 1)
            targets = scores.topk(k, dim=1).indices

            def run(rank, idx):
                attack = ctx.pgd(view, 100, sub_seed(seed, rank), x.device, loss="margin", targeted=True)
                return attack(x[idx], y[idx], targets[idx, rank])
            return first_success(ctx, x, y, k, run)
        return craft
    return factory


def margin_restarts() -> Factory:
    """PGD-100 on the CW margin of the projected classifier, ``margin_restarts`` random restarts."""
    def factory(ctx: AttackContext) -> Craft:
        def craft(x, y, seed):
            def run(restart, idx):
                return ctx.pgd(View.MAX_MERGED, 100, sub_seed(seed, restart), x.device, loss="margin")(x[idx], y[idx])
            return first_success(ctx, x, y, ctx.settings.margin_restarts, run)
        return craft
    return factory


def dawa() -> Factory:
    """DAWA-style: PGD on ``w CE(z, y) + (1-w) CE(z, dummy(y))`` over the raw 2C logits, one run per weight,
    first success kept (see :mod:`ducat.attacks.dummy_aware`)."""
    def factory(ctx: AttackContext) -> Craft:
        s = ctx.settings

        def craft(x, y, seed):
            def run(i, idx):
                loss = dummy_aware_weighted_ce(s.dawa_weights[i], ctx.model.dummy_index)
                return ctx.pgd(View.RAW, s.dawa_steps, sub_seed(seed, i), x.device, loss=loss)(x[idx], y[idx])
            return first_success(ctx, x, y, len(s.dawa_weights), run)
        return craft
    return factory


WHITE_BOX = ("apgd-ce", "apgd-t", "fab-t")  # standard AutoAttack without Square, the one attack that uses no gradient


def autoattack(view: View, white_box: bool = False) -> Factory:
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square 5000) from ``pyautoattack`` on ``view``; with
    ``white_box`` its gradient attacks alone (:data:`WHITE_BOX`, standard parameters).

    Seeded with the evaluation's own ``seed`` (not a derived one), so that on a plain model the result
    equals calling pyautoattack with that seed."""
    def factory(ctx: AttackContext) -> Craft:
        from pyautoattack import AutoAttack

        def craft(x, y, seed):
            aa = AutoAttack(ctx.views[view], eps=ctx.eps, norm=ctx.settings.norm, seed=ctx.settings.seed,
                            version="standard", device=x.device)
            if white_box:
                aa.attacks_to_run = list(WHITE_BOX)
            handler = _ListHandler(ctx.log)
            aa.logger.addHandler(handler)
            aa.logger.setLevel(logging.DEBUG)
            try:
                x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=ctx.settings.batch_size)
            finally:
                aa.logger.removeHandler(handler)
            return x_adv
        return craft
    return factory


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())
