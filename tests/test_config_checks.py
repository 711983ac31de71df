"""Config checks that must fire before any data is read, config-file errors that never echo the file, and
the config API the CLI builds on (``load_run_config``, ``apply_override``, ``parse_fraction``).

Each check here was a probe finding: the value passed validation and failed later with a traceback
(ZeroDivisionError, RuntimeError, OverflowError), or the error quoted a line of a file that is not a config.
"""

from __future__ import annotations

import io
import math
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from ducat.cli import main
from ducat.config import (
    ConfigError,
    apply_override,
    config_from_dict,
    describe,
    load_config,
    load_run_config,
    parse_fraction,
)
from ducat.data import dataset_info, load_split, random_crop_flip, split_train_val

PRESET = "cpu-digits-small_cnn-pgd_at-ducat"
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def refused(overrides: list[str], *needles: str) -> str:
    """The one-line ConfigError ``load_config(PRESET, overrides)`` raises; it must contain ``needles``."""
    with pytest.raises(ConfigError) as info:
        load_config(PRESET, overrides)
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


def cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


@pytest.fixture
def no_data(monkeypatch):
    """Reading the digits (the preset's dataset) fails the test: the checks must fire before."""
    import sklearn.datasets

    def no_reading(*args, **kwargs):
        raise AssertionError("data was read before the config was refused")

    monkeypatch.setattr(sklearn.datasets, "load_digits", no_reading)


# ---- split sizes -------------------------------------------------------------------------------------

def test_a_split_with_no_training_images_is_refused_before_any_data_is_read(no_data, tmp_path):
    refused(["data.val_fraction=0.99", "data.n_train=20"], "data.val_fraction=0.99", "no training images")
    code, err = cli(["train", PRESET, "data.val_fraction=0.99", "data.n_train=20", f"run.out={tmp_path / 'r'}"])
    assert code == 2 and err.startswith("ducat: error: ") and err.count("\n") == 1, err


def test_an_empty_validation_split_is_refused_unless_val_fraction_is_0(no_data):
    refused(["data.val_fraction=0.01", "data.n_train=20"], "empty validation split")  # round(0.2) = 0
    load_config(PRESET, ["data.val_fraction=0", "data.n_train=20", "validation.select=last"])
    load_config(PRESET, ["data.val_fraction=0.05", "data.n_train=20"])  # round(1.0) = 1


@pytest.mark.parametrize("n_train", [1, 2, 3, 20, 1437, 5000])
@pytest.mark.parametrize("val_fraction", [0.01, 0.025, 0.05, 0.5, 0.95, 0.975, 0.99])
def test_split_check_agrees_with_the_real_split(n_train, val_fraction):
    """validate accepts exactly the settings whose real split of digits has both parts non-empty."""
    full = load_split("digits", None, train=True)
    train, val = split_train_val(full.subset(torch.arange(min(n_train, len(full)))), val_fraction, seed=0)
    try:
        load_config(PRESET, [f"data.n_train={n_train}", f"data.val_fraction={val_fraction}"])
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted == (len(train) > 0 and len(val) > 0), (len(train), len(val))


def test_dataset_train_sizes_are_the_real_ones():
    assert dataset_info("digits").train_size == len(load_split("digits", None, train=True))
    if not FASHION_ROOT.is_dir():
        pytest.skip(f"no Fashion-MNIST files in {FASHION_ROOT}")
    assert dataset_info("FashionMNIST").train_size == len(load_split("FashionMNIST", str(FASHION_ROOT), train=True))


# ---- crop padding, learning-rate schedule, run directory ---------------------------------------------

def test_crop_padding_is_bounded_by_the_image_size(no_data):
    refused(["data.crop_padding=100000000"], "data.crop_padding", "[0, 8]", "digits")
    refused(["data.crop_padding=9"], "data.crop_padding")
    assert load_config(PRESET, ["data.crop_padding=8"]).data.crop_padding == 8


