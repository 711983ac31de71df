#!/usr/bin/env python
"""Crash consistency of ``ducat train``, ``ducat eval`` and ``ducat reproduce``: SIGKILL them, run them again,
compare with unkilled runs; and two concurrent writers of one run directory.

Training (``--kills N``). One uninterrupted reference run, then N kills, each followed by what a user would
do: ``ducat train --resume RUN_DIR`` when the directory holds a checkpoint (``last.pt`` or ``prev.pt``),
the original command otherwise (nothing was saved yet), repeated until the command exits 0. A run is
*lost* when that fails (a resume that exits non-zero) or when the finished run differs from the
reference: ``last.pt`` and ``best.pt`` weights compared bit for bit, and every ``metrics.jsonl``
row without its timing fields compared exactly.

Kill points. The first kills use the test hook of ``ducat.fileio`` (``DUCAT_TEST_CRASH_AT``):
the process SIGKILLs itself at one exact step of a checkpoint write -- a temporary file complete
but not renamed, a checksum renamed but not its data, ``prev.pt``'s checksum renamed but not the
file, a checkpoint in place but the epoch's metrics not yet written, the final checkpoint in place
but the run not finished. The remaining kills are SIGKILLs sent by this script at a uniformly random
moment of the training phase (from the run writing ``config.yaml`` to the reference's run length),
two per run: the first launch is killed, then its first resume, then the run is resumed to the end.

The run: preset ``cpu-digits-small_cnn-pgd_at-ducat`` (small CNN, 8x8 digits), 200 training images,
4 epochs, DUCAT from epoch 2, deterministic CPU, 1 thread. ~10 s per kill on 2 cores (process
start-up dominates).

Concurrent writers (``--concurrent N``, default 2): two identical ``ducat train`` of one new run directory
started together. Exactly one may proceed; the other must exit 2 with one line naming the first's PID
(the lock holder is paused until the other has ended, so they overlap whatever the start-up times); the
run must equal the reference. A pair is lost otherwise.

Evaluation (``--eval-kills N``, default 4): ``ducat eval`` of the reference run (PGD-10, margin, targeted;
100 test images) is killed at a uniformly random moment after its first attack starts, at most twice, then
run again with the same ``--out`` until it ends. Lost if the rerun fails or its ``report.json`` (timing and
provenance aside) or ``masks.npz`` differ from an unkilled evaluation's.

Reproduction (``--reproduce-kills N``, default 0: several minutes each): ``ducat reproduce --scale smoke``
killed at a uniformly random moment of its training phase, then run again; lost if that fails or table 1
(``results.json``) differs from an unkilled reproduction's.

    python benchmarks/crash_resume.py --kills 10
    python benchmarks/crash_resume.py --kills 30 --seed 1 --keep /tmp/crash   # keep the run dirs
    python benchmarks/crash_resume.py --kills 0 --eval-kills 0 --concurrent 0 --reproduce-kills 2

Prints one line per trial, then ``kills: N, kills survived: ... runs lost: L, wall time: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PRESET = "cpu-digits-small_cnn-pgd_at-ducat"
EPOCHS = 4
OVERRIDES = ["data.n_train=200", "data.batch_size=50", "attack.steps=2", "validation.pgd_steps=2",
             "validation.n_examples=40", "run.progress=false", "run.tensorboard=false", "run.deterministic=true",
             "run.threads=1", "run.device=cpu", f"optim.epochs={EPOCHS}", "optim.milestones=[3]",
             "ducat.start_epoch=2"]
TIMING_KEYS = ("epoch_time_s", "train_images_per_s")

# Exact kill points (DUCAT_TEST_CRASH_AT values) and what they leave on disk.
HOOK_POINTS = [
    ("replaced:last.pt.sha256@2", "new checksum of last.pt in place, its data not: last.pt fails its check"),
    ("replaced:last.pt@2", "epoch-2 checkpoint in place, epoch 2 not yet in metrics.jsonl"),
    ("replaced:last.pt@4", "final checkpoint in place, run not finished (no summary.json)"),
    ("temp-written:last.pt@1", "first last.pt complete as a temp file, not renamed: nothing saved yet"),
    ("temp-written:last.pt@3", "epoch-3 temp file complete, not renamed"),
    ("replaced:prev.pt.sha256@2", "prev.pt's new checksum in place, prev.pt not yet relinked"),
    ("replaced:best.pt.sha256@2", "new checksum of best.pt in place, its data not"),
    ("temp-written:summary.json@1", "run finishing: summary.json written as a temp file, not renamed"),
]


def train_command(run_dir: Path, resume: bool) -> list[str]:
    if resume:
        return [sys.executable, "-m", "ducat", "train", "--resume", str(run_dir)]
    return [sys.executable, "-m", "ducat", "train", PRESET, f"run.out={run_dir}", *OVERRIDES]


def _env(crash_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DUCAT_TEST_CRASH_AT"}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))  # this checkout's ducat
    env.setdefault("OMP_NUM_THREADS", "1")
    if crash_at:
        env["DUCAT_TEST_CRASH_AT"] = crash_at
    return env


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "last.pt").is_file() or (run_dir / "prev.pt").is_file()


def next_command(run_dir: Path) -> list[str]:
    """What a user runs after a crash: resume if anything was saved, else start again."""
    return train_command(run_dir, resume=has_checkpoint(run_dir))


def run(command: list[str], crash_at: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=_env(crash_at), capture_output=True, text=True, timeout=timeout)


def _config_stamp(run_dir: Path):
    try:
        st = (run_dir / "config.yaml").stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _kill_after(proc: subprocess.Popen, delay: float) -> bool:
    """Sleep ``delay`` s, then SIGKILL ``proc``; True if the kill landed (it was still running)."""
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def run_and_kill_at_random(command: list[str], run_dir: Path, delay: float, timeout: float = 300) -> bool:
    """Start ``command``, wait until it starts training (it (re)writes config.yaml), sleep ``delay`` s,
    SIGKILL it. True if the kill landed (the process was still running)."""
    before = _config_stamp(run_dir)
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while _config_stamp(run_dir) == before and proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(" ".join(command))
            time.sleep(0.002)
        return _kill_after(proc, delay)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def resume_until_done(run_dir: Path, max_attempts: int = 3) -> tuple[bool, str]:
    """Resume (or restart when nothing was saved) until the command exits 0; (ok, last stderr)."""
    err = ""
    for _ in range(max_attempts):
        done = run(next_command(run_dir))
        if done.returncode == 0:
            return True, ""
        err = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    return False, err


def _model(path: Path):
    from ducat.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def compare_runs(reference: Path, run_dir: Path) -> list[str]:
    """Differences between a finished run and the reference ([] = identical)."""
    import torch

    problems = []
    for name in ("last.pt", "best.pt"):
        if not (run_dir / name).is_file():
            problems.append(f"{name} missing")
            continue
        a, b = _model(reference / name), _model(run_dir / name)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            problems.append(f"{name} weights differ")
    if not (run_dir / "metrics.jsonl").is_file():
        problems.append("metrics.jsonl missing")
    else:
        ref_rows, rows = metric_rows(reference), metric_rows(run_dir)
        if [r["epoch"] for r in rows] != [r["epoch"] for r in ref_rows]:
            problems.append(f"metrics.jsonl epochs {[r['epoch'] for r in rows]}")
        elif rows != ref_rows:
            problems.append("metrics.jsonl values differ")
    summary = run_dir / "summary.json"
    if not summary.is_file():
        problems.append("summary.json missing")
    else:
        got, want = json.loads(summary.read_text()), json.loads((reference / "summary.json").read_text())
        if got["best_epoch"] != want["best_epoch"] or got["best"]["epoch"] != want["best"]["epoch"]:
            problems.append(f"summary.json best epoch {got['best_epoch']}/{got['best']['epoch']}")
    return problems


def reference_run(run_dir: Path) -> float:
    """The uninterrupted run; returns the length of its training phase in seconds."""
    proc = subprocess.Popen(train_command(run_dir, resume=False), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while _config_stamp(run_dir) is None and proc.poll() is None:
        time.sleep(0.002)
    started = time.monotonic()
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed: {err.strip()[-500:]}")
    return time.monotonic() - started


@dataclass
class Trial:
    kind: str
    group: str = "train"  # train, eval, reproduce or concurrent
    kills: int = 0
    survived: int = 0
    lost: bool = False
    problems: list[str] = field(default_factory=list)

    def judge(self, problems: list[str]) -> "Trial":
        """Record what the comparison with the reference found: any problem means the run was lost and no
        kill was survived."""
        self.problems, self.lost = problems, bool(problems)
        self.survived = 0 if self.lost else self.kills
        return self


def hook_trial(point: str, reference: Path, run_dir: Path) -> Trial:
    trial = Trial(point)
    killed = run(train_command(run_dir, resume=False), crash_at=point)
    if killed.returncode != -signal.SIGKILL:
        trial.problems.append(f"hook not reached (exit {killed.returncode})")
        trial.lost = killed.returncode != 0
        return trial
    trial.kills = 1
    ok, err = resume_until_done(run_dir)
    return trial.judge([f"resume failed: {err}"] if not ok else compare_runs(reference, run_dir))


def random_trial(reference: Path, run_dir: Path, window: float, kills: int, rng: random.Random) -> Trial:
    trial = Trial("random")
    delays = []
    for _ in range(kills):
        delay = rng.uniform(0, window)
        if run_and_kill_at_random(next_command(run_dir), run_dir, delay):
            trial.kills += 1
            delays.append(f"{delay:.2f}s")
        else:
            break  # that launch finished before the kill: the run is complete
    trial.kind = f"random kills at {', '.join(delays) or '-'} after start of training"
    ok, err = resume_until_done(run_dir)
    return trial.judge([f"resume failed: {err}"] if not ok else compare_runs(reference, run_dir))


# ---- kills during ``ducat eval`` ----------------------------------------------------------------------------

EVAL_OPTIONS = ["--attacks", "pgd10,margin,targeted", "--n-examples", "100", "--seed", "0"]


def eval_command(run_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "ducat", "eval", str(run_dir), "--out", str(out), *EVAL_OPTIONS]


def kill_after_line(command: list[str], marker: str, delay: float, timeout: float = 600) -> bool:
    """Start ``command``, wait for a line containing ``marker`` on its stdout or stderr, sleep ``delay`` s,
    SIGKILL it. True if the kill landed (the process was still running)."""
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            if marker in line or time.monotonic() > deadline:
                break
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining: the pipe never fills
        return _kill_after(proc, delay)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def timed_between(command: list[str], first: str, last: str | None, timeout: float = 1800) -> float:
    """Run ``command`` to its end; seconds from its line containing ``first`` to the line containing ``last``
    (to its exit if None). Raises if it fails."""
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = end = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if start is None and first in line:
            start = time.monotonic()
        if start is not None and end is None and last is not None and last in line:
            end = time.monotonic()
    proc.wait(timeout=timeout)
    if proc.returncode != 0 or start is None:
        raise RuntimeError(f"reference {' '.join(command[2:5])} failed: {''.join(lines[-3:]).strip()}")
    return (end or time.monotonic()) - start


def eval_outputs(out: Path) -> tuple[dict, dict]:
    """(report.json without its timing and provenance, masks.npz arrays as lists)."""
    import numpy as np

    report = json.loads((out / "report.json").read_text())
    for key in ("wall_time_s", "provenance"):  # provenance names the command, and with it --out
        report.pop(key, None)
    with np.load(out / "masks.npz") as masks:
        return report, {k: masks[k].tolist() for k in masks.files}


def eval_trial(run_dir: Path, reference: Path, out: Path, window: float, kills: int, rng: random.Random) -> Trial:
    """Kill ``ducat eval`` up to ``kills`` times at random moments after its first attack starts, run it
    again to the end, compare report.json and masks.npz with the unkilled evaluation's."""
    trial = Trial("eval", group="eval")
    delays = []
    for _ in range(kills):
        delay = rng.uniform(0, window)
        if not kill_after_line(eval_command(run_dir, out), "attack 1/", delay):
            break
        trial.kills += 1
        delays.append(f"{delay:.2f}s")
    trial.kind = f"eval, kills at {', '.join(delays) or '-'} after its first attack started"
    done = run(eval_command(run_dir, out))
    if done.returncode != 0:
        return trial.judge([f"eval rerun failed: {done.stderr.strip().splitlines()[-1:]}"])
    same = eval_outputs(out) == eval_outputs(reference)
    return trial.judge([] if same else ["report.json or masks.npz differ from the unkilled evaluation's"])


