#!/usr/bin/env python
"""Why does ducat collapse when another CPU-bound process shares the cores, and what fixes it?

For each candidate setting the script starts a *worker* process (its environment set before torch is
imported, which is when OpenMP reads it) that times ducat training steps -- PGD-10 + DUCAT with
``ducat.objectives`` on small_cnn, batch 128 -- in alternating phases: idle, then ``--cycles`` times
contended and idle again. For a contended phase the script starts a *competitor*: a separate Python
process running a torch CPU loop (``relu(a @ a)`` on 512 x 512 fp32, forever) with torch's default
threads, as a user's other job would; it stops the competitor before the next idle phase. Slowdown =
mean step time of a contended phase / mean step time of the idle phases on either side. The phases
alternate within one worker, so the idle and contended figures share the process, the data and the
warm caches. On a shared machine other users' jobs load the "idle" phases too: the script measures
that background load (cores busy outside its own process tree, from ``/proc``) per phase and prints
it next to the result.

Candidates (``--configs``, comma-separated):

  t2          torch's default: one intra-op thread per core, libgomp's default (spinning) wait policy
  t1          1 intra-op thread
  t2-passive  2 threads, ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at barriers instead of spinning)
  t2-spin0    2 threads, ``GOMP_SPINCOUNT=0`` (libgomp only; the spin part of the wait alone)
  t2-spin1k   2 threads, ``GOMP_SPINCOUNT=1000``: a short spin, then sleep (libgomp's default is 300000)
  t2-spin10k  2 threads, ``GOMP_SPINCOUNT=10000``
  t1-passive  1 thread, ``OMP_WAIT_POLICY=PASSIVE``
  auto        ducat's runtime setup: ``ducat.runtime.prepare_environment()`` applied to the worker's
              environment (GOMP_SPINCOUNT=1000 unless a wait setting is set) + ``configure_threads(None)``
              (torch's default count, capped by the usable CPUs and the container's CPU quota)

Workloads (``--workload``): ``fmnist`` (28 x 28, ``ducat train`` / ``reproduce --scale mini``) and
``digits`` (8 x 8, ``ducat quickstart`` / ``reproduce --scale smoke``, where every operator is tiny and
synchronisation dominates). The thread count of the competitor and of the machine are printed.

    python benchmarks/contention.py                         # fmnist, all candidates, ~4 min
    python benchmarks/contention.py --workload digits --configs t2,t2-passive,auto
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
CONFIGS: dict[str, tuple[dict[str, str], str]] = {  # name -> (environment, thread mode)
    "t2": ({}, "2"),
    "t1": ({}, "1"),
    "t2-passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, "2"),
    "t2-spin0": ({"GOMP_SPINCOUNT": "0"}, "2"),
    "t2-spin1k": ({"GOMP_SPINCOUNT": "1000"}, "2"),
    "t2-spin10k": ({"GOMP_SPINCOUNT": "10000"}, "2"),
    "t1-passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, "1"),
    "auto": ({}, "auto"),
}
COMPETITOR = """
import torch
a = torch.randn(512, 512)
while True:
    torch.relu(a @ a)
