"""One job of a launched reproduction (:mod:`.jobs`), in a process of its own:
``python -m ducat.reproduce.job train|eval RUN --scale S --seeds N --variants=... --out OUT ...``.

It rebuilds the grid from the scale, the seeds and the variants, finds its run, and trains it with
:func:`~.grid.train_run` or evaluates it with :func:`~.evaluation.evaluate_run`, as the sequential path
does. It exits 0 when done, and 1 with one ``ducat job: error:`` line on a known error (a traceback on an
unexpected one); its launcher appends all its output to the job's log.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from pathlib import Path

from ducat.config import ConfigError
from ducat.errors import USER_ERRORS, RunError
from ducat.reproduce.engine import PARENT_ENV
from ducat.reproduce.evaluation import evaluate_run
from ducat.reproduce.grid import plan, run_config, train_run
from ducat.reproduce.scales import get_scale
from ducat.runtime import configure_threads


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ducat.reproduce.job",
                                     description="one job of a launched reproduction (started by ducat reproduce "
                                                 "--launcher; not meant to be typed)")
    parser.add_argument("kind", choices=("train", "eval"))
    parser.add_argument("run", help="the run's name in the grid")
    parser.add_argument("--scale", required=True)
    parser.add_argument("--seeds", type=int, required=True)
    parser.add_argument("--variants", required=True, help="comma-separated, possibly empty")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-root")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--nproc", type=int, default=1)
    return parser


def _end_with_parent() -> None:
    """Ask Linux to SIGKILL this job when the process that started it (a launcher's worker) dies, so that a
    stopped reproduction leaves no job behind that holds its run's lock; the run resumes from its last
    checkpoint next time. A no-op elsewhere."""
    parent = os.environ.get(PARENT_ENV)
    if not sys.platform.startswith("linux") or parent is None:
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(parent):  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGKILL)


def run_job(args: argparse.Namespace) -> None:
    """Train or evaluate one run of the grid, exactly as the sequential path does."""
    configure_threads(args.threads)
    scale = get_scale(args.scale).with_seeds(args.seeds).with_variants(
        tuple(v for v in args.variants.split(",") if v))
    runs = {run.name: run for run in plan(scale)}
    if args.run not in runs:
        raise ConfigError(f"no run '{args.run}' in the {args.scale} grid")
    run, out = runs[args.run], Path(args.out)
    if args.kind == "train":
        train_run(run, run_config(run, out, args.data_root), out, args.nproc, lambda line: print(line, flush=True))
    else:
        evaluate_run(run, scale, out, args.data_root, args.workers)
    print(f"{args.kind} {args.run}: done", flush=True)


def main(argv: list[str] | None = None) -> int:
    """A job's process: exit 0 when its run is trained or evaluated, 1 with one error line when it failed on
    a known error (an unexpected one prints its traceback)."""
    args = _parser().parse_args(argv)
    _end_with_parent()
    try:
        run_job(args)
    except (RunError, *USER_ERRORS) as exc:
        print(f"ducat job: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
