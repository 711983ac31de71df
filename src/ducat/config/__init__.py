"""Run configuration: typed sections, YAML presets with ``base:`` inheritance, ``key=value`` overrides.

Every value is checked when the config is built, before any data is read or any compute runs; a
bad value raises :class:`ConfigError` with a one-line message (the CLI prints it and exits 2).
Epochs are counted from 1, as in the paper's released code.

- :mod:`ducat.config.schema`: the sections and their types, coercion, overrides;
- :mod:`ducat.config.files`: YAML files and presets, a run's saved ``config.yaml``;
- :mod:`ducat.config.checks`: :func:`validate`;
- :mod:`ducat.config.schedule`: :func:`scale_schedule` (``--epochs N``) and the milestone warning.
"""

from ducat.config.checks import validate
from ducat.config.files import (
    IGNORED_KEYS,
    base_presets,
    config_from_dict,
    config_name,
    load_config,
    load_run_config,
    new_run_dir,
    preset_names,
)
from ducat.config.schedule import ScheduleWarning, scale_epoch, scale_schedule, schedule_warning
from ducat.config.schema import (
    ATTACK_MODES,
    ATTACK_NORMS,
    AttackConfig,
    ConfigError,
    DataConfig,
    DucatConfig,
    FinetuneConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    ValidationConfig,
    apply_override,
    describe,
    parse_fraction,
    parse_override,
)

__all__ = ["ConfigError", "TrainConfig", "DataConfig", "ModelConfig", "MethodConfig", "AttackConfig", "DucatConfig",
           "OptimConfig", "ValidationConfig", "RunConfig", "FinetuneConfig", "load_config", "config_from_dict",
           "load_run_config", "parse_override", "parse_fraction", "apply_override", "preset_names", "validate",
           "describe", "ATTACK_MODES", "ATTACK_NORMS", "IGNORED_KEYS", "base_presets", "ScheduleWarning", "config_name",
           "new_run_dir", "scale_epoch", "scale_schedule", "schedule_warning"]
