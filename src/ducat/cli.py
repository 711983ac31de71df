"""The ``ducat`` command: a thin layer over the library.

Every known bad input (config value, dataset, checkpoint, run directory) ends in one line on
stderr, ``ducat: error: ...``, and exit code 2, before any compute.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ducat.checkpoint import CheckpointError
from ducat.config import ConfigError, config_from_dict, load_config, preset_names
from ducat.data import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)


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
    from ducat.train import train

    if args.resume:
        run_dir = Path(args.resume)
        if args.config and "=" not in args.config:
            raise UsageError("with --resume give the run directory only; the run's saved config is used")
        overrides = ([args.config] if args.config else []) + args.overrides
        bad = [o for o in overrides if not o.startswith("run.")]
        if bad:
            raise UsageError(f"--resume keeps the saved config; only run.* overrides are allowed, got {bad[0]}")
        config = _saved_config(run_dir, overrides)
    else:
        if not args.config:
            raise UsageError("give a preset name or YAML file (list presets with: ducat presets)")
        config = load_config(args.config, args.overrides)
    result = train(config, resume=bool(args.resume))
    print(f"run written to {result.run_dir} (best epoch {result.best_epoch}: "
          f"val clean {result.best['val_clean_acc']:.4f}, val PGD {result.best['val_pgd_acc']:.4f})")
    return 0


def _saved_config(run_dir: Path, overrides: list[str]):
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"nothing to resume: '{run_dir}' has no config.yaml")
    try:
        mapping = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise ConfigError(f"cannot read the saved config '{path}' ({type(exc).__name__}: {first})") from None
    if not isinstance(mapping, dict):
        raise ConfigError(f"the saved config '{path}' is not a mapping of config sections")
    config = config_from_dict(mapping)
    from ducat.config import _apply, parse_override, validate

    for text in overrides:
        _apply(config, *parse_override(text))
    config.run.out = str(run_dir)
    validate(config)
    return config


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from ducat.quickstart import quickstart

    quickstart(Path(args.out), epochs=args.epochs, progress=not args.no_progress)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from ducat.reproduce import reproduce

    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    _check_output_dir(Path(args.out), "--out")

    reproduce(args.scale, Path(args.out), data_root=args.data_root, seeds=args.seeds, nproc=args.nproc)
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
    from ducat.evaluate import run_cli

    _check_eval_args(args)
    return run_cli(args)


def _check_eval_args(args: argparse.Namespace) -> None:
    """Values ``ducat eval`` would otherwise only trip over once the attacks run."""
    import math
    import re

    from ducat.config import _parse_fraction

    if args.eps is not None and not math.isfinite(_parse_fraction(args.eps, "--eps")):
        raise UsageError(f"--eps must be a finite number, got {args.eps!r}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not -2**63 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [-2**63, 2**63), got {args.seed}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.out:
        _check_output_dir(Path(args.out), "--out")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ducat", description="Dummy-class adversarial training and honest evaluation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one configuration (preset or YAML + key=value overrides)")
    p.add_argument("config", nargs="?", help="preset name (ducat presets) or YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.epochs=5 ducat.enabled=true")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("quickstart", help="PGD-AT vs PGD-AT+DUCAT on digits, offline, ~2 minutes on 2 CPU cores")
    p.add_argument("--out", default="runs/quickstart", help="directory for the two runs (default runs/quickstart)")
    p.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser("reproduce", help="the paper's grid, tables and figures under both protocols")
    p.add_argument("--scale", required=True, choices=("smoke", "mini", "paper"),
                   help="smoke: digits, ~3 min; mini: Fashion-MNIST, ~1 h on 2 CPU cores; paper: CIFAR-10 recipe, GPUs")
    p.add_argument("--out", required=True, help="output directory (a rerun skips finished runs)")
    p.add_argument("--data-root", help="dataset root (CIFAR/Tiny-ImageNet files; Fashion-MNIST optional)")
    p.add_argument("--seeds", type=int, help="override the scale's number of seeds (paper: 3)")
    p.add_argument("--nproc", type=int, default=1, help="train each run with torchrun on N processes/GPUs")
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=_cmd_presets)

    try:
        from ducat.evaluate import add_eval_arguments
    except ImportError:  # evaluation not installed in this build
        add_eval_arguments = None
    if add_eval_arguments is not None:
        p = sub.add_parser("eval", help="robustness report: paper protocol and adaptive attacks side by side")
        add_eval_arguments(p)
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
