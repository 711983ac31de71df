"""The registry of evaluation attacks: an attack is one registered factory.

``@register_attack(id, name=..., protocol=..., view=..., ...)`` on a function ``build(settings) -> factory`` makes
it an :class:`AttackEntry` and adds it to :data:`ATTACKS`; the decorated name is the entry, so other modules name
a result by ``entry.id``. Everything else derives from the registry: the plan (:func:`ducat.eval.plan.build_plan`
runs the selected entries in registration order, standalone ones before cumulative ones), the ``--attacks`` names
(:func:`attack_names`), the rows of ``report.json`` and ``report.md`` (one per spec of the plan) and the columns
of ``ducat reproduce``'s table 1 (:func:`table_columns`). The built-in attacks are registered in
:mod:`ducat.eval.catalog`; a test or a user registers its own the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Callable

from ducat.eval.vocabulary import AttackSpec, Factory, Protocol, Scope, Scoring, View

SWEEP = "eps-sweep"  # the --attacks name of the eps sweep of the PGD-10 rows (the plan adds it, not an entry)


class Stage(int, Enum):
    """When an attack runs: on every clean-correct example, or (cumulative) on the survivors of every attack
    before it when the settings ask for early stopping."""

    STANDALONE = 0
    CUMULATIVE = 1


@dataclass(frozen=True)
class AttackEntry:
    """One registered attack. ``id``: its result id (``report.json``, ``masks.npz``); ``name``: the ``--attacks``
    name that selects it (several entries share one; None: added by the plan or a check, never selected);
    ``protocol``, ``view``, ``stage``, ``scoring``: see :mod:`ducat.eval.vocabulary`; ``label`` and ``note``: its
    row's text (or functions of the settings); ``build(settings) -> factory``; ``runs(settings)``: attack runs
    per example (:func:`ducat.eval.plan.effort`); ``dummy_only``: only on a model with dummy classes;
    ``requires``: the protocols that must be asked for (default: its own); ``counterpart``: the paper-protocol id it
    also stands for on a model without dummy classes; ``rescores``: the id whose adversarial inputs it scores
    again instead of crafting; ``column``: its header in ``ducat reproduce``'s table 1; ``fast``: kept by
    ``--fast``."""

    id: str
    name: str | None
    protocol: Protocol
    view: View
    build: Callable[[Any], Factory | None]
    stage: Stage = Stage.STANDALONE
    scoring: Scoring = Scoring.PROJECTED
    label: str | Callable[[Any], str] = ""
    note: str | Callable[[Any], str] = ""
    runs: int | Callable[[Any], int] = 1
    dummy_only: bool = False
    requires: tuple[Protocol, ...] = ()
    counterpart: str | None = None
    rescores: str | None = None
    column: str | None = None
    fast: bool = True

    def spec(self, settings: Any, **changes: Any) -> AttackSpec:
        """This attack as one item of a plan for ``settings`` (an :class:`~ducat.eval.settings.EvalSettings`);
        ``changes``: other :class:`AttackSpec` fields (``eps_factor``, ``scope``, ...)."""
        cumulative = self.stage is Stage.CUMULATIVE and settings.early_stop
        note = self.note(settings) if callable(self.note) else self.note
        if cumulative:
            note = "; ".join(filter(None, ["cumulative: run on survivors of the attacks above", note]))
        spec = AttackSpec(self.id, self.protocol, self.view, self.label(settings) if callable(self.label) else
                          self.label, self.build(settings), scope=Scope.SURVIVORS if cumulative else
                          Scope.CLEAN_CORRECT, scoring=self.scoring, rescores=self.rescores,
                          runs=self.runs(settings) if callable(self.runs) else self.runs, note=note)
        return replace(spec, **changes)


ATTACKS: dict[str, AttackEntry] = {}  # id -> entry, in registration order


def register_attack(id: str, **fields: Any) -> Callable[[Callable[[Any], Factory | None]], AttackEntry]:
    """Decorator: register ``build(settings) -> factory`` as the attack ``id`` with the :class:`AttackEntry`
    ``fields``; returns the entry."""
    def register(build: Callable[[Any], Factory | None]) -> AttackEntry:
        if id in ATTACKS:
            raise ValueError(f"an attack with id '{id}' is registered already")
        entry = AttackEntry(id, build=build, **fields)
        ATTACKS[id] = entry
        return entry
    return register


def attack_names() -> tuple[str, ...]:
    """Every ``--attacks`` name, in registration order, and the eps sweep."""
    return (*dict.fromkeys(e.name for e in ATTACKS.values() if e.name), SWEEP)


def fast_names() -> tuple[str, ...]:
    """The names ``--fast`` keeps: those whose every entry is fast, and the eps sweep."""
    return tuple(n for n in attack_names() if all(e.fast for e in ATTACKS.values() if e.name == n))


def table_columns() -> tuple[tuple[str, str], ...]:
    """``ducat reproduce``'s table 1: (result id, header) of the clean accuracy, every entry with a ``column``, and
    the per-example worst case."""
    return (("clean", "clean"), *((e.id, e.column) for e in ATTACKS.values() if e.column),
            ("worst", "worst case per example, every attack of both protocols (projected scoring)"))
