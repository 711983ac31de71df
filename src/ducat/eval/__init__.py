"""``ducat eval``: robust accuracy under the paper's protocol and under adaptive attacks, side by side.

:mod:`~ducat.eval.registry` holds the attacks (one registered factory each; the built-in ones in
:mod:`~ducat.eval.catalog`), :mod:`~ducat.eval.plan` selects them for an :class:`EvalSettings`,
:mod:`~ducat.eval.runner` runs any plan with one loop and a resumable cache, :mod:`~ducat.eval.checks` checks the
evaluation itself (attack-failure indicators, attack unit tests, transfer, convergence), :mod:`~ducat.eval.report`
assembles and writes the report, and :mod:`~ducat.eval.load` takes models trained elsewhere (``--load``).
AutoAttack is the official code as repackaged by ``pyautoattack``; torchattacks' port is weaker
(10 iterations instead of 100) and is never used here.
"""

from ducat.eval.api import evaluate, evaluate_checkpoint, load_target
from ducat.eval.plan import build_plan, effort
from ducat.eval.registry import ATTACKS, AttackEntry, attack_names, fast_names, register_attack, table_columns
from ducat.eval.report import EvalReport, write_report
from ducat.eval.settings import EvalSettings
from ducat.eval.vocabulary import AttackSpec, Protocol, Scope, Scoring, View

__all__ = ["ATTACKS", "AttackEntry", "AttackSpec", "EvalReport", "EvalSettings", "Protocol", "Scope", "Scoring",
           "View", "attack_names", "build_plan", "effort", "evaluate", "evaluate_checkpoint", "fast_names",
           "load_target", "register_attack", "table_columns", "write_report"]