# ---- kills during ``ducat reproduce --scale smoke`` training ------------------------------------------------

def reproduce_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "ducat", "reproduce", "--scale", "smoke", "--out", str(out)]


def table1(out: Path) -> list:
    return json.loads((out / "results.json").read_text())["table1"]


def reproduce_trial(out: Path, reference: Path, window: float, rng: random.Random) -> Trial:
    """Kill a reproduction at a random moment of its training phase, run it again, compare table 1."""
    delay = rng.uniform(0, window)
    trial = Trial(f"reproduce --scale smoke, kill at {delay:.1f}s of training", group="reproduce")
    trial.kills = int(kill_after_line(reproduce_command(out), "reproduce --scale", delay))
    done = run(reproduce_command(out), timeout=3600)
    if done.returncode != 0:
        return trial.judge([f"reproduce rerun failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"])
    same = table1(out) == table1(reference)
    return trial.judge([] if same else ["table 1 differs from the unkilled reproduction's"])


# ---- two concurrent writers of one run directory -----------------------------------------------------------

def lock_holder(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / ".lock").read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def concurrent_trial(reference: Path, run_dir: Path) -> Trial:
    """Two ``ducat train`` of one run directory started together: exactly one may proceed, the other must exit
    2 naming it, and the run must equal the reference. The lock holder is paused (SIGSTOP) until the other has
    ended, so both really overlap whatever the start-up times."""
    trial = Trial("two trainings of one run directory started together", group="concurrent")
    procs = [subprocess.Popen(train_command(run_dir, resume=False), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.monotonic() + 300
    while lock_holder(run_dir) not in [p.pid for p in procs] and time.monotonic() < deadline:
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    winner = next((p for p in procs if p.pid == lock_holder(run_dir)), None)
    if winner is None:
        trial.problems, trial.lost = ["no process took the lock"], True
        return trial
    loser = procs[1] if winner is procs[0] else procs[0]
    winner.send_signal(signal.SIGSTOP)
    _, loser_err = loser.communicate(timeout=300)
    winner.send_signal(signal.SIGCONT)
    winner.communicate(timeout=300)
    expected = f"is in use by process {winner.pid} "
    if winner.returncode != 0 or loser.returncode != 2 or expected not in loser_err or loser_err.count("\n") != 1:
        trial.problems.append(f"exits {winner.returncode}/{loser.returncode}, refusal {loser_err.strip()[:120]!r}")
    return trial.judge(trial.problems + compare_runs(reference, run_dir))


# ---- the benchmark -------------------------------------------------------------------------------------------

def report(index: int, trial: Trial) -> None:
    status = "LOST: " + "; ".join(trial.problems) if trial.lost else (
        "ok" if not trial.problems else "; ".join(trial.problems))
    print(f"run {index:3d}: {trial.kills} kill(s) [{trial.kind}] -> {status}", flush=True)


def train_trials(root: Path, reference: Path, window: float, args, rng: random.Random) -> list[Trial]:
    trials: list[Trial] = []
    kills_done, index = 0, 0
    while kills_done < args.kills:
        run_dir = root / f"run{index:03d}"
        shutil.rmtree(run_dir, ignore_errors=True)
        if index < len(HOOK_POINTS) or args.hooks_only:
            trial = hook_trial(HOOK_POINTS[index % len(HOOK_POINTS)][0], reference, run_dir)
        else:
            trial = random_trial(reference, run_dir, window, min(2, args.kills - kills_done), rng)
        trials.append(trial)
        kills_done += trial.kills
        index += 1
        report(index, trial)
        if index > 4 * args.kills + len(HOOK_POINTS):
            print("too many launches finished before their kill; stopping")
            break
    return trials


def eval_trials(root: Path, run_dir: Path, kills: int, rng: random.Random) -> list[Trial]:
    reference = root / "eval-reference"
    window = timed_between(eval_command(run_dir, reference), "attack 1/", None)
    print(f"reference eval: {window:.2f}s from its first attack to its exit")
    trials, done, index = [], 0, 0
    while done < kills and index < 4 * kills:
        trial = eval_trial(run_dir, reference, root / f"eval{index:03d}", window, min(2, kills - done), rng)
        trials.append(trial)
        done += trial.kills
        index += 1
        report(index, trial)
    return trials


def reproduce_trials(root: Path, kills: int, rng: random.Random) -> list[Trial]:
    reference = root / "reproduce-reference"
    window = timed_between(reproduce_command(reference), "reproduce --scale", "evaluating")
    print(f"reference reproduction: training phase {window:.1f}s")
    trials = []
    for index in range(kills):
        trials.append(reproduce_trial(root / f"reproduce{index:03d}", reference, window, rng))
        report(index + 1, trials[-1])
    return trials


def summary(trials: list[Trial], wall: float) -> str:
    def count(group: str) -> str:
        mine = [t for t in trials if t.group == group]
        return f"{group} {sum(t.survived for t in mine)}/{sum(t.kills for t in mine)}"

    pairs = [t for t in trials if t.group == "concurrent"]
    return (f"kills: {sum(t.kills for t in trials)}, kills survived: {sum(t.survived for t in trials)} "
            f"({', '.join(count(g) for g in ('train', 'eval', 'reproduce'))}), runs: {len(trials)}, "
            f"concurrent writer pairs: {len(pairs)} ({sum(not t.lost for t in pairs)} with one refused), "
            f"runs lost: {sum(t.lost for t in trials)}, wall time: {wall:.1f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs of ducat train (default 10)")
    parser.add_argument("--eval-kills", type=int, default=4, help="SIGKILLs of ducat eval (default 4)")
    parser.add_argument("--concurrent", type=int, default=2, help="pairs of concurrent ducat train (default 2)")
    parser.add_argument("--reproduce-kills", type=int, default=0,
                        help="SIGKILLs of ducat reproduce --scale smoke in training (default 0; minutes each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    parser.add_argument("--hooks-only", action="store_true", help="only the exact kill points")
    parser.add_argument("--keep", help="keep the run directories here (default: a temporary directory)")
    args = parser.parse_args(argv)
    counts = (args.kills, args.eval_kills, args.concurrent, args.reproduce_kills)
    if min(counts) < 0 or max(counts) < 1:
        parser.error("the counts must be >= 0, and one of them >= 1")
    rng = random.Random(args.seed)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ducat-crash-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reference = root / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    window = reference_run(reference)
    print(f"reference run: training phase {window:.2f}s ({EPOCHS} epochs)")
    trials = train_trials(root, reference, window, args, rng)
    for index in range(args.concurrent):
        trials.append(concurrent_trial(reference, root / f"concurrent{index:03d}"))
        report(index + 1, trials[-1])
    if args.eval_kills:
        trials += eval_trials(root, reference, args.eval_kills, rng)
    if args.reproduce_kills:
        trials += reproduce_trials(root, args.reproduce_kills, rng)
    print(summary(trials, time.perf_counter() - started))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if any(t.lost for t in trials) else 0


if __name__ == "__main__":
    sys.exit(main())
