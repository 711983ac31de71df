"""The checks of the ``ducat`` command's options, shared by its commands: each bad value is one
:class:`UsageError` line (exit 2) before anything is loaded or computed."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ducat.config import parse_fraction
from ducat.errors import UsageError
from ducat.vocabulary import DEVICE_PATTERN, DEVICES_TEXT, SEEDS_TEXT, valid_seed

if TYPE_CHECKING:
    from ducat.reproduce.launch import Launcher


def epochs_option(args: argparse.Namespace) -> int | None:
    """``--epochs N``, checked; the config package scales the schedule with it (``scale_schedule``)."""
    if args.epochs is None:
        return None
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if any(o.startswith("optim.epochs=") for o in getattr(args, "overrides", [])):
        raise UsageError("give --epochs N (scales the schedule) or optim.epochs=N (changes only the length), not both")
    return args.epochs


def set_threads(threads: int | None) -> int:
    """``--threads N``: torch's intra-op threads, set before any compute (None: automatic, see
    :func:`ducat.runtime.configure_threads`), in this process and, through ``OMP_NUM_THREADS``, in the
    processes it starts (``reproduce --nproc``). The one place a command chooses its thread count."""
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    from ducat.runtime import configure_threads  # torch loads here, after the option checks

    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return configure_threads(threads)


def check_output_dir(path: Path, option: str) -> None:
    """An output directory must be a directory or creatable as one (checked before any compute)."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option} '{path}': '{parent}' exists and is not a directory")
            return


CHECK_OPTIONS = {  # ducat eval option -> EvalSettings field of a check of the evaluation itself (docs/evaluation.md)
    "--unbounded-examples": ("unbounded_examples", "examples every attack attacks again without a budget (the "
                                                   "bad-initialisation indicator)"),
    "--unit-test-examples": ("unit_test_examples", "examples of the attack unit test"),
    "--transfer-steps": ("transfer_steps", "PGD steps on the surrogate for the transfer row"),
    "--convergence-examples": ("convergence_examples", "examples of the convergence check (the attacks that set "
                                                       "the worst case, steps and restarts doubled)"),
    "--square-queries": ("square_queries", "Square queries of the follow-up on the worst-case survivors when "
                                           "Square beat the white-box attacks"),
}


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """``ducat eval``'s options of the checks of the evaluation itself: their sizes, 0 for off."""
    from ducat.eval.settings import EvalSettings  # torch: loads after prepare_environment

    for option, (name, text) in CHECK_OPTIONS.items():
        parser.add_argument(option, type=int, metavar="N", default=getattr(EvalSettings, name),
                            help=f"{text} (default: %(default)s; 0: off)")
    parser.add_argument("--no-indicators", action="store_true",
                        help="do not trace the PGD runs for the attack-failure indicators")
    parser.add_argument("--no-checks", action="store_true",
                        help="none of the checks of the evaluation itself (indicators, unit test, transfer, "
                             "convergence, Square follow-up): the attacks alone")
    parser.add_argument("--load", metavar="MODULE:FUNCTION",
                        help="evaluate the model a Python function returns (a C-class nn.Module taking [0,1] inputs, "
                             "or (module, dummy_index) for a 2C dummy-class model); needs --dataset and --eps")
    parser.add_argument("--surrogate", metavar="RUN",
                        help="run directory or checkpoint of the transfer row's surrogate, e.g. the base model of the "
                             "same method and seed (default: the original C logits of a DUCAT model)")


def _check_settings(args: argparse.Namespace) -> dict:
    """The check fields of EvalSettings from ``ducat eval``'s options."""
    for option, (name, _) in CHECK_OPTIONS.items():
        if getattr(args, name) < 0:
            raise UsageError(f"{option} must be >= 0, got {getattr(args, name)}")
    if args.no_checks:
        return {"indicators": False, **{name: 0 for name, _ in CHECK_OPTIONS.values()}}
    return {"indicators": not args.no_indicators, **{name: getattr(args, name) for name, _ in CHECK_OPTIONS.values()}}


