"""What every training objective shares: settings, the attacked view of the model, the DUCAT term.

An objective is called once per training step as ``objective(model, x, y, ducat_active=...)``
with un-augmented inputs ``x`` (``(B, C, H, W)`` in [0,1]) and labels ``y`` (``(B,)``); it crafts
the training attack, runs the forward pass(es) and returns a :class:`StepOutput`. The model is
either a plain C-output classifier (baselines) or a :class:`~ducat.dummy.DummyClassModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ducat.attacks import PGD, Norm, eval_mode
from ducat.attacks.fold import FoldedView, folded
from ducat.dummy import DummyClassModel, ducat_loss, model_view
from ducat.vocabulary import TRAINING_VIEWS

AttackMode = Literal["raw", "original", "merged"]
Augment = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class AttackSettings:
    """The training attack. ``eps`` and ``step_size`` in [0,1] pixel units (8/255 = 0.0314); ``norm``
    (``Linf`` or ``L2``) is the ball ``eps`` is the radius of.

    ``mode`` (DUCAT models only): ``raw`` attacks CE on the 2C logits (released code), ``original``
    the first C logits (paper eq. 7), ``merged`` the projected classifier (max-merged logits).
    ``bn_eval``: craft the attack with BatchNorm in eval mode (released code) or in train mode
    (Madry/Rice-style). ``random_start``: start PGD from a uniform point in the eps-ball.
    ``fold_bn``: with ``bn_eval``, craft on a view whose eval-mode BatchNorms are folded into the
    preceding convolutions (the same function to float rounding, fewer memory passes; it reads the live
    weights, and the trained weights never see it).
    """

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    mode: AttackMode = "raw"
    bn_eval: bool = True
    random_start: bool = True
    norm: Norm = "Linf"
    fold_bn: bool = True


@dataclass(frozen=True, kw_only=True)
class DucatSettings:
    """DUCAT weights (paper eq. 9): alpha weighs clean vs adversarial, beta1 the clean target's
    mass on y, beta2 the adversarial target's mass on dummy(y)."""

    alpha: float = 0.5
    beta1: float = 0.75
    beta2: float = 1.0


@dataclass
class StepOutput:
    """Loss to back-propagate and detached logits for training statistics (``(B, K)`` or None)."""

    loss: torch.Tensor
    logits_clean: torch.Tensor | None
    logits_adv: torch.Tensor


METHODS: dict[str, type["Objective"]] = {}  # name -> objective class, in registration order


def register_method(cls: type["Objective"]) -> type["Objective"]:
    """Class decorator: make an :class:`Objective` subclass a training method under its ``name``. The config's
    method section, its checks, the presets, the cost model and ``ducat reproduce``'s grid all read
    :data:`METHODS`, so a method is this one class."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a method named '{cls.name}' is registered already")
    METHODS[cls.name] = cls
    return cls


def attacked_view(model: nn.Module, mode: AttackMode) -> nn.Module:
    """The function of the input that the training attack maximises its loss on: ``attack.mode``'s view
    (:data:`ducat.vocabulary.TRAINING_VIEWS`) of a DUCAT model, the model itself otherwise."""
    if mode not in TRAINING_VIEWS:
        raise ValueError(f"unknown attack mode '{mode}'; choose one of: {', '.join(TRAINING_VIEWS)}")
    return model_view(model, TRAINING_VIEWS[mode]) if isinstance(model, DummyClassModel) else model


def dummy_mask_probability(probs: torch.Tensor, y: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Probability of the true class, ``(B,)``; on a DUCAT model ``p_y + p_dummy(y)`` (projected)."""
    p = probs.gather(1, y[:, None]).squeeze(1)
    if isinstance(model, DummyClassModel):
        p = p + probs.gather(1, model.dummy_index[y][:, None]).squeeze(1)
    return p


@dataclass(frozen=True)
class NoParams:
    """The hyperparameters of a method that has none of its own (PGD-AT)."""


