"""Training objectives: the four base methods, each usable with and without DUCAT.

The methods register themselves when their module is imported (:func:`register_method`); the import order below is
the registration order, which is the order of the grid, the presets and the tables."""

from ducat.objectives.base import (
    METHODS,
    AttackSettings,
    DucatSettings,
    Objective,
    StepOutput,
    attacked_view,
    register_method,
)

# isort: off
from ducat.objectives.pgd_at import PGDAT
from ducat.objectives.trades import TRADES, kl_clean_adv
from ducat.objectives.mart import MART
from ducat.objectives.consistency import ConsistencyAT, jensen_shannon
# isort: on

__all__ = ["AttackSettings", "DucatSettings", "Objective", "StepOutput", "attacked_view", "ConsistencyAT",
           "MART", "PGDAT", "TRADES", "METHODS", "jensen_shannon", "kl_clean_adv", "register_method"]
