"""Changing a run's length without breaking its schedule, and the warning for a schedule that is broken.

A preset's schedule is a set of epoch numbers: the lr milestones, the DUCAT start, the fine-tuning
start and the epochs whose checkpoints are kept. Setting ``optim.epochs`` alone leaves them where they
were: ``optim.epochs=12`` on a 30-epoch preset with milestones ``[25, 28]`` never decays the lr, and
``optim.epochs=5`` puts the DUCAT start (22) past the end. :func:`scale_schedule` moves every one of
them with the length (``ducat train PRESET --epochs N``; ``ducat quickstart --epochs N``).

The rule: an epoch number ``e`` of an ``E``-epoch schedule becomes ``round(e * N / E)`` (halves
rounded up), clamped into the range where it still acts: ``[1, N - 1]`` for a milestone (the lr
decays *after* it, so a milestone at ``N`` would never act) and ``[1, N]`` for the DUCAT start, the
fine-tuning start and ``run.save_epochs``. Rounding and clamping are monotone, so the numbers keep
their order (two milestones may merge into one epoch at small ``N``: both decays then happen at once).
A milestone that did not act in the original schedule (at or past ``E``) is dropped; with ``N = 1``
no milestone can act and all are dropped. The 30-epoch digits schedule (milestones 25, 28; DUCAT
from 22) becomes milestones 8, 9 and DUCAT from 7 at ``N = 10``; 10, 11 and 9 at ``N = 12``.
"""

from __future__ import annotations

from ducat.config.schema import ConfigError, TrainConfig


class ScheduleWarning(UserWarning):
    """A schedule that is valid but does not do what it says (a milestone that never acts)."""


def scale_epoch(epoch: int, old_epochs: int, new_epochs: int, last: int) -> int:
    """Epoch ``epoch`` of an ``old_epochs`` schedule in a ``new_epochs`` one: ``epoch * new / old``
    rounded half up (exact integer arithmetic), clamped to ``[1, last]``."""
    scaled = (2 * epoch * new_epochs + old_epochs) // (2 * old_epochs)
    return min(last, max(1, scaled))


def scale_schedule(config: TrainConfig, epochs: int) -> None:
    """Set ``config.optim.epochs`` to ``epochs`` and move every epoch number of the schedule with it
    (module docstring: the rule). Changes ``config`` in place; raises ConfigError if ``epochs < 1``."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"--epochs must be an integer >= 1, got {epochs!r}")
    old = config.optim.epochs
    if old < 1:
        raise ConfigError(f"optim.epochs must be >= 1 to be rescaled, got {old}")
    o, r = config.optim, config.run
    o.milestones = [scale_epoch(m, old, epochs, epochs - 1) for m in o.milestones if m < old and epochs > 1]
    config.ducat.start_epoch = scale_epoch(config.ducat.start_epoch, old, epochs, epochs)
    config.finetune.start_epoch = scale_epoch(config.finetune.start_epoch, old, epochs, epochs)
    r.save_epochs = sorted({scale_epoch(e, old, epochs, epochs) for e in r.save_epochs})
    o.epochs = epochs


def schedule_warning(config: TrainConfig) -> str | None:
    """One line saying which lr milestones never act (at or past ``optim.epochs``), or None."""
    o = config.optim
    late = [m for m in o.milestones if m >= o.epochs]
    if not late:
        return None
    return (f"optim.milestones {late} are at or past the last epoch ({o.epochs}) and never decay the lr; "
            "to shorten a preset with its schedule use --epochs N instead of optim.epochs")
