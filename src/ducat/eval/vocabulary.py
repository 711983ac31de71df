"""The words of an evaluation plan, shared by every module of :mod:`ducat.eval`: the protocols, which examples
an attack attacks, how its result is scored, and :class:`AttackSpec`, one attack of a plan
(``docs/method.md``, "Evaluation protocols"). The views an attack takes gradients from are
:class:`ducat.vocabulary.View`, the training attack's too."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from ducat.vocabulary import View

Factory = Callable[[Any], Callable]  # factory(AttackContext) -> craft(x, y, seed) -> x_adv


class Protocol(str, Enum):
    PAPER = "paper"
    RAW_AUTOATTACK = "raw-autoattack"
    ADAPTIVE = "adaptive"


class Scope(str, Enum):
    CLEAN_CORRECT = "every clean-correct example"
    SURVIVORS = "examples robust to every attack before it"


class Scoring(str, Enum):
    PROJECTED = "projected prediction (deployed classifier)"
    RAW_ARGMAX = "raw 2C argmax (a dummy prediction is an error)"


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the plan. ``factory(context)`` returns ``craft(x, y, seed) -> x_adv``.

    ``rescores``: reuse the adversarial predictions of that attack (same inputs) with this spec's
    ``scoring`` instead of crafting anew. ``eps_factor`` scales the budget (the eps sweep).
    ``strength`` multiplies the attack's steps and restarts (the convergence check); ``variant`` names a
    check's rerun in the key; ``counted=False`` keeps a result out of the worst case (a check's attack).
    ``runs``: the attack runs (random starts, restarts, weights, targets) it makes per example, the unit of
    :func:`ducat.eval.plan.effort`.
    """

    id: str
    protocol: Protocol
    view: View
    label: str
    factory: Factory | None
    scope: Scope = Scope.CLEAN_CORRECT
    scoring: Scoring = Scoring.PROJECTED
    eps_factor: float = 1.0
    rescores: str | None = None
    strength: int = 1
    variant: str = ""
    counted: bool = True
    runs: int = 1
    note: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        """Unique name of the result: the id, plus the budget when it is not the evaluation's, plus a check's
        variant."""
        if self.variant:
            return f"{self.id}@{self.variant}"
        return self.id if self.eps_factor == 1.0 else f"{self.id}@eps-x{self.eps_factor:g}"

    @property
    def in_worst_case(self) -> bool:
        """Whether the per-example worst case counts this result (deployed scoring at the evaluation eps, an
        attack of the evaluation rather than of a check)."""
        return self.scoring is Scoring.PROJECTED and self.eps_factor == 1.0 and self.counted and not self.variant


__all__ = ["AttackSpec", "Factory", "Protocol", "Scope", "Scoring", "View"]
