"""Run configuration: typed sections, YAML presets with ``base:`` inheritance, ``key=value`` overrides.

Every value is checked when the config is built, before any data is read or any compute runs; a
bad value raises :class:`ConfigError` with a one-line message (the CLI prints it and exits 2).
Epochs are counted from 1, as in the paper's released code.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value or file; the message is one line."""


@dataclass
class DataConfig:
    """``dataset``: torchvision-style name (digits, FashionMNIST, CIFAR10, CIFAR100, TinyImageNet).
    ``val_fraction``: share of the training set held out to select the best checkpoint.
    ``n_train``/``n_test``: use only the first N examples (smoke runs); None = all."""

    dataset: str = "digits"
    root: str | None = None
    val_fraction: float = 0.1
    batch_size: int = 128
    augment: bool = True
    crop_padding: int = 4
    flip: bool = True
    n_train: int | None = None
    n_test: int | None = None


@dataclass
class ModelConfig:
    """``normalize``: put the dataset's mean/std inside the model (the paper trains without)."""

    name: str = "small_cnn"
    normalize: bool = False


@dataclass
class MethodConfig:
    """Base adversarial-training method: pgd_at, trades, mart or consistency."""

    name: str = "pgd_at"
    trades_beta: float = 6.0
    mart_beta: float = 6.0
    mart_exclude_dummy: bool = True
    consistency_lambda: float = 1.0
    consistency_temperature: float = 0.5


