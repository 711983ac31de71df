"""Presets: the family recipes shipped as YAML (``ducat/configs/<family>.yaml``) and the presets generated from them.

A family file is a recipe (dataset, schedule, attack, optimizer) and, under ``presets: {models: [...]}``, the
models it is run with. Every family gives one preset per model, registered training method
(``ducat.objectives.METHODS``) and variant, named ``<family>-<model>-<method><variant>``:

- no suffix: the base method (``ducat.enabled: false``);
- ``-ducat``: the method with DUCAT;
- ``-toy``: the paper's hard-label toy case, DUCAT with ``beta1 = beta2 = 1``.

A generated preset is the mapping ``{base: <family>, model: {name}, method: {name}, ducat: {...}}``, read like a
file, so a new method or a model added to a family's list gives its presets with no file written.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

PRESET_PACKAGE = "ducat.configs"
VARIANTS: dict[str, dict[str, Any]] = {"": {"enabled": False}, "-ducat": {"enabled": True},
                                       "-toy": {"enabled": True, "beta1": 1.0, "beta2": 1.0}}


def family_names() -> list[str]:
    """The families shipped with ducat: the YAML files of :data:`PRESET_PACKAGE`, without ``.yaml``."""
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def family_text(name: str) -> str | None:
    """The YAML text of family ``name``, None when there is no such family."""
    path = resources.files(PRESET_PACKAGE) / f"{name}.yaml"
    return path.read_text() if path.is_file() else None


def generated_presets() -> dict[str, dict[str, Any]]:
    """Every generated preset: name -> the mapping it stands for (see the module docstring)."""
    from ducat.objectives import METHODS  # torch: the config package loads before the CLI sets torch's runtime

    presets = {}
    for family in family_names():
        recipe = yaml.safe_load(family_text(family)) or {}
        for model in (recipe.get("presets") or {}).get("models", []):
            for method in METHODS:
                for suffix, ducat in VARIANTS.items():
                    presets[f"{family}-{model}-{method}{suffix}"] = {
                        "base": family, "model": {"name": model}, "method": {"name": method}, "ducat": dict(ducat)}
    return presets
