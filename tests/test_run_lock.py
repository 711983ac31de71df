"""One writer per run directory, with real ``ducat`` processes (the run lock itself: tests/test_fileio.py).

Probe findings (main at 048b4d6): two ``ducat train ... run.out=D`` started together with different learning
rates both exited 0 and ``metrics.jsonl`` alternated epochs 1, 1, 2, 2, ...; ``ducat train --resume D`` was
accepted while D was still training. Now the second writer -- train, resume or reproduce -- exits 2 with one
line naming the holder's PID, and a lock left by a killed process is taken over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PRESET = "cpu-digits-small_cnn-pgd_at-ducat"
EPOCHS = 4
TINY_RUN = ["data.n_train=200", "data.batch_size=50", "attack.steps=2", "validation.pgd_steps=2",
            "validation.n_examples=40", "run.progress=false", "run.tensorboard=false", "run.threads=1",
            f"optim.epochs={EPOCHS}", "optim.milestones=[3]", "ducat.start_epoch=2"]


def ducat(*args: str, **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DUCAT_TEST_CRASH_AT"}
    env.update(PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "ducat", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args[3:]} still running after {timeout} s; stderr: {err[-300:]}") from None
    return proc.returncode, out, err


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"process ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def holder(directory: Path) -> int | None:
    """The PID recorded in a directory's lock file (None if no holder is recorded)."""
    try:
        return json.loads((directory / ".lock").read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def assert_refused_by(code: int, err: str, directory: Path, pid: int) -> None:
    assert code == 2, err
    assert err.startswith("ducat: error: ") and err.count("\n") == 1, err
    assert f"run directory '{directory}' is in use by process {pid} " in err, err


def epochs_in_metrics(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_concurrent_train_and_resume_are_refused_and_a_killed_holders_lock_is_taken_over(tmp_path):
    """The holder is paused (SIGSTOP) while the others try: it is alive and holds the lock however slowly
    they start, so the test does not depend on timing."""
    run_dir = tmp_path / "run"
    # (a) two trainings of one run directory started together, with different learning rates
    first, second = (ducat("train", PRESET, f"run.out={run_dir}", f"optim.lr={lr}", *TINY_RUN) for lr in (0.05, 0.02))
    try:
        wait_for(lambda: holder(run_dir) in (first.pid, second.pid), first, "lock holder")
        winner, loser = (first, second) if holder(run_dir) == first.pid else (second, first)
        winner.send_signal(signal.SIGSTOP)
        code, _, err = finish(loser)
        assert_refused_by(code, err, run_dir, winner.pid)
        # (b) a resume of the directory while it trains (paused after its first checkpoint)
        winner.send_signal(signal.SIGCONT)
        wait_for(lambda: (run_dir / "last.pt").is_file(), winner, "first checkpoint")
        winner.send_signal(signal.SIGSTOP)
        code, _, err = finish(ducat("train", "--resume", str(run_dir)))
        assert_refused_by(code, err, run_dir, winner.pid)
        # (c) the holder is killed mid-run: its lock is stale, a resume takes it over and finishes the run
        assert winner.poll() is None, "the run finished before it could be paused"
        winner.send_signal(signal.SIGKILL)
        assert winner.wait() == -signal.SIGKILL
        assert holder(run_dir) == winner.pid  # the dead holder's record is still in the lock file
    finally:
        for proc in (first, second):
            proc.kill()
            proc.communicate()
    code, out, err = finish(ducat("train", "--resume", str(run_dir)))
    assert code == 0, err
    assert f"took over the lock of '{run_dir}' from process {winner.pid}" in out, out
    assert epochs_in_metrics(run_dir) == list(range(1, EPOCHS + 1))  # one row per epoch
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == (0.05 if winner is first else 0.02)  # every row is the winner's run
    assert (run_dir / "summary.json").is_file() and (run_dir / ".lock").read_text() == ""  # released


@pytest.mark.slow
def test_a_second_reproduce_on_one_output_directory_is_refused(tmp_path):
    out = tmp_path / "grid"
    first = ducat("reproduce", "--scale", "smoke", "--out", str(out))
    try:
        wait_for(lambda: (out / "manifest.json").is_file(), first, "the reproduction's start")
        first.send_signal(signal.SIGSTOP)  # alive and holding the lock, however slowly the second one starts
        code, _, err = finish(ducat("reproduce", "--scale", "smoke", "--out", str(out)), timeout=60)
        assert_refused_by(code, err, out, first.pid)
        assert first.poll() is None  # the first one was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
