"""Config files: YAML presets and files with ``base:`` inheritance, and a run's saved ``config.yaml``.

A config file may name anything, so its errors name the file and the problem but never quote its
content (``ducat train /etc/shadow`` must not print a line of it): YAML errors give a position, an
unknown key its index, a bad value its ``section.key`` and the expected type. Known section names
are named. Values given on the command line are the user's own text and are echoed.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from ducat.config.checks import validate
from ducat.config.families import family_names, family_text, generated_presets
from ducat.config.schedule import ScheduleWarning, scale_schedule, schedule_warning
from ducat.config.schema import ConfigError, TrainConfig, _BadValue, apply_override, parse_override

# Top-level keys of a config file that are not sections: ``base:`` (inheritance, resolved by
# _load_mapping), ``provenance:`` (versions and command line, written with a run's config.yaml) and ``presets:``
# (a family's models, read by ducat.config.families).
IGNORED_KEYS = ("base", "provenance", "presets")


def _merge_mapping(config: TrainConfig, mapping: dict[str, Any], source: str) -> None:
    """Apply a parsed config file to ``config``. Errors name ``source`` and never quote the file's keys
    or values (``ducat train /etc/shadow`` must not print a line of it); known section names are named."""
    sections = [f.name for f in fields(TrainConfig)]
    for index, (section, values) in enumerate(mapping.items(), 1):
        if section in IGNORED_KEYS:
            continue
        if section not in sections:
            raise ConfigError(f"{source}: top-level key #{index} is not a config section; sections are: "
                              f"{', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of key: value")
        keys = [f.name for f in fields(getattr(config, section))]
        for key_index, (key, value) in enumerate(values.items(), 1):
            if key not in keys and section != "method":  # the method's hyperparameters: see resolve_method
                raise ConfigError(f"{source}: key #{key_index} of section '{section}' is not a config key; "
                                  f"keys of '{section}': {', '.join(keys)}")
            try:
                apply_override(config, section, key, value)
            except _BadValue as exc:
                raise ConfigError(f"{source}: {exc.problem}") from None


def preset_names() -> list[str]:
    """Every preset: the families shipped as YAML and the presets generated from them
    (:mod:`ducat.config.families`)."""
    return sorted([*family_names(), *generated_presets()])


def base_presets() -> set[str]:
    """Presets that other presets name in ``base:``: the family recipes, inherited from rather than run."""
    bases = {mapping["base"] for mapping in generated_presets().values()}
    for name in family_names():
        base = _parse_yaml(family_text(name), f"preset {name}").get("base")
        if isinstance(base, str):
            bases.add(base[:-5] if base.endswith(".yaml") else base)
    return bases


def _read_text(path: Path) -> str:
    """The UTF-8 text of a config file; ConfigError naming the file (never its content) otherwise."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config file '{path}': not UTF-8 text (bad byte at offset {exc.start})"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{path}' ({exc.strerror or type(exc).__name__})") from None


def _parse_yaml(text: str, label: str) -> dict[str, Any]:
    """The mapping in a config file's text. YAML's own messages quote the offending line, so errors give
    only its position."""
    try:
        mapping = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{label}: not valid YAML{where}") from None
    except RecursionError:
        raise ConfigError(f"{label}: not valid YAML (nested too deeply)") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError):  # e.g. a date or an int YAML cannot build
        raise ConfigError(f"{label}: not valid YAML (a value cannot be read)") from None
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{label}: a config must be a mapping of sections")
    return mapping


def _resolve_file(name_or_path: str, relative_to: Path | None = None, referrer: str | None = None) -> tuple[str, str]:
    """(text, label) of a config given as a path or a preset name. ``referrer``: the file whose ``base:``
    names it (then the name is file content and is not echoed)."""
    candidates = [Path(name_or_path)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name_or_path)
    for path in candidates:
        if path.is_file():
            return _read_text(path), str(path)
    stem = Path(name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path).name
    text = family_text(stem)
    if text is None and stem in (generated := generated_presets()):
        text = yaml.safe_dump(generated[stem], sort_keys=False)
    if text is not None:
        return text, f"preset {stem}"
    if referrer is not None:
        raise ConfigError(f"{referrer}: its base: names no config file or preset")
    raise ConfigError(f"no config file or preset named '{name_or_path}' (list presets with: ducat presets)")


