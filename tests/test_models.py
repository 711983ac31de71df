import functools

import pytest
import torch
from torch import nn

from ducat.models import MODEL_NAMES, ImageNormalizer, build_model, count_flops

CIFAR_NETS = ("resnet18", "preact_resnet18", "wrn28_10", "wrn34_10", "bottleneck_resnet18")


@functools.cache
def _model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes, in_channels).eval()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_names():
    assert set(MODEL_NAMES) == {*CIFAR_NETS, "small_cnn", "mlp"}


@pytest.mark.parametrize("name", CIFAR_NETS)
def test_cifar_output_shape(name):
    with torch.no_grad():
        out = _model(name)(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_tiny_imagenet_input():
    model = build_model("preact_resnet18", 200)
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 200)


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 32, 32), (1, 32, 32)])
def test_small_cnn_shapes(shape):
    model = build_model("small_cnn", 10, in_channels=shape[0])
    out = model(torch.rand(4, *shape))  # train mode: BN uses batch statistics
    assert out.shape == (4, 10)
    out.sum().backward()


def test_small_cnn_has_batchnorm_and_is_small():
    model = _model("small_cnn", 10, 1)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    assert _n_params(model) == 284_250
    assert count_flops(model, (1, 28, 28)) == 9_792_000


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", 11_173_962),
        ("preact_resnet18", 11_172_170),
        ("bottleneck_resnet18", 13_958_986),
        ("wrn28_10", 36_479_194),
        ("wrn34_10", 46_160_474),
    ],
)
def test_param_counts(name, expected):
    assert _n_params(_model(name)) == expected


def test_bottleneck_resnet18_feature_dim():
    assert _model("bottleneck_resnet18").net.fc.in_features == 2048
    assert _model("resnet18").net.fc.in_features == 512


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_last_linear_is_classifier(name):
    model = _model(name, 10, 1 if name in ("small_cnn", "mlp") else 3)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    last_name, last = linears[-1]
    assert last_name == "net.fc"
    assert last is model.net.fc
    assert last.out_features == 10


def test_builder_structure_and_identity_normalizer():
    model = build_model("small_cnn", 3, in_channels=2)
    assert [n for n, _ in model.named_children()] == ["normalizer", "net"]
    x = torch.rand(3, 2, 8, 8)
    assert torch.equal(model.normalizer(x), x)
    assert model.normalizer.mean.shape == (1, 2, 1, 1)


def test_normalizer_applies_mean_std():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    model = build_model("resnet18", 10, mean=mean, std=std)
    x = torch.rand(2, 3, 5, 5)
    manual = torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    torch.testing.assert_close(model.normalizer(x), manual)
    assert {"normalizer.mean", "normalizer.std"} <= set(model.state_dict())


def test_normalizer_rejects_bad_stats():
    with pytest.raises(ValueError):
        ImageNormalizer([0.5, 0.5], [0.5])
    with pytest.raises(ValueError):
        ImageNormalizer([0.5], [0.0])
    with pytest.raises(ValueError):
        build_model("small_cnn", 10, in_channels=1, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="unknown model 'vgg16'") as err:
        build_model("vgg16", 10)
    assert "\n" not in str(err.value)
    assert all(n in str(err.value) for n in MODEL_NAMES)


@pytest.mark.parametrize("kwargs", [dict(num_classes=1), dict(num_classes=0), dict(num_classes=10, in_channels=0)])
def test_bad_sizes_raise(kwargs):
    with pytest.raises(ValueError):
        build_model("small_cnn", **kwargs)


def test_count_flops_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, kernel_size=3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    conv = 2 * 3 * 3 * 3 * 4 * 6 * 6  # 2 * Cin * kh * kw * Cout * Hout * Wout on a 3x8x8 input
    linear = 2 * 144 * 5
    model.train()
    stats = model[1].running_mean.clone()
    assert count_flops(model, (3, 8, 8)) == conv + linear == 9216
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, stats)


def test_count_flops_grouped_strided_conv():
    model = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2)
    assert count_flops(model, (4, 8, 8)) == 2 * (4 // 2) * 3 * 3 * 6 * 4 * 4


def test_mlp_has_no_batchnorm_and_takes_any_size():
    model = build_model("mlp", 10, 1)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for size in (8, 28):
        assert model(torch.rand(2, 1, size, size)).shape == (2, 10)
