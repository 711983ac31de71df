"""Models trained elsewhere: ``ducat eval --load MODULE:FUNCTION`` and the DUCAT authors' released "resnet18"
layout (``ducat.models.foreign``)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

from ducat.checkpoint import CheckpointError
from ducat.cli import main
from ducat.dummy import DummyClassModel
from ducat.models.foreign import authors_resnet18, load_authors_resnet18

MODELS = '''
import torch
from torch import nn


def _mlp(outputs):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, outputs))


def plain():
    return _mlp(10)


def dummy():
    return _mlp(20), list(range(10, 20))


def wrong_width():
    return _mlp(7)


def no_pairing():
    return _mlp(20)


def bad_pairing():
    return _mlp(20), [10] * 10


def raises():
    raise RuntimeError("no weights here")


not_a_function = 3
'''


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(textwrap.dedent(MODELS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_dummy_class_model_from_a_function_is_evaluated_under_both_protocols(models_dir):
    args = ["eval", "--load", "user_models:dummy", "--dataset", "digits", "--eps", "0.1", "--n-examples", "16",
            "--attacks", "pgd10,margin", "--no-checks", "--workers", "1", "--no-progress", "--out", "out"]
    assert main(args) == 0
    report = json.loads((models_dir / "out" / "report.json").read_text())
    protocols = {r["protocol"] for r in report["results"]}
    assert report["dummy_classes"] and report["dummy_index"] == list(range(10, 20))
    assert protocols == {"paper", "adaptive"} and report["worst_case"]["protocol"] == "adaptive"
    loaded = report["provenance"]["loaded"]
    assert loaded["function"] == "user_models:dummy" and loaded["module_file"].endswith("user_models.py")
    import hashlib

    assert loaded["sha256"] == hashlib.sha256((models_dir / "user_models.py").read_bytes()).hexdigest()
    assert main([*args[:2], "user_models.py:plain", *args[3:-1], "plain"]) == 0  # a file path, a C-class model
    assert not json.loads((models_dir / "plain" / "report.json").read_text())["dummy_classes"]


@pytest.mark.parametrize("load, extra, needle", [
    ("user_models:missing", [], "has no function 'missing'"),
    ("user_models:not_a_function", [], "has no function 'not_a_function'"),
    ("no_such_module:f", [], "cannot import 'no_such_module'"),
    ("user_models:raises", [], "raises() raised RuntimeError: no weights here"),
    ("user_models:wrong_width", [], "7 outputs; the dataset has 10 classes"),
    ("user_models:no_pairing", [], "20 outputs; the dataset has 10 classes"),
    ("user_models:bad_pairing", [], "dummy_index must pair each of the 10 classes"),
    ("user_models", [], "--load must be MODULE:FUNCTION"),
    ("user_models:plain", ["RUN"], "give no run directory"),
])
def test_bad_load_input_is_one_line_and_exit_2(load, extra, needle, models_dir, capsys):
    assert main(["eval", *extra, "--load", load, "--dataset", "digits", "--eps", "0.1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ducat: error: ") and err.count("\n") == 1, err
    assert needle in err


def test_load_needs_a_dataset_and_an_eps(models_dir, capsys):
    assert main(["eval", "--load", "user_models:plain", "--eps", "0.1"]) == 2
    assert "--load needs --dataset" in capsys.readouterr().err
    assert main(["eval", "--load", "user_models:plain", "--dataset", "digits"]) == 2
    assert "--load needs --eps" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "give a run directory or checkpoint, or --load" in capsys.readouterr().err


def authors_layout(classes: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A state dict with the keys and shapes of the authors' "resnet18" (random values), written from its
    description: a 3x3 stem of 64 channels, four stages of two Bottleneck blocks (planes 64, 128, 256, 512,
    expansion 4, 1x1-3x3-1x1 convs, a 1x1 conv + BatchNorm shortcut in each stage's first block), a 2C ``linear``
    head on the 2048 features."""
    def bn(prefix: str, channels: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + 0.1 * torch.randn(channels, generator=generator),
                f"{prefix}.bias": 0.1 * torch.randn(channels, generator=generator),
                f"{prefix}.running_mean": 0.1 * torch.randn(channels, generator=generator),
                f"{prefix}.running_var": 1 + torch.rand(channels, generator=generator),
                f"{prefix}.num_batches_tracked": torch.tensor(100)}

    def conv(out: int, inp: int, k: int) -> torch.Tensor:
        return torch.randn(out, inp, k, k, generator=generator) * (2 / (inp * k * k)) ** 0.5

    state = {"conv1.weight": conv(64, 3, 3), **bn("bn1", 64)}
    inp = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            state |= {f"{p}.conv1.weight": conv(planes, inp, 1), f"{p}.conv2.weight": conv(planes, planes, 3),
                      f"{p}.conv3.weight": conv(4 * planes, planes, 1), **bn(f"{p}.bn1", planes),
                      **bn(f"{p}.bn2", planes), **bn(f"{p}.bn3", 4 * planes)}
            if block == 0:
                state |= {f"{p}.shortcut.0.weight": conv(4 * planes, inp, 1), **bn(f"{p}.shortcut.1", 4 * planes)}
            inp = 4 * planes
    return state | {"linear.weight": 0.01 * torch.randn(2 * classes, 2048, generator=generator),
                    "linear.bias": torch.zeros(2 * classes)}


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The layout's function computed from the state dict alone (functional ops, BatchNorm in eval mode)."""
    def bn(t, prefix):
        return F.batch_norm(t, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], False)

    out = F.relu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1"))
    for stage in range(1, 5):
        for block in range(2):
            p, stride = f"layer{stage}.{block}", 2 if stage > 1 and block == 0 else 1
            h = F.relu(bn(F.conv2d(out, state[f"{p}.conv1.weight"]), f"{p}.bn1"))
            h = F.relu(bn(F.conv2d(h, state[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
            h = bn(F.conv2d(h, state[f"{p}.conv3.weight"]), f"{p}.bn3")
            skip = bn(F.conv2d(out, state[f"{p}.shortcut.0.weight"], stride=stride), f"{p}.shortcut.1") \
                if block == 0 else out
            out = F.relu(h + skip)
    return F.linear(F.avg_pool2d(out, 4).flatten(1), state["linear.weight"], state["linear.bias"])


def test_a_state_dict_of_the_authors_layout_loads_and_computes_their_function(tmp_path):
    state = authors_layout(10, torch.Generator().manual_seed(0))
    assert sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "tracked"))) \
        == sum(p.numel() for p in authors_resnet18(10).parameters())  # the same parameters, about 14.0M
    torch.save(state, tmp_path / "last.model")
    module, dummy_index = load_authors_resnet18(tmp_path / "last.model", 10)
    assert dummy_index.tolist() == list(range(10, 20))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = module.eval()(x), reference_forward(state, x)
    assert ours.shape == (2, 20) and torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert isinstance(DummyClassModel(module, dummy_index).projected()(x), torch.Tensor)
    with pytest.raises(CheckpointError, match="'net.fc.weight' has shape"):  # a CIFAR-100 head
        load_authors_resnet18(tmp_path / "last.model", 100)
    del state["layer4.1.conv3.weight"]  # not their layout
    torch.save(state, tmp_path / "other.model")
    with pytest.raises(CheckpointError, match="does not fit the model: 1 missing"):
        load_authors_resnet18(tmp_path / "other.model", 10)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from ducat.config import load_config
    from ducat.train import train

    out = tmp_path_factory.mktemp("tiny-run")
    train(load_config("cpu-digits-small_cnn-pgd_at-ducat", [
        f"run.out={out}", "data.n_train=200", "optim.epochs=2", "optim.milestones=[1]", "ducat.start_epoch=2",
        "attack.steps=2", "validation.pgd_steps=2", "validation.n_examples=40", "run.progress=false",
        "run.tensorboard=false"]), log=lambda s: None)
    return out


def test_the_surrogate_of_the_transfer_row_is_a_run(tiny_run, tmp_path, capsys):
    args = ["eval", str(tiny_run), "--attacks", "pgd10", "--n-examples", "10", "--no-progress", "--workers", "1",
            "--unbounded-examples", "0", "--unit-test-examples", "0", "--convergence-examples", "0",
            "--transfer-steps", "5"]
    assert main([*args, "--surrogate", str(tiny_run), "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["checks"]["transfer"]["source"] == "surrogate model (--surrogate)"
    assert report["provenance"]["surrogate"]["sha256"] == report["provenance"]["checkpoint"]["sha256"]
    assert "adaptive-transfer" in {r["id"] for r in report["results"]}
    capsys.readouterr()
    assert main([*args, "--surrogate", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ducat: error: ") and "does not exist" in err and err.count("\n") == 1
