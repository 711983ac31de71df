"""Training: the run directory and its state (:mod:`.state`), what a run is built from (:mod:`.setup`),
the epoch loop (:mod:`.loop`), validation, progress output and forking DUCAT runs from a shared trunk."""

from __future__ import annotations

from typing import Callable

from ducat.config import TrainConfig
from ducat.train.fork import fork_run, trunk_key
from ducat.train.loop import Trainer
from ducat.train.setup import ducat_active, learning_rate, setup_runtime
from ducat.train.state import RunError, RunResult
from ducat.train.validate import validate_model


def train(config: TrainConfig, resume: bool = False, log: Callable[[str], None] = print,
          until_epoch: int | None = None) -> RunResult | None:
    """Train one configuration (see :class:`Trainer`); with ``until_epoch`` stop after that epoch, resumable."""
    return Trainer(config, resume=resume, log=log).run(until_epoch)


__all__ = ["RunError", "RunResult", "Trainer", "ducat_active", "fork_run", "learning_rate", "setup_runtime",
           "train", "trunk_key", "validate_model"]
