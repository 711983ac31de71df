"""What a training run shows while it runs: one line per finished epoch (always), a live bar only on a
terminal, and TensorBoard scalars.

A log file gets the epoch lines and nothing else: no carriage-return bar updates. ``run.progress=false``
turns the bar off on a terminal too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable


class EpochProgress:
    """Context manager around the epoch loop of one run (rank 0 only shows anything)."""

    def __init__(self, bar: bool, steps_per_epoch: int, last_epoch: int, log: Callable[[str], None],
                 run_dir: Path, tensorboard: bool):
        self.steps, self.last_epoch, self.log = steps_per_epoch, last_epoch, log
        self.show_bar = bar and sys.stderr.isatty()
        self.bar = None
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # loads tensorboard: only when asked for

            self.writer = SummaryWriter(str(run_dir / "tb"))

    def __enter__(self) -> "EpochProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def start_epoch(self, epoch: int) -> None:
        if not self.show_bar:
            return
        from tqdm.auto import tqdm  # only on a terminal

        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=self.steps, unit="step", desc=f"epoch {epoch}/{self.last_epoch}", leave=False,
                        dynamic_ncols=True, mininterval=0.5)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def end_epoch(self, row: dict[str, Any]) -> None:
        """One line with the epoch's metrics (it stays above the bar), and the TensorBoard scalars."""
        line = (f"epoch {row['epoch']}/{self.last_epoch}: loss {row['train_loss']:.4f}, val clean "
                f"{row['val_clean_acc']:.4f}, val PGD {row['val_pgd_acc']:.4f}, lr {row['lr']:.3g}"
                f"{', DUCAT' if row['ducat_active'] else ''} ({row['epoch_time_s']:.1f} s)")
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            self.log(line)
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()
