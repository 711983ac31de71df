"""Training: the run directory and its state (:mod:`.state`), what a run is built from (:mod:`.setup`),
the epoch loop (:mod:`.loop`), validation, progress output and forking DUCAT runs from a shared trunk."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ducat.config import TrainConfig
from ducat.distributed import close_process_group
from ducat.errors import RunError
from ducat.fileio import RunLock
from ducat.train.fork import fork_run, trunk_key
from ducat.train.loop import Trainer
from ducat.train.setup import ducat_active, learning_rate, run_device, setup_runtime
from ducat.train.state import RunResult
from ducat.train.validate import validate_model


def train(config: TrainConfig, resume: bool = False, log: Callable[[str], None] = print,
          until_epoch: int | None = None, on_ready: Callable[[], None] | None = None) -> RunResult | None:
    """Train one configuration (see :class:`Trainer`) holding the run directory's lock, so no second process
    trains or resumes it meanwhile; with ``until_epoch`` stop after that epoch, resumable. ``on_ready`` is
    called once the run is set up (device, data and checkpoints accepted), before its first epoch.

    Applies the config's process-wide settings first (:func:`setup_runtime`: ``run.threads``,
    ``run.deterministic``), so that a run and its resumption compute the same way in any process."""
    run_dir = Path(config.run.out)
    if resume and not run_dir.is_dir():
        raise RunError(f"nothing to resume: '{run_dir}' does not exist")
    setup_runtime(config.run)
    run_device(config.run.device)  # refused before the run directory is made
    try:
        with run_lock(run_dir, log):
            trainer = Trainer(config, resume=resume, log=log)
            if on_ready is not None:
                on_ready()
            return trainer.run(until_epoch)
    finally:
        close_process_group()


@contextmanager
def run_lock(run_dir: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the run directory's exclusive lock, rank 0 only (the other torchrun ranks never write)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with RunLock(run_dir) as lock:
        if lock.note:
            log(lock.note)
        yield


__all__ = ["RunError", "RunResult", "Trainer", "ducat_active", "fork_run", "learning_rate", "run_lock",
           "setup_runtime", "train", "trunk_key", "validate_model"]
