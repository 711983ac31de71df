"""A run directory and what it holds: checkpoints, metrics, the summary; what a resume restores.

``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per epoch), ``last.pt`` /
``prev.pt`` / ``best.pt`` (+ ``epoch_N.pt`` for ``run.save_epochs``), ``model.safetensors`` (best
weights), ``summary.json``. A run is never silently restarted: a directory that already holds a
``last.pt`` is trained further only with ``resume``. Every file is written atomically; the metrics
row of an epoch is written before its checkpoint, and a resume drops rows past the checkpoint. A
resume continues from ``last.pt``, else ``prev.pt``, else ``best.pt`` (when a write failed or a kill
struck between the first ``best.pt`` and the first ``last.pt``). A failed write (disk full) stops the
run with one line naming what a resume would continue from.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from safetensors.torch import save as safetensors_bytes

from ducat.checkpoint import CheckpointError, check_training_state, load_checkpoint, save_checkpoint
from ducat.config import TrainConfig, config_from_dict, describe
from ducat.dummy import check_pairing
from ducat.errors import RunError
from ducat.fileio import atomic_write_bytes
from ducat.provenance import file_sha256, provenance


@dataclass
class RunResult:
    run_dir: Path
    epochs: int
    best_epoch: int
    best: dict[str, Any]
    last: dict[str, Any]
    wall_time_s: float


def _training_state(path: Path, max_bytes: int | None) -> dict[str, Any]:
    """A checked training state (:func:`check_training_state`, and a DUCAT pairing that is a permutation:
    ``load_state_dict`` copies any ``dummy_index`` of the right shape)."""
    state = load_checkpoint(path, max_bytes=max_bytes)
    check_training_state(state, path)
    if "dummy_index" in state["model"]:
        try:
            check_pairing(state["model"]["dummy_index"])
        except ValueError:
            raise CheckpointError(f"checkpoint '{path}' cannot be resumed from: its 'dummy_index' is not a "
                                  "permutation of [C, 2C)") from None
    return state


class RunState:
    """The run directory of one config, and the run's progress through it: the last good checkpoint,
    the best epoch so far and the wall time of earlier attempts (``elapsed_s``)."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None] = print, device: str | None = None):
        self.config, self.log, self.device = config, log, device
        self.run_dir = Path(config.run.out)
        self.saved: tuple[Path, int] | None = None  # the checkpoint a resume continues from, and its epoch
        self.best_metric, self.best_epoch, self.elapsed_s = -math.inf, 0, 0.0

    def check(self, resume: bool) -> None:
        """Refuse to start over an existing run, or to resume nothing."""
        last = self.run_dir / "last.pt"
        if resume and not any((self.run_dir / name).exists() for name in ("last.pt", "prev.pt", "best.pt")):
            raise RunError(f"nothing to resume: '{self.run_dir}' has no checkpoint (last.pt)")
        if not resume and last.exists():
            raise RunError(f"'{self.run_dir}' already holds a run; resume it with: ducat train --resume "
                           f"{self.run_dir} (or set run.out to a new directory)")

    def restore(self, max_bytes: int | None = None, write: bool = True) -> dict[str, Any]:
        """The checkpoint to resume from, checked to be a complete training state of this config of at most
        ``max_bytes``: ``last.pt``, else ``prev.pt`` (loudly), else -- when neither exists, because the
        first ``last.pt`` was never written (disk full, a kill) -- ``best.pt``, a full training state too.
        Sets the progress fields; with ``write`` (rank 0 only under torchrun) drops metric rows past it."""
        path, state = self._load_resumable(max_bytes)
        saved = config_from_dict(json.loads(state["config"]))
        if saved.to_dict() | {"run": None} != self.config.to_dict() | {"run": None}:
            raise RunError(f"the config differs from the one saved in '{self.run_dir}'; resume with the saved "
                           "config (ducat train --resume RUN_DIR) or start a new run")
        if state["epoch"] > self.config.optim.epochs:
            raise CheckpointError(f"checkpoint '{path}' cannot be resumed from: its epoch {state['epoch']} is past "
                                  f"the run's last epoch ({self.config.optim.epochs})")
        self.saved = (path, state["epoch"])
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.elapsed_s = float(state.get("wall_time_s", 0.0))
        if write:
            self.truncate_metrics(state["epoch"])
            keep_saved_epoch(self, state)
        self.log(f"resuming {self.run_dir} after epoch {state['epoch']}")
        return state

    def _load_resumable(self, max_bytes: int | None) -> tuple[Path, dict[str, Any]]:
        """(path, training state) of the checkpoint a resume continues from (see :meth:`restore`)."""
        last, previous, best = (self.run_dir / name for name in ("last.pt", "prev.pt", "best.pt"))
        if not last.exists() and not previous.exists() and best.is_file():
            state = _training_state(best, max_bytes)
            self.log(f"no {last.name} was written (the run stopped right after {best.name}); resuming from {best}")
            return best, state
        try:
            return last, _training_state(last, max_bytes)
        except CheckpointError as exc:
            if not previous.is_file():
                raise
            try:
                state = _training_state(previous, max_bytes)
            except CheckpointError as prev_exc:
                raise CheckpointError(f"cannot resume '{self.run_dir}': {exc}; and the previous checkpoint is "
                                      f"unusable too ({prev_exc})") from None
            self.log(f"warning: {exc}; resuming from the previous checkpoint {previous} instead")
            return previous, state

    def begin(self, resume: bool, start_epoch: int) -> None:
        """Create the directory and write ``config.yaml``; drop rows of an attempt that crashed before its
        first checkpoint."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        facts = yaml.safe_dump({"provenance": provenance(self.device)}, sort_keys=False)
        with self.writing(self.run_dir / "config.yaml"):
            atomic_write_bytes(self.run_dir / "config.yaml", (describe(self.config) + facts).encode())
        if not resume:
            self.truncate_metrics(start_epoch - 1)

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop metric lines written after the checkpoint being resumed (a crash between the two)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        text = path.read_text()
        keep = []
        for line in (line for line in text.splitlines() if line.strip()):
            try:
                if json.loads(line)["epoch"] <= last_epoch:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a torn last line
        kept = "".join(line + "\n" for line in keep)
        if kept != text:  # atomic: a crash here must not lose the rows being kept
            with self.writing(path):
                atomic_write_bytes(path, kept.encode())

    def append_metrics(self, row: dict[str, Any]) -> None:
        path = self.run_dir / "metrics.jsonl"
        with self.writing(f"{path} at epoch {row['epoch']}"), open(path, "a") as f:
            f.write(json.dumps(row) + "\n")  # a torn line (disk full, a kill) is dropped by the next resume
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def save(self, epoch: int, improved: bool, state: dict[str, Any]) -> None:
        """``best.pt`` (if ``improved``), ``last.pt`` (previous one kept as ``prev.pt``), ``epoch_N.pt``."""
        targets = [("best.pt", False)] if improved else []
        targets.append(("last.pt", True))
        if epoch in self.config.run.save_epochs:
            targets.append((f"epoch_{epoch}.pt", False))
        for name, keep_previous in targets:
            with self.writing(f"checkpoint {self.run_dir / name} at epoch {epoch}"):
                save_checkpoint(state, self.run_dir / name, keep_previous=keep_previous)
            # what a resume would continue from: last.pt; best.pt while no last.pt exists (see restore)
            if name == "last.pt" or (name == "best.pt" and (self.saved is None or self.saved[0].name == name)):
                self.saved = (self.run_dir / name, epoch)

    def last_good(self) -> str:
        """What a resume would continue from, for error messages."""
        if self.saved is None:
            return f"no checkpoint of this run was written yet ('{self.run_dir / 'last.pt'}' does not exist)"
        return f"the last good checkpoint is {self.saved[0]} (epoch {self.saved[1]}), unchanged"

    @contextmanager
    def writing(self, what: str | Path) -> Iterator[None]:
        """Turn an ``OSError`` (disk full, quota, permissions) while writing ``what`` into a one-line
        :class:`RunError` that names what is still good. Every write is atomic: the old file stays in place."""
        try:
            yield
        except OSError as exc:
            resume = f"; continue with: ducat train --resume {self.run_dir}" if self.saved else ""
            raise RunError(f"cannot write {what} ({exc.strerror or exc}); {self.last_good()}{resume}") from None

    def finish(self, last: dict[str, Any], wall_time_s: float) -> RunResult:
        """``model.safetensors`` (best weights) and ``summary.json``; the run is complete."""
        rows = self.metrics()
        best = next((r for r in rows if r["epoch"] == self.best_epoch), rows[-1])
        last = last or rows[-1]
        best_state = load_checkpoint(self.run_dir / "best.pt")
        weights = safetensors_bytes({k: v.contiguous() for k, v in best_state["model"].items()},
                       metadata={"config": self.config.to_json()})
        summary = {"run_dir": str(self.run_dir), "epochs": self.config.optim.epochs, "best_epoch": self.best_epoch,
                   "selected_on": self.config.validation.select, "best": best, "last": last,
                   "wall_time_s": wall_time_s, "best_checkpoint_sha256": file_sha256(self.run_dir / "best.pt"),
                   "provenance": provenance(self.device)}
        for name, data in (("model.safetensors", weights), ("summary.json", json.dumps(summary, indent=2).encode())):
            with self.writing(self.run_dir / name):
                atomic_write_bytes(self.run_dir / name, data)
        return RunResult(self.run_dir, self.config.optim.epochs, self.best_epoch, best, last, wall_time_s)


def keep_saved_epoch(run: RunState, state: dict[str, Any]) -> None:
    """Write ``epoch_N.pt`` of the epoch N that ``run`` resumes from when ``run.save_epochs`` asks for it and it
    is missing: a kill between ``last.pt`` and it leaves it unwritten, no later epoch writes it, and the
    DUCAT runs that fork from a trunk at epoch N need it (``ducat.reproduce``)."""
    epoch = state["epoch"]
    path = run.run_dir / f"epoch_{epoch}.pt"
    if epoch not in run.config.run.save_epochs or path.is_file():
        return
    with run.writing(f"checkpoint {path} at epoch {epoch}"):
        save_checkpoint({k: v for k, v in state.items() if k != "format_version"}, path, keep_previous=False)
    run.log(f"wrote the missing {path.name} from {run.saved[0].name} (same epoch)")
