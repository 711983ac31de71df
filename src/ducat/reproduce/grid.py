"""The grid of a reproduction and how each of its runs is trained.

Every DUCAT run follows the paper's schedule (``docs/method.md``): a 2C head from epoch 1, the base
method with hard labels before the DUCAT start epoch t, the DUCAT objective from t on, one optimizer
state throughout. Runs that are identical before t share that part exactly: one *trunk* per method,
seed and variant is trained with hard labels to the last epoch any of its forks needs and keeps the
checkpoint of each fork's epoch t-1; each DUCAT run starts as a copy of it (weights, optimizer and RNG
state, metrics) and trains on (:func:`ducat.train.fork_run`). The result is the same as training the
DUCAT run from scratch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ducat.config import ConfigError, TrainConfig, load_config
from ducat.errors import RunError
from ducat.presets import Throughput, Work, training_work
from ducat.reproduce.scales import VARIANTS, Scale
from ducat.train import fork_run, train


@dataclass(frozen=True)
class GridRun:
    """One training run. ``group``: main | variant | toy | ablation | trunk. A DUCAT run forks from
    ``trunk`` at ``fork_epoch``; a trunk trains to ``until`` and keeps the checkpoints of ``fork_epochs``."""

    name: str
    preset: str
    overrides: tuple[str, ...]
    method: str
    ducat: bool
    seed: int
    group: str = "main"
    variant: str | None = None
    ablation: tuple[str, float] | None = None
    trunk: str | None = None
    fork_epoch: int | None = None


def plan(scale: Scale) -> list[GridRun]:
    """Every run of the grid, each trunk before the runs that fork from it."""
    schedule = (f"optim.epochs={scale.epochs}", f"optim.milestones=[{', '.join(map(str, scale.milestones))}]",
                f"ducat.start_epoch={scale.start_epoch}", *scale.overrides)
    forks: list[GridRun] = []
    runs: list[GridRun] = []
    for seed in range(scale.seeds):
        seeded = (*schedule, f"run.seed={seed}")
        for method in scale.methods:
            runs.append(GridRun(f"{method}-s{seed}", f"{scale.family}-{method}", seeded, method, False, seed))
            forks.append(_fork(f"{method}-ducat-s{seed}", f"{scale.family}-{method}-ducat", seeded, method, seed,
                               f"trunk-{method}-s{seed}", scale.start_epoch))
        for name in scale.variants:
            v = VARIANTS[name]
            forks.append(_fork(f"{name}-s{seed}", f"{scale.family}-{v.method}-ducat", (*seeded, *v.overrides),
                               v.method, seed, f"trunk-{name}-s{seed}", scale.start_epoch, "variant", name))
    seed0 = (*schedule, "run.seed=0")
    if scale.toy:
        forks.append(_fork("pgd_at-toy-s0", f"{scale.family}-pgd_at-toy", seed0, "pgd_at", 0, "trunk-pgd_at-s0",
                           scale.start_epoch, "toy"))
    for param, values in scale.ablations.items():
        for value in values:
            start = int(value) if param == "start_epoch" else scale.start_epoch
            forks.append(_fork(f"ablation-{param}-{value:g}", f"{scale.family}-pgd_at-ducat",
                               (*seed0, f"ducat.{param}={value}"), "pgd_at", 0, "trunk-pgd_at-s0", start, "ablation",
                               ablation=(param, value)))
    return runs + _trunks(forks, scale) + forks


def _fork(name: str, preset: str, overrides: tuple[str, ...], method: str, seed: int, trunk: str, start: int,
          group: str = "main", variant: str | None = None, ablation: tuple[str, float] | None = None) -> GridRun:
    return GridRun(name, preset, overrides, method, True, seed, group, variant, ablation, trunk, start - 1)


def _trunks(forks: list[GridRun], scale: Scale) -> list[GridRun]:
    """One trunk per (method, variant, seed): the main DUCAT preset (the variant's overrides) with its DUCAT
    start past every fork, trained to the last fork epoch."""
    trunks = []
    for name in dict.fromkeys(f.trunk for f in forks):
        first = next(f for f in forks if f.trunk == name)
        epochs = sorted({f.fork_epoch for f in forks if f.trunk == name})
        overrides = (*[o for o in first.overrides if not o.startswith("ducat.")], f"ducat.start_epoch={scale.epochs}",
                     f"run.save_epochs={epochs}")
        trunks.append(GridRun(name, f"{scale.family}-{first.method}-ducat", overrides, first.method, True, first.seed,
                              "trunk", first.variant, fork_epoch=max(epochs)))
    return trunks


def run_config(run: GridRun, out: Path, data_root: str | None) -> TrainConfig:
    """The validated config of ``run`` in ``out/runs/<name>``."""
    overrides = [*run.overrides, f"run.out={out / 'runs' / run.name}", "run.progress=false"]
    if data_root:
        overrides.append(f"data.root={data_root}")
    return load_config(run.preset, overrides)


def train_run(run: GridRun, config: TrainConfig, out: Path, nproc: int, log: Callable[[str], None]) -> None:
    """Train, fork, resume or skip one run, whatever state its directory is in."""
    run_dir = Path(config.run.out)
    if finished(run, run_dir):
        log(f"  {run.name}: finished, skipped")
        return
    if run.trunk is not None and not (run_dir / "last.pt").is_file():
        fork_run(out / "runs" / run.trunk / f"epoch_{run.fork_epoch}.pt", config)
        log(f"  {run.name}: forked from {run.trunk} at epoch {run.fork_epoch}")
    resume = (run_dir / "last.pt").is_file()
    log(f"  {run.name}: {'resuming' if resume else 'training'}")
    until = run.fork_epoch if run.group == "trunk" else None
    if nproc > 1:
        _train_distributed(run.preset, config, resume, until, nproc)
    else:
        train(config, resume=resume, log=lambda s: None, until_epoch=until)


def finished(run: GridRun, run_dir: Path) -> bool:
    """Whether ``run`` is trained: a trunk to its last fork epoch, any other run to its end (``summary.json``)."""
    if run.group == "trunk":
        return (run_dir / f"epoch_{run.fork_epoch}.pt").is_file()
    return (run_dir / "summary.json").is_file()


def check_nproc(nproc: int, device: str) -> None:
    """ConfigError (before anything runs) when ``nproc`` CUDA processes per run would need more GPUs than this
    machine has; on the CPU any number of gloo processes may run."""
    import torch  # the CLI checks options before torch loads

    uses_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if nproc > 1 and uses_cuda and nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc {nproc} needs {nproc} GPUs per run; this machine has "
                          f"{torch.cuda.device_count()}")


def _train_distributed(preset: str, config: TrainConfig, resume: bool, until: int | None, nproc: int) -> None:
    """The same run through torchrun on ``nproc`` processes (one GPU each on CUDA); RunError if it fails."""
    args = ["--resume", config.run.out] if resume else [preset, *flat_overrides(config)]
    if until is not None:
        args += ["--until-epoch", str(until)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ducat", "train", *args]
    code = subprocess.run(command).returncode
    if code != 0:
        raise RunError(f"torchrun training of '{config.run.out}' on {nproc} processes failed (exit code {code}); "
                       "its output is above; a rerun resumes it")


def flat_overrides(config: TrainConfig) -> list[str]:
    """``section.key=value`` for every field of ``config``, values as JSON (read back by YAML, quotes and all):
    ``load_config(preset, flat_overrides(config))`` is ``config`` again."""
    return [f"{section}.{key}={json.dumps(value)}" for section, values in config.to_dict().items()
            for key, value in values.items()]


def grid_seconds(scale: Scale, device: Throughput) -> float:
    """Training time of the whole grid of ``scale`` on ``device`` by ducat's cost model (:mod:`ducat.presets`,
    an estimate): each run from scratch, each trunk to its last fork epoch, each fork from the epoch after
    its fork epoch. Evaluation is not counted."""
    work = Work(0.0, 0.0)
    for run in plan(scale):
        config = run_config(run, Path("estimate"), None)
        if run.group == "trunk":
            work = work + training_work(config, 1, run.fork_epoch)
        else:
            work = work + training_work(config, 1 if run.trunk is None else run.fork_epoch + 1)
    return work.seconds(device)
