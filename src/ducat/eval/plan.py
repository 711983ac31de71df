"""The evaluation as data: which attacks run, on which view of the model, on which examples, scored how.

Modelled on AutoAttack's ``attacks_to_run``, but typed. :func:`build_plan` returns the ordered list
of :class:`AttackSpec`; :mod:`ducat.eval.runner` runs any such list with one loop. Adding an attack
means one spec here and its factory in :mod:`ducat.eval.attacks`. Results are keyed by
:attr:`AttackSpec.key`, and so is everything that reads them (reports, ``ducat reproduce``).

Protocols (``docs/method.md``, "Evaluation protocols"):

- ``paper``: the released code's evaluation. Attacks maximise CE on the raw 2C logits; predictions
  are scored after the projection, so an input pushed into the dummy class of its own label counts
  as defended.
- ``raw-autoattack``: the released code's AutoAttack call: AutoAttack on the raw 2C logits and no
  projection anywhere (a dummy prediction counts as an error). Kept only to reproduce that path.
- ``adaptive``: attacks that know the defense, on the projected classifier itself (max- or
  logsumexp-merged logits) or on the raw logits with a dummy-aware loss.

For a model without dummy classes the protocols coincide: only the adaptive specs run, and the
report lists each of them under both protocols.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Callable

from ducat.attacks import NORMS, Norm
from ducat.config import ConfigError

if TYPE_CHECKING:
    from ducat.eval.attacks import AttackContext, Craft


class Protocol(str, Enum):
    PAPER = "paper"
    RAW_AUTOATTACK = "raw-autoattack"
    ADAPTIVE = "adaptive"


class View(str, Enum):
    """The function of the input an attack takes its gradients from."""

    RAW = "raw 2C logits"
    ORIGINAL = "original C logits"
    MAX_MERGED = "projected classifier (max-merged logits)"
    LSE_MERGED = "logsumexp-merged logits"
    SURROGATE = "surrogate model (--surrogate)"


class Scope(str, Enum):
    CLEAN_CORRECT = "every clean-correct example"
    SURVIVORS = "examples robust to every attack before it"


class Scoring(str, Enum):
    PROJECTED = "projected prediction (deployed classifier)"
    RAW_ARGMAX = "raw 2C argmax (a dummy prediction is an error)"


class AttackId(str, Enum):
    PAPER_PGD10 = "paper-pgd10"
    PAPER_PGD100 = "paper-pgd100"
    PAPER_AUTOATTACK = "paper-autoattack"
    RAW_AUTOATTACK = "raw-autoattack"
    PAPER_TARGETED_ORIGINAL = "paper-targeted-original"
    PAPER_TARGETED_DUMMY = "paper-targeted-dummy"
    PAPER_ORIGINAL_LOGITS = "paper-original-logits"
    PGD10 = "adaptive-pgd10"
    PGD100 = "adaptive-pgd100"
    AUTOATTACK = "adaptive-autoattack"
    TARGETED_ORIGINAL = "adaptive-targeted-original"
    DAWA = "adaptive-dawa"
    LSE_PGD100 = "adaptive-lse-pgd100"
    LSE_AUTOATTACK = "adaptive-lse-autoattack"
    MARGIN = "adaptive-margin"
    TARGETED_TOP = "adaptive-targeted-top"
    EXTRA_RESTARTS = "adaptive-extra-restarts"
    TRANSFER = "adaptive-transfer"
    SQUARE_FOLLOWUP = "adaptive-square-followup"


# On a model without dummy classes the paper's attack *is* the adaptive one; reports list it under both ids.
PAPER_COUNTERPART = {AttackId.PGD10: AttackId.PAPER_PGD10, AttackId.PGD100: AttackId.PAPER_PGD100,
                     AttackId.AUTOATTACK: AttackId.PAPER_AUTOATTACK,
                     AttackId.TARGETED_ORIGINAL: AttackId.PAPER_TARGETED_ORIGINAL}

ATTACK_NAMES = ("pgd10", "pgd100", "autoattack", "logsumexp", "logsumexp-autoattack", "dawa", "margin", "targeted",
                "eps-sweep")
FAST_ATTACKS = ("pgd10", "logsumexp", "dawa", "margin", "targeted", "eps-sweep")
SWEEP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
AUTOATTACK_PARTS = ("apgd-ce", "apgd-t", "fab-t", "square")  # standard AutoAttack, in its order
CHECK_SIZES = ("unbounded_examples", "unit_test_examples", "transfer_steps", "convergence_examples", "square_queries")


@dataclass(frozen=True)
class EvalSettings:
    """What to run. ``eps`` is the radius in [0,1] pixel units for ``norm`` (L-inf or L2);
    ``step_size`` defaults to eps/4. ``attacks`` selects by :data:`ATTACK_NAMES`.

    Each attack splits the examples it attacks into near-equal batches of at most ``batch_size``, and
    into at least ``workers`` of them, which that many processes attack in parallel
    (:mod:`ducat.eval.workers`; None: one single-threaded worker per torch thread on a Linux CPU, else
    1). Random starts are drawn per batch, so results depend on both (and on ``seed``).

    ``autoattack``: the attacks of every AutoAttack row, a subset of :data:`AUTOATTACK_PARTS` (standard: all four).

    ``equal_effort``: a model without dummy classes meets extra margin restarts on its survivors, so that its
    worst case counts as many attack runs per example as a DUCAT model's under the same settings (:func:`effort`).

    The checks of the evaluation itself (``docs/evaluation.md``; 0 turns one off): ``indicators`` traces every
    PGD run for the attack-failure indicators (one more forward pass per run); ``unbounded_examples``
    clean-correct examples are attacked again without a budget (bad initialisation); the attack unit test
    runs on ``unit_test_examples`` examples; ``transfer_steps`` PGD steps on the surrogate craft the transfer
    row; the convergence check reruns the attacks that set the worst case, steps and restarts doubled, on
    the first ``convergence_examples`` examples; Square with ``square_queries`` queries attacks the worst-case
    survivors when the black-box Square hint fires."""

    eps: float
    norm: Norm = "Linf"
    attacks: tuple[str, ...] = ATTACK_NAMES
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
        unknown = [a for a in self.attacks if a not in ATTACK_NAMES]
        if unknown:
            raise ConfigError(f"unknown attack '{unknown[0]}'; choose from: {', '.join(ATTACK_NAMES)}")
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


Factory = Callable[["AttackContext"], "Craft"]


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the plan. ``factory(context)`` returns ``craft(x, y, seed) -> x_adv``.

    ``rescores``: reuse the adversarial predictions of that attack (same inputs) with this spec's
    ``scoring`` instead of crafting anew. ``eps_factor`` scales the budget (the eps sweep).
    ``strength`` multiplies the attack's steps and restarts (the convergence check); ``variant`` names a
    check's rerun in the key; ``counted=False`` keeps a result out of the worst case (a check's attack).
    ``runs``: the attack runs (random starts, restarts, weights, targets) it makes per example, the unit of
    :func:`effort`.
    """

    id: AttackId
    protocol: Protocol
    view: View
    label: str
    factory: Factory | None
    scope: Scope = Scope.CLEAN_CORRECT
    scoring: Scoring = Scoring.PROJECTED
    eps_factor: float = 1.0
    rescores: AttackId | None = None
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
            return f"{self.id.value}@{self.variant}"
        return self.id.value if self.eps_factor == 1.0 else f"{self.id.value}@eps-x{self.eps_factor:g}"

    @property
    def in_worst_case(self) -> bool:
        """Whether the per-example worst case counts this result (deployed scoring at the evaluation eps, an
        attack of the evaluation rather than of a check)."""
        return self.scoring is Scoring.PROJECTED and self.eps_factor == 1.0 and self.counted and not self.variant


