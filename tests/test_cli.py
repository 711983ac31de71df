"""The command line: one clear line and exit code 2 for bad input, before any compute."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ducat.cli import main

TINY = ["data.n_train=100", "data.batch_size=50", "attack.steps=1", "validation.pgd_steps=1",
        "validation.n_examples=20", "run.progress=false", "run.tensorboard=false", "optim.epochs=1",
        "optim.milestones=[]", "ducat.start_epoch=1"]


@pytest.mark.parametrize("args, needle", [
    (["train", "cpu-digits-small_cnn-pgd_at", "data.dataset=imagenet22k"], "unknown dataset"),
    (["train", "cpu-digits-small_cnn-pgd_at", "model.name=vgg99"], "unknown model 'vgg99'"),
    (["train", "cpu-digits-small_cnn-pgd_at", "method.name=fgsm"], "unknown method 'fgsm'"),
    (["train", "cpu-digits-small_cnn-pgd_at-ducat", "ducat.beta1=1.5"], "ducat.beta1 must be in [0, 1]"),
    (["train", "cpu-digits-small_cnn-pgd_at-ducat", "ducat.beta2=-0.1"], "ducat.beta2 must be in [0, 1]"),
    (["train", "cpu-digits-small_cnn-pgd_at-ducat", "ducat.start_epoch=31"], "past the last epoch"),
    (["train", "cpu-digits-small_cnn-pgd_at", "attack.eps=-0.1"], "attack.eps must be >= 0"),
    (["train", "cpu-digits-small_cnn-pgd_at", "optim.epochs=abc"], "optim.epochs must be an integer"),
    (["train", "no-such-preset"], "no config file or preset named 'no-such-preset'"),
    (["train", "cpu-digits-small_cnn-pgd_at", "data.dataset=CIFAR10", "data.root=/nonexistent"], "/nonexistent"),
    (["train", "cpu-digits-small_cnn-pgd_at", "finetune.checkpoint=/no/such.pt"], "does not exist"),
    (["train", "--resume", "/no/such/run"], "nothing to resume"),
    (["train"], "give a preset name"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ducat: error: ") and err.count("\n") == 1, err
    assert needle in err


def test_wrong_shape_checkpoint(tmp_path, capsys):
    assert main(["train", "cpu-digits-small_cnn-pgd_at", f"run.out={tmp_path / 'a'}", *TINY]) == 0
    code = main(["train", "cpu-digits-small_cnn-pgd_at", "model.name=preact_resnet18", f"run.out={tmp_path / 'b'}",
                 f"finetune.checkpoint={tmp_path / 'a' / 'last.pt'}", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the model" in err and err.count("\n") == 1
    assert not (tmp_path / "b" / "last.pt").exists()


def test_existing_run_needs_resume(tmp_path, capsys):
    args = ["train", "cpu-digits-small_cnn-pgd_at-ducat", f"run.out={tmp_path}", *TINY]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert f"ducat train --resume {tmp_path}" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 0  # finished run: nothing left to do
    assert main(["train", "--resume", str(tmp_path), "ducat.beta1=0.1"]) == 2


def test_presets_listed(capsys):
    assert main(["presets"]) == 0
    names = capsys.readouterr().out.split()
    from ducat.objectives import METHODS

    for method in METHODS:
        for suffix in ("", "-ducat"):
            for data_model in ("paper-cifar10-resnet18", "paper-cifar100-wrn28_10", "paper-tinyimagenet-resnet18",
                               "cpu-fmnist-small_cnn", "cpu-digits-small_cnn"):
                assert f"{data_model}-{method}{suffix}" in names
    assert "paper-cifar10-resnet18-pgd_at-toy" in names


@pytest.mark.slow
def test_module_entry_point_trains(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ducat", "train", "cpu-digits-small_cnn-mart-ducat",
                           f"run.out={tmp_path}", *TINY], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "run written to" in done.stdout and (tmp_path / "summary.json").is_file()