@dataclass
class AttackConfig:
    """Training attack (L-inf, [0,1] pixel units). ``mode``: raw | original | merged.
    ``bn``: BatchNorm mode while crafting (eval = released code, train = Madry/Rice style).
    ``random_start``: PGD starts from a uniform point in the eps-ball (the paper's setting)."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    mode: str = "raw"
    bn: str = "eval"
    random_start: bool = True


@dataclass
class DucatConfig:
    """DUCAT: ``enabled`` gives the model a 2C head from epoch 1; the DUCAT objective is used from
    ``start_epoch`` to the last epoch (before it: the base method with hard labels on the 2C head).
    ``pairing_seed``: None = in-order pairing ``dummy(k) = C + k``, else a seeded permutation.
    ``dummy_init``: how dummy rows start when widening a C-output checkpoint (copy | zero | random)."""

    enabled: bool = False
    alpha: float = 0.5
    beta1: float = 0.75
    beta2: float = 1.0
    start_epoch: int = 105
    pairing_seed: int | None = None
    dummy_init: str = "copy"


@dataclass
class OptimConfig:
    """SGD with the paper's MultiStep schedule: the lr is multiplied by ``gamma`` after each
    milestone epoch (milestone 100 = epochs 101.. use lr * gamma)."""

    epochs: int = 130
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [100, 105])
    gamma: float = 0.1


@dataclass
class ValidationConfig:
    """Per-epoch validation: clean and PGD accuracy of the projected classifier.
    ``select``: which split picks the best checkpoint: val (default), test (the paper's choice,
    optimistic), or last (no selection). DUCAT runs select among their DUCAT epochs only."""

    pgd_steps: int = 10
    n_examples: int | None = 1000
    select: str = "val"
    batch_size: int = 256


@dataclass
class RunConfig:
    """``out``: run directory. ``device``: auto | cpu | cuda | cuda:N.
    ``deterministic``: deterministic algorithms (bit-exact resume on CPU).
    ``amp``: bf16 autocast (auto = on CUDA with bf16 support). ``channels_last``: auto = on CUDA.
    ``sync_bn``: SyncBatchNorm across torchrun ranks (CUDA only). ``save_epochs``: also keep the
    checkpoint of these epochs as ``epoch_N.pt`` (e.g. to fork DUCAT runs from a base run)."""

    out: str = "runs/run"
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    amp: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    tensorboard: bool = True
    progress: bool = True
    threads: int | None = None
    sync_bn: bool = False
    save_epochs: list[int] = field(default_factory=list)


@dataclass
class FinetuneConfig:
    """Fine-tune an existing checkpoint (C or 2C outputs) from epoch ``start_epoch`` (paper T_r)."""

    checkpoint: str | None = None
    start_epoch: int = 1


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    ducat: DucatConfig = field(default_factory=DucatConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


METHOD_NAMES = ("pgd_at", "trades", "mart", "consistency")
ATTACK_MODES = ("raw", "original", "merged")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Coerce a YAML value to a field's declared type; ConfigError if impossible."""
    tp = eval(annotation, {"list": list}) if isinstance(annotation, str) else annotation
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:  # (a non-finite float has no int value: int(nan) and int(inf) raise)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or int(value) != value):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            value = _parse_fraction(value, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _parse_fraction(text: str, key: str) -> float:
    """Accept ``8/255`` style fractions for eps and step sizes."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{key} must be a number or a fraction like 8/255, got {text!r}") from None


def _apply(config: TrainConfig, section: str, key: str, value: Any) -> None:
    sections = {f.name: f for f in fields(TrainConfig)}
    if section not in sections:
        raise ConfigError(f"unknown config section '{section}'; choose one of: {', '.join(sections)}")
    target = getattr(config, section)
    known = {f.name: f for f in fields(target)}
    if key not in known:
        raise ConfigError(f"unknown config key '{section}.{key}'; keys of '{section}': {', '.join(known)}")
    setattr(target, key, _coerce(value, known[key].type, f"{section}.{key}"))


def _merge_mapping(config: TrainConfig, mapping: dict[str, Any], source: str) -> None:
    for section, values in mapping.items():
        if section == "base":
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of key: value")
        for key, value in values.items():
            _apply(config, section, key, value)


PRESET_PACKAGE = "ducat.configs"


def preset_names() -> list[str]:
    """Names of the YAML presets shipped with ducat (file names without ``.yaml``)."""
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def _resolve_file(name_or_path: str, relative_to: Path | None = None) -> tuple[str, str]:
    """(text, label) of a config given as a path or a preset name."""
    candidates = [Path(name_or_path)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name_or_path)
    for path in candidates:
        if path.is_file():
            try:
                return path.read_text(), str(path)
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read config file '{path}' ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    preset = resources.files(PRESET_PACKAGE) / f"{Path(stem).name}.yaml"
    if preset.is_file():
        return preset.read_text(), f"preset {stem}"
    raise ConfigError(f"no config file or preset named '{name_or_path}' (list presets with: ducat presets)")


def _load_mapping(name_or_path: str, relative_to: Path | None = None, depth: int = 0) -> list[tuple[dict, str]]:
    if depth > 10:
        raise ConfigError(f"config 'base:' chain too deep at '{name_or_path}'")
    text, label = _resolve_file(name_or_path, relative_to)
    try:
        mapping = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(mapping, dict):
        raise ConfigError(f"{label}: a config must be a mapping of sections")
    chain = []
    if "base" in mapping:
        here = Path(label).parent if not label.startswith("preset ") else None
        chain = _load_mapping(str(mapping["base"]), here, depth + 1)
    return chain + [(mapping, label)]


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    dotted, raw = text.split("=", 1)
    if dotted.count(".") != 1:
        raise ConfigError(f"override key '{dotted}' must look like section.key (e.g. optim.epochs=5)")
    section, key = dotted.split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and "/" in value:
        value = raw  # keep fractions like 8/255 as text; _coerce parses them for float fields
    return section, key, value


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Build a validated config from a preset name or YAML path (or defaults) plus overrides."""
    config = TrainConfig()
    if name_or_path:
        for mapping, label in _load_mapping(name_or_path):
            _merge_mapping(config, mapping, label)
    for text in overrides or []:
        _apply(config, *parse_override(text))
    validate(config)
    return config


