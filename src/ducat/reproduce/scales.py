"""Reproduction scales and the dummy-class variants tested beside the paper's grid."""

from __future__ import annotations

from dataclasses import dataclass, field

from ducat.config import ConfigError
from ducat.eval import attack_names
from ducat.eval.settings import AUTOATTACK_PARTS, CHECK_SIZES
from ducat.objectives import METHODS

# The checks of the evaluation itself (docs/evaluation.md) cost more than a grid can afford at every scale but
# smoke, which runs each once in its cheapest form; the attack-failure indicators (one more forward pass per PGD
# run) stay on everywhere.
CHECKS_OFF = {name: 0 for name in CHECK_SIZES}
SMOKE_CHECKS = {"unbounded_examples": 2, "unit_test_examples": 2, "transfer_steps": 2, "convergence_examples": 4,
                "square_queries": 50}


@dataclass(frozen=True)
class Variant:
    """A dummy-class training variant: a DUCAT preset of ``method`` plus ``overrides``, with its own trunk."""

    name: str
    method: str
    overrides: tuple[str, ...]
    label: str
    why: str


VARIANTS = {v.name: v for v in (
    Variant("pgd_at-ducat-merged", "pgd_at", ("attack.mode=merged",), "PGD-AT + DUCAT, merged training attack",
            "the training attack targets the projected classifier that is deployed, so the dummy class stops being "
            "a place where the training attack's examples are counted as defended"),
    Variant("trades-ducat-merged", "trades", ("attack.mode=merged",), "TRADES + DUCAT, merged training attack",
            "TRADES + DUCAT shows the widest gap between the paper's protocol and the adaptive worst case on digits, "
            "so it is where a projection-aware training attack has the most to repair"),
)}


@dataclass(frozen=True)
class Scale:
    """One reproduction scale: which presets, how much data, how many epochs and seeds, how hard to attack.

    ``epochs``/``milestones``/``start_epoch`` set the schedule of every run; ``eval_examples`` are the first
    N test examples, the same for every run and attack; ``ablations`` and the toy case run with seed 0."""

    name: str
    family: str  # preset prefix, e.g. "cpu-fmnist-small_cnn"
    overrides: tuple[str, ...]
    epochs: int
    milestones: tuple[int, ...]
    start_epoch: int
    seeds: int
    eval_examples: int
    eval_attacks: tuple[str, ...]
    ablations: dict[str, tuple[float, ...]] = field(default_factory=dict)
    ablation_attacks: tuple[str, ...] = ("pgd10", "margin")
    variants: tuple[str, ...] = tuple(VARIANTS)
    n_targets: int = 9
    margin_restarts: int = 2
    dawa_steps: int = 100
    tsne_examples: int = 300
    transfer_examples: int = 500
    eval_eps: float | None = None  # evaluation budget; None = each run's training eps
    cuts: str = ""  # what this scale leaves out to fit its time, said in its report
    eval_checks: dict[str, int] = field(default_factory=lambda: dict(CHECKS_OFF))  # EvalSettings check sizes
    methods: tuple[str, ...] = tuple(METHODS)  # base methods of the grid, each without and with DUCAT
    toy: bool = True  # the hard-label toy case (paper fig. 4)
    equal_effort: bool = True  # base runs meet as many attack runs as their DUCAT runs (EvalSettings.equal_effort)
    autoattack: tuple[str, ...] = AUTOATTACK_PARTS  # the attacks of every AutoAttack row (EvalSettings.autoattack)

    def with_seeds(self, seeds: int | None) -> "Scale":
        if seeds is None:
            return self
        if seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds}")
        return Scale(**{**self.__dict__, "seeds": seeds})

    def with_variants(self, names: tuple[str, ...] | None) -> "Scale":
        if names is None:
            return self
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant '{unknown[0]}'; choose from: {', '.join(VARIANTS)}")
        return Scale(**{**self.__dict__, "variants": tuple(names)})



