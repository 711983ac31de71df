#!/usr/bin/env python
"""Does bf16 autocast training change what a run learns? fp32 against bf16 on a Fashion-MNIST preset, paired tests.

For each seed the script trains ``cpu-fmnist-small_cnn-pgd_at-ducat`` on the first ``--n-train`` training
images for ``--epochs`` epochs (the preset's schedule scaled with ``--epochs``) twice: in fp32
(``run.amp=off``) and with bf16 autocast (``run.amp=bf16``), both channels_last with BatchNorm folded in
the attack, as the defaults run. It evaluates every model in fp32 with ``ducat eval`` on the same first
``--n-examples`` test images (``--attacks pgd10,logsumexp,margin,targeted``, both protocols), then compares,
per seed, clean accuracy and the adaptive worst case per example with the exact McNemar test (descriptive),
then over all seeds x examples with the test ``ducat reproduce`` uses for DUCAT against its base
(``ducat.reproduce.stats.seed_example_test``: seeds and examples both counted as noise, Holm over the two
measures, no verdict below 5 seeds), and the per-seed differences with a paired t-test. McNemar counts only the
examples as noise: two runs trained apart differ per example by more than that (training is chaotic).

    python benchmarks/bf16_accuracy.py --out /tmp/bf16acc               # 3 seeds, about 40 min on 2 cores
    python benchmarks/bf16_accuracy.py --out /tmp/bf16acc --seeds 5     # a rerun reuses finished runs

Every command runs in its own process with ducat's defaults (threads, wait policy); the commands and their
wall times are printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
PRESET = "cpu-fmnist-small_cnn-pgd_at-ducat"
PRECISIONS = {"fp32": "run.amp=off", "bf16": "run.amp=bf16"}
ATTACKS = "pgd10,logsumexp,margin,targeted"


def ducat(*args: str) -> float:
    """Run ``python -m ducat ARGS`` from this checkout; its wall time in seconds."""
    print("$ ducat " + " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ducat", *args], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(SRC)})
    return time.perf_counter() - start


def p_text(p: float) -> str:
    """A p-value for print; one below float64's range (it underflows to 0) as ``< 1e-300``."""
    return "< 1e-300" if p < 1e-300 else f"{p:.2g}"


def train_and_eval(out: Path, seed: int, precision: str, args) -> dict:
    run = out / f"{precision}-s{seed}"
    report = run / "eval" / "report.json"
    if not report.is_file():
        if not (run / "last.pt").is_file():
            secs = ducat("train", PRESET, f"data.n_train={args.n_train}", f"run.seed={seed}", PRECISIONS[precision],
                         "run.channels_last=on", f"run.out={run}", "run.progress=false", "run.tensorboard=false",
                         "--epochs", str(args.epochs))
            print(f"  trained in {secs:.0f} s", flush=True)
        secs = ducat("eval", str(run), "--n-examples", str(args.n_examples), "--attacks", ATTACKS, "--no-progress")
        print(f"  evaluated in {secs:.0f} s", flush=True)
    masks = np.load(run / "eval" / "masks.npz")
    return {"clean": masks["clean"], "worst": masks["worst_case"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-examples", type=int, default=1000)
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    from ducat.reproduce.stats import holm, mcnemar, seed_example_test, verdict

    results = {(seed, p): train_and_eval(args.out, seed, p, args) for seed in range(args.seeds) for p in PRECISIONS}
    print(f"\n{PRESET}, {args.n_train} training images, {args.epochs} epochs; fp32 evaluation on the first "
          f"{args.n_examples} test images (--attacks {ATTACKS})\n")
    print("| seed | clean fp32 | clean bf16 | McNemar p (fp32 only / bf16 only) | worst case fp32 | worst case bf16 "
          "| McNemar p (fp32 only / bf16 only) |")
    print("|---|---|---|---|---|---|---|")
    tests: dict[str, list] = {"clean": [], "worst": []}
    for seed in range(args.seeds):
        a, b = results[seed, "fp32"], results[seed, "bf16"]
        cells = []
        for measure in ("clean", "worst"):
            t = mcnemar(a[measure], b[measure])
            tests[measure].append(t)
            cells += [f"{100 * a[measure].mean():.1f}", f"{100 * b[measure].mean():.1f}",
                      f"{t.p:.2g} ({t.only_base}/{t.only_other})"]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    from scipy import stats

    primary = {}  # measure -> the seeds x examples test of bf16 against fp32
    for m in tests:
        fp32_correct, bf16_correct = (np.stack([results[seed, p][m] for seed in range(args.seeds)]) for p in PRECISIONS)
        primary[m] = seed_example_test(fp32_correct, bf16_correct)
    adjusted = dict(zip(primary, holm([t.p for t in primary.values()])))
    for measure, label in (("clean", "clean accuracy"), ("worst", "adaptive worst case")):
        test = primary[measure]
        diffs = [100 * t.difference for t in tests[measure]]
        fp32 = [100 * results[seed, "fp32"][measure].mean() for seed in range(args.seeds)]
        across = stats.ttest_1samp(diffs, 0.0).pvalue if len(diffs) > 1 else float("nan")
        print(f"\n{label}: bf16 - fp32 = {np.mean(diffs):+.2f} points on average (per seed "
              + ", ".join(f"{d:+.1f}" for d in diffs) + f"); seeds x examples: 95% CI [{100 * test.ci_low:+.2f}, "
              f"{100 * test.ci_high:+.2f}], p {p_text(test.p)}, Holm p {p_text(adjusted[measure])} "
              f"({verdict(test, adjusted[measure])}); across seeds, paired t-test on "
              f"the differences (the runs' own variation as the noise): p {across:.2g}; fp32 seed-to-seed standard "
              f"deviation {np.std(fp32, ddof=1):.1f} points")


if __name__ == "__main__":
    main()
