"""Training objectives: the four base methods, each usable with and without DUCAT."""

from ducat.objectives.base import (
    METHODS,
    AttackSettings,
    DucatSettings,
    Objective,
    StepOutput,
    attacked_view,
    register_method,
)
from ducat.objectives.consistency import ConsistencyAT, jensen_shannon
from ducat.objectives.mart import MART
from ducat.objectives.pgd_at import PGDAT  # noqa: I001 (registration order = the order of the grid and the tables)
from ducat.objectives.trades import TRADES, kl_clean_adv

__all__ = ["AttackSettings", "DucatSettings", "Objective", "StepOutput", "attacked_view", "ConsistencyAT",
           "MART", "PGDAT", "TRADES", "METHODS", "jensen_shannon", "kl_clean_adv", "register_method"]