def _load_mapping(name_or_path: str, relative_to: Path | None = None, depth: int = 0,
                  referrer: str | None = None) -> list[tuple[dict, str]]:
    """The (mapping, label) chain of a config and its ``base:`` ancestors, the farthest ancestor first."""
    if depth > 10:
        raise ConfigError(f"{referrer}: the 'base:' chain is more than 10 files deep (a loop?)")
    text, label = _resolve_file(name_or_path, relative_to, referrer)
    mapping = _parse_yaml(text, label)
    chain = []
    if "base" in mapping:
        base = mapping["base"]
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{label}: base: must be a preset name or a file path")
        here = Path(label).parent if not label.startswith("preset ") else None
        chain = _load_mapping(base, here, depth + 1, referrer=label)
    return chain + [(mapping, label)]


def new_run_dir(name: str, root: Path = Path("runs")) -> str:
    """``root/<name>-<YYYYmmdd-HHMMSS>`` (local time), with ``-2``, ``-3``, ... appended while that path
    exists: a run directory that no earlier run used."""
    base = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return str(path)


def config_name(name_or_path: str | None) -> str:
    """What a run of this config is named after: the preset name or the YAML file's stem ("run" for none)."""
    return Path(name_or_path).stem if name_or_path else "run"


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None,
                epochs: int | None = None) -> TrainConfig:
    """Build a validated config from a preset name or YAML path (or defaults) plus overrides.

    ``epochs``: rescale the preset's schedule to that many epochs (:func:`~ducat.config.schedule.scale_schedule`)
    before the overrides, so explicit overrides win. ``run.out`` left unset becomes :func:`new_run_dir`
    of :func:`config_name`. A milestone that never acts gives a :class:`ScheduleWarning` (one line)."""
    config = TrainConfig()
    if name_or_path:
        for mapping, label in _load_mapping(name_or_path):
            _merge_mapping(config, mapping, label)
    if epochs is not None:
        scale_schedule(config, epochs)
    for text in overrides or []:
        apply_override(config, *parse_override(text))
    validate(config)
    if config.run.out is None:
        config.run.out = new_run_dir(config_name(name_or_path))
    message = schedule_warning(config)
    if message:
        warnings.warn(message, ScheduleWarning, stacklevel=2)
    return config


def config_from_dict(mapping: dict[str, Any], source: str = "saved config") -> TrainConfig:
    """Rebuild a config saved with a run (``config.yaml`` or inside a checkpoint); ``source`` names it in errors."""
    config = TrainConfig()
    _merge_mapping(config, mapping, source)
    validate(config)
    if config.run.out is None:
        config.run.out = new_run_dir(config_name(None))
    return config


def load_run_config(run_dir: Path, overrides: list[str]) -> TrainConfig:
    """The validated config of the run in ``run_dir`` (its ``config.yaml``) to resume it: only ``run.*``
    ``overrides`` are allowed (the rest must match the checkpoints), and ``run.out`` becomes ``run_dir``."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"nothing to resume: '{run_dir}' has no config.yaml")
    label = f"the saved config '{path}'"
    mapping = _parse_yaml(_read_text(path), label)
    if not mapping:
        raise ConfigError(f"{label} is empty")
    config = TrainConfig()
    _merge_mapping(config, mapping, label)
    for text in overrides:
        section, key, value = parse_override(text)
        if section != "run":
            raise ConfigError(f"resuming keeps the saved config; only run.* overrides are allowed, got '{text}'")
        apply_override(config, section, key, value)
    config.run.out = str(run_dir)
    validate(config)
    return config
