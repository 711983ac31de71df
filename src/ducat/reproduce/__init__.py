"""``ducat reproduce``: the paper's grid at a chosen scale, evaluated under both protocols, with statistics.

The grid: PGD-AT, TRADES, MART and Consistency-AT, each without and with DUCAT, plus dummy-class
variants, over seeds; the hard-label toy case; ablations of PGD-AT + DUCAT. The report is made in three
stages: compute the results (:mod:`.results`), draw the figures (:mod:`.figures`), write the markdown
(:mod:`.text`). A rerun skips finished training and cached evaluations; an output directory made with
other settings or other code is refused rather than mixed (``manifest.json``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from ducat.config import ConfigError, TrainConfig
from ducat.data import load_split
from ducat.fileio import RunLock, atomic_write_bytes
from ducat.provenance import provenance, source_digest
from ducat.reproduce.grid import GridRun, check_nproc, plan, run_config, train_run
from ducat.reproduce.jobs import launch_grid
from ducat.reproduce.launch import Launcher
from ducat.reproduce.scales import SCALES, VARIANTS, Scale, get_scale

__all__ = ["SCALES", "VARIANTS", "GridRun", "Scale", "get_scale", "plan", "reproduce", "run_config"]


def manifest(scale: Scale) -> dict:
    """What a reproduction's results depend on: the scale and the code (every ducat source file)."""
    return {"scale": json.loads(json.dumps(asdict(scale))), "source_sha256": source_digest()}


def check_manifest(out: Path, expected: dict) -> None:
    """Refuse an output directory that holds a reproduction made with other settings or other code."""
    path = out / "manifest.json"
    if not path.is_file():
        return
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"'{path}' is unreadable; use a new --out") from None
    differs = [key for key in expected if found.get(key) != expected[key]]
    if differs:
        raise ConfigError(f"'{out}' holds a reproduction made with other {' and '.join(differs)} "
                          "(manifest.json); use a new --out, or delete that directory to start over")


def reproduce(scale_name: str, out: Path, data_root: str | None = None, seeds: int | None = None,
              variants: tuple[str, ...] | None = None, nproc: int = 1, log: Callable[[str], None] = print,
              launcher: Launcher | None = None, workers: int | None = None) -> Path:
    """Run (or continue) the grid at ``scale_name`` and write ``out/report.md`` with its figures: one run after
    another in this process, or with ``launcher`` as jobs on a Dask cluster (:mod:`.launch`). ``workers``:
    evaluation processes per run (None: one per torch thread on a CPU); results depend on it."""
    scale = get_scale(scale_name).with_seeds(seeds).with_variants(variants)
    runs = plan(scale)
    configs = {run.name: run_config(run, out, data_root) for run in runs}  # every config checked first
    check_nproc(nproc, configs[runs[0].name].run.device)
    load_split(configs[runs[0].name].data.dataset, data_root, train=False)  # and the data is there
    with RunLock(out) as lock:  # one reproduction per --out at a time (train() also locks each run directory)
        if lock.note:
            log(lock.note)
        return _reproduce_locked(scale, runs, configs, out, data_root, nproc, log, launcher, workers)


def _reproduce_locked(scale: Scale, runs: list[GridRun], configs: dict[str, TrainConfig], out: Path,
                      data_root: str | None, nproc: int, log: Callable[[str], None], launcher: Launcher | None,
                      workers: int | None) -> Path:
    """The body of :func:`reproduce`, run while holding the lock of ``out``."""
    # the report's stages load matplotlib and scipy: imported here, not by every command that reads the scales
    from ducat.reproduce.figures import draw
    from ducat.reproduce.results import collect, evaluate_runs
    from ducat.reproduce.text import report_markdown

    expected = manifest(scale)
    check_manifest(out, expected)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "manifest.json", json.dumps(expected, indent=2).encode())
    started = time.perf_counter()
    log(f"reproduce --scale {scale.name}: {len(runs)} runs into {out / 'runs'}")
    if launcher is None:
        for run in runs:
            train_run(run, configs[run.name], out, nproc, log)
        spent = f"{(time.perf_counter() - started) / 60:.1f} min of it training"
        log("evaluating")
        evaluate_runs(runs, scale, out, data_root, log, workers)
    else:
        ran = launch_grid(replace(launcher, workers=workers), runs, scale, out, data_root,
                          configs[runs[0].name].run.device, log)
        spent = f"{(time.perf_counter() - started) / 60:.1f} min of it in {ran}"
    results = collect(runs, scale, out, data_root)
    atomic_write_bytes(out / "results.json", json.dumps(results.to_json(), indent=2).encode())
    figures = draw(results, out / "figures")
    wall = time.perf_counter() - started
    footer = (f"---\nWall time of this invocation: {wall / 60:.1f} min ({spent}; a rerun skips finished runs). "
              f"Machine: {_machine()}. Provenance: {json.dumps(provenance())}.")
    atomic_write_bytes(out / "report.md", report_markdown(results, figures, scale, footer).encode())
    log(f"report written to {out / 'report.md'} ({wall / 60:.1f} min)")
    return out / "report.md"


def _machine() -> str:
    import torch  # reading the scales and plans does not load torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {device}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")
