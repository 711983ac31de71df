"""Config checks: every value is checked when a config is built, before any data is read or any compute
runs; a bad value raises :class:`ConfigError` with a one-line message (the CLI prints it and exits 2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

from ducat.config.schema import (
    ATTACK_MODES,
    ATTACK_NORMS,
    ConfigError,
    DataConfig,
    MethodConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    coerce,
)
from ducat.vocabulary import DEVICE_PATTERN, DEVICES_TEXT, SEEDS_TEXT, valid_seed

if TYPE_CHECKING:
    from ducat.data import DatasetInfo


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: TrainConfig) -> None:
    """Check every value; raise ConfigError with a one-line message on the first bad one.

    Everything that would otherwise fail only once training runs is checked here, before any data
    is read: split sizes, crop padding, the learning-rate schedule, the run directory."""
    from ducat.data import DataError, dataset_info  # torch: config loads before the CLI sets torch's runtime up
    from ducat.models import MODEL_NAMES  # torch, as the line above

    try:
        info = dataset_info(config.data.dataset)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    m, a, u, v, f = config.model, config.attack, config.ducat, config.validation, config.finetune
    _check(m.name in MODEL_NAMES, f"unknown model '{m.name}'; choose one of: {', '.join(MODEL_NAMES)}")
    resolve_method(config.method)
    _validate_data(config.data, info)
    _check(a.eps >= 0, f"attack.eps must be >= 0, got {a.eps}")
    _check(a.step_size >= 0, f"attack.step_size must be >= 0, got {a.step_size}")
    _check(a.steps >= 0, f"attack.steps must be >= 0, got {a.steps}")
    _check(a.norm in ATTACK_NORMS, f"unknown attack.norm '{a.norm}'; choose one of: {', '.join(ATTACK_NORMS)}")
    _check(a.mode in ATTACK_MODES, f"unknown attack.mode '{a.mode}'; choose one of: {', '.join(ATTACK_MODES)}")
    _check(a.bn in ("eval", "train"), f"attack.bn must be eval or train, got '{a.bn}'")
    for name in ("alpha", "beta1", "beta2"):
        value = getattr(u, name)
        _check(0.0 <= value <= 1.0, f"ducat.{name} must be in [0, 1], got {value}")
    _check(u.dummy_init in ("copy", "zero", "random"),
           f"ducat.dummy_init must be copy, zero or random, got '{u.dummy_init}'")
    _validate_optim(config.optim)
    epochs = config.optim.epochs
    if u.enabled:
        _check(1 <= u.start_epoch <= epochs,
               f"ducat.start_epoch {u.start_epoch} is past the last epoch ({epochs}); it must be in [1, {epochs}] "
               "(to shorten a preset with its schedule use --epochs N instead of optim.epochs)")
    _check(v.select in ("val", "test", "last"), f"validation.select must be val, test or last, got '{v.select}'")
    _check(v.select != "val" or config.data.val_fraction > 0, "validation.select=val needs data.val_fraction > 0")
    _check(v.pgd_steps >= 0, f"validation.pgd_steps must be >= 0, got {v.pgd_steps}")
    _check(v.n_examples is None or v.n_examples >= 1, f"validation.n_examples must be >= 1, got {v.n_examples}")
    _check(v.batch_size >= 1, f"validation.batch_size must be >= 1, got {v.batch_size}")
    _validate_run(config.run, epochs)
    _check(u.pairing_seed is None or valid_seed(u.pairing_seed),
           f"ducat.pairing_seed must be in {SEEDS_TEXT}, got {u.pairing_seed}")
    _check(1 <= f.start_epoch <= epochs, f"finetune.start_epoch must be in [1, {epochs}], got {f.start_epoch}")
    if f.checkpoint is not None:
        _check(Path(f.checkpoint).is_file(), f"finetune.checkpoint '{f.checkpoint}' does not exist")


# Keys of the method section in configs saved before each method declared its own hyperparameters (a frozen
# history: a new method never adds one): legacy key -> (method, field of its Params).
LEGACY_METHOD_KEYS = {"trades_beta": ("trades", "beta"), "mart_beta": ("mart", "beta"),
                      "mart_exclude_dummy": ("mart", "exclude_dummy"), "consistency_lambda": ("consistency", "lam"),
                      "consistency_temperature": ("consistency", "temperature")}


def resolve_method(method: MethodConfig) -> None:
    """Check ``method`` and complete its ``params`` in place: every field of the method's ``Params``, defaults
    filled in, values of the declared types (a legacy key is read as its field; one of another method is left out
    if it holds that method's default, as every saved config does, and refused otherwise). ConfigError otherwise."""
    from ducat.objectives import METHODS  # torch: config loads before the CLI sets torch's runtime up

    _check(method.name in METHODS, f"unknown method '{method.name}'; choose one of: {', '.join(METHODS)}")
    own = {f.name: f for f in fields(METHODS[method.name].Params)}
    params = {}
    for key, value in method.params.items():
        owner, name = LEGACY_METHOD_KEYS.get(key, (method.name, key))
        if owner != method.name:
            default = next(f.default for f in fields(METHODS[owner].Params) if f.name == name)
            _check(value == default, f"method.{key} is a hyperparameter of method {owner}, not of {method.name}")
            continue
        _check(name in own, f"unknown key method.{key} of method {method.name}; its keys: "
                            f"{', '.join(['name', *own]) if own else 'name only'}")
        params[name] = coerce(value, own[name].type, f"method.{name}")
    try:
        method.params = asdict(METHODS[method.name].Params(**params))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _validate_data(d: DataConfig, info: DatasetInfo) -> None:
    """Data values, and the train/validation split sizes they give (``info``: the dataset's DatasetInfo)."""
    _check(0.0 <= d.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    _check(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _check(0 <= d.crop_padding <= info.image_size,
           f"data.crop_padding must be in [0, {info.image_size}] (the image size of {info.name}), got {d.crop_padding}")
    for name in ("n_train", "n_test"):
        n = getattr(d, name)
        _check(n is None or n >= 1, f"data.{name} must be >= 1 or null, got {n}")
    n = info.train_size if d.n_train is None else min(d.n_train, info.train_size)
    n_val = round(n * d.val_fraction)  # exactly as data.split_train_val sizes the validation split
    _check(n_val < n, f"data.val_fraction={d.val_fraction} leaves no training images: all {n} would go to "
                      "validation; lower it or raise data.n_train")
    _check(d.val_fraction == 0 or n_val >= 1,
           f"data.val_fraction={d.val_fraction} of {n} training images gives an empty validation split; raise it "
           "or data.n_train, or set it to 0 with validation.select=test or last")


FLOAT32_MAX, FLOAT32_TINY = 3.4028234663852886e38, 1.1754943508222875e-38  # torch.finfo(torch.float32).max, .tiny


def _validate_optim(o: OptimConfig) -> None:
    """Optimizer values. gamma has no fixed bound (a step-up, gamma > 1, is legitimate): the bound is that
    every learning rate the schedule reaches, ``lr * gamma ** k`` for k = 0..len(milestones), computed as
    the trainer computes it, is a positive float32 number (the optimizer applies it to float32 weights:
    1e306 is a finite float64 but overflows there), so an overflowing or underflowing gamma is refused."""
    _check(o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}")
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(o.momentum >= 0 and o.weight_decay >= 0 and o.gamma > 0,
           "optim.momentum and optim.weight_decay must be >= 0 and optim.gamma > 0")
    try:
        lrs = [o.lr * o.gamma ** k for k in range(len(o.milestones) + 1)]
    except OverflowError:
        lrs = [math.inf]
    _check(all(FLOAT32_TINY <= lr <= FLOAT32_MAX for lr in lrs),
           f"optim.lr={o.lr} and optim.gamma={o.gamma} give a learning rate that is not a finite positive number "
           f"after {len(o.milestones)} milestone(s) (lr * gamma ** k)")


def _validate_run(r: RunConfig, epochs: int) -> None:
    """Run values; ``run.out`` must be a directory or creatable as one (no file on its path); None is
    resolved when the config is loaded."""
    _check(r.amp in ("auto", "off", "bf16"), f"run.amp must be auto, off or bf16, got '{r.amp}'")
    _check(r.sync_bn in ("auto", "on", "off"), f"run.sync_bn must be auto, on or off, got '{r.sync_bn}'")
    _check(r.channels_last in ("auto", "on", "off"),
           f"run.channels_last must be auto, on or off, got '{r.channels_last}'")
    _check(DEVICE_PATTERN.fullmatch(r.device) is not None, f"run.device must be {DEVICES_TEXT}, got '{r.device}'")
    _check(r.threads is None or r.threads >= 1, f"run.threads must be >= 1, got {r.threads}")
    _check(all(1 <= e <= epochs for e in r.save_epochs),
           f"run.save_epochs must be in [1, {epochs}], got {r.save_epochs}")
    _check(valid_seed(r.seed), f"run.seed must be in {SEEDS_TEXT}, got {r.seed}")
    if r.out is None:
        return
    out = Path(r.out)
    try:
        blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    except OSError as exc:
        raise ConfigError(f"run.out '{r.out}' cannot be checked ({exc.strerror})") from None
    _check(blocker is None, f"run.out '{r.out}': '{blocker}' exists and is not a directory")
