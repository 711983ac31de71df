"""L-infinity PGD, written by hand because it runs inside every training step.

Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
Gradients are taken with respect to the input only (``torch.autograd.grad``), so no parameter
gradient is accumulated or zeroed; all randomness comes from an explicit ``torch.Generator`` so a
training run resumes bit-exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

LossName = Literal["ce", "margin", "dlr"]


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin to maximise, ``(B,)``: ``max_{j != y} z_j - z_y`` (positive = misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return other - true


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference-of-logits-ratio loss to maximise (Croce & Hein, ICML 2020), ``(B,)``.

    Needs at least 3 classes."""
    top = logits.sort(dim=1, descending=True).values
    return margin_loss(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_margin_loss(logits: torch.Tensor, target: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_target - z_y`` to maximise, ``(B,)``."""
    return logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)


def _loss_fn(name: LossName) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "ce":
        return lambda z, y: F.cross_entropy(z.float(), y, reduction="none")
    if name == "margin":
        return margin_loss
    if name == "dlr":
        return dlr_loss
    raise ValueError(f"unknown attack loss '{name}'; choose ce, margin or dlr")


@contextmanager
def eval_mode(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Put ``model`` in eval mode (BatchNorm uses running statistics) for the block, then restore."""
    was_training = model.training
    if enabled:
        model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _random_uniform(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.rand(x.shape, generator=generator, device=generator.device if generator else x.device)
    return (noise.to(x.device, x.dtype) * 2 - 1) * eps


class PGD:
    r"""L-infinity projected gradient descent with random start.

    Arguments:
        model: maps inputs in [0,1] ``(B, C, H, W)`` to logits ``(B, K)``.
        eps: maximum perturbation (L-inf, in [0,1] pixel units). Default 8/255.
        step_size: step per iteration. Default 2/255.
        steps: number of iterations. Default 10.
        random_start: start from a uniform point in the eps-ball. Default True.
        loss: ``ce`` (cross-entropy), ``margin`` (CW) or ``dlr``, maximised (untargeted).
        targeted: if True, ``attack(x, y, target)`` minimises CE to ``target``, or, with the
            ``margin`` loss, maximises ``z_target - z_y``.
        generator: source of the random start (for reproducibility).

    Shape:
        x: ``(B, C, H, W)`` in [0,1]; y: ``(B,)`` int64. Returns adversarial x of the same shape,
        detached, within the eps-ball of x and in [0,1].

    Example::

        >>> attack = PGD(model, eps=8/255, step_size=2/255, steps=10)
        >>> x_adv = attack(x, y)
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        random_start: bool = True,
        loss: LossName = "ce",
        targeted: bool = False,
        generator: torch.Generator | None = None,
    ):
        if eps < 0 or step_size < 0 or steps < 0:
            raise ValueError(f"eps, step_size and steps must be >= 0 (got {eps}, {step_size}, {steps})")
        self.model, self.eps, self.step_size, self.steps = model, eps, step_size, steps
        self.random_start, self.targeted, self.generator = random_start, targeted, generator
        self.loss_name = loss
        self._loss = _loss_fn(loss)

    def objective(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """Per-example quantity the attack maximises, ``(B,)``."""
        if not self.targeted:
            return self._loss(logits, y)
        if self.loss_name == "margin":
            return targeted_margin_loss(logits, target, y)
        return -F.cross_entropy(logits.float(), target, reduction="none")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        if self.targeted and target is None:
            raise ValueError("a targeted PGD needs target labels: attack(x, y, target)")
        x = x.detach()
        x_adv = x + _random_uniform(x, self.eps, self.generator) if self.random_start else x.clone()
        x_adv = x_adv.clamp(0, 1)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            loss = self.objective(self.model(x_adv), y, target).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + self.step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0, 1)
        return x_adv.detach()


class TradesAttack:
    """TRADES inner maximisation (Zhang et al., ICML 2019): maximise ``KL(p(x) || p(x'))``.

    Starts at ``x + 0.001 * N(0, 1)`` as the reference code does. Shapes as :class:`PGD`;
    ``y`` is unused (the attack is label-free).
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
                 generator: torch.Generator | None = None):
        self.model, self.eps, self.step_size, self.steps, self.generator = model, eps, step_size, steps, generator

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
            x_adv = x_adv.detach() + self.step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0, 1)
        return x_adv.detach()
