"""What a user meets first: shortening a preset, the schedule warning, run directories, the L2 threat model,
the presets table and its cost model, --threads, --version, interrupts, progress output, ``ducat plot``."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from ducat.cli import main
from ducat.config import (
    ConfigError,
    ScheduleWarning,
    config_name,
    load_config,
    new_run_dir,
    scale_schedule,
    validate,
)

# a few seconds per run: 100 digits images, 1-step attacks; no optim.* (each test sets its schedule)
TINY = ["data.n_train=100", "data.batch_size=50", "attack.steps=1", "validation.pgd_steps=1",
        "validation.n_examples=20", "run.progress=false", "run.tensorboard=false"]
DIGITS = "cpu-digits-small_cnn-pgd_at-ducat"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("ducat: error: ") and err.count("\n") == 1, err
    return err


# --- shortening a preset: --epochs N ----------------------------------------------------------------------

@pytest.mark.parametrize("preset", [DIGITS, "cpu-fmnist-small_cnn-trades-ducat", "paper-cifar10-resnet18-mart-ducat"])
def test_scaled_schedule_keeps_order_range_and_proportions(preset):
    original = load_config(preset, ["run.out=x", "run.save_epochs=[5, 20]"])
    old = original.optim.epochs
    for n in range(1, 2 * old + 1):
        config = load_config(preset, ["run.out=x", "run.save_epochs=[5, 20]"])
        scale_schedule(config, n)
        validate(config)  # a valid config at every length
        o, start = config.optim, config.ducat.start_epoch
        assert o.epochs == n and o.milestones == sorted(o.milestones)
        assert all(1 <= m <= n - 1 for m in o.milestones) and 1 <= start <= n
        assert len(o.milestones) == (len(original.optim.milestones) if n > 1 else 0)
        for before, after, last in [*zip(original.optim.milestones, o.milestones, [n - 1] * 9),
                                    (original.ducat.start_epoch, start, n)]:
            exact = before * n / old  # rounded to the nearest epoch unless clamped into [1, last]
            assert abs(after - exact) <= 0.5 or after in (1, last), (n, before, after)
        assert config.run.save_epochs == sorted(set(config.run.save_epochs))
        assert all(1 <= e <= n for e in config.run.save_epochs)


def test_scaling_to_the_same_length_changes_nothing():
    config = load_config(DIGITS, ["run.out=x"])
    before = config.to_dict()
    scale_schedule(config, config.optim.epochs)
    assert config.to_dict() == before


def test_scaled_digits_schedule_is_the_documented_one():
    """The examples in ducat.config.schedule's docstring: 25*10/30 = 8.3 -> 8, 28*10/30 = 9.3 -> 9, 22*10/30 = 7.3
    -> 7; at 12 epochs 10, 11.2 -> 11, 8.8 -> 9."""
    ten = load_config(DIGITS, epochs=10)
    assert (ten.optim.milestones, ten.ducat.start_epoch) == ([8, 9], 7)
    twelve = load_config(DIGITS, epochs=12)
    assert (twelve.optim.milestones, twelve.ducat.start_epoch) == ([10, 11], 9)


def test_overrides_win_over_the_scaled_schedule():
    config = load_config(DIGITS, ["ducat.start_epoch=3", "optim.milestones=[4]"], epochs=10)
    assert config.optim.epochs == 10 and config.ducat.start_epoch == 3 and config.optim.milestones == [4]


def test_bad_epochs_is_refused():
    with pytest.raises(ConfigError, match="--epochs must be an integer >= 1"):
        load_config(DIGITS, epochs=0)


@pytest.mark.parametrize("args, needle", [
    (["train", DIGITS, "--epochs", "0"], "--epochs must be >= 1"),
    (["train", DIGITS, "--epochs", "5", "optim.epochs=5"], "not both"),
    (["train", "--resume", "/no/such/run", "--epochs", "5"], "--epochs cannot change a run being resumed"),
    (["quickstart", "--epochs", "-1"], "--epochs must be >= 1"),
    (["train", DIGITS, "optim.epochs=5"], "use --epochs N instead"),  # DUCAT start 22 past the end: says how
])
def test_epochs_misuse_is_one_line(args, needle, capsys):
    assert main(args) == 2
    assert needle in one_line_error(capsys)


def test_a_shortened_run_decays_its_lr_and_runs_ducat(tmp_path, capsys):
    """``ducat train PRESET --epochs 4``: milestones 25, 28 of 30 -> 3, 3 (4 would never act), DUCAT 22 -> 3."""
    assert main(["train", DIGITS, "--epochs", "4", f"run.out={tmp_path}", *TINY]) == 0
    assert capsys.readouterr().err == ""  # no schedule warning
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["lr"] == rows[2]["lr"] == 0.05 and rows[3]["lr"] == pytest.approx(0.05 * 0.1 ** 2)
    assert [r["ducat_active"] for r in rows] == [False, False, True, True]


# --- the milestone warning --------------------------------------------------------------------------------

def test_a_milestone_past_the_end_warns_in_one_line():
    with pytest.warns(ScheduleWarning) as caught:
        load_config("cpu-digits-small_cnn-pgd_at", ["optim.epochs=12", "run.out=x"])
    (warning,) = caught
    message = str(warning.message)
    assert "[25, 28]" in message and "(12)" in message and "--epochs" in message and "\n" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scaled schedule and the preset itself warn about nothing
        load_config("cpu-digits-small_cnn-pgd_at", ["run.out=x"], epochs=12)
        load_config("cpu-digits-small_cnn-pgd_at", ["run.out=x"])


def test_the_cli_prints_the_warning_once_before_training(tmp_path, capsys):
    args = ["train", "cpu-digits-small_cnn-pgd_at", "optim.epochs=2", "optim.milestones=[1, 2]",
            f"run.out={tmp_path / 'a'}", *TINY]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert err == "ducat: warning: optim.milestones [2] are at or past the last epoch (2) and never decay the lr; " \
                  "to shorten a preset with its schedule use --epochs N instead of optim.epochs\n"
    assert "training cpu-digits-small_cnn-pgd_at (2 epochs)" in out
    # bad input found after the config loaded (a checkpoint of another model): the error line alone
    assert main([*args[:4], "model.name=preact_resnet18", f"finetune.checkpoint={tmp_path / 'a' / 'last.pt'}",
                 f"run.out={tmp_path / 'b'}", *TINY]) == 2
    assert "does not fit the model" in one_line_error(capsys)


# --- run directories ----------------------------------------------------------------------------------------

def test_default_run_directory_is_named_after_the_config_and_never_reused(tmp_path, monkeypatch):
    import ducat.config.files as files

    monkeypatch.setattr(files.time, "strftime", lambda fmt: "20260102-030405")
    first = new_run_dir("cpu-digits", tmp_path)
    assert first == str(tmp_path / "cpu-digits-20260102-030405")
    Path(first).mkdir()
    second = new_run_dir("cpu-digits", tmp_path)
    assert second == first + "-2"
    Path(second).mkdir()
    assert new_run_dir("cpu-digits", tmp_path) == first + "-3"
    assert config_name("some/dir/my-recipe.yaml") == "my-recipe" and config_name(DIGITS) == DIGITS


def test_default_run_out_for_a_preset_and_a_yaml_file(tmp_path):
    assert re.fullmatch(rf"runs/{DIGITS}-\d{{8}}-\d{{6}}(-\d+)?", load_config(DIGITS).run.out)
    recipe = tmp_path / "my-recipe.yaml"
    recipe.write_text(f"base: {DIGITS}\noptim: {{lr: 0.01}}\n")
    assert re.fullmatch(r"runs/my-recipe-\d{8}-\d{6}(-\d+)?", load_config(str(recipe)).run.out)
    assert load_config(DIGITS, [f"run.out={tmp_path}"]).run.out == str(tmp_path)


def test_two_runs_without_run_out_get_two_directories(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", "cpu-digits-small_cnn-pgd_at", "--epochs", "1", *TINY]
    assert main(args) == 0 and main(args) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("cpu-digits-small_cnn-pgd_at-") for r in runs)
    assert all((r / "summary.json").is_file() for r in runs)
    assert capsys.readouterr().out.count("into runs/cpu-digits-small_cnn-pgd_at-") == 2


# --- the L2 threat model in training ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["pgd_at", "trades", "mart", "consistency"])
def test_an_l2_training_attack_stays_in_its_l2_ball(method):
    from ducat.objectives.base import StepOutput
    from ducat.train.setup import build_model, build_objective

    eps = 0.5
    config = load_config(f"cpu-digits-small_cnn-{method}-ducat", ["run.out=x", "attack.norm=L2", f"attack.eps={eps}",
                                                                   "attack.step_size=0.2", "attack.steps=5"])
    model = build_model(config, False, print)
    objective = build_objective(config, torch.Generator().manual_seed(0))
    x = torch.rand(16, 1, 8, 8)
    y = torch.arange(16) % 10
    crafted = []
    original_craft = objective.craft

    def recording_craft(model, x_in, y_in):
        x_adv = original_craft(model, x_in, y_in)
        crafted.append((x_in, x_adv))
        return x_adv

    objective.craft = recording_craft
    assert isinstance(objective(model, x, y, ducat_active=True, augment=lambda t: t), StepOutput)
    (x_in, x_adv), = crafted
    delta = (x_adv - x_in).flatten(1)
    assert (delta.norm(dim=1) <= eps + 1e-5).all()
    assert delta.norm(dim=1).max() > eps / 2  # it moved: not a zero attack
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_validation_attacks_with_the_training_norm(monkeypatch):
    import ducat.train.validate as validate_module
    from ducat.data import load_split
    from ducat.train import validate_model
    from ducat.train.setup import build_model

    norms = []
    real_pgd = validate_module.PGD

    def recording_pgd(*args, **kwargs):
        norms.append(kwargs.get("norm"))
        return real_pgd(*args, **kwargs)

    monkeypatch.setattr(validate_module, "PGD", recording_pgd)
    config = load_config(DIGITS, ["run.out=x", "attack.norm=L2", "attack.eps=0.5", "validation.pgd_steps=2"])
    data = load_split("digits", None, train=False).subset(torch.arange(20))
    metrics = validate_model(build_model(config, False, print), data, config)
    assert norms == ["L2"] and 0 <= metrics["pgd_acc"] <= metrics["clean_acc"]


def test_attack_norm_is_checked(capsys):
    assert main(["train", DIGITS, "attack.norm=L1"]) == 2
    assert "unknown attack.norm 'L1'; choose one of: Linf, L2" in one_line_error(capsys)
