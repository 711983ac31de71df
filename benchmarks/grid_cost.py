"""GPU time of ``ducat reproduce --scale paper`` per dataset and model, by ducat's cost model (an estimate).

The paper scale's grid is run on CIFAR-10 with ResNet-18; the same grid (same runs, trunks and forks) is
costed here on every family of paper presets, so that a cluster request can be sized. Training only:
evaluation (AutoAttack and the rest on 10,000 test examples per run) is not in the cost model. The wall
time on N GPUs is bounded below by the total divided by N and by the longest chain of dependent jobs (a
trunk, then its longest fork), and is printed as that bound.

    python benchmarks/grid_cost.py [--gpus 8]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ducat.presets import ONE_GPU, format_duration, training_work
from ducat.reproduce import SCALES, plan, run_config
from ducat.reproduce.grid import grid_seconds

FAMILIES = ("paper-cifar10-resnet18", "paper-cifar100-resnet18", "paper-tinyimagenet-resnet18",
            "paper-cifar10-wrn28_10", "paper-cifar100-wrn28_10", "paper-tinyimagenet-wrn28_10")


def longest_chain(scale) -> float:
    """Seconds of the longest chain of jobs that must run one after another: a run, or a trunk and a fork."""
    runs = plan(scale)
    by_name = {run.name: run for run in runs}

    def seconds(run, first=1, last=None):
        return training_work(run_config(run, Path("estimate"), None), first, last).seconds(ONE_GPU)

    chains = []
    for run in runs:
        if run.trunk is None and run.group != "trunk":
            chains.append(seconds(run))
        elif run.trunk is not None:
            chains.append(seconds(by_name[run.trunk], 1, run.fork_epoch) + seconds(run, run.fork_epoch + 1))
    return max(chains)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs for the wall-time bound (default 8)")
    args = parser.parse_args()
    print(f"cost model: {ONE_GPU.describe()}; training only, evaluation not counted")
    print(f"{'family':30} {'runs':>5} {'GPU-hours':>10} {f'wall on {args.gpus} GPUs, at least':>28}")
    for family in FAMILIES:
        scale = replace(SCALES["paper"], family=family)
        total = grid_seconds(scale, ONE_GPU)
        wall = max(total / args.gpus, longest_chain(scale))
        runs = sum(run.group != "trunk" for run in plan(scale))
        print(f"{family:30} {runs:>5} {total / 3600:>10.1f} {format_duration(wall):>28}")


if __name__ == "__main__":
    main()