class Objective:
    """Base class of a training method. A method is one subclass, registered with :func:`register_method`, that
    declares everything the rest of ducat needs to know about it:

    - ``name``: its config name (``method.name``), ``label``: its name in tables;
    - ``Params``: a frozen dataclass of its hyperparameters, set in a config as ``method.<field>=value`` (checks of
      their values in its ``__post_init__``, raising ValueError);
    - its cost per training step for the cost model (:meth:`step_cost`): ``views`` augmented copies of each image
      (2 for Consistency-AT), ``forwards_clean`` (whether its plain step forwards the clean batch beside the
      adversarial one; a DUCAT step always does) and ``extra_forwards`` (forward passes of its attack beyond PGD's,
      e.g. TRADES' clean target).

    An instance holds the settings, its ``params``, the generator for attack random starts and the module the
    training forward pass runs through (``forward_module``, e.g. ``DistributedDataParallel(model)``; default the
    model)."""

    name = "base"
    label = "base"
    Params: type = NoParams
    views = 1
    forwards_clean = True
    extra_forwards = 0

    def __init__(self, attack: AttackSettings, ducat: DucatSettings, generator: torch.Generator | None = None,
                 forward_module: nn.Module | None = None, params: Any = None):
        self.attack, self.ducat, self.generator, self.forward_module = attack, ducat, generator, forward_module
        self.params = self.Params() if params is None else params
        self._folded: tuple[nn.Module, nn.Module] | None = None  # (model, its folded attacked view)

    @classmethod
    def step_cost(cls, steps: int, ducat_active: bool) -> tuple[int, int]:
        """(forward-equivalents ``F`` per training image, passes per batch) of one training step with a PGD-``steps``
        attack: each step of the attack is a forward and an input-gradient backward (2F), the training step 3F
        per forwarded batch (forward and backward through the weights)."""
        train = 6 if ducat_active or cls.forwards_clean else 3
        return cls.views * (2 * steps + train) + cls.extra_forwards, 2 * steps + 2 + cls.extra_forwards

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The training forward pass (through ``forward_module`` when set; attacks use ``model``)."""
        return (self.forward_module or model)(x)

    def attack_target(self, model: nn.Module) -> nn.Module:
        """The attacked view of ``model`` (``attack.mode``); with ``bn_eval`` and ``fold_bn`` its BatchNorms
        folded, refreshed from the current weights (the fx trace is made once per model)."""
        a = self.attack
        if not (a.bn_eval and a.fold_bn):
            return attacked_view(model, a.mode)
        if self._folded is None or self._folded[0] is not model:
            self._folded = (model, folded(attacked_view(model, a.mode)))
        view = self._folded[1]
        if isinstance(view, FoldedView):
            view.refresh()
        return view

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD on CE over the attacked view of the model, BatchNorm per ``attack.bn_eval``."""
        a = self.attack
        with eval_mode(model, a.bn_eval):
            pgd = PGD(self.attack_target(model), a.eps, a.step_size, a.steps, a.random_start,
                      generator=self.generator, norm=a.norm)
            return pgd(x, y)

    def clean_and_adversarial(self, model: nn.Module, x: torch.Tensor,
                              y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Craft x' and return the logits of ``x`` and ``x'`` from one forward pass over ``[x; x']``."""
        x_adv = self.craft(model, x, y)
        logits_clean, logits_adv = self.forward(model, torch.cat([x, x_adv])).chunk(2)
        return logits_clean, logits_adv

    def classification(self, model: nn.Module, logits_clean: torch.Tensor, logits_adv: torch.Tensor,
                       y: torch.Tensor, ducat_active: bool) -> torch.Tensor:
        """DUCAT term when active (needs a DummyClassModel), else the method's plain CE term."""
        if ducat_active:
            if not isinstance(model, DummyClassModel):
                raise TypeError("DUCAT needs a DummyClassModel (2C outputs); see ducat.dummy.widen_model")
            d = self.ducat
            return ducat_loss(logits_clean, logits_adv, y, model.dummy_index, d.alpha, d.beta1, d.beta2)
        return self.plain_classification(logits_clean, logits_adv, y)

    def plain_classification(self, logits_clean: torch.Tensor, logits_adv: torch.Tensor,
                             y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_adv.float(), y)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, ducat_active: bool,
                 augment: Augment) -> StepOutput:
        raise NotImplementedError
