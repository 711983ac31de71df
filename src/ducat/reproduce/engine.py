"""Jobs run through Dask distributed: submitted with their dependencies, one at a time per worker, followed
live, and accounted for at the end.

Dask does the scheduling: a job is a task whose arguments are the futures of the jobs it needs, so it starts
only when they have finished, and a task whose dependency failed never runs (Dask hands it the failure).
Every worker has one thread, so a worker -- one GPU, one share of the CPU, or one SLURM job
(:mod:`.launch`) -- runs one job at a time. Dask hands out ready tasks eagerly, also to busy workers, and
moves a waiting one to a worker that becomes idle (work stealing, within about a second: nothing for jobs
of minutes or hours). The task itself (:func:`run_job`) runs the job's command as a subprocess with its
output appended to the job's log, and reports its start as a Dask event, which the driver reads to tell
running jobs from waiting ones.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

EVENTS = "ducat-jobs"  # the Dask event topic on which jobs announce their start
PARENT_ENV = "DUCAT_JOB_PARENT"  # the PID of the process that started a job (ducat.reproduce.job reads it)


@dataclass(frozen=True)
class Job:
    """One command to run: its name, argv, log file, extra environment, the jobs it needs (names) and its
    priority (higher first among jobs ready to start)."""

    name: str
    argv: tuple[str, ...]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    priority: int = 0


class JobFailed(Exception):
    """A job's command exited non-zero or was killed. Args: the job's name, why, and its log's path."""

    def __init__(self, job: str, reason: str, log: str):
        super().__init__(job, reason, log)
        self.job, self.reason, self.log = job, reason, log

    def __str__(self) -> str:
        return f"{self.job} {self.reason}; log: {self.log}"


def exit_reason(code: int) -> str:
    """``exited with code N`` or ``was killed by SIGNAME (signal N)`` for a subprocess's return code."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name} (signal {-code})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run_job(job: Job, *needed: Any) -> float:
    """The Dask task of ``job`` (``needed``: the results of the jobs it needs, only waited for): run its
    command, output appended to its log; returns its wall time, or raises :class:`JobFailed`."""
    from distributed import get_worker  # the engine is optional: only its workers run this

    started = time.time()
    get_worker().log_event(EVENTS, {"job": job.name, "started": started})
    job.log.parent.mkdir(parents=True, exist_ok=True)
    env = job_environment(job)
    with open(job.log, "a") as log:
        log.write(f"==== {job.name}: started {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}\n")
        log.flush()
        code = subprocess.run(job.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                              env=env).returncode
        log.write(f"==== {job.name}: {exit_reason(code)} after {duration(time.time() - started)}\n")
    if code != 0:
        raise JobFailed(job.name, exit_reason(code), str(job.log))
    return time.time() - started


def job_environment(job: Job) -> dict[str, str]:
    """The environment of ``job``'s command: this worker's, less what Dask's nanny put there for its worker
    process, plus ``job.env`` and this process's PID.

    The nanny sets ``distributed.nanny.pre-spawn-environ`` (``MALLOC_TRIM_THRESHOLD_=65536`` and thread
    counts) in its own environment before it starts a worker, so every job would inherit it. That trim
    threshold turns off glibc's adaptive mmap threshold: each large tensor a job frees goes back to the
    kernel and the next one page-faults in. A PGD training job of scale ``cnn`` spent 44% of its CPU time
    in the kernel that way and ran at half the speed of the same job without it. Dropped here: a variable
    whose value is the nanny's; one the user set to another value stays. Threads are the job's ``--threads``.
    """
    import dask
    import distributed  # noqa: F401 -- the engine is optional; importing it registers its configuration

    nanny = {name: str(value) for name, value in dask.config.get("distributed.nanny.pre-spawn-environ").items()
             if value is not None}
    inherited = {name: value for name, value in os.environ.items() if nanny.get(name) != value}
    return {**inherited, **job.env, PARENT_ENV: str(os.getpid())}


def duration(seconds: float) -> str:
    """``42 s``, ``3m 05s`` or ``2h 07m``."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


@dataclass
class Outcome:
    """What became of each job: finished, failed (job -> its :class:`JobFailed` or other error), not run
    (job -> the failed job it needed, directly or not)."""

    finished: list[str] = field(default_factory=list)
    failed: dict[str, Exception] = field(default_factory=dict)
    not_run: dict[str, str] = field(default_factory=dict)