def config_from_dict(mapping: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved with a run (``config.json`` or inside a checkpoint)."""
    config = TrainConfig()
    _merge_mapping(config, mapping, "saved config")
    validate(config)
    return config


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: TrainConfig) -> None:
    """Check every value; raise ConfigError with a one-line message on the first bad one."""
    from ducat.data import DataError, dataset_info
    from ducat.models import MODEL_NAMES

    try:
        dataset_info(config.data.dataset)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    d, m, a, u, o, v, r, f = (config.data, config.model, config.attack, config.ducat, config.optim,
                              config.validation, config.run, config.finetune)
    _check(m.name in MODEL_NAMES, f"unknown model '{m.name}'; choose one of: {', '.join(MODEL_NAMES)}")
    _check(config.method.name in METHOD_NAMES,
           f"unknown method '{config.method.name}'; choose one of: {', '.join(METHOD_NAMES)}")
    _check(0.0 <= d.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    _check(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _check(d.crop_padding >= 0, f"data.crop_padding must be >= 0, got {d.crop_padding}")
    for name in ("n_train", "n_test"):
        n = getattr(d, name)
        _check(n is None or n >= 1, f"data.{name} must be >= 1 or null, got {n}")
    _check(a.eps >= 0, f"attack.eps must be >= 0, got {a.eps}")
    _check(a.step_size >= 0, f"attack.step_size must be >= 0, got {a.step_size}")
    _check(a.steps >= 0, f"attack.steps must be >= 0, got {a.steps}")
    _check(a.mode in ATTACK_MODES, f"unknown attack.mode '{a.mode}'; choose one of: {', '.join(ATTACK_MODES)}")
    _check(a.bn in ("eval", "train"), f"attack.bn must be eval or train, got '{a.bn}'")
    for name in ("alpha", "beta1", "beta2"):
        value = getattr(u, name)
        _check(0.0 <= value <= 1.0, f"ducat.{name} must be in [0, 1], got {value}")
    _check(u.dummy_init in ("copy", "zero", "random"),
           f"ducat.dummy_init must be copy, zero or random, got '{u.dummy_init}'")
    _check(o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}")
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(o.momentum >= 0 and o.weight_decay >= 0 and o.gamma > 0,
           "optim.momentum and optim.weight_decay must be >= 0 and optim.gamma > 0")
    if u.enabled:
        _check(1 <= u.start_epoch <= o.epochs,
               f"ducat.start_epoch {u.start_epoch} is past the last epoch ({o.epochs}); it must be in [1, {o.epochs}]")
    _check(v.select in ("val", "test", "last"), f"validation.select must be val, test or last, got '{v.select}'")
    _check(v.select != "val" or d.val_fraction > 0, "validation.select=val needs data.val_fraction > 0")
    _check(v.pgd_steps >= 0, f"validation.pgd_steps must be >= 0, got {v.pgd_steps}")
    _check(v.n_examples is None or v.n_examples >= 1, f"validation.n_examples must be >= 1, got {v.n_examples}")
    _check(v.batch_size >= 1, f"validation.batch_size must be >= 1, got {v.batch_size}")
    _check(r.amp in ("auto", "off", "bf16"), f"run.amp must be auto, off or bf16, got '{r.amp}'")
    _check(r.channels_last in ("auto", "on", "off"), f"run.channels_last must be auto, on or off, got '{r.channels_last}'")
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", r.device) is not None,
           f"run.device must be auto, cpu, cuda or cuda:N, got '{r.device}'")
    _check(r.threads is None or r.threads >= 1, f"run.threads must be >= 1, got {r.threads}")
    _check(all(1 <= e <= o.epochs for e in r.save_epochs), f"run.save_epochs must be in [1, {o.epochs}], got {r.save_epochs}")
    for name, seed in (("run.seed", r.seed), ("ducat.pairing_seed", u.pairing_seed)):
        _check(seed is None or -2**63 <= seed < 2**63, f"{name} must be in [-2**63, 2**63), got {seed}")
    mt = config.method
    _check(mt.consistency_temperature > 0,
           f"method.consistency_temperature must be > 0, got {mt.consistency_temperature}")
    for name in ("trades_beta", "mart_beta", "consistency_lambda"):
        _check(getattr(mt, name) >= 0, f"method.{name} must be >= 0, got {getattr(mt, name)}")
    _check(1 <= f.start_epoch <= o.epochs, f"finetune.start_epoch must be in [1, {o.epochs}], got {f.start_epoch}")
    if f.checkpoint is not None:
        _check(Path(f.checkpoint).is_file(), f"finetune.checkpoint '{f.checkpoint}' does not exist")


def describe(config: TrainConfig) -> str:
    """The config as YAML text (saved with every run as ``config.yaml``)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


__all__ = ["ConfigError", "TrainConfig", "load_config", "config_from_dict", "parse_override", "preset_names",
           "validate", "describe", "METHOD_NAMES", "ATTACK_MODES"]
