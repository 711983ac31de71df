"""What an evaluation runs: :class:`EvalSettings`, every choice of ``ducat eval`` in one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from ducat.errors import ConfigError
from ducat.eval.registry import attack_names
from ducat.eval.vocabulary import Protocol
from ducat.vocabulary import NORMS, Norm

SWEEP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # the eps sweep: PGD-10 at eps times each
AUTOATTACK_PARTS = ("apgd-ce", "apgd-t", "fab-t", "square")  # standard AutoAttack, in its order
CHECK_SIZES = ("unbounded_examples", "unit_test_examples", "transfer_steps", "convergence_examples", "square_queries")


@dataclass(frozen=True)
class EvalSettings:
    """What to run. ``eps`` is the radius in [0,1] pixel units for ``norm`` (L-inf or L2); ``step_size`` defaults
    to eps/4. ``attacks`` selects by the names of :func:`~ducat.eval.registry.attack_names` (None: all of them).

    Each attack splits the examples it attacks into near-equal batches of at most ``batch_size``, and
    into at least ``workers`` of them, which that many processes attack in parallel
    (:mod:`ducat.eval.workers`; None: one single-threaded worker per torch thread on a Linux CPU, else
    1). Random starts are drawn per batch, so results depend on both (and on ``seed``).

    ``autoattack``: the attacks of every AutoAttack row, a subset of :data:`AUTOATTACK_PARTS` (standard: all four).

    ``equal_effort``: a model without dummy classes meets extra margin restarts on its survivors, so that its
    worst case counts as many attack runs per example as a DUCAT model's under the same settings
    (:func:`ducat.eval.plan.effort`).

    The checks of the evaluation itself (``docs/evaluation.md``; 0 turns one off): ``indicators`` traces every
    PGD run for the attack-failure indicators (one more forward pass per run); ``unbounded_examples``
    clean-correct examples are attacked again without a budget (bad initialisation); the attack unit test
    runs on ``unit_test_examples`` examples; ``transfer_steps`` PGD steps on the surrogate craft the transfer
    row; the convergence check reruns the attacks that set the worst case, steps and restarts doubled, on
    the first ``convergence_examples`` examples; Square with ``square_queries`` queries attacks the worst-case
    survivors when the black-box Square hint fires."""

    eps: float
    norm: Norm = "Linf"
    attacks: tuple[str, ...] | None = None
    protocols: tuple[Protocol, ...] = tuple(Protocol)
    n_examples: int | None = None
    batch_size: int = 500
    workers: int | None = None
    seed: int = 0
    early_stop: bool = True
    step_size: float | None = None
    margin_restarts: int = 2
    n_targets: int = 9
    dawa_weights: tuple[float, ...] = (0.25, 0.5, 0.75)
    dawa_steps: int = 100
    equal_effort: bool = False
    autoattack: tuple[str, ...] = AUTOATTACK_PARTS
    indicators: bool = True
    unbounded_examples: int = 16
    unit_test_examples: int = 10
    transfer_steps: int = 100
    convergence_examples: int = 64
    square_queries: int = 20000

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm '{self.norm}'; choose one of: {', '.join(NORMS)}")
        names = attack_names()
        object.__setattr__(self, "attacks", names if self.attacks is None else tuple(self.attacks))
        unknown = [a for a in self.attacks if a not in names]
        if unknown:
            raise ConfigError(f"unknown attack '{unknown[0]}'; choose from: {', '.join(names)}")
        try:
            object.__setattr__(self, "protocols", tuple(Protocol(p) for p in self.protocols))
        except ValueError as exc:
            raise ConfigError(f"{exc}; choose from: {', '.join(p.value for p in Protocol)}") from None
        if self.batch_size < 1 or (self.n_examples is not None and self.n_examples < 1):
            raise ConfigError("batch size and n_examples must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.margin_restarts < 1 or self.n_targets < 1 or self.dawa_steps < 1:
            raise ConfigError("margin_restarts, n_targets and dawa_steps must be >= 1")
        if not self.dawa_weights or not all(0.0 <= w <= 1.0 for w in self.dawa_weights):
            raise ConfigError(f"dawa_weights must be in [0, 1], got {self.dawa_weights}")
        parts = tuple(part for part in AUTOATTACK_PARTS if part in self.autoattack)
        if not parts or len(parts) != len(set(self.autoattack)):
            raise ConfigError(f"autoattack must name some of {', '.join(AUTOATTACK_PARTS)}, got {self.autoattack}")
        object.__setattr__(self, "autoattack", parts)
        sizes = {name: getattr(self, name) for name in CHECK_SIZES}
        bad = next((f"{name} must be >= 0, got {v}" for name, v in sizes.items() if v < 0), None)
        if bad:
            raise ConfigError(bad)

    @property
    def checks(self) -> bool:
        """Whether any check of the evaluation itself runs (``docs/evaluation.md``)."""
        return self.indicators or any(getattr(self, name) for name in CHECK_SIZES)

    @property
    def autoattack_label(self) -> str:
        """The AutoAttack rows' label: ``AutoAttack``, or the attacks it runs when not the standard four."""
        return "AutoAttack" if self.autoattack == AUTOATTACK_PARTS else f"AutoAttack ({', '.join(self.autoattack)})"

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else self.eps / 4

    def budget(self, eps_factor: float) -> float:
        """The radius at ``eps_factor`` times eps (an L-inf radius is at most 1: the whole [0,1] box)."""
        eps = self.eps * eps_factor
        return min(1.0, eps) if self.norm == "Linf" else eps