def _check_target(args: argparse.Namespace) -> None:
    """A run directory or checkpoint, or ``--load``: one of the two."""
    if args.load is None and args.target is None:
        raise UsageError("give a run directory or checkpoint, or --load MODULE:FUNCTION")
    if args.load is not None and (args.target is not None or args.model is not None):
        raise UsageError("--load evaluates the model its function returns: give no run directory, checkpoint or "
                         "--model with it")
    if args.load is not None and args.eps is None:
        raise UsageError("--load needs --eps (a model from a function has no training radius)")


def eval_settings(args: argparse.Namespace, fast_attacks: tuple[str, ...]) -> dict:
    """EvalSettings fields from ``ducat eval``'s options, checked before anything is loaded."""
    _check_target(args)
    if args.eps is not None and not math.isfinite(parse_fraction(args.eps, "--eps")):
        raise UsageError(f"--eps must be a finite number, got {args.eps!r}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.n_examples is not None and args.n_examples < 1:
        raise UsageError(f"--n-examples must be >= 1, got {args.n_examples}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if not valid_seed(args.seed):
        raise UsageError(f"--seed must be in {SEEDS_TEXT}, got {args.seed}")
    if not DEVICE_PATTERN.fullmatch(args.device):
        raise UsageError(f"--device must be {DEVICES_TEXT}, got {args.device!r}")
    if args.out:
        check_output_dir(Path(args.out), "--out")
    settings = {"n_examples": args.n_examples, "batch_size": args.batch_size, "workers": args.workers,
                "seed": args.seed, "early_stop": not args.no_early_stop, "equal_effort": args.equal_effort,
                "norm": eval_norm(args), **_check_settings(args)}
    if args.fast:
        settings["attacks"] = fast_attacks
    if args.attacks:
        settings["attacks"] = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    if args.autoattack:
        settings["autoattack"] = tuple(a.strip() for a in args.autoattack.split(",") if a.strip())
    if args.protocols:
        settings["protocols"] = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
    return settings


def eval_norm(args: argparse.Namespace) -> str:
    """``--norm``, by default the training attack's norm of a run directory (else Linf). The default eps is the
    training radius, so it is refused with another norm than the training one."""
    trained = None
    try:
        saved = Path(args.target or "") / "config.yaml"
        if args.target is not None and saved.is_file():
            trained = (yaml.safe_load(saved.read_text()).get("attack") or {}).get("norm", "Linf")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        trained = None  # ducat eval's own loading reports what is wrong with the target
    norm = args.norm or trained or "Linf"
    if args.eps is None and trained is not None and norm != trained:
        raise UsageError(f"--norm {norm}: the run was trained against {trained}; give --eps, its default is the "
                         f"run's {trained} radius")
    return norm


SLURM_OPTIONS = ("partition", "gpus_per_job", "time_limit", "cluster_config")


def launcher_option(args: argparse.Namespace) -> Launcher | None:
    """``ducat reproduce``'s ``--launcher`` and its options, checked before anything is submitted: options
    without the launcher that uses them, ``--nproc`` with a launcher, the engine's packages, SLURM's
    settings. None: the grid runs sequentially in this process."""
    given = [name for name in ("jobs", *SLURM_OPTIONS) if getattr(args, name) is not None]
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if args.launcher is None and given:
        raise UsageError(f"{flag(given[0])} needs --launcher{' slurm' if given[0] in SLURM_OPTIONS else ''}")
    if args.launcher is None:
        return None
    from ducat.reproduce.launch import (  # loads torch: not at this module's import
        Launcher,
        check_engine,
        slurm_launcher,
    )

    slurm_only = [name for name in given if name in SLURM_OPTIONS]
    if args.launcher != "slurm" and slurm_only:
        raise UsageError(f"{flag(slurm_only[0])} is an option of --launcher slurm, not --launcher {args.launcher}")
    if args.nproc > 1:
        raise UsageError("--nproc trains one run on several GPUs; with --launcher each job has its own GPU "
                         "(on SLURM, --gpus-per-job N trains each run on N)")
    for name in ("jobs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    check_engine(args.launcher)
    if args.launcher == "local":
        return Launcher("local", jobs=args.jobs, threads=args.threads)
    flags = {name: getattr(args, name) for name in ("jobs", "partition", "gpus_per_job", "time_limit")}
    config = Path(args.cluster_config) if args.cluster_config else None
    return slurm_launcher(Launcher("slurm", threads=args.threads), config, flags)  # the flags override the file
