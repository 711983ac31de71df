"""The ``ducat`` command: a thin layer over the library.

Every known bad input (config value, dataset, checkpoint, run directory) ends in one line on
stderr, ``ducat: error: ...``, and exit code 2, before any compute.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ducat.checkpoint import CheckpointError
from ducat.config import ConfigError, load_config, load_run_config, parse_fraction, preset_names
from ducat.data import DataError
from ducat.fileio import RunDirError

USER_ERRORS = (ConfigError, DataError, CheckpointError, RunDirError)


class UsageError(ValueError):
    """Bad command-line usage; one line."""


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
    from ducat.train import setup_runtime, train

    if args.resume:
        run_dir = Path(args.resume)
        if args.config and "=" not in args.config:
            raise UsageError("with --resume give the run directory only; the run's saved config is used")
        overrides = ([args.config] if args.config else []) + args.overrides
        bad = [o for o in overrides if not o.startswith("run.")]
        if bad:
            raise UsageError(f"--resume keeps the saved config; only run.* overrides are allowed, got {bad[0]}")
        config = load_run_config(run_dir, overrides)
    else:
        if not args.config:
            raise UsageError("give a preset name or YAML file (list presets with: ducat presets)")
        config = load_config(args.config, args.overrides)
    if args.until_epoch is not None and not 1 <= args.until_epoch <= config.optim.epochs:
        raise UsageError(f"--until-epoch must be in [1, {config.optim.epochs}], got {args.until_epoch}")
    setup_runtime(config.run)
    result = train(config, resume=bool(args.resume), until_epoch=args.until_epoch)
    if result is None:
        print(f"stopped after epoch {args.until_epoch}; continue with: ducat train --resume {config.run.out}")
        return 0
    print(f"run written to {result.run_dir} (best epoch {result.best_epoch}: "
          f"val clean {result.best['val_clean_acc']:.4f}, val PGD {result.best['val_pgd_acc']:.4f})")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from ducat.quickstart import quickstart

    quickstart(Path(args.out), epochs=args.epochs, progress=not args.no_progress)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from ducat.reproduce import reproduce

    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    _check_output_dir(Path(args.out), "--out")

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip()) if args.variants is not None else None
    reproduce(args.scale, Path(args.out), data_root=args.data_root, seeds=args.seeds, variants=variants,
              nproc=args.nproc)
    return 0


def _check_output_dir(path: Path, option: str) -> None:
    """An output directory must be a directory or creatable as one (checked before any compute)."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option} '{path}': '{parent}' exists and is not a directory")
            return


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        print(name)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ducat.eval import FAST_ATTACKS, evaluate_checkpoint
    from ducat.eval.api import default_output

    settings = _eval_settings(args, FAST_ATTACKS)
    eps = parse_fraction(args.eps, "--eps") if args.eps is not None else None
    try:
        report = evaluate_checkpoint(args.target, args.out, eps=eps, settings=settings, data_root=args.data_root,
                                     dataset=args.dataset, model_name=args.model, device=args.device,
                                     progress=not args.no_progress)
    except ValueError as exc:  # a model's own checks (shapes, names) on a foreign checkpoint
        if isinstance(exc, USER_ERRORS):
            raise
        raise ConfigError(str(exc)) from None
    print(report.to_markdown())
    out = Path(args.out) if args.out else default_output(Path(args.target))
    print(f"\nreport written to {out / 'report.md'} and {out / 'report.json'}")
    return 0


