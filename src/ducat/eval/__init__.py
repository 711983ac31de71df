"""``ducat eval``: robust accuracy under the paper's protocol and under adaptive attacks, side by side.

:mod:`~ducat.eval.plan` declares the attacks (typed specs), :mod:`~ducat.eval.runner` runs any plan with
one loop and a resumable cache, :mod:`~ducat.eval.checks` checks the evaluation itself (attack-failure
indicators, attack unit tests, transfer, convergence), :mod:`~ducat.eval.report` assembles and writes the report,
and :mod:`~ducat.eval.load` takes models trained elsewhere (``--load``).
AutoAttack is the official code as repackaged by ``pyautoattack``; torchattacks' port is weaker
(10 iterations instead of 100) and is never used here.
"""

from ducat.eval.api import evaluate, evaluate_checkpoint, load_target
from ducat.eval.plan import (
    ATTACK_NAMES,
    FAST_ATTACKS,
    AttackId,
    AttackSpec,
    EvalSettings,
    Protocol,
    Scope,
    Scoring,
    View,
    build_plan,
)
from ducat.eval.report import EvalReport, write_report

__all__ = ["ATTACK_NAMES", "FAST_ATTACKS", "AttackId", "AttackSpec", "EvalReport", "EvalSettings", "Protocol",
           "Scope", "Scoring", "View", "build_plan", "evaluate", "evaluate_checkpoint", "load_target",
           "write_report"]