"""
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without thread settings (torch defaults), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env | extra


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


# ---- the worker (a separate process: its environment is read when it imports torch) ----------------
def worker(workload: str, mode: str) -> None:
    import torch

    from ducat.config import load_config
    from ducat.data import load_split
    from ducat.objectives import METHODS, AttackSettings, DucatSettings
    from ducat.runs import build_run_model

    if mode == "auto":
        from ducat.runtime import configure_threads

        configure_threads(None)
    else:
        torch.set_num_threads(int(mode))
    preset = {"fmnist": "cpu-fmnist-small_cnn-pgd_at-ducat", "digits": "cpu-digits-small_cnn-pgd_at-ducat"}[workload]
    cfg = load_config(preset, ["run.device=cpu"])
    data = load_split(cfg.data.dataset, None, train=True)
    x, y = data.images[:128].float() / 255, data.labels[:128]
    torch.manual_seed(0)
    model = build_run_model(cfg)
    a = cfg.attack
    attack = AttackSettings(eps=a.eps, step_size=a.step_size, steps=a.steps, mode=a.mode, bn_eval=a.bn == "eval",
                            random_start=a.random_start)
    objective = METHODS["pgd_at"](attack, DucatSettings(), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        out = objective(model, x, y, ducat_active=True, augment=lambda t: t)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    for _ in range(2):
        step()
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        max_steps, max_secs = (float(v) for v in line.split())
        times, threads, start = [], [], time.perf_counter()
        while len(times) < max_steps and (len(times) < 2 or time.perf_counter() - start < max_secs):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
            threads.append(torch.get_num_threads())
        print(json.dumps({"times": times, "threads": threads}), flush=True)


# ---- background load: CPU time of processes outside this benchmark ---------------------------------
def _machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (``/proc/stat``: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields)) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by ``root`` and its live descendants (``/proc/PID/stat`` utime + stime)."""
    parent, ticks = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        parent[int(entry.name)], ticks[int(entry.name)] = int(rest[1]), int(rest[11]) + int(rest[12])
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, pp in parent.items() if pp in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    return sum(ticks.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def load_sample() -> tuple[float, float, float] | None:
    """(wall s, machine busy CPU s, this benchmark's process tree CPU s); None where /proc is missing."""
    try:
        return time.monotonic(), _machine_busy_seconds(), _tree_cpu_seconds(os.getpid())
    except (OSError, ValueError, AttributeError):
        return None


def background_cores(before, after) -> float | None:
    """Cores kept busy by processes outside this benchmark between two samples (other users' jobs)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def fmt_cores(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


# ---- the driver ----------------------------------------------------------------------------------
def start_competitor(threads: int | None = None) -> subprocess.Popen:
    """The competing torch process (torch's default threads unless ``threads``); running when returned."""
    env = clean_env({} if threads is None else {"OMP_NUM_THREADS": str(threads)})
    proc = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)
    time.sleep(1.5)  # import torch and reach the loop
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def alternate(run_phase, cycles: int, competitor_threads: int | None) -> list[dict[str, Any]]:
    """Phases idle, (contended, idle) x ``cycles``; ``run_phase()`` returns a dict with ``times`` (s).

    Each phase also records the background load (cores busy outside this benchmark), sampled before
    the competitor is stopped so that its CPU time still counts as ours."""
    phases = []
    for kind in ["idle"] + ["contended", "idle"] * cycles:
        competitor = start_competitor(competitor_threads) if kind == "contended" else None
        try:
            before = load_sample()
            out = run_phase()
            phases.append(out | {"kind": kind, "background": background_cores(before, load_sample())})
        finally:
            if competitor is not None:
                stop(competitor)
    return phases


def slowdowns(phases: list[dict[str, Any]]) -> list[float]:
    """Mean step time of each contended phase over the mean of the idle phases on either side."""
    out = []
    for i, ph in enumerate(phases):
        if ph["kind"] == "contended":
            idle = phases[i - 1]["times"] + phases[i + 1]["times"]
            out.append(statistics.mean(ph["times"]) / statistics.mean(idle))
    return out


def measure(name: str, args) -> dict[str, Any]:
    """Alternating idle and contended phases of one worker process."""
    extra, mode = CONFIGS[name]
    env = clean_env(extra)
    if mode == "auto":
        # what ``ducat.cli`` does before torch is imported; done here because importing the ``ducat``
        # package imports torch (until its ``__init__`` is made lazy)
        from ducat.runtime import prepare_environment

        prepare_environment(env)
    cmd = [sys.executable, __file__, "--worker", args.workload, "--mode", mode]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run_phase() -> dict[str, Any]:
        proc.stdin.write(f"{args.steps} {args.secs}\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    try:
        json.loads(proc.stdout.readline())
        phases = alternate(run_phase, args.cycles, args.competitor_threads)
        proc.stdin.close()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"name": name, "phases": phases}


def summary_row(name: str, runs: list[dict[str, Any]]) -> str:
    """Pooled mean step times; slowdown per contended phase, median (min-max); background load."""
    phases = [ph for r in runs for ph in r["phases"]]
    idle = [t for ph in phases if ph["kind"] == "idle" for t in ph["times"]]
    busy = [t for ph in phases if ph["kind"] == "contended" for t in ph["times"]]
    slow = [v for r in runs for v in slowdowns(r["phases"])]
    threads = sorted({t for ph in phases if ph["kind"] == "contended" for t in ph["threads"]})
    bg = [ph["background"] for ph in phases if ph["background"] is not None]
    bg_text = f"{min(bg):.2f}-{max(bg):.2f}" if bg else "n/a"
    return (f"| {name:11s} | {1000 * statistics.mean(idle):8.0f} | {1000 * statistics.mean(busy):12.0f} | "
            f"{len(idle):4d} / {len(busy):4d} | {statistics.median(slow):5.1f}x ({min(slow):.1f}-{max(slow):.1f}) "
            f"| {','.join(map(str, threads)):>7s} | {bg_text:>11s} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("fmnist", "digits"), default="fmnist")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=8, help="at most this many steps per phase")
    p.add_argument("--secs", type=float, default=8.0, help="a phase ends after this many seconds (>= 2 steps)")
    p.add_argument("--cycles", type=int, default=2, help="contended phases per worker, each between idle ones")
    p.add_argument("--repeat", type=int, default=1, help="measure every config this many times, alternating order")
    p.add_argument("--competitor-threads", type=int, help="competitor's threads (default: torch's default)")
    p.add_argument("--json", help="also write the raw per-step times here")
    p.add_argument("--worker", choices=("fmnist", "digits"), help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.mode)
    sys.path.insert(0, str(SRC))
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    import torch

    print(f"# contention: PGD-10 + DUCAT training step, small_cnn, {args.workload}, batch 128")
    print(f"{os.cpu_count()} logical CPUs; torch {torch.__version__}; OpenMP runtime: {openmp_runtime()}")
    print(f"competitor: relu(a @ a), 512 x 512 fp32, {args.competitor_threads or torch.get_num_threads()} threads")
    print(f"load average at start (1/5/15 min): {loadavg()}; {args.repeat} repetition(s) of idle + "
          f"{args.cycles} x (contended, idle)\n")
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(args.repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(measure(name, args))
            row = summary_row(name, results[name][-1:]).split("|")
            print(f"  rep {r + 1} {name}: slowdown {row[5].strip()}, background cores {row[7].strip()}", flush=True)
    print("\n| config      | idle ms  | contended ms | steps idle / cont. | slowdown median (min-max) | threads "
          "| background cores |")
    print("|-------------|----------|--------------|--------------------|---------------------------|---------"
          "|------------------|")
    for name in names:
        print(summary_row(name, results[name]))
    print("\nslowdown: each contended phase against the idle phases on either side; background: cores kept busy by "
          "processes\noutside this benchmark during a phase (min-max over phases; 0 = the machine was otherwise idle)")
    print(f"load average at end: {loadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def openmp_runtime() -> str:
    """Which OpenMP library torch loaded (libgomp or Intel libiomp), from this process's memory map."""
    import torch  # noqa: F401  (loads the runtime)

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown (no /proc)"
    libs = sorted({line.rsplit("/", 1)[-1] for line in maps.splitlines() if "omp" in line.rsplit("/", 1)[-1]})
    return ", ".join(libs) or "none found"


if __name__ == "__main__":
    sys.exit(main())
