"""BatchNorm folding for attacks: same function and input gradients, model untouched, live weights."""

import pytest
import torch
from torch import nn

from ducat.attacks import PGD, eval_mode
from ducat.attacks.fold import FoldedView, FoldError, folded
from ducat.dummy import OriginalLogits, widen_model
from ducat.models import MODEL_NAMES, build_model

# conv-BN pairs each architecture has, counted by hand from its definition (not by the code under test)
EXPECTED_FOLDS = {
    "small_cnn": 4,                 # four conv-BN-ReLU
    "mlp": 0,                       # no BatchNorm
    "resnet18": 1 + 8 * 2 + 3,      # stem, two per BasicBlock, three projection shortcuts
    "bottleneck_resnet18": 1 + 8 * 3 + 4,  # stem, three per Bottleneck, four projection shortcuts
    "preact_resnet18": 8,           # conv1 -> bn2 in each PreActBlock; bn1 and the final bn follow adds
    "wrn28_10": 12 + 1,             # conv1 -> bn2 in each of 12 blocks, stem conv -> first block's bn1
    "wrn34_10": 15 + 1,
}


def trained_like(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A DUCAT model with non-trivial BatchNorm statistics and affine parameters, in train mode."""
    torch.manual_seed(0)
    channels, size = (1, 12) if name in ("small_cnn", "mlp") else (3, 8)
    model = widen_model(build_model(name, 10, channels, mean=[0.4] * channels, std=[0.3] * channels))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.train()
        for _ in range(2):
            model(torch.rand(6, channels, size, size) * 2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # some small variances, where bn.eps matters
                m.running_var.mul_(torch.empty_like(m.running_var).uniform_(1e-4, 1))
    return model, torch.rand(3, channels, size, size)


def reference(view: nn.Module, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode logits of the unfolded view and the input gradient of their sum of squares."""
    was = model.training
    model.eval()
    x = x.clone().requires_grad_(True)
    out = view(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    model.train(was)
    return out.detach(), grad


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "wrn34_10"])
def test_logits_and_input_gradients_match_for_every_architecture_and_view(name):
    model, x = trained_like(name)
    before = snapshot(model)
    for view in (model, model.projected("max"), model.projected("logsumexp"), OriginalLogits(model)):
        want, want_grad = reference(view, model, x)
        fv = FoldedView(view)
        assert len(fv.folded) == EXPECTED_FOLDS[name]
        xg = x.clone().requires_grad_(True)
        got = fv(xg)
        (grad,) = torch.autograd.grad(got.square().sum(), xg)
        scale = want.abs().max()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale), (got - want).abs().max()
        assert torch.allclose(grad, want_grad, rtol=1e-3, atol=1e-5 * want_grad.abs().max())
    after = snapshot(model)
    assert model.training and all(m.training for m in model.modules())
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_model_stays_in_eval_mode():
    model, x = trained_like("preact_resnet18")
    model.eval()
    FoldedView(model)(x)
    assert not any(m.training for m in model.modules())


