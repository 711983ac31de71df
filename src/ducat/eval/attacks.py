"""Factories of the evaluation attacks: each returns ``factory(context) -> craft(x, y, seed) -> x_adv``.

``x``: ``(B, C, H, W)`` in [0,1], ``y``: ``(B,)``; ``seed`` is derived by the runner from the spec and
the batch, so every attack is reproducible and independent of the others. The attacks themselves
are :class:`ducat.attacks.PGD` (hand-written: it is also the training attack) and AutoAttack from
``pyautoattack`` (the official code, repackaged).

At ``strength`` s > 1 (the convergence check) every attack runs s times its steps (AutoAttack: iterations
and Square queries) and s times its restarts, first success kept; at strength 1 each runs exactly as it
always did. With ``settings.indicators`` every PGD run leaves its trace in the context
(:attr:`AttackContext.traced`, with the batch positions it attacked) for :mod:`ducat.eval.indicators`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ducat.attacks import PGD, dummy_aware_weighted_ce
from ducat.attacks.fold import folded
from ducat.dummy import DummyClassModel, deployed, model_view
from ducat.eval.settings import AUTOATTACK_PARTS, EvalSettings
from ducat.eval.vocabulary import Factory, View
from ducat.runtime import derive_seed

Craft = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
Run = Callable[[int, torch.Tensor, int], torch.Tensor]  # run(part, idx, seed) -> x_adv of x[idx]


def model_views(model: nn.Module, surrogate: nn.Module | None = None) -> dict[View, nn.Module]:
    """Every view an attack may take gradients from (a plain model has one: itself; a ``surrogate`` adds its
    deployed classifier), each with its eval-mode BatchNorms folded into the preceding convolutions
    (:mod:`ducat.attacks.fold`): the same function to float rounding, computed faster. Adversarial inputs
    are always scored on the model itself."""
    extra = {} if surrogate is None else {View.SURROGATE: folded(deployed(surrogate))}
    if not isinstance(model, DummyClassModel):
        view = folded(model)
        return {View.RAW: view, View.MAX_MERGED: view} | extra
    views = (View.RAW, View.ORIGINAL, View.MAX_MERGED, View.LSE_MERGED)
    return {view: folded(model_view(model, view)) for view in views} | extra


@dataclass
class AttackContext:
    """What a factory may use: the model (eval mode), its views, the settings, this attack's budget and
    strength. ``traced``: every traced PGD run of the batch with the batch positions it attacked (None: all)."""

    model: nn.Module
    views: dict[View, nn.Module]
    settings: EvalSettings
    eps: float
    log: list[str] = field(default_factory=list)  # AutoAttack's log lines, for the sanity checks
    strength: int = 1
    traced: list[tuple[PGD, torch.Tensor | None]] = field(default_factory=list)

    @property
    def step(self) -> float:
        return self.settings.step if self.eps == self.settings.eps else self.eps / 4

    def pgd(self, view: View, steps: int, seed: int, device: torch.device, **kwargs) -> PGD:
        """PGD on ``view`` with this attack's budget, step and norm, ``steps`` times the strength; random start
        from ``seed`` on ``device``; traced when the settings ask for the indicators."""
        generator = torch.Generator(device=device).manual_seed(seed)
        attack = PGD(self.views[view], self.eps, self.step, steps * self.strength, generator=generator,
                     norm=self.settings.norm, trace=self.settings.indicators, **kwargs)
        self.traced.append((attack, None))
        return attack


def sub_seed(seed: int, part: int | str) -> int:
    """A seed for one part of an attack (a restart, a target rank), independent of the others: 63 bits."""
    return derive_seed(seed, part)


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
        before = len(ctx.traced)
        x_adv = run(i, idx)
        ctx.traced[before:] = [(attack, idx) for attack, _ in ctx.traced[before:]]
        with torch.no_grad():
            fooled = ctx.views[View.MAX_MERGED](x_adv).argmax(1) != y[idx]
        best[idx[fooled]] = x_adv[fooled]
        alive[idx[fooled]] = False
    return best


def restarted(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, seed: int, runs: int, run: Run) -> torch.Tensor:
    """:func:`first_success` over ``run(part, idx, seed)`` for part < ``runs``, each part ``ctx.strength`` times:
    repeat 0 with ``sub_seed(seed, part)`` (the attack's own runs), repeat r with another seed."""
    def one(i: int, idx: torch.Tensor) -> torch.Tensor:
        repeat, part = divmod(i, runs)
        return run(part, idx, sub_seed(seed, part if repeat == 0 else f"{part}/repeat{repeat}"))
    return first_success(ctx, x, y, runs * ctx.strength, one)


def single(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, seed: int, run: Run) -> torch.Tensor:
    """``run(0, all, seed)``: one run at strength 1; at strength s, s restarts (seeds derived from ``seed``)."""
    if ctx.strength == 1:
        return run(0, torch.arange(len(y), device=y.device), seed)
    return restarted(ctx, x, y, seed, 1, run)


def pgd(view: View, steps: int) -> Factory:
    """Untargeted PGD on CE over ``view``, step eps/4 (the spec's budget)."""
    def factory(ctx: AttackContext) -> Craft:
        def craft(x, y, seed):
            return single(ctx, x, y, seed, lambda _, idx, s: ctx.pgd(view, steps, s, x.device)(x[idx], y[idx]))
        return craft
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
            return single(ctx, x, y, seed, lambda _, idx, s: ctx.pgd(view, 10, s, x.device, targeted=True)(
                x[idx], y[idx], target[idx]))
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

            def run(rank, idx, run_seed):
                attack = ctx.pgd(view, 100, run_seed, x.device, loss="margin", targeted=True)
                return attack(x[idx], y[idx], targets[idx, rank])
            return restarted(ctx, x, y, seed, k, run)
        return craft
    return factory


def margin_restarts(restarts: int | None = None) -> Factory:
    """PGD-100 on the CW margin of the projected classifier, ``restarts`` random restarts (default: the settings'
    ``margin_restarts``)."""
    def factory(ctx: AttackContext) -> Craft:
        def craft(x, y, seed):
            def run(_, idx, run_seed):
                return ctx.pgd(View.MAX_MERGED, 100, run_seed, x.device, loss="margin")(x[idx], y[idx])
            return restarted(ctx, x, y, seed, restarts or ctx.settings.margin_restarts, run)
        return craft
    return factory


def dawa() -> Factory:
    """DAWA-style: PGD on ``w CE(z, y) + (1-w) CE(z, dummy(y))`` over the raw 2C logits, one run per weight,
    first success kept (see :mod:`ducat.attacks.dummy_aware`)."""
    def factory(ctx: AttackContext) -> Craft:
        s = ctx.settings

        def craft(x, y, seed):
            def run(i, idx, run_seed):
                loss = dummy_aware_weighted_ce(s.dawa_weights[i], ctx.model.dummy_index)
                return ctx.pgd(View.RAW, s.dawa_steps, run_seed, x.device, loss=loss)(x[idx], y[idx])
            return restarted(ctx, x, y, seed, len(s.dawa_weights), run)
        return craft
    return factory


WHITE_BOX = ("apgd-ce", "apgd-t", "fab-t")  # standard AutoAttack without Square, the one attack that uses no gradient


def autoattack(view: View, white_box: bool = False) -> Factory:
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square 5000) from ``pyautoattack`` on ``view``, or the subset
    the settings' ``autoattack`` names; with ``white_box`` its gradient attacks alone (:data:`WHITE_BOX`), standard
    parameters either way.

    Seeded with the evaluation's own ``seed`` (not a derived one), so that on a plain model the result
    equals calling pyautoattack with that seed. At strength s: s times the APGD iterations and restarts, the
    FAB iterations (FAB-T's restarts are fixed at 1 by pyautoattack) and the Square queries."""
    def factory(ctx: AttackContext) -> Craft:
        def craft(x, y, seed):
            parts = [part for part in ctx.settings.autoattack if not white_box or part in WHITE_BOX]
            aa = _autoattack(ctx, view, x.device, None if tuple(parts) == AUTOATTACK_PARTS else parts)
            for attack, names in ((aa.apgd, ("n_iter", "n_restarts")), (aa.apgd_targeted, ("n_iter", "n_restarts")),
                                  (aa.fab, ("n_iter",)), (aa.square, ("n_queries",))):
                for name in names:
                    setattr(attack, name, getattr(attack, name) * ctx.strength)
            return _run_logged(ctx, aa, x, y)
        return craft
    return factory


def square(queries: int) -> Factory:
    """AutoAttack's Square (margin loss, the official schedule) alone with ``queries`` queries on the projected
    classifier: the follow-up when Square removed points after the white-box attacks."""
    def factory(ctx: AttackContext) -> Craft:
        def craft(x, y, seed):
            aa = _autoattack(ctx, View.MAX_MERGED, x.device, ["square"])
            aa.square.n_queries = queries * ctx.strength
            return _run_logged(ctx, aa, x, y)
        return craft
    return factory


def _autoattack(ctx: AttackContext, view: View, device: torch.device, attacks: list[str] | None):
    """pyautoattack's standard AutoAttack on ``view``, seeded with the evaluation's seed; ``attacks``: a subset."""
    from pyautoattack import AutoAttack  # heavy: only when AutoAttack runs

    aa = AutoAttack(ctx.views[view], eps=ctx.eps, norm=ctx.settings.norm, seed=ctx.settings.seed,
                    version="standard", device=device)
    if attacks is not None:
        aa.attacks_to_run = attacks
    return aa


def _run_logged(ctx: AttackContext, aa, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``aa.run_standard_evaluation`` with its log lines appended to ``ctx.log``."""
    handler = _ListHandler(ctx.log)
    aa.logger.addHandler(handler)
    aa.logger.setLevel(logging.DEBUG)
    try:
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=ctx.settings.batch_size)
    finally:
        aa.logger.removeHandler(handler)
    return x_adv


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())
