"""Training curves of one or several runs, read from each run directory's ``metrics.jsonl``.

Not a figure of the paper: a look at how a run trained. Three panels over epochs: clean accuracy,
adversarial accuracy (validation PGD and the training attack's accuracy on the training batches),
and the learning rate on a log scale. Runs are overlaid in one colour each; solid lines are
validation, dashed lines training; the epochs where DUCAT is active are shaded lightly in the run's
colour. ``metrics.jsonl`` holds one JSON object per epoch, appended by ``ducat.train``; a last line
torn by a crash mid-append is skipped, as the trainer itself does on resume.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ducat.analysis._figure import save_figure
from ducat.errors import MetricsError

CURVE_KEYS = ("epoch", "lr", "train_clean_acc", "train_adv_acc", "val_clean_acc", "val_pgd_acc", "ducat_active")
ACCURACY_KEYS = ("train_clean_acc", "train_adv_acc", "val_clean_acc", "val_pgd_acc")
# (panel title, validation key drawn solid, train key drawn dashed)
ACCURACY_PANELS = (("clean accuracy", "val_clean_acc", "train_clean_acc"),
                   ("adversarial accuracy\nvalidation: PGD; train: the training attack", "val_pgd_acc",
                    "train_adv_acc"))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` in file order (all keys kept), skipping blank lines and a
    torn last line. Raises ``MetricsError`` naming the file if it is missing, if a line before the
    last is not JSON, if a row has no integer ``epoch`` or a non-numeric curve value, or if no row is left."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        raise MetricsError(f"no metrics file '{path}' (is '{run_dir}' a run directory?)") from None
    except OSError as exc:
        raise MetricsError(f"cannot read '{path}': {exc.strerror or exc}") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows = []
    for lineno, line in numbered:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if lineno == numbered[-1][0]:  # torn by a crash while appending: not a row yet
                break
            raise MetricsError(f"'{path}' line {lineno} is not JSON") from None
        rows.append(_checked_row(row, path, lineno))
    if not rows:
        raise MetricsError(f"'{path}' holds no complete metrics row")
    return rows


def _checked_row(row: Any, path: Path, lineno: int) -> dict[str, Any]:
    epoch = row.get("epoch") if isinstance(row, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise MetricsError(f"'{path}' line {lineno} is not a metrics row (no integer 'epoch')")
    for key in CURVE_KEYS:
        value = row.get(key)
        if value is not None and not isinstance(value, (int, float)):
            raise MetricsError(f"'{path}' line {lineno}: '{key}' is {value!r:.40}, not a number")
    return row


def curve_series(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """One run's per-epoch arrays ``(E,)`` exactly as plotted: ``epoch``; the accuracies of
    ``ACCURACY_KEYS`` in %; ``lr``; ``ducat_active`` (bool). A missing value is NaN (False for
    ``ducat_active``); NaN leaves a gap in the line."""
    def column(key: str) -> np.ndarray:
        return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)

    series = {"epoch": column("epoch"), "lr": column("lr")}
    series.update({key: 100 * column(key) for key in ACCURACY_KEYS})
    series["ducat_active"] = np.array([bool(r.get("ducat_active")) for r in rows], dtype=bool)
    return series


def active_spans(epochs: np.ndarray, active: np.ndarray) -> list[tuple[float, float]]:
    """Epoch intervals to shade: each stretch of consecutive active epochs ``e0..e1`` becomes
    ``(e0 - 0.5, e1 + 0.5)``, so every active epoch's point sits in the middle of its band."""
    spans: list[list[float]] = []
    for epoch, on in zip(epochs, active):
        if on and spans and spans[-1][1] == epoch - 0.5:
            spans[-1][1] = epoch + 0.5
        elif on:
            spans.append([epoch - 0.5, epoch + 0.5])
    return [(lo, hi) for lo, hi in spans]


def _draw_run(axes: list[Axes], series: dict[str, np.ndarray], name: str, colour: str) -> None:
    """One run on the three panels; each line's label is ``"{name} {metrics key}"``."""
    epochs = series["epoch"]
    for ax, (_, val_key, train_key) in zip(axes, ACCURACY_PANELS):
        ax.plot(epochs, series[val_key], "-", color=colour, marker=".", label=f"{name} {val_key}")
        ax.plot(epochs, series[train_key], "--", color=colour, label=f"{name} {train_key}")
    axes[2].plot(epochs, series["lr"], "-", color=colour, marker=".", label=f"{name} lr")
    for lo, hi in active_spans(epochs, series["ducat_active"]):
        for ax in axes:
            ax.axvspan(lo, hi, color=colour, alpha=0.12, lw=0)


def draw_training_curves(runs: dict[str, list[dict[str, Any]]]) -> Figure:
    """The training-curve figure for ``runs`` (name -> ``read_metrics`` rows), not yet saved."""
    fig = Figure(figsize=(15, 4.6))
    axes = list(fig.subplots(1, 3, sharex=True))
    colours = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    for name, rows in runs.items():
        _draw_run(axes, curve_series(rows), name, colours[name])
    for ax, (title, _, _) in zip(axes, ACCURACY_PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("accuracy (%)")
    axes[2].set_yscale("log", nonpositive="mask")
    axes[2].set_title("learning rate", fontsize=10)
    axes[2].set_ylabel("learning rate (log scale)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, lw=2, label=name) for name, c in colours.items()]
    handles += [Line2D([], [], color="k", ls="-", label="validation"),
                Line2D([], [], color="k", ls="--", label="train"),
                Patch(color="grey", alpha=0.25, lw=0, label="DUCAT active")]
    axes[0].legend(handles=handles, fontsize=8)
    return fig


def plot_training_curves(runs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Write ``draw_training_curves(runs)`` as a PNG at ``path`` and return the path."""
    if not runs:
        raise MetricsError("no runs to plot")
    return save_figure(draw_training_curves(runs), path)


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Legend names for ``run_dirs``: each directory's name; ``parent/name`` where two share a name;
    the full path where those still collide."""
    resolved = [Path(d).resolve() for d in run_dirs]
    labels = [d.name for d in resolved]
    for longer in (lambda d: f"{d.parent.name}/{d.name}", str):
        counts = Counter(labels)
        labels = [longer(d) if counts[label] > 1 else label for d, label in zip(resolved, labels)]
    twice = [label for label, n in Counter(labels).items() if n > 1]
    if twice:
        raise MetricsError(f"run directory '{twice[0]}' is given more than once")
    return labels


def training_curves(run_dirs: list[Path], path: Path, labels: list[str] | None = None) -> Path:
    """Read every run's ``metrics.jsonl`` (all before drawing) and write their overlaid training
    curves to ``path``; ``labels`` default to ``run_labels(run_dirs)``."""
    run_dirs = [Path(d) for d in run_dirs]
    if labels is None:
        labels = run_labels(run_dirs)
    elif len(labels) != len(run_dirs) or len(set(labels)) != len(labels):
        raise MetricsError(f"need {len(run_dirs)} distinct labels for {len(run_dirs)} runs, got {list(labels)}")
    runs = {label: read_metrics(d) for label, d in zip(labels, run_dirs)}
    return plot_training_curves(runs, path)
