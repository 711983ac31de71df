"""Training objectives: the four base methods, each usable with and without DUCAT."""

from ducat.objectives.base import AttackSettings, DucatSettings, Objective, StepOutput, attacked_view
from ducat.objectives.consistency import ConsistencyAT, jensen_shannon
from ducat.objectives.mart import MART
from ducat.objectives.pgd_at import PGDAT
from ducat.objectives.trades import TRADES, kl_clean_adv

# The one list of base methods: config validation, the trainer and ``ducat reproduce`` all read it.
METHODS: dict[str, type[Objective]] = {"pgd_at": PGDAT, "trades": TRADES, "mart": MART, "consistency": ConsistencyAT}

__all__ = ["AttackSettings", "DucatSettings", "Objective", "StepOutput", "attacked_view", "ConsistencyAT",
           "MART", "PGDAT", "TRADES", "METHODS", "jensen_shannon", "kl_clean_adv"]
