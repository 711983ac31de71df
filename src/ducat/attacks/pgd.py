"""Projected gradient descent in the L-infinity and L2 balls, written by hand because it runs
inside every training step.

Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
Gradients are taken with respect to the input only (``torch.autograd.grad``), so no parameter
gradient is accumulated or zeroed; all randomness comes from an explicit ``torch.Generator`` so a
training run resumes bit-exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ducat.vocabulary import NORMS, Norm

LossName = Literal["ce", "margin"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin to maximise, ``(B,)``: ``max_{j != y} z_j - z_y`` (positive = misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return other - true


def targeted_margin_loss(logits: torch.Tensor, target: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_target - z_y`` to maximise, ``(B,)``."""
    return logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy in fp32, ``(B,)``."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def _loss_fn(loss: LossName | LossFn) -> LossFn:
    if callable(loss):
        return loss
    if loss == "ce":
        return cross_entropy
    if loss == "margin":
        return margin_loss
    raise ValueError(f"unknown attack loss '{loss}'; choose ce or margin, or pass a function (logits, y) -> (B,)")


@contextmanager
def eval_mode(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Put ``model`` in eval mode (BatchNorm uses running statistics) for the block, then give every
    submodule back its own mode (``model.train(was)`` would impose the root's mode on all of them: a view
    such as ``model.projected()`` is a new module in train mode, and a frozen BatchNorm is in eval mode
    inside a training model)."""
    modes = [(module, module.training) for module in model.modules()] if enabled else []
    if enabled:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped ``(B, 1, ..., 1)`` to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def random_start(x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator | None) -> torch.Tensor:
    """A random point of the eps-ball around ``x`` (uniform per coordinate for L-inf; a uniform
    direction at a uniform radius for L2), clipped to [0,1]."""
    device = generator.device if generator is not None else x.device
    if norm == "Linf":
        delta = (torch.rand(x.shape, generator=generator, device=device) * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=device)
        radius = torch.rand(x.shape[0], generator=generator, device=device).view(-1, *([1] * (x.dim() - 1)))
        delta = direction / _per_example_norm(direction) * radius * eps
    return (x + delta.to(x.device, x.dtype)).clamp(0, 1)


def ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps: float, step_size: float,
                norm: Norm) -> torch.Tensor:
    """One steepest-ascent step for ``norm`` and the projection back onto the eps-ball and [0,1]."""
    if norm == "Linf":
        x_adv = x_adv + step_size * grad.sign()
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    x_adv = x_adv + step_size * grad / _per_example_norm(grad)
    delta = x_adv - x
    delta = delta * (eps / _per_example_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0, 1)


@dataclass
class PGDTrace:
    """What one call of a :class:`PGD` with ``trace=True`` went through, for the attack-failure indicators
    (Pintor et al., "Indicators of Attack Failure", NeurIPS 2022). Row ``t`` of the per-step tensors is the
    iterate after ``t`` steps: row 0 the (random) start, the last row the returned point.

    ``objective``: ``(steps + 1, B)`` float32, the per-example quantity the attack maximises (its loss);
    ``prediction``: ``(steps + 1, B)`` int64, the argmax of the attacked model's logits;
    ``grad_norm``: ``(B,)`` L2 norm of the objective's input gradient at the start (zero with no step)."""

    objective: torch.Tensor
    prediction: torch.Tensor
    grad_norm: torch.Tensor


@dataclass
class _Recorder:
    """Collects a :class:`PGDTrace` step by step (detached copies only; nothing feeds back into the attack)."""

    objective: list[torch.Tensor] = field(default_factory=list)
    prediction: list[torch.Tensor] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None

    def step(self, objective: torch.Tensor, logits: torch.Tensor, grad: torch.Tensor | None) -> None:
        self.objective.append(objective.detach().float())
        self.prediction.append(logits.detach().argmax(1))
        if self.grad_norm is None:
            self.grad_norm = grad.flatten(1).float().norm(dim=1) if grad is not None else torch.zeros_like(
                self.objective[0])

    def trace(self) -> PGDTrace:
        return PGDTrace(torch.stack(self.objective), torch.stack(self.prediction), self.grad_norm)


class PGD:
    r"""Projected gradient descent with random start, L-inf or L2.

    Arguments:
        model: maps inputs in [0,1] ``(B, C, H, W)`` to logits ``(B, K)``.
        eps: radius of the ball (in [0,1] pixel units; L-inf: max per pixel, L2: Euclidean). Default 8/255.
        step_size: step per iteration (same units). Default 2/255.
        steps: number of iterations. Default 10.
        random_start: start from a random point of the eps-ball. Default True.
        loss: ``ce`` (cross-entropy), ``margin`` (CW), or a function ``(logits, y) -> (B,)``, maximised.
        targeted: if True, ``attack(x, y, target)`` minimises CE to ``target``, or, with the
            ``margin`` loss, maximises ``z_target - z_y``.
        generator: source of the random start (for reproducibility).
        norm: ``Linf`` (signed-gradient steps) or ``L2`` (normalised-gradient steps). Default ``Linf``.
        trace: if True, each call leaves a :class:`PGDTrace` in ``attack.trace`` (per-step objective and
            prediction, gradient norm at the start), at the cost of one more forward pass for the returned
            point; the adversarial examples are the same. Default False (``attack.trace`` stays None).

    Shape:
        x: ``(B, C, H, W)`` in [0,1]; y: ``(B,)`` int64. Returns adversarial x of the same shape,
        detached, within the eps-ball of x and in [0,1].

    Example::

        >>> attack = PGD(model, eps=8/255, step_size=2/255, steps=10)
        >>> x_adv = attack(x, y)
        >>> traced = PGD(model, eps=8/255, steps=10, trace=True)
        >>> x_adv = traced(x, y); traced.trace.objective.shape      # (11, B)
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        random_start: bool = True,
        loss: LossName | LossFn = "ce",
        targeted: bool = False,
        generator: torch.Generator | None = None,
        norm: Norm = "Linf",
        trace: bool = False,
    ):
        if eps < 0 or step_size < 0 or steps < 0:
            raise ValueError(f"eps, step_size and steps must be >= 0 (got {eps}, {step_size}, {steps})")
        if norm not in NORMS:
            raise ValueError(f"unknown norm '{norm}'; choose Linf or L2")
        self.model, self.eps, self.step_size, self.steps = model, eps, step_size, steps
        self.random_start, self.targeted, self.generator, self.norm = random_start, targeted, generator, norm
        self.loss, self.tracing, self.trace = loss, trace, None
        self._loss = _loss_fn(loss)

    def objective(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """Per-example quantity the attack maximises, ``(B,)``."""
        if not self.targeted:
            return self._loss(logits, y)
        if self.loss == "margin":
            return targeted_margin_loss(logits, target, y)
        return -cross_entropy(logits, target)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        if self.targeted and target is None:
            raise ValueError("a targeted PGD needs target labels: attack(x, y, target)")
        x = x.detach()
        x_adv = random_start(x, self.eps, self.norm, self.generator) if self.random_start else x.clone()
        recorder = _Recorder() if self.tracing else None
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            logits = self.model(x_adv)
            objective = self.objective(logits, y, target)
            (grad,) = torch.autograd.grad(objective.sum(), x_adv)
            if recorder is not None:
                recorder.step(objective, logits, grad)
            x_adv = ascent_step(x_adv.detach(), grad, x, self.eps, self.step_size, self.norm)
        if recorder is not None:
            self.trace = self._finish(recorder, x_adv, y, target)
        return x_adv.detach()

    @torch.no_grad()
    def _finish(self, recorder: _Recorder, x_adv: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None) -> PGDTrace:
        """The trace, completed with the returned point (one forward pass)."""
        logits = self.model(x_adv)
        recorder.step(self.objective(logits, y, target), logits, None)
        return recorder.trace()


class TradesAttack:
    """TRADES inner maximisation (Zhang et al., ICML 2019): maximise ``KL(p(x) || p(x'))``.

    Starts at ``x + 0.001 * N(0, 1)`` as the reference code does. Shapes and ``norm`` as
    :class:`PGD`; ``y`` is unused (the attack is label-free).
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
                 generator: torch.Generator | None = None, norm: Norm = "Linf"):
        self.model, self.eps, self.step_size, self.steps, self.generator = model, eps, step_size, steps, generator
        self.norm = norm

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = x.detach()
        with torch.no_grad():
            p_clean = F.softmax(self.model(x).float(), dim=1)
        noise = torch.randn(x.shape, generator=self.generator,
                            device=self.generator.device if self.generator else x.device)
        x_adv = (x + 0.001 * noise.to(x.device, x.dtype)).clamp(0, 1)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            log_p_adv = F.log_softmax(self.model(x_adv).float(), dim=1)
            loss = F.kl_div(log_p_adv, p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = ascent_step(x_adv.detach(), grad, x, self.eps, self.step_size, self.norm)
        return x_adv.detach()
