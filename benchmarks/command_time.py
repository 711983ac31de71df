#!/usr/bin/env python
"""Wall time of a whole ``ducat`` command as a user runs it, idle and beside a competing job, against a baseline.

    python benchmarks/command_time.py eval RUN_DIR [--n-examples 200]    # ducat eval with its defaults
    python benchmarks/command_time.py quickstart --contended             # ducat quickstart, idle and contended
    python benchmarks/command_time.py eval RUN_DIR --baseline ../old/src # and the same command from other sources
    python benchmarks/command_time.py eval RUN_DIR --variant "1 worker=--workers 1"   # and with other options

Each repetition runs the command once per source tree (this checkout's ``src``, then each ``--baseline``
directory, put first on ``PYTHONPATH``; then each ``--variant LABEL=OPTIONS``, this checkout with the
command's options followed by OPTIONS) and per condition: idle, and with ``--contended`` beside the
competitor of ``benchmarks/contention.py`` (``relu(a @ a)`` on 512 x 512 fp32, torch's default threads).
Every run writes to a new temporary directory, so nothing is reused from an earlier run. Before each run
the script records the 1-minute load average and the machine's fp32 matmul rate (2048 x 2048, torch's
default threads, measured in a separate process): on a shared or virtual machine the same command can
take 25% longer from one minute to the next, and the matmul rate shows when that happens.

It prints one line per run and then, per tree and condition, the median and range of the wall times and
what the command printed as its result (``ducat eval``: the worst case per example; ``quickstart``: its
table). Run it on an otherwise idle machine (``uptime``); it takes the commands' own time and a few
seconds per probe.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contention import SRC, clean_env, loadavg, start_competitor, stop

MATMUL_PROBE = """
import time, torch
a = torch.randn(2048, 2048)
a @ a
times = []
for _ in range(5):
    t = time.perf_counter(); a @ a; times.append(time.perf_counter() - t)
print(2 * 2048 ** 3 / min(times) / 1e9)
"""


def matmul_rate() -> float:
    """fp32 GFLOP/s of a 2048 x 2048 matmul in a fresh process (torch's default threads)."""
    out = subprocess.run([sys.executable, "-c", MATMUL_PROBE], env=clean_env({}), capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip())


def command(args, out: Path, options: list[str]) -> list[str]:
    """The ducat command line of one run: the command's own options, then a variant's ``options``."""
    if args.command == "eval":
        return ["eval", str(args.run), "--n-examples", str(args.n_examples), "--out", str(out), "--no-progress",
                *options]
    return ["quickstart", "--out", str(out), "--no-progress", *options]


def result_of(args, out: Path, stdout: str) -> str:
    """What the command reported: eval's worst case and AutoAttack rows, or quickstart's table rows."""
    if args.command == "eval":
        report = json.loads((out / "report.json").read_text())
        rows = {r["id"]: r["robust_accuracy"] for r in report["results"]}
        aa = " ".join(f"{k} {100 * v:.1f}" for k, v in rows.items() if "autoattack" in k)
        return (f"clean {100 * report['clean_accuracy']:.1f}, worst {100 * report['worst_case']['robust_accuracy']:.1f}"
                f"; {aa}; workers {report['settings'].get('workers', 1)}")
    return "; ".join(line.strip("| ") for line in stdout.splitlines() if re.match(r"\| pgd_at", line))


def run_once(args, src: Path, options: list[str], contended: bool) -> dict:
    env = clean_env({}) | {"PYTHONPATH": str(src)}
    with tempfile.TemporaryDirectory(prefix="ducat-command-time-") as tmp:
        out = Path(tmp) / "out"
        rate, load = matmul_rate(), loadavg()
        competitor = start_competitor() if contended else None
        try:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "ducat", *command(args, out, options)], env=env,
                                  capture_output=True, text=True, cwd=tmp)
            wall = time.perf_counter() - start
        finally:
            if competitor is not None:
                stop(competitor)
        if proc.returncode != 0:
            raise SystemExit(f"ducat {args.command} from {src} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        return {"wall": wall, "load": load, "matmul": rate, "result": result_of(args, out, proc.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("eval", "quickstart"))
    parser.add_argument("run", nargs="?", type=Path, help="run directory to evaluate (eval)")
    parser.add_argument("--n-examples", type=int, default=200)
    parser.add_argument("--baseline", action="append", type=Path, default=[],
                        help="another checkout's src directory to time the same command from (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=OPTIONS",
                        help="also time this checkout with these extra command options (repeatable)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--contended", action="store_true", help="also run each beside a competing torch process")
    args = parser.parse_args()
    if args.command == "eval" and args.run is None:
        parser.error("eval needs a RUN directory")
    if any("=" not in v for v in args.variant):
        parser.error("--variant takes LABEL=OPTIONS, e.g. '1 worker=--workers 1'")
    trees = ([("this checkout", SRC, [])] + [(f"baseline {b}", b.resolve(), []) for b in args.baseline]
             + [(label, SRC, shlex.split(options)) for label, options in (v.split("=", 1) for v in args.variant)])
    conditions = ["idle"] + (["contended"] if args.contended else [])
    print(f"ducat {args.command}; {os.cpu_count()} logical CPUs; load average at start {loadavg()}")
    print("| repetition | tree | condition | wall s | load (1/5/15 min) | fp32 matmul GFLOP/s | result |")
    print("|---|---|---|---|---|---|---|")
    runs: dict[tuple[str, str], list[dict]] = {}
    for repetition in range(1, args.repeat + 1):
        for name, src, options in trees:
            for condition in conditions:
                r = run_once(args, src, options, condition == "contended")
                runs.setdefault((name, condition), []).append(r)
                print(f"| {repetition} | {name} | {condition} | {r['wall']:.1f} | {r['load']} | {r['matmul']:.0f} | "
                      f"{r['result']} |", flush=True)
    print(f"\nload average at end {loadavg()}\n")
    for (name, condition), rs in runs.items():
        walls = [r["wall"] for r in rs]
        print(f"{name}, {condition}: median {statistics.median(walls):.1f} s ({min(walls):.1f}-{max(walls):.1f}) "
              f"over {len(walls)} runs")


if __name__ == "__main__":
    main()