def build_plan(settings: EvalSettings, is_dummy: bool, surrogate: bool = False) -> list[AttackSpec]:
    """The ordered attack sequence for ``settings`` on a model with (``is_dummy``) or without dummy classes.

    Standalone attacks (on every clean-correct example) come first; then, on a DUCAT model, the
    cumulative adaptive attacks (on the survivors of everything before them when ``early_stop``);
    then the eps sweep; last the transfer row (from the ``surrogate`` model when there is one, else from the
    original C logits of a DUCAT model), which the worst case does not count."""
    plan: list[AttackSpec] = []
    if is_dummy and Protocol.PAPER in settings.protocols:
        plan += _paper(settings)
    if Protocol.ADAPTIVE in settings.protocols or not is_dummy:
        plan += _adaptive(settings, is_dummy)
    if settings.equal_effort and not is_dummy:
        plan += _equal_effort(settings, plan)
    if "eps-sweep" in settings.attacks:
        plan += _sweep(settings, is_dummy)
    if settings.transfer_steps and (surrogate or is_dummy):
        plan.append(_transfer(settings, surrogate))
    return plan


def effort(plan: list[AttackSpec]) -> int:
    """Attack runs per example that the worst case of ``plan`` counts (a restart, a DAWA weight, a target of the
    targeted attack each count one)."""
    return sum(spec.runs for spec in plan if spec.in_worst_case)