def submit(client: Any, jobs: list[Job]) -> dict[str, Any]:
    """Submit every job (each after the jobs it needs, which come before it in ``jobs``): name -> future."""
    futures: dict[str, Any] = {}
    for job in jobs:
        futures[job.name] = client.submit(run_job, job, *[futures[n] for n in job.needs], key=job.name,
                                          pure=False, priority=job.priority)
    return futures


def settle(job: Job, future: Any, started: set[str], outcome: Outcome) -> None:
    """Record the finished future of ``job`` in ``outcome``, after the jobs it needs: a job that ran and failed,
    or one that never ran because a job it needs failed (Dask gives it that job's exception)."""
    if future.status == "finished":
        outcome.finished.append(job.name)
        return
    error = future.exception() if future.status == "error" else RuntimeError(f"Dask reported it {future.status}")
    if isinstance(error, JobFailed) and error.job != job.name:
        outcome.not_run[job.name] = error.job
        return
    blocked = next((n for n in job.needs if n in outcome.failed or n in outcome.not_run), None)
    if blocked is not None and job.name not in started:  # a dependency failed outside its command
        outcome.not_run[job.name] = outcome.not_run.get(blocked, blocked)
    else:
        outcome.failed[job.name] = error


def run_jobs(client: Any, jobs: list[Job], log: Callable[[str], None], poll: float = 0.5,
             heartbeat: float = 30.0) -> Outcome:
    """Run ``jobs`` on ``client``'s cluster until each has finished, failed or cannot run, printing progress
    (:class:`Progress`); the failures are in the returned :class:`Outcome`, not raised."""
    futures = submit(client, jobs)
    progress = Progress(log, len(jobs), heartbeat)
    outcome = Outcome()
    pending = {job.name: job for job in jobs}  # in submission order: a job after the jobs it needs
    while pending:
        done = [name for name in pending if futures[name].done()]
        # read after the futures: a job's start event reaches the scheduler before its result does
        started = {msg["job"]: msg["started"] for _, msg in client.get_events(EVENTS)}
        for name in done:
            if not any(need in pending for need in pending[name].needs):
                settle(pending.pop(name), futures[name], set(started), outcome)
        progress.update(outcome, started, set(pending))
        if pending:
            time.sleep(poll)
    return outcome


class Progress:
    """Live progress, one line per change (a job started, finished, failed or cannot run), each with the
    counts and the slowest running job, and one every ``heartbeat`` seconds while nothing changes. Plain
    lines, readable in a log file."""

    def __init__(self, log: Callable[[str], None], total: int, heartbeat: float):
        self.log, self.total, self.heartbeat = log, total, heartbeat
        self.seen: set[str] = set()  # jobs whose start, and (separately) whose end, were printed
        self.last = time.monotonic()

    def update(self, outcome: Outcome, started: dict[str, float], pending: set[str]) -> None:
        """Print what changed since the last call (``started``: job -> its start, a Unix time; ``pending``:
        the jobs not settled in ``outcome`` yet)."""
        events = [f"started {n}" for n in sorted(started, key=started.get) if f"start {n}" not in self.seen]
        events += [f"finished {n}" for n in outcome.finished if n not in self.seen]
        events += [f"FAILED {e if isinstance(e, JobFailed) else f'{n}: {e!r}'}" for n, e in outcome.failed.items()
                   if n not in self.seen]
        events += [f"not run {n} (needs {c})" for n, c in outcome.not_run.items() if n not in self.seen]
        self.seen.update(outcome.finished, outcome.failed, outcome.not_run, (f"start {n}" for n in started))
        if not events and time.monotonic() - self.last < self.heartbeat:
            return
        summary = self.summary(outcome, {n: started[n] for n in pending if n in started})
        for event in events or ["progress"]:
            self.log(f"{time.strftime('%H:%M:%S')} {event} | {summary}")
        self.last = time.monotonic()

    def summary(self, outcome: Outcome, running: dict[str, float]) -> str:
        """``jobs: F finished, R running, Q queued, X failed, N not run; slowest running: NAME (time)``."""
        settled = len(outcome.finished) + len(outcome.failed) + len(outcome.not_run)
        text = (f"jobs: {len(outcome.finished)} finished, {len(running)} running, "
                f"{self.total - settled - len(running)} queued, {len(outcome.failed)} failed")
        if outcome.not_run:
            text += f", {len(outcome.not_run)} not run"
        if running:
            name = min(running, key=running.get)
            text += f"; slowest running: {name} ({duration(time.time() - running[name])})"
        return text