def test_refresh_follows_weight_and_running_stat_changes():
    model, x = trained_like("small_cnn")
    fv = FoldedView(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(torch.rand(6, 1, 12, 12)).logsumexp(1).mean()  # train-mode forward: running stats move too
    loss.backward()
    opt.step()
    want, _ = reference(model, model, x)
    with torch.no_grad():
        stale = fv(x)
        fv.refresh()
        fresh = fv(x)
    assert (stale - want).abs().max() > 1e-3  # the view holds folded copies, not the live tensors...
    assert torch.allclose(fresh, want, rtol=1e-4, atol=1e-6)  # ...until refresh() recomputes them


def test_channels_last_model_and_bf16_autocast():
    model, x = trained_like("resnet18")
    model = model.to(memory_format=torch.channels_last)
    fv = FoldedView(model)
    want, _ = reference(model, model, x)
    with torch.no_grad():
        assert torch.allclose(fv(x), want, rtol=1e-4, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.eval()
            want16 = model(x).float()
            model.train()
            got16 = fv(x).float()
    assert (got16 - want16).abs().max() <= 0.05 * want16.abs().max()  # bf16 has 8 mantissa bits


def test_pgd_on_the_folded_view_finds_the_same_adversarial_examples():
    model, _ = trained_like("small_cnn")
    x, y = torch.rand(16, 1, 12, 12), torch.randint(0, 10, (16,))
    model.eval()
    runs = []
    for target in (model, FoldedView(model)):
        attack = PGD(target, eps=0.1, step_size=0.025, steps=5, generator=torch.Generator().manual_seed(3))
        runs.append(attack(x, y))
    same = (runs[0] == runs[1]).float().mean()
    # a pixel differs only where a gradient component is ~0 and float rounding flips its sign
    assert same > 0.99 and (runs[0] - runs[1]).abs().max() <= 2 * 0.1 + 1e-6


def test_nothing_to_fold_or_untraceable_returns_the_module():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    assert folded(plain) is plain

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent branch: fx cannot trace it

    dynamic = Dynamic()
    with pytest.raises(FoldError):
        FoldedView(dynamic)
    assert folded(dynamic) is dynamic
    small, _ = trained_like("small_cnn")
    assert isinstance(folded(small), FoldedView)


def test_view_mode_switches_do_not_reach_the_model():
    model, _ = trained_like("small_cnn")
    fv = FoldedView(model)
    fv.eval()
    assert model.training
    assert list(fv.parameters()) == []


@pytest.mark.parametrize("size", [4, 8, 12, 16, 28])
def test_pooling_folds_into_the_linear_after_it_only_for_maps_smaller_than_the_pooled_one(size):
    """small_cnn pools its last map to 4x4: from 1x1, 2x2 and 3x3 maps (4, 8 and 12 pixels) the pooling is folded
    into fc 512 -> 512 (same logits and input gradients); from 4x4 and 7x7 maps the original path runs."""
    model, _ = trained_like("small_cnn")
    model.eval()
    x = torch.rand(3, 1, size, size)
    for view in (model, model.projected("max")):
        fv = FoldedView(view)
        assert fv.pooled == [next(n for n, m in view.named_modules() if m is model.net.net.hidden[0])]
        want, want_grad = reference(view, model, x)
        xg = x.clone().requires_grad_(True)
        got = fv(xg)
        (grad,) = torch.autograd.grad(got.square().sum(), xg)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max()), (got - want).abs().max()
        assert torch.allclose(grad, want_grad, rtol=1e-3, atol=1e-5 * want_grad.abs().max())
        pooled = fv._held[1].get_submodule("_pooled0")
        cells = (size // 4) ** 2
        assert list(pooled._weights) == ([(size // 4, size // 4)] if cells < 16 else [])
        for weight in pooled._weights.values():
            assert weight.shape == (512, 32 * cells)  # fc's 512 inputs cut to the map's cells


def test_refresh_follows_the_linear_weights_of_a_folded_pooling():
    model, _ = trained_like("small_cnn")
    model.eval()
    fv, x = FoldedView(model), torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        fv(x)
        model.net.net.hidden[0].weight.mul_(1.5)
        want = model(x)
        stale = fv(x)
        fv.refresh()
        fresh = fv(x)
    assert (stale - want).abs().max() > 1e-3
    assert torch.allclose(fresh, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["small_cnn", "preact_resnet18"])
@pytest.mark.parametrize("training", [False, True])
def test_a_view_of_a_wrapper_computes_eval_mode_and_leaves_every_mode_as_it_was(name, training):
    """Regression: ``model.projected()`` is a new module in train mode; its folded view used to restore that mode
    over the whole model after each call, so an evaluation scored every later attack with batch statistics
    (and moved the running statistics)."""
    model, x = trained_like(name)
    model.train(training)
    want, _ = reference(model.projected("max"), model, x)
    before = snapshot(model)
    fv = FoldedView(model.projected("max"))
    with torch.no_grad():
        got = fv(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max())
    assert all(m.training == training for m in model.modules())
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_eval_mode_gives_every_module_back_its_own_mode():
    model, x = trained_like("small_cnn")
    frozen = model.net.net.features[1]  # a BatchNorm kept in eval mode while the rest trains
    frozen.eval()
    wrapper = model.projected("max")  # a new module: in train mode, around a model in mixed modes
    with eval_mode(wrapper):
        assert not any(m.training for m in wrapper.modules())
    assert wrapper.training and model.training and not frozen.training
    assert all(m.training for m in model.modules() if m is not frozen)


@pytest.mark.parametrize("kernel, padding", [(3, 1), (3, 0), (5, 2), (1, 0), ((3, 5), (1, 2))])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_one_channel_convolution_has_the_input_gradient_of_f_conv2d(kernel, padding, autocast):
    from ducat.attacks.fold import conv2d_folded

    torch.manual_seed(0)
    kernel = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    weight, bias = torch.randn(8, 1, *kernel), torch.randn(8)
    x, grad_out = torch.rand(5, 1, 9, 10), None
    grads = []
    for conv in (conv2d_folded, torch.nn.functional.conv2d):
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = conv(xg, weight, bias, (1, 1), padding, (1, 1), 1)
        grad_out = torch.randn_like(out.float(), generator=torch.Generator().manual_seed(1)) if grad_out is None \
            else grad_out
        grads.append((out.float(), *torch.autograd.grad(out, xg, grad_out.to(out.dtype))))
    (mine_out, mine), (want_out, want) = grads
    tolerance = 0.02 * want.abs().max() if autocast else 1e-5 * want.abs().max()
    assert torch.equal(mine_out, want_out)  # the forward is F.conv2d itself
    assert mine.dtype == want.dtype == torch.float32 and (mine - want).abs().max() <= tolerance


def test_the_one_channel_convolution_leaves_weights_that_need_a_gradient_to_f_conv2d():
    from ducat.attacks.fold import conv2d_folded

    weight = torch.randn(4, 1, 3, 3, requires_grad=True)
    out = conv2d_folded(torch.rand(2, 1, 6, 6, requires_grad=True), weight, None, (1, 1), (1, 1), (1, 1), 1)
    (grad,) = torch.autograd.grad(out.sum(), weight)
    assert grad is not None and grad.shape == weight.shape