def _eval_settings(args: argparse.Namespace, fast_attacks: tuple[str, ...]) -> dict:
    """EvalSettings fields from ``ducat eval``'s options, checked before anything is loaded."""
    import math
    import re

    if args.eps is not None and not math.isfinite(parse_fraction(args.eps, "--eps")):
        raise UsageError(f"--eps must be a finite number, got {args.eps!r}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.n_examples is not None and args.n_examples < 1:
        raise UsageError(f"--n-examples must be >= 1, got {args.n_examples}")
    if not -2**63 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [-2**63, 2**63), got {args.seed}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.out:
        _check_output_dir(Path(args.out), "--out")
    settings = {"n_examples": args.n_examples, "batch_size": args.batch_size, "seed": args.seed,
                "early_stop": not args.no_early_stop, "norm": args.norm}
    if args.fast:
        settings["attacks"] = fast_attacks
    if args.attacks:
        settings["attacks"] = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    if args.protocols:
        settings["protocols"] = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
    return settings


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from ducat.eval.plan import ATTACK_NAMES, Protocol

    parser.add_argument("target", help="run directory or checkpoint (.pt or .safetensors)")
    parser.add_argument("--eps", help="budget in [0,1] pixel units, e.g. 8/255 (default: the run's training eps)")
    parser.add_argument("--norm", default="Linf", choices=("Linf", "L2"), help="threat model (default Linf)")
    parser.add_argument("--n-examples", type=int, help="evaluate the first N test examples (default: all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacks", help=f"comma-separated subset of: {', '.join(ATTACK_NAMES)} (default: all)")
    parser.add_argument("--protocols", help="comma-separated subset of: "
                                            f"{', '.join(p.value for p in Protocol)} (default: all)")
    parser.add_argument("--fast", action="store_true", help="skip AutoAttack and PGD-100 (CPU-friendly)")
    parser.add_argument("--no-early-stop", action="store_true", help="run every attack on every clean-correct example")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/eval or the checkpoint's directory/eval)")
    parser.add_argument("--dataset", help="dataset of a foreign checkpoint without a ducat config")
    parser.add_argument("--model", help="architecture of a foreign checkpoint (a ducat model name)")
    parser.add_argument("--data-root", help="dataset root directory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")


def build_parser() -> argparse.ArgumentParser:
    from ducat.reproduce.scales import SCALES, VARIANTS

    parser = _Parser(prog="ducat", description="Dummy-class adversarial training and honest evaluation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one configuration (preset or YAML + key=value overrides)")
    p.add_argument("config", nargs="?", help="preset name (ducat presets) or YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.epochs=5 ducat.enabled=true")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--until-epoch", type=int, metavar="N", help="stop after epoch N (the run stays resumable)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("quickstart", help="PGD-AT vs PGD-AT+DUCAT on digits, offline, ~2 minutes on 2 CPU cores")
    p.add_argument("--out", default="runs/quickstart", help="directory for the two runs (default runs/quickstart)")
    p.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser("reproduce", help="the paper's grid, tables and figures under both protocols")
    p.add_argument("--scale", required=True, choices=tuple(SCALES),
                   help="smoke: digits, every piece in CI time; mini: Fashion-MNIST, 3 seeds, ~1 h on 2 CPU cores; "
                        "full-cpu: full Fashion-MNIST, a night; paper: the CIFAR-10 recipe, GPUs")
    p.add_argument("--out", required=True, help="output directory (a rerun skips finished runs)")
    p.add_argument("--data-root", help="dataset root (CIFAR/Tiny-ImageNet files; Fashion-MNIST optional)")
    p.add_argument("--seeds", type=int, help="override the scale's number of seeds")
    p.add_argument("--variants", help=f"comma-separated dummy-class variants to add (default: the scale's); "
                                      f"choose from: {', '.join(VARIANTS)}")
    p.add_argument("--nproc", type=int, default=1, help="train each run with torchrun on N processes/GPUs")
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("eval", help="robustness report: paper protocol and adaptive attacks side by side")
    _add_eval_arguments(p)
    p.set_defaults(func=_cmd_eval)
    return parser


_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def _one_line(message: object) -> str:
    """The message with line breaks escaped (they come from user text: paths, names, values)."""
    return str(message).translate(_LINE_BREAKS)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UsageError, *USER_ERRORS) as exc:
        print(f"ducat: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ducat: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from ducat.train import RunError

        if isinstance(exc, RunError):
            print(f"ducat: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
