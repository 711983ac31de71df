"""The ``ducat`` command: a thin layer over the library.

Every known bad input (config value, dataset, checkpoint, run directory) ends in one line on
stderr, ``ducat: error: ...``, and exit code 2, before any compute.

The command handlers import the library inside themselves: torch must load after
:func:`~ducat.runtime.prepare_environment` has set its OpenMP runtime up (the wait policy only works when set
before torch loads; ``tests/test_runtime.py``), and ``ducat --help`` or a bad option then answers without it.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from ducat import __version__
from ducat.cli_options import (
    add_check_arguments,
    check_output_dir,
    epochs_option,
    eval_settings,
    launcher_option,
    set_threads,
)
from ducat.config import ScheduleWarning, load_config, load_run_config, parse_fraction
from ducat.errors import USER_ERRORS, ConfigError, MetricsError, UsageError
from ducat.runtime import prepare_environment

EPOCHS_HELP = ("shorten or lengthen the preset keeping its proportions: the lr milestones, the DUCAT start "
               "and run.save_epochs scale with N (ducat.config.scale_schedule)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + exits 2; keep it to one line
        raise UsageError(message)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:  # Python 3.11 reads '--opt=--' as an empty list, unconverted
            value = getattr(namespace, action.dest, None)
            if action.nargs is None and action.option_strings and isinstance(value, list):
                self.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
        return namespace, extras


def _cmd_train(args: argparse.Namespace) -> int:
    from ducat.train import setup_runtime, train  # torch: loads after prepare_environment

    with warnings.catch_warnings(record=True) as caught:  # ducat's are held until the run is set up
        warnings.simplefilter("always", ScheduleWarning)
        config = _train_config(args)
    held = _ducat_warnings(caught)
    if args.until_epoch is not None and not 1 <= args.until_epoch <= config.optim.epochs:
        raise UsageError(f"--until-epoch must be in [1, {config.optim.epochs}], got {args.until_epoch}")
    setup_runtime(config.run)

    def ready() -> None:  # every input check passed: the run is about to start
        if not args.resume and os.environ.get("RANK", "0") == "0":
            print(f"training {args.config} ({config.optim.epochs} epochs) into {config.run.out}", flush=True)
        for line in held:
            print(line, file=sys.stderr, flush=True)

    try:
        result = train(config, resume=bool(args.resume), until_epoch=args.until_epoch, on_ready=ready)
    except KeyboardInterrupt:
        print(f"ducat: interrupted; {_resume_hint(Path(config.run.out))}", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 speaks for the run
        return 0
    if result is None:
        print(f"stopped after epoch {args.until_epoch}; continue with: ducat train --resume {config.run.out}")
        return 0
    print(f"run written to {result.run_dir} (best epoch {result.best_epoch}: "
          f"val clean {result.best['val_clean_acc']:.4f}, val PGD {result.best['val_pgd_acc']:.4f})")
    return 0


def _train_config(args: argparse.Namespace):
    """The config of ``ducat train``: a run's saved one (``--resume``, run.* overrides only) or a preset/YAML
    with overrides and ``--epochs``."""
    if not args.resume:
        if not args.config:
            raise UsageError("give a preset name or YAML file (list presets with: ducat presets)")
        return load_config(args.config, args.overrides, epochs=epochs_option(args))
    if args.config and "=" not in args.config:
        raise UsageError("with --resume give the run directory only; the run's saved config is used")
    if args.epochs is not None:
        raise UsageError("--epochs cannot change a run being resumed; it keeps its saved schedule")
    overrides = ([args.config] if args.config else []) + args.overrides
    bad = [o for o in overrides if not o.startswith("run.")]
    if bad:
        raise UsageError(f"--resume keeps the saved config; only run.* overrides are allowed, got {bad[0]}")
    return load_run_config(Path(args.resume), overrides)


def _resume_hint(run_dir: Path) -> str:
    """What to do after an interrupted ``ducat train``: resume from the last checkpoint, if one was written."""
    if (run_dir / "last.pt").is_file() or (run_dir / "prev.pt").is_file():
        return f"continue with: ducat train --resume {run_dir}"
    return f"no epoch finished, so '{run_dir}' holds no checkpoint to resume; start the run again"


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from ducat.quickstart import quickstart  # torch: loads after prepare_environment

    set_threads(args.threads)
    check_output_dir(Path(args.out), "--out")
    try:
        quickstart(Path(args.out), epochs=epochs_option(args) or 30, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"ducat: interrupted; to continue from the last finished epoch, run: ducat quickstart --out {args.out}"
              + (f" --epochs {args.epochs}" if args.epochs is not None else ""), file=sys.stderr)
        return 130
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from ducat.reproduce import reproduce  # torch: loads after prepare_environment

    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    check_output_dir(Path(args.out), "--out")
    launcher = launcher_option(args)  # before torch loads: a launched grid's jobs set their own threads
    set_threads(args.threads if launcher is None else None)

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip()) if args.variants is not None else None
    reproduce(args.scale, Path(args.out), data_root=args.data_root, seeds=args.seeds, variants=variants,
              nproc=args.nproc, launcher=launcher, workers=args.workers)
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from ducat.presets import presets_table  # torch: loads after prepare_environment

    print(presets_table(include_base=args.all))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from ducat.analysis import training_curves  # torch: loads after prepare_environment

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got '{out}'")
    check_output_dir(out.parent, "--out")
    labels = [label.strip() for label in args.labels.split(",")] if args.labels is not None else None
    try:
        path = training_curves([Path(r) for r in args.runs], out, labels)
    except MetricsError as exc:
        raise UsageError(str(exc)) from None
    print(f"training curves of {len(args.runs)} run(s) written to {path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ducat.eval import evaluate_checkpoint, fast_names  # torch: loads after prepare_environment
    from ducat.eval.api import default_output  # torch: loads after prepare_environment

    settings = eval_settings(args, fast_names())
    eps = parse_fraction(args.eps, "--eps") if args.eps is not None else None
    set_threads(args.threads)
    try:
        report = evaluate_checkpoint(args.target, args.out, eps=eps, settings=settings, data_root=args.data_root,
                                     dataset=args.dataset, model_name=args.model, device=args.device,
                                     progress=not args.no_progress, load=args.load, surrogate=args.surrogate)
    except ValueError as exc:  # a model's own checks (shapes, names) on a foreign checkpoint
        if isinstance(exc, USER_ERRORS):
            raise
        raise ConfigError(str(exc)) from None
    print(report.to_markdown())
    out = Path(args.out) if args.out else default_output(args.target and Path(args.target), args.load)
    print(f"\nreport written to {out / 'report.md'} and {out / 'report.json'}")
    return 0


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from ducat.eval import EvalSettings, Protocol, attack_names  # torch: loads after prepare_environment

    parser.add_argument("target", nargs="?", help="run directory or checkpoint (.pt or .safetensors); none with --load")
    parser.add_argument("--eps", help="budget in [0,1] pixel units, e.g. 8/255 (default: the run's training eps)")
    parser.add_argument("--norm", choices=("Linf", "L2"),
                        help="threat model (default: the run's training attack norm, else Linf)")
    parser.add_argument("--n-examples", type=int, help="evaluate the first N test examples (default: all)")
    parser.add_argument("--batch-size", type=int, default=EvalSettings.batch_size,
                        help="most examples per attack batch (default: %(default)s; AutoAttack's iterations run per "
                             "batch, so fewer batches cost less)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="processes that attack batches in parallel, each batch its own (default: one "
                             "single-threaded worker per thread on a Linux CPU, else 1); each attack runs in at "
                             "least N batches, and random starts are drawn per batch, so give the same N to "
                             "reproduce a report exactly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacks", help=f"comma-separated subset of: {', '.join(attack_names())} (default: all)")
    parser.add_argument("--protocols", help="comma-separated subset of: "
                                            f"{', '.join(p.value for p in Protocol)} (default: all)")
    parser.add_argument("--fast", action="store_true", help="skip AutoAttack and PGD-100 (CPU-friendly)")
    parser.add_argument("--no-early-stop", action="store_true", help="run every attack on every clean-correct example")
    parser.add_argument("--autoattack", metavar="PARTS",
                        help="comma-separated attacks of every AutoAttack row, from apgd-ce, apgd-t, fab-t, square "
                             "(default: all four, standard AutoAttack)")
    parser.add_argument("--equal-effort", action="store_true",
                        help="a model without dummy classes meets extra margin restarts, as many attack runs per "
                             "example as a DUCAT model faces with the same options (a fair worst-case comparison)")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/eval or the checkpoint's directory/eval)")
    parser.add_argument("--dataset", help="dataset of a foreign checkpoint without a ducat config")
    parser.add_argument("--model", help="architecture of a foreign checkpoint (a ducat model name)")
    add_check_arguments(parser)
    parser.add_argument("--data-root", help="dataset root directory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")
    _add_threads_argument(parser)


def _add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    from ducat.reproduce.launch import LAUNCHERS  # torch: loads after prepare_environment

    group = parser.add_argument_group("launcher", "run the grid's jobs through Dask (pip install -e \".[cluster]\"); "
                                                  "see README, Running the grid on many GPUs")
    group.add_argument("--launcher", choices=tuple(LAUNCHERS),
                       help="local: this machine, one job per GPU (on a CPU, one single-threaded job per core); "
                            "slurm: each worker a SLURM job (default: one run after another in this process)")
    group.add_argument("--jobs", type=int, metavar="N", help="most jobs at a time (local default: one per GPU or "
                                                             "core; slurm default: 8); --threads is per job")
    group.add_argument("--partition", help="slurm: the partition (#SBATCH -p)")
    group.add_argument("--gpus-per-job", type=int, metavar="N",
                       help="slurm: GPUs per job (#SBATCH --gres=gpu:N, default 1; N > 1 trains with torchrun)")
    group.add_argument("--time-limit", metavar="HH:MM:SS", help="slurm: time limit per job (#SBATCH -t)")
    group.add_argument("--cluster-config", metavar="FILE", help="slurm: a YAML file of these settings and more "
                                                                "(account, memory, cores_per_job, directives, setup)")


def _add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's, the core count)")


def build_parser() -> argparse.ArgumentParser:
    from ducat.reproduce.scales import SCALES, VARIANTS  # torch: loads after prepare_environment

    parser = _Parser(prog="ducat", description="Dummy-class adversarial training and honest evaluation.")
    parser.add_argument("--version", action="version", version=f"ducat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one configuration (preset or YAML + key=value overrides)")
    p.add_argument("config", nargs="?", help="preset name (ducat presets) or YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.n_train=2000 run.threads=1")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--until-epoch", type=int, metavar="N", help="stop after epoch N (the run stays resumable)")
    p.add_argument("--epochs", type=int, metavar="N", help=EPOCHS_HELP)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("quickstart", help="PGD-AT vs PGD-AT+DUCAT on digits, offline, on the CPU (about a minute; "
                                          "README)")
    p.add_argument("--out", default="runs/quickstart", help="directory for the two runs (default runs/quickstart)")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs per run (default 30); " + EPOCHS_HELP)
    p.add_argument("--no-progress", action="store_true", help="no epoch lines or progress bars")
    _add_threads_argument(p)
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser("reproduce", help="the paper's grid, tables and figures under both protocols")
    p.add_argument("--scale", required=True, choices=tuple(SCALES),
                   help="smoke: digits, every piece, ~1 min; mini: Fashion-MNIST, MLP, 5 seeds; cnn: Fashion-MNIST "
                        "28x28, small CNN, PGD-AT with and without DUCAT, 5 seeds (docs/results.md has the measured "
                        "times); full-cpu: full Fashion-MNIST, MLP, ~4-4.5 h (estimated); paper: the CIFAR-10 recipe, "
                        "GPUs")
    p.add_argument("--out", required=True, help="output directory (a rerun skips finished runs)")
    p.add_argument("--data-root", help="dataset root (CIFAR/Tiny-ImageNet files; Fashion-MNIST optional)")
    p.add_argument("--seeds", type=int, help="override the scale's number of seeds")
    p.add_argument("--variants", help=f"comma-separated dummy-class variants to add (default: the scale's); "
                                      f"choose from: {', '.join(VARIANTS)}")
    p.add_argument("--nproc", type=int, default=1, help="train each run with torchrun on N processes/GPUs")
    p.add_argument("--workers", type=int, metavar="N",
                   help="evaluation processes per run (default: one per thread on a CPU); results depend on it")
    _add_threads_argument(p)
    _add_launcher_arguments(p)
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("presets", help="the shipped presets: dataset, model, method, epochs, estimated time")
    p.add_argument("--all", action="store_true", help="also the base presets (recipes the others inherit)")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("plot", help="training curves (clean/PGD accuracy, lr per epoch) of runs, overlaid, as a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", default="training_curves.png", help="PNG to write (default training_curves.png)")
    p.add_argument("--labels", help="comma-separated legend names, one per run (default: the directory names)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("eval", help="robustness report: paper protocol and adaptive attacks side by side")
    _add_eval_arguments(p)
    p.set_defaults(func=_cmd_eval)
    return parser


_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def _one_line(message: object) -> str:
    """The message with line breaks escaped (they come from user text: paths, names, values)."""
    return str(message).translate(_LINE_BREAKS)


def _ducat_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """ducat's own warnings of ``caught`` (a :class:`ScheduleWarning`) as ``ducat: warning: ...`` lines; any other
    warning is shown at once as Python shows it."""
    lines = []
    for w in caught:
        if issubclass(w.category, ScheduleWarning):
            lines.append(f"ducat: warning: {_one_line(w.message)}")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    return lines


def main(argv: list[str] | None = None) -> int:
    prepare_environment()  # before torch loads: OpenMP threads spin briefly, then sleep (see ducat.runtime)
    return _main(argv)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line. ``section.key=value`` overrides may also follow options
    (``ducat train PRESET --epochs 5 data.n_train=2000``), which argparse alone leaves unrecognised."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extras):
        args.overrides += extras
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _main(argv: list[str] | None) -> int:
    try:
        args = _parse(argv)
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"ducat: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ducat: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (ducat presets | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # the environment (disk full, permissions), not the input: still one line
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"ducat: error: cannot read or write{where} ({exc.strerror or exc})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
