"""Training time per epoch with and without DUCAT, per base method (the paper's fig. 6), measured.

Trains each base method and its DUCAT variant (DUCAT active from epoch 1) for ``--epochs`` epochs
with the CPU Fashion-MNIST presets, in alternating order so that load on the machine affects both
alike, and prints the median epoch time after the first (warm-up) epoch, the overhead, and the fig. 6
bar chart rendered by ``ducat.analysis.training_time_bars``. Run it on an otherwise idle machine.

    python benchmarks/ducat_overhead.py --n-train 4000 --epochs 3 --out /tmp/overhead
    python benchmarks/ducat_overhead.py --n-train 20000 --epochs 4 --model mlp --out /tmp/overhead-mlp
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ducat import analysis
from ducat.objectives import METHODS


def epoch_times(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["epoch_time_s"] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=4000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    parser.add_argument("--out", type=Path, required=True, help="directory for the runs and the figure")
    parser.add_argument("--model", help="a ducat model name instead of the presets' small_cnn (e.g. mlp, as in mini)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is warm-up)")
    args.out.mkdir(parents=True, exist_ok=True)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
    print(f"load average at start (1/5/15 min): {' '.join(load)}")
    times: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for method in METHODS:
        times[METHODS[method].label] = {}
        for variant, preset, extra in (("base", f"cpu-fmnist-small_cnn-{method}", []),
                                       ("ducat", f"cpu-fmnist-small_cnn-{method}-ducat", ["ducat.start_epoch=1"])):
            run_dir = args.out / f"{method}-{variant}"
            if not (run_dir / "summary.json").is_file():
                command = [sys.executable, "-m", "ducat", "train", preset, f"run.out={run_dir}",
                           f"data.n_train={args.n_train}", f"optim.epochs={args.epochs}",
                           f"optim.milestones=[{args.epochs + 1}]", "validation.n_examples=100", *extra,
                           *([f"model.name={args.model}"] if args.model else [])]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            steady = epoch_times(run_dir)[1:]
            times[METHODS[method].label][variant] = statistics.median(steady)
            listed = ", ".join(f"{t:.1f}" for t in steady)
            print(f"{METHODS[method].label:>15} {variant:>5}: {listed} s/epoch (after warm-up)")
    print("\n| method | base s/epoch | DUCAT s/epoch | overhead |\n|---|---|---|---|")
    for method, t in times.items():
        print(f"| {method} | {t['base']:.1f} | {t['ducat']:.1f} | {100 * (t['ducat'] / t['base'] - 1):+.0f}% |")
    figure = analysis.training_time_bars(times, args.out / "fig6_training_time.png")
    print(f"\n{args.n_train} images per epoch, {args.epochs} epochs per run; wall time "
          f"{(time.perf_counter() - started) / 60:.1f} min; figure: {figure}")


if __name__ == "__main__":
    main()
