"""Forking a DUCAT run from a shared trunk: exact sharing of the epochs before the DUCAT start.

Before its start epoch t, a DUCAT run is the base method with hard labels on the 2C head; nothing it
does then depends on alpha, beta1, beta2 or t itself (as long as t is later). So every DUCAT run of one
method, seed and recipe can share one trunk trained to the epoch before its own t: the fork copies the
trunk's checkpoint of epoch t-1 (weights, optimizer state, RNG states, wall time) and its metric rows
into the new run directory, with the new run's config, and the run is then resumed. The result is
the run trained from scratch, bit for bit on a deterministic CPU (``tests/test_train.py`` checks it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ducat.checkpoint import load_checkpoint, save_checkpoint
from ducat.config import TrainConfig, config_from_dict
from ducat.errors import RunError
from ducat.fileio import atomic_write_bytes

# Fields a fork may change: what only acts from the DUCAT start epoch on, and where and how the run is kept.
_DUCAT_PHASE = ("alpha", "beta1", "beta2", "start_epoch")
_BOOKKEEPING = ("out", "progress", "tensorboard", "save_epochs")


def trunk_key(config: TrainConfig) -> str:
    """What the epochs before the DUCAT start depend on: the config without the DUCAT-phase fields and the
    run's bookkeeping (JSON text; two DUCAT configs with the same key can share a trunk)."""
    data = config.to_dict()
    for name in _DUCAT_PHASE:
        data["ducat"].pop(name)
    for name in _BOOKKEEPING:
        data["run"].pop(name)
    return json.dumps(data, sort_keys=True)


def fork_run(trunk_checkpoint: str | Path, config: TrainConfig) -> None:
    """Start ``config``'s run (``config.run.out``) from ``trunk_checkpoint``, a checkpoint of a DUCAT
    config with the same trunk key saved at an epoch before both runs' DUCAT start; then resume it with
    ``train(config, resume=True)``."""
    source = Path(trunk_checkpoint)
    state = load_checkpoint(source)
    trunk = config_from_dict(json.loads(state["config"]))
    epoch = int(state["epoch"])
    if not config.ducat.enabled or trunk_key(trunk) != trunk_key(config):
        raise RunError(f"cannot fork '{config.run.out}' from '{source}': their configs differ before the DUCAT "
                       "start epoch")
    if not epoch < min(config.ducat.start_epoch, trunk.ducat.start_epoch):
        raise RunError(f"cannot fork from '{source}': its epoch {epoch} is not before both DUCAT start epochs "
                       f"({trunk.ducat.start_epoch}, {config.ducat.start_epoch})")
    run_dir = Path(config.run.out)
    if (run_dir / "last.pt").exists():
        raise RunError(f"'{run_dir}' already holds a run; it cannot be forked into")
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [line for line in (source.parent / "metrics.jsonl").read_text().splitlines()
            if line.strip() and json.loads(line)["epoch"] <= epoch]
    atomic_write_bytes(run_dir / "metrics.jsonl", "".join(f"{line}\n" for line in rows).encode())
    state.update(config=config.to_json(), best_metric=-math.inf, best_epoch=0)  # no DUCAT epoch yet
    state.pop("format_version", None)
    save_checkpoint(state, run_dir / "last.pt", keep_previous=False)