def test_the_largest_allowed_crop_padding_augments_real_images():
    images = load_split("digits", None, train=True).images[:16].float() / 255
    out = random_crop_flip(images, padding=8, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("overrides", [
    ["optim.gamma=1e308"],                                                 # lr * gamma overflows to inf
    ["optim.gamma=1e200"],                                                 # gamma ** 2 raises OverflowError
    ["optim.lr=1e-300", "optim.gamma=1e300", "optim.milestones=[1, 2]"],   # lr finite, gamma ** 2 is not
    ["optim.gamma=1e-320"],                                                # lr * gamma underflows to 0
    ["optim.gamma=1e308", "optim.milestones=[2]"],  # lr * gamma = 5e306: a float64, not a float32 (probe's case)
    ["optim.lr=1e-40"],                                                    # not a normal float32 either
])
def test_a_schedule_with_a_non_finite_or_zero_learning_rate_is_refused(no_data, overrides):
    refused(overrides, "optim.gamma", "finite positive")


def test_the_largest_accepted_learning_rate_trains_without_a_traceback(tmp_path):
    """lr * gamma = 3e38 (float32 max 3.4e38) is accepted; the weights then overflow, which the trainer
    reports in one line (non-finite loss) instead of torch failing to convert the lr."""
    code, err = cli(["train", PRESET, f"run.out={tmp_path / 'r'}", "optim.lr=0.05", "optim.gamma=6e39",
                     "optim.milestones=[1]", "optim.epochs=2", "ducat.start_epoch=1", "data.n_train=100",
                     "attack.steps=1", "validation.pgd_steps=1", "validation.n_examples=20", "run.progress=false",
                     "run.tensorboard=false"])
    assert code == 2 and err.count("\n") == 1 and "non-finite loss" in err, err


def test_schedules_with_finite_learning_rates_are_accepted():
    for overrides in (["optim.gamma=0.1"], ["optim.gamma=2"], ["optim.gamma=1e30", "optim.milestones=[1]"]):
        o = load_config(PRESET, overrides).optim
        assert all(math.isfinite(o.lr * o.gamma ** k) and o.lr * o.gamma ** k > 0
                   for k in range(len(o.milestones) + 1))


def test_run_out_that_is_a_file_or_under_one_is_refused(no_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused([f"run.out={blocker}"], str(blocker), "not a directory")
    refused([f"run.out={blocker / 'sub' / 'run'}"], str(blocker), "not a directory")
    load_config(PRESET, [f"run.out={tmp_path / 'new' / 'run'}"])
    load_config(PRESET, [f"run.out={tmp_path}"])


# ---- config files: errors name the file, never its content -------------------------------------------

LEAKY_FILES = {
    "shadow": b"root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nSECRETuser:$6$SECRET:19000:0:99999:7:::\n",
    "unknown-section": b"SECRET_TOKEN: SECRETvalue\n",
    "unknown-key": b"data:\n  SECRETkey: 1\n",
    "bad-value": b"data:\n  batch_size: SECRETvalue\n",
    "bad-float": b"attack:\n  eps: SECRET/255\n",
    "section-not-mapping": b"data: SECRETvalue\n",
    "yaml-syntax": b'data:\n  root: "SECRET\n',
    "yaml-tag": b"data: !!python/object:SECRET {}\n",
    "base-unknown": b"base: SECRETbase\n",
    "base-list": b"base: [SECRET]\n",
    "not-utf8": b"SECRET: \xff\xfe\n",
    "nested": b"[" * 100000,
    "huge-int": b"data:\n  batch_size: " + b"9" * 5000 + b"\n",
    "bad-date": b"data:\n  root: 2001-02-30\n",
}


@pytest.mark.parametrize("case", sorted(LEAKY_FILES))
def test_config_file_errors_name_the_file_and_never_echo_its_content(no_data, tmp_path, case):
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(LEAKY_FILES[case])
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for leaked in ("SECRET", "daemon", "19000", "0xff", "9999"):
        assert leaked not in message, message
    code, err = cli(["train", str(path)])
    assert code == 2 and err.count("\n") == 1 and "SECRET" not in err, err


def test_file_errors_still_say_what_is_wrong_and_overrides_still_echo_the_users_value(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(f"base: {PRESET}\ndata:\n  batch_size: 64\n  batchsize: 1\n")
    with pytest.raises(ConfigError, match=r"key #2 of section 'data' is not a config key; keys of 'data': dataset"):
        load_config(str(path))
    path.write_text("data:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: data.batch_size must be an integer$"):
        load_config(str(path))
    path.write_text("data:\n  batch_size: [1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3, column 1$"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"data.batch_size must be an integer, got 'many'"):
        load_config(PRESET, ["data.batch_size=many"])  # the user's own text: echoed


# ---- the API the CLI builds on -------------------------------------------------------------------------

def test_parse_fraction_and_apply_override():
    assert parse_fraction("8/255", "attack.eps") == 8 / 255 and parse_fraction("0.5", "x") == 0.5
    with pytest.raises(ConfigError, match="--eps must be a number or a fraction"):
        parse_fraction("1/0", "--eps")
    config = load_config(PRESET)
    apply_override(config, "optim", "epochs", 7)
    apply_override(config, "attack", "eps", "4/255")  # as parse_override leaves fractions: text
    assert config.optim.epochs == 7 and config.attack.eps == 4 / 255
    with pytest.raises(ConfigError, match="unknown config key 'optim.epoch'"):
        apply_override(config, "optim", "epoch", 1)


def saved_run(run_dir: Path, provenance: bool = True) -> Path:
    """A run directory with a config.yaml as a run writes it (optionally with a provenance section)."""
    run_dir.mkdir(parents=True)
    text = describe(load_config(PRESET, ["data.n_train=200", "run.out=/somewhere/else"]))
    if provenance:
        text += "provenance:\n  ducat: 0.1.0\n  command: [ducat, train]\n"
    (run_dir / "config.yaml").write_text(text)
    return run_dir


def test_load_run_config_reads_the_saved_config_for_a_resume(tmp_path):
    run_dir = saved_run(tmp_path / "run")
    config = load_run_config(run_dir, ["run.threads=1", "run.progress=false"])
    assert config.run.out == str(run_dir) and config.run.threads == 1 and not config.run.progress
    assert config.data.n_train == 200
    with pytest.raises(ConfigError, match="only run.\\* overrides are allowed, got 'optim.epochs=3'"):
        load_run_config(run_dir, ["optim.epochs=3"])
    with pytest.raises(ConfigError, match="nothing to resume"):
        load_run_config(tmp_path / "missing", [])


@pytest.mark.parametrize("content", [b"", b"[1, 2", b"- a\n- b", b"\xff\xfeSECRET", b"42", b"data: 5",
                                     b"SECRET: {a: 1}", b"optim: {epochs: -1}"])
def test_load_run_config_errors_are_one_line_naming_the_file(tmp_path, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_run_config(run_dir, [])
    message = str(info.value)
    assert "\n" not in message and "SECRET" not in message, message
    assert str(run_dir / "config.yaml") in message or content == b"optim: {epochs: -1}", message


def test_a_top_level_provenance_section_is_ignored_like_base(tmp_path):
    path = tmp_path / "with-provenance.yaml"
    path.write_text(f"base: {PRESET}\nprovenance:\n  torch: 2.14.1\noptim:\n  epochs: 33\n")
    assert load_config(str(path)).optim.epochs == 33
    assert config_from_dict({"provenance": {"argv": ["x"]}, "optim": {"epochs": 4}}).optim.epochs == 4


@pytest.mark.parametrize("override, key, expected", [("run.channels_last=on", "channels_last", "on"),
                                                      ("run.channels_last=off", "channels_last", "off"),
                                                      ("run.amp=off", "amp", "off")])
def test_on_and_off_stay_words_for_text_settings(override, key, expected):
    """YAML reads on/off as booleans; the settings that take the words must still get them."""
    assert getattr(load_config("cpu-digits-small_cnn-pgd_at", [override]).run, key) == expected