SCALES = {
    "smoke": Scale(
        "smoke", "cpu-digits-small_cnn",
        ("data.n_train=200", "data.batch_size=50", "attack.steps=2", "validation.pgd_steps=2",
         "validation.n_examples=40", "optim.lr=0.05"),
        epochs=3, milestones=(2,), start_epoch=3, seeds=2, eval_examples=24,
        eval_attacks=("pgd10", "autoattack", "dawa", "margin", "targeted"),
        ablations={"start_epoch": (2,), "beta1": (1.0,)}, ablation_attacks=("pgd10",),
        variants=("pgd_at-ducat-merged",),
        n_targets=2, margin_restarts=1, dawa_steps=10, tsne_examples=40, transfer_examples=40, eval_eps=0.3,
        eval_checks=SMOKE_CHECKS, autoattack=("apgd-ce",),
        cuts="every piece in CI time: 200 training images, 3 epochs, 24 test examples, 2 seeds, one variant, "
             "evaluation at eps 0.3 (three times the training eps) and AutoAttack's APGD-CE only (a model of 3 epochs "
             "that predicts one class keeps that class robust at any eps, and the other attacks of AutoAttack on it "
             "took most of the grid's time: one seed on one thread, 100 s with Square, 53 s with APGD-T, 35 s "
             "without); the numbers are noise"),
    "mini": Scale(
        "mini", "cpu-fmnist-small_cnn",
        ("model.name=mlp", "data.n_train=20000", "validation.n_examples=1000"),
        epochs=10, milestones=(7, 9), start_epoch=8, seeds=5, eval_examples=500,
        eval_attacks=tuple(a for a in attack_names() if a != "logsumexp-autoattack"),
        ablations={"start_epoch": (6, 9), "beta1": (0.5, 1.0), "beta2": (0.5, 0.75), "alpha": (0.3, 0.7)},
        n_targets=3, margin_restarts=1, tsne_examples=400, transfer_examples=500,
        cuts="the model is ducat's MLP (input pooled to 8x8, two hidden layers of 256) instead of the small CNN "
             "(scale cnn has the CNN); 20000 training images; the targeted margin attack aims at the top 3 classes "
             "(not 9), the margin attack has 1 restart (not 2), and AutoAttack on logsumexp-merged gradients is left "
             "out: run on the survivors of every other attack at commit 54c8ffd, it broke no further example on any "
             "of 18 DUCAT runs of this scale"),
    "cnn": Scale(
        "cnn", "cpu-fmnist-small_cnn", ("data.n_train=20000", "validation.n_examples=1000"),
        epochs=10, milestones=(7, 9), start_epoch=8, seeds=5, eval_examples=500,
        eval_attacks=("pgd10", "autoattack", "logsumexp", "margin"), autoattack=("apgd-ce", "apgd-t", "square"),
        methods=("pgd_at",), toy=False, ablations={}, variants=("pgd_at-ducat-merged",),
        margin_restarts=2, tsne_examples=400, transfer_examples=500,
        cuts="PGD-AT only, with and without DUCAT and with the merged training attack, on 20000 training images; "
             "the attacks are the ones that set the worst case of these models under ducat eval's full default set "
             "(docs/results.md: on two checkpoints they give the full set's worst-case accuracy, and the same "
             "worst case on 998 of the 1000 examples, one example broken only by each set): "
             "AutoAttack's APGD-CE and APGD-T under both protocols, PGD-10, PGD-100 on logsumexp-merged logits and "
             "a PGD-100 margin attack"),
    "full-cpu": Scale(
        "full-cpu", "cpu-fmnist-small_cnn", ("model.name=mlp", "validation.n_examples=2000"),
        epochs=30, milestones=(23, 24), start_epoch=24, seeds=3, eval_examples=1000,
        eval_attacks=attack_names(),
        ablations={"start_epoch": (20, 26), "beta1": (0.5, 1.0), "beta2": (0.5, 0.75), "alpha": (0.3, 0.7)},
        n_targets=9, margin_restarts=2, tsne_examples=1000, transfer_examples=1000,
        cuts="the model is ducat's MLP (input pooled to 8x8, two hidden layers of 256), as at scale mini, so that "
             "the grid fits an evening on 2 cores: its training is about 3 h scaled from mini's measured times, "
             "against about 41 h with the small CNN by ducat's cost model"),
    "paper": Scale(
        "paper", "paper-cifar10-resnet18", (),
        epochs=130, milestones=(100, 105), start_epoch=105, seeds=3, eval_examples=10000,
        eval_attacks=attack_names(), ablation_attacks=("pgd10", "autoattack", "margin"),
        ablations={"start_epoch": (95, 100, 110, 115), "beta1": (0.5, 0.6, 0.9, 1.0),
                   "beta2": (0.5, 0.75, 0.9), "alpha": (0.3, 0.4, 0.6, 0.7)},
        tsne_examples=1000, transfer_examples=10000),
}


def get_scale(name: str) -> Scale:
    try:
        return SCALES[name]
    except KeyError:
        raise ConfigError(f"unknown scale '{name}'; choose one of: {', '.join(SCALES)}") from None