def _equal_effort(settings: EvalSettings, plan: list[AttackSpec]) -> list[AttackSpec]:
    """For a model without dummy classes: the margin restarts that bring its worst case to the effort a DUCAT model
    meets under the same settings (``equal_effort``), on the survivors; random restarts alone would otherwise tilt
    a comparison of worst cases against the model that faces more attacks."""
    from ducat.eval import attacks as a

    extra = effort(build_plan(settings, is_dummy=True)) - effort(plan)
    if extra < 1:
        return []
    return [AttackSpec(AttackId.EXTRA_RESTARTS, Protocol.ADAPTIVE, View.MAX_MERGED,
                       f"PGD-100 margin, {extra} more random restarts (equal effort)", a.margin_restarts(extra),
                       scope=Scope.SURVIVORS if settings.early_stop else Scope.CLEAN_CORRECT, runs=extra,
                       note=f"equal effort: {effort(plan) + extra} attack runs per example, as a DUCAT model meets")]


def _transfer(settings: EvalSettings, surrogate: bool) -> AttackSpec:
    """PGD on CE over the surrogate (or the original C logits), scored on the deployed classifier."""
    from ducat.eval import attacks as a

    view, source = (View.SURROGATE, "the surrogate") if surrogate else (View.ORIGINAL, "the original C logits")
    return AttackSpec(AttackId.TRANSFER, Protocol.ADAPTIVE, view, f"transfer: PGD-{settings.transfer_steps} on "
                      f"{source}", a.pgd(view, settings.transfer_steps), counted=False,
                      note="crafted on a surrogate, scored on the deployed classifier; a check: not counted in the "
                           "worst case")


def _paper(settings: EvalSettings) -> list[AttackSpec]:
    """The paper's protocol: the attacks' own losses on the raw 2C logits, projected scoring."""
    from ducat.eval import attacks as a

    has, paper, raw = settings.attacks.__contains__, Protocol.PAPER, View.RAW
    plan = []
    if has("pgd10"):
        plan.append(AttackSpec(AttackId.PAPER_PGD10, paper, raw, "PGD-10", a.pgd(raw, 10)))
    if has("pgd100"):
        plan.append(AttackSpec(AttackId.PAPER_PGD100, paper, raw, "PGD-100", a.pgd(raw, 100)))
    if has("autoattack"):
        plan.append(AttackSpec(AttackId.PAPER_AUTOATTACK, paper, raw, settings.autoattack_label, a.autoattack(raw),
                               note="attacks the raw 2C logits, scored after the projection"))
        if Protocol.RAW_AUTOATTACK in settings.protocols:
            plan.append(AttackSpec(AttackId.RAW_AUTOATTACK, Protocol.RAW_AUTOATTACK, raw, settings.autoattack_label,
                                   None,
                                   scoring=Scoring.RAW_ARGMAX, rescores=AttackId.PAPER_AUTOATTACK,
                                   note="the released code's call"))
    if has("targeted"):
        plan += [AttackSpec(AttackId.PAPER_TARGETED_ORIGINAL, paper, raw, "targeted PGD-10 (original classes)",
                            a.targeted_random(raw, dummy_targets=False)),
                 AttackSpec(AttackId.PAPER_TARGETED_DUMMY, paper, raw, "targeted PGD-10 (dummy classes)",
                            a.targeted_random(raw, dummy_targets=True)),
                 AttackSpec(AttackId.PAPER_ORIGINAL_LOGITS, paper, View.ORIGINAL, "PGD-10 on original logits",
                            a.pgd(View.ORIGINAL, 10))]
    return plan


