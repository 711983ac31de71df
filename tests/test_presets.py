"""Presets are generated from the family recipes (family x model x method x {plain, DUCAT, toy}); every preset
name that existed as a YAML file resolves to the same config as it did then; a method is one registered class."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.nn.functional as F

from ducat.config import ConfigError, config_from_dict, load_config, preset_names
from ducat.config.families import family_names
from ducat.objectives import METHODS, Objective, StepOutput, register_method
from ducat.presets import step_cost

BEFORE = Path(__file__).parent / "data" / "presets_before.json"  # every preset's config, written at 31f8ff2


def test_every_preset_of_before_resolves_to_the_same_config():
    """The 77 preset files of 31f8ff2 (5 families, 72 presets) as their configs resolved then, against the
    presets generated now. Method hyperparameters were saved under legacy flat keys (``trades_beta``); reading
    the old config maps them to the method's own fields, and every value must survive."""
    before = json.loads(BEFORE.read_text())
    assert len(before) == 77 and set(before) <= set(preset_names())
    for name, old in before.items():
        now = load_config(name, ["run.out=/runs/x"]).to_dict()
        assert config_from_dict(old).to_dict() == now, name
        assert {k: v for k, v in now.items() if k != "method"} == {k: v for k, v in old.items() if k != "method"}
        method = now["method"]["name"]
        legacy = {k.split("_", 1)[1] if k != "consistency_lambda" else "lam": v for k, v in old["method"].items()
                  if k.startswith(f"{method}_")}
        assert legacy == {k: v for k, v in now["method"].items() if k != "name"}, name  # e.g. trades_beta -> beta


def test_only_family_recipes_are_files_and_every_product_is_a_preset():
    families = family_names()
    assert families == ["cpu-digits", "cpu-fmnist", "paper-cifar10", "paper-cifar100", "paper-tinyimagenet"]
    names = set(preset_names())
    for family, models in (("cpu-fmnist", ["small_cnn"]), ("paper-tinyimagenet", ["resnet18", "wrn28_10"])):
        for model in models:
            for method in METHODS:
                assert {f"{family}-{model}-{method}{s}" for s in ("", "-ducat", "-toy")} <= names
    toy = load_config("cpu-digits-small_cnn-trades-toy", ["run.out=/x"])
    assert toy.ducat.enabled and toy.ducat.beta1 == toy.ducat.beta2 == 1.0 and toy.method.name == "trades"


@dataclass(frozen=True)
class ToyParams:
    weight: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= 1:
            raise ValueError(f"method.weight must be in [0, 1], got {self.weight}")


class ToyMethod(Objective):
    """CE on a mix of the clean and the adversarial batch: a method declared in this file alone."""

    name, label, Params, extra_forwards = "toymix", "Toy mix", ToyParams, 2

    def __call__(self, model, x, y, *, ducat_active, augment):
        logits_clean, logits_adv = self.clean_and_adversarial(model, augment(x), y)
        w = self.params.weight
        loss = w * F.cross_entropy(logits_clean, y) + (1 - w) * F.cross_entropy(logits_adv, y)
        return StepOutput(loss, logits_clean.detach(), logits_adv.detach())


@pytest.fixture
def toy_method():
    register_method(ToyMethod)
    yield ToyMethod
    METHODS.pop(ToyMethod.name)


def test_a_method_declared_in_one_class_has_presets_config_keys_a_cost_and_trains(toy_method, tmp_path):
    from ducat.train import train

    assert "cpu-digits-small_cnn-toymix-ducat" in preset_names()  # presets of every family
    config = load_config("cpu-digits-small_cnn-toymix", ["method.weight=0.25", f"run.out={tmp_path / 'run'}",
                                                         "data.n_train=60", "optim.epochs=1", "optim.milestones=[]",
                                                         "attack.steps=1", "validation.pgd_steps=1",
                                                         "run.progress=false", "run.tensorboard=false"])
    assert config.method.params == {"weight": 0.25} and config.to_dict()["method"] == {"name": "toymix",
                                                                                      "weight": 0.25}
    assert step_cost("toymix", 10, ducat_active=False) == (28, 24)  # 2K + 6 forward-equivalents + its 2 extra
    with pytest.raises(ConfigError, match=r"method.weight must be in \[0, 1\], got 2.0"):
        load_config("cpu-digits-small_cnn-toymix", ["method.weight=2", "run.out=/x"])
    with pytest.raises(ConfigError, match="unknown key method.beta of method toymix; its keys: name, weight"):
        load_config("cpu-digits-small_cnn-toymix", ["method.beta=2", "run.out=/x"])
    result = train(config, log=lambda s: None)
    assert result is not None and result.epochs == 1


def test_legacy_method_keys_read_as_the_methods_own_and_refused_for_another_method():
    assert load_config("cpu-digits-small_cnn-mart", ["method.mart_beta=3", "run.out=/x"]).method.params == {
        "beta": 3.0, "exclude_dummy": True}
    with pytest.raises(ConfigError, match="method.trades_beta is a hyperparameter of method trades, not of mart"):
        load_config("cpu-digits-small_cnn-mart", ["method.trades_beta=3", "run.out=/x"])
