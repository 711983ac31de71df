"""Config schema: the typed sections of a run config, coercion of raw values to their types, overrides.

``TrainConfig`` holds one dataclass per section; :func:`apply_override` sets one ``section.key`` from a
raw (YAML-parsed) value, coerced to the field's declared type; :func:`parse_override` reads the
command line's ``section.key=value``. Range checks live in :mod:`ducat.config.checks`, files in
:mod:`ducat.config.files`. Epochs are counted from 1, as in the paper's released code.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import yaml

from ducat.errors import ConfigError
from ducat.vocabulary import NORMS, TRAINING_VIEWS


class _BadValue(ConfigError):
    """A value of the wrong type; ``problem`` is the message without the value (for values read from files,
    whose content is never echoed: the file may not be a config at all)."""

    def __init__(self, problem: str, value: Any):
        super().__init__(f"{problem}, got {value!r}")
        self.problem = problem


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
    """The base adversarial-training method: ``name``, a registered method (``ducat.objectives.METHODS``: pgd_at,
    trades, mart, consistency, ...), and ``params``, its hyperparameters: ``method.<field>=value`` for each field
    of that method's ``Params`` (in a file, keys of the method section beside ``name``). When the config is built,
    :func:`ducat.config.checks.resolve_method` fills in the defaults and checks the values."""

    name: str = "pgd_at"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttackConfig:
    """Training attack, in [0,1] pixel units. ``norm``: Linf | L2, the threat model of the training attack
    and of the per-epoch validation attack (``eps`` is its radius; for L2 the step is along the normalised
    gradient). ``mode``: raw | original | merged.
    ``bn``: BatchNorm mode while crafting (eval = released code, train = Madry/Rice style).
    ``random_start``: PGD starts from a uniform point in the eps-ball (the paper's setting)."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    norm: str = "Linf"
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
    """``out``: run directory; None (the default) = a new directory ``runs/<config name>-<YYYYmmdd-HHMMSS>``
    chosen when the config is loaded (never an existing one). ``device``: auto | cpu | cuda | cuda:N.
    ``deterministic``: deterministic algorithms (bit-exact resume on CPU).
    ``amp``: bf16 autocast for training with ``bf16``; auto = off = fp32 (bf16 training lost accuracy in the
    measured comparison, docs/performance.md). ``channels_last``: auto = on for models with 2-d convolutions.
    ``sync_bn``: SyncBatchNorm across torchrun ranks: auto = on for CUDA ranks of a model with BatchNorm (a
    global batch normalises as on one GPU), on, off (PyTorch's SyncBatchNorm has no CPU kernel).
    ``save_epochs``: also keep the checkpoint of these epochs as ``epoch_N.pt`` (e.g. to fork DUCAT runs from a
    base run)."""

    out: str | None = None
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    amp: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    tensorboard: bool = True
    progress: bool = True
    threads: int | None = None
    sync_bn: str = "auto"
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
        """Every section as a mapping; the method's hyperparameters beside its name, as a config file has them."""
        data = asdict(self)
        data["method"] = {"name": self.method.name, **self.method.params}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


ATTACK_MODES = tuple(TRAINING_VIEWS)  # attack.mode: the view the training attack targets
ATTACK_NORMS = NORMS


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Coerce a YAML value to a field's declared type; ConfigError if impossible."""
    tp = eval(annotation, {"list": list}) if isinstance(annotation, str) else annotation
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, args[0], key)
    if origin is list:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise _BadValue(f"{key} must be a list", value)
        (item,) = typing.get_args(tp)
        return [coerce(v, item, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise _BadValue(f"{key} must be true or false", value)
    if tp is int:  # (a non-finite float has no int value: int(nan) and int(inf) raise)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or int(value) != value):
            raise _BadValue(f"{key} must be an integer", value)
        return int(value)
    if tp is float:
        if isinstance(value, str):
            value = parse_fraction(value, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _BadValue(f"{key} must be a number", value)
        if value != value or value in (float("inf"), float("-inf")):
            raise _BadValue(f"{key} must be finite", value)
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans: run.channels_last=on, run.amp=off
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise _BadValue(f"{key} must be a string", value)
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def parse_fraction(text: str, key: str) -> float:
    """``text`` as a float, accepting ``8/255`` style fractions (eps, step sizes); ``key`` names it in errors."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise _BadValue(f"{key} must be a number or a fraction like 8/255", text) from None


def apply_override(config: TrainConfig, section: str, key: str, value: Any) -> None:
    """Set ``config.<section>.<key>`` to ``value`` coerced to the field's type (not yet validated)."""
    sections = {f.name: f for f in fields(TrainConfig)}
    if section not in sections:
        raise ConfigError(f"unknown config section '{section}'; choose one of: {', '.join(sections)}")
    target = getattr(config, section)
    if section == "method" and key != "name":  # a hyperparameter of the method, checked when the config is built
        config.method.params[key] = value
        return
    known = {f.name: f for f in fields(target)}
    if key not in known:
        raise ConfigError(f"unknown config key '{section}.{key}'; keys of '{section}': {', '.join(known)}")
    setattr(target, key, coerce(value, known[key].type, f"{section}.{key}"))


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, YAML-parsed value). Quoted text loses its quotes as in YAML
    (``data.root="/data"`` is ``/data``); fractions like ``8/255`` stay text, which float fields parse."""
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
    if isinstance(value, dict):
        value = raw  # text with ': ' in it (a path, say) is the value itself, not a mapping
    return section, key, value


def describe(config: TrainConfig) -> str:
    """The config as YAML text (saved with every run as ``config.yaml``)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