def _adaptive(settings: EvalSettings, is_dummy: bool) -> list[AttackSpec]:
    """Attacks that know the projection: standalone ones first, then the cumulative ones."""
    from ducat.eval import attacks as a

    has, s, adaptive, projected = settings.attacks.__contains__, settings, Protocol.ADAPTIVE, View.MAX_MERGED
    plan = []
    if has("pgd10"):
        plan.append(AttackSpec(AttackId.PGD10, adaptive, projected, "PGD-10", a.pgd(projected, 10)))
    if has("pgd100"):
        plan.append(AttackSpec(AttackId.PGD100, adaptive, projected, "PGD-100", a.pgd(projected, 100)))
    if has("autoattack"):
        plan.append(AttackSpec(AttackId.AUTOATTACK, adaptive, projected, s.autoattack_label, a.autoattack(projected)))
    if has("targeted"):
        plan.append(AttackSpec(AttackId.TARGETED_ORIGINAL, adaptive, projected, "targeted PGD-10 (original classes)",
                               a.targeted_random(projected, dummy_targets=False)))
    if is_dummy and has("dawa"):
        weights = ", ".join(f"{w:g}" for w in s.dawa_weights)
        plan.append(AttackSpec(AttackId.DAWA, adaptive, View.RAW, f"DAWA-style PGD-{s.dawa_steps}, w in {{{weights}}}",
                               a.dawa(), runs=len(s.dawa_weights),
                               note="w CE(z, y) + (1-w) CE(z, dummy(y)) on raw 2C logits; first success over the "
                                    "weights"))
    return plan + _cumulative(settings, is_dummy)


def _cumulative(settings: EvalSettings, is_dummy: bool) -> list[AttackSpec]:
    """Adaptive attacks run on the survivors of everything before them (with ``early_stop``)."""
    from ducat.eval import attacks as a

    has, s, adaptive, projected, lse = (settings.attacks.__contains__, settings, Protocol.ADAPTIVE, View.MAX_MERGED,
                                        View.LSE_MERGED)
    later = Scope.SURVIVORS if s.early_stop else Scope.CLEAN_CORRECT
    note = "cumulative: run on survivors of the attacks above" if s.early_stop else ""
    plan = []
    if is_dummy and has("logsumexp"):
        plan.append(AttackSpec(AttackId.LSE_PGD100, adaptive, lse, "PGD-100, logsumexp-merged gradients",
                               a.pgd(lse, 100), scope=later, note=note))
    if is_dummy and has("logsumexp-autoattack"):
        plan.append(AttackSpec(AttackId.LSE_AUTOATTACK, adaptive, lse,
                               "AutoAttack's white-box attacks (APGD-CE, APGD-T, FAB-T), logsumexp-merged gradients",
                               a.autoattack(lse, white_box=True), scope=later,
                               note="; ".join(filter(None, [note, "no Square: it takes no gradient, and it runs on "
                                                                  "the projected classifier in the AutoAttack row"]))))
    if has("margin"):
        plan.append(AttackSpec(AttackId.MARGIN, adaptive, projected, f"PGD-100 margin, {s.margin_restarts} restarts",
                               a.margin_restarts(), scope=later, runs=s.margin_restarts, note=note))
    if has("targeted"):
        plan.append(AttackSpec(AttackId.TARGETED_TOP, adaptive, projected,
                               f"PGD-100 targeted margin, top-{s.n_targets} classes", a.targeted_top(),
                               scope=later, runs=s.n_targets, note=note))
    return plan


def _sweep(settings: EvalSettings, is_dummy: bool) -> list[AttackSpec]:
    """PGD-10 at eps x each factor; at x1 it is the PGD-10 row itself (same spec, same seeds)."""
    from ducat.eval import attacks as a

    specs = [(AttackId.PGD10, Protocol.ADAPTIVE, View.MAX_MERGED)]
    if is_dummy and Protocol.PAPER in settings.protocols:
        specs.append((AttackId.PAPER_PGD10, Protocol.PAPER, View.RAW))
    plan, budgets = [], set()
    for factor in SWEEP_FACTORS:
        if settings.budget(factor) in budgets:
            continue  # an L-inf radius saturates at 1
        budgets.add(settings.budget(factor))
        for attack_id, protocol, view in specs:
            if factor == 1.0 and attack_id.value.split("-", 1)[1] in settings.attacks:
                continue  # already in the plan
            plan.append(AttackSpec(attack_id, protocol, view, "PGD-10", a.pgd(view, 10), eps_factor=factor))
    return plan
