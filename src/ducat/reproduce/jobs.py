"""The grid of a reproduction as jobs for a launcher (:mod:`.launch`), and running them (:func:`launch_grid`).

Each job is a subprocess, ``python -m ducat.reproduce.job train|eval RUN ...`` (:mod:`.job`), so that its
torch settings, its memory and a crash are its own, with its output in ``OUT/logs/<job>.log``. It does
what the sequential path does for that run, with the same functions: :func:`~.grid.train_run` (train,
fork, resume or skip) or :func:`~.evaluation.evaluate_run` (the same evaluation settings).

What depends on what: a fork's training needs its trunk's; a run's evaluation needs its training; the
report (made by the driver) needs everything. Finished work -- a trained run, an evaluation with the
settings asked for -- is no job at all, so a rerun submits only what is missing or failed, and a job
that was killed resumes its run from the last checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ducat.errors import RunError
from ducat.reproduce.engine import Job, JobFailed, Outcome, run_jobs
from ducat.reproduce.evaluation import evaluated
from ducat.reproduce.grid import GridRun, finished
from ducat.reproduce.launch import SLURM_JOBS, Launcher, local_cluster, local_slots, slurm_cluster
from ducat.reproduce.scales import Scale


@dataclass(frozen=True)
class JobOptions:
    """What every job of one reproduction is given: the grid (scale, seeds, variants), where it lives, and how
    each job computes (torch threads, evaluation workers, training processes per run)."""

    scale: str
    seeds: int
    variants: tuple[str, ...]
    out: Path
    data_root: str | None = None
    threads: int | None = None
    workers: int | None = None
    nproc: int = 1

    def argv(self, kind: str, run: str) -> tuple[str, ...]:
        args = [sys.executable, "-m", "ducat.reproduce.job", kind, run, "--scale", self.scale,
                "--seeds", str(self.seeds), f"--variants={','.join(self.variants)}", "--out", str(self.out),
                "--nproc", str(self.nproc)]
        for option, value in (("--data-root", self.data_root), ("--threads", self.threads),
                              ("--workers", self.workers)):
            if value is not None:
                args += [option, str(value)]
        return tuple(args)


def grid_jobs(runs: list[GridRun], scale: Scale, options: JobOptions) -> tuple[list[Job], int]:
    """The jobs still to run, each after the jobs it needs, and how many of the grid's jobs are done already.

    Trunks train first (priority 2: forks wait for them), then the other trainings, then evaluations."""
    env = {"OMP_NUM_THREADS": str(options.threads)} if options.threads else {}
    logs = options.out / "logs"
    jobs: list[Job] = []
    training: set[str] = set()  # runs whose training is a job of this invocation
    done = 0
    for run in runs:
        if finished(run, options.out / "runs" / run.name):
            done += 1
            continue
        needs = (f"train-{run.trunk}",) if run.trunk in training else ()
        jobs.append(Job(f"train-{run.name}", options.argv("train", run.name), logs / f"train-{run.name}.log", env,
                        needs, 2 if run.group == "trunk" else 1))
        training.add(run.name)
    for run in runs:
        if run.group == "trunk":
            continue
        if run.name not in training and evaluated(run, scale, options.out, options.workers):
            done += 1
            continue
        needs = (f"train-{run.name}",) if run.name in training else ()
        jobs.append(Job(f"eval-{run.name}", options.argv("eval", run.name), logs / f"eval-{run.name}.log", env,
                        needs))
    return jobs, done


def launch_grid(launcher: Launcher, runs: list[GridRun], scale: Scale, out: Path, data_root: str | None,
                device: str, log: Callable[[str], None]) -> str:
    """Run every job of the grid that is not done yet on the launcher's cluster, with live progress on stderr
    (flushed line by line, so that it can be followed in a log file). RunError
    naming each failed job and its log when any failed (the others' work is kept). Returns what ran, for
    the report's footer."""
    from distributed import Client  # the engine is optional (ducat[cluster])

    if launcher.kind == "local":
        slots, threads = local_slots(launcher, device)
        where = f"{len(slots)} at a time on this machine"
    else:
        slots, threads = [], launcher.threads or launcher.cores_per_job
        where = f"up to {launcher.jobs or SLURM_JOBS} SLURM jobs at a time"
    options = JobOptions(scale.name, scale.seeds, scale.variants, out, data_root, threads, launcher.workers,
                         max(1, launcher.gpus_per_job) if launcher.kind == "slurm" else 1)
    jobs, done = grid_jobs(runs, scale, options)
    log(f"launcher {launcher.kind}: {len(jobs)} jobs to run ({done} done before), {where}, {threads} torch "
        f"thread(s) each; each job's output in {out / 'logs'}/<job>.log")
    if jobs:
        cluster = (local_cluster(slots) if launcher.kind == "local" else
                   slurm_cluster(launcher, out / "logs" / "slurm", min(len(jobs), launcher.jobs or SLURM_JOBS)))
        with cluster, Client(cluster) as client:
            outcome = run_jobs(client, jobs, lambda line: print(line, file=sys.stderr, flush=True))
        if outcome.failed:
            raise_failures(outcome, len(jobs))
    return f"{len(jobs)} jobs on the {launcher.kind} launcher ({where})"


def raise_failures(outcome: Outcome, total: int) -> None:
    """RunError, one line: each failed job with its log, how many were not run, and that a rerun resumes."""
    failed = "; ".join(str(e) if isinstance(e, JobFailed) else f"{n}: {e!r}" for n, e in outcome.failed.items())
    not_run = f"; {len(outcome.not_run)} jobs that need them were not run" if outcome.not_run else ""
    raise RunError(f"{len(outcome.failed)} of {total} jobs failed: {failed}{not_run}; the other jobs' work is "
                   "kept: run the same command again to resume the failed runs and do the rest")
