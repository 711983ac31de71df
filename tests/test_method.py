"""The DUCAT method itself: soft labels, the loss against hand-computed values, projection and
merged logits, widening, and every base method's loss going down on tiny data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ducat.dummy import (
    DummyClassModel,
    ducat_loss,
    make_pairing,
    merge_logits,
    project_predictions,
    soft_labels,
    widen_model,
)
from ducat.objectives import METHODS, AttackSettings, DucatSettings


def test_soft_labels_in_order_and_permuted():
    y = torch.tensor([0, 2])
    expected = torch.tensor([[0.75, 0, 0, 0.25, 0, 0], [0, 0, 0.75, 0, 0, 0.25]])
    assert torch.equal(soft_labels(y, 0.75, make_pairing(3)), expected)
    pairing = torch.tensor([4, 5, 3])  # dummy(0)=4, dummy(1)=5, dummy(2)=3
    expected = torch.tensor([[0.75, 0, 0, 0, 0.25, 0], [0, 0, 0.75, 0.25, 0, 0]])
    assert torch.equal(soft_labels(y, 0.75, pairing), expected)
    assert torch.equal(soft_labels(y, 1.0, pairing), F.one_hot(y, 6).float())


def _log_softmax(row: list[float]) -> list[float]:
    total = math.log(sum(math.exp(v) for v in row))
    return [v - total for v in row]


@pytest.mark.parametrize("alpha, beta1, beta2", [(0.5, 0.75, 1.0), (0.3, 0.6, 0.9)])
def test_ducat_loss_matches_hand_computation(alpha, beta1, beta2):
    clean, adv = [1.0, 0.0, -1.0, 2.0], [0.5, 1.5, 3.0, -2.0]  # C = 2, y = 0, dummy(0) = 2
    lc, la = _log_softmax(clean), _log_softmax(adv)
    expected = (alpha * -(beta1 * lc[0] + (1 - beta1) * lc[2])
                + (1 - alpha) * -((1 - beta2) * la[0] + beta2 * la[2]))
    value = ducat_loss(torch.tensor([clean]), torch.tensor([adv]), torch.tensor([0]), make_pairing(2),
                       alpha, beta1, beta2)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_toy_case_is_hard_label_cross_entropy():
    torch.manual_seed(0)
    zc, za, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 5, (8,))
    pairing = make_pairing(5, seed=3)
    expected = 0.5 * F.cross_entropy(zc, y) + 0.5 * F.cross_entropy(za, pairing[y])
    assert ducat_loss(zc, za, y, pairing, 0.5, 1.0, 1.0).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("seed", [None, 11])
def test_merged_argmax_equals_projection(seed):
    torch.manual_seed(1)
    pairing = make_pairing(10, seed)
    z = torch.randn(2000, 20)
    projected = project_predictions(z, pairing)
    assert torch.equal(merge_logits(z, pairing, "max").argmax(1), projected)
    # the projection by hand: argmax over 2C, dummy index mapped back through the pairing
    g = z.argmax(1)
    back = {int(d): k for k, d in enumerate(pairing)}
    assert projected.tolist() == [int(v) if v < 10 else back[int(v)] for v in g]
    # logsumexp merge: softmax equals p_k + p_dummy(k)
    p = z.softmax(1)
    assert torch.allclose(merge_logits(z, pairing, "logsumexp").softmax(1), p[:, :10] + p[:, pairing], atol=1e-6)


def test_pairing_is_seeded_permutation():
    assert torch.equal(make_pairing(4), torch.tensor([4, 5, 6, 7]))
    a, b = make_pairing(10, seed=5), make_pairing(10, seed=5)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(10, 20))
    assert not torch.equal(a, make_pairing(10))
    with pytest.raises(ValueError):
        DummyClassModel(nn.Linear(4, 6), torch.tensor([3, 3, 4]))


def tiny_net(classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes))


def test_widen_round_trip_with_permutation():
    torch.manual_seed(0)
    net = tiny_net()
    x = torch.rand(5, 1, 8, 8)
    before = net(x).detach()
    pairing = make_pairing(3, seed=2)
    model = widen_model(net, pairing)
    z = model(x).detach()
    assert z.shape == (5, 6)
    assert torch.allclose(z[:, :3], before)
    assert torch.allclose(z[:, pairing], before)  # dummy rows start as copies
    assert torch.equal(model.projected()(x).argmax(1), before.argmax(1))

    clone = widen_model(tiny_net(), make_pairing(3), dummy_init="random")
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone.dummy_index, pairing) and torch.allclose(clone(x), z)
    with pytest.raises(ValueError, match="no nn.Linear"):
        widen_model(nn.Sequential(nn.Flatten()))


def _blobs(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    centers = torch.rand(3, 64, generator=g)
    x = (centers[y] * 0.6 + 0.4 * torch.rand(n, 64, generator=g)).clamp(0, 1)
    return x.view(n, 1, 8, 8), y


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("use_ducat", [False, True])
def test_each_method_loss_is_finite_and_decreases(method, use_ducat):
    torch.manual_seed(0)
    model = widen_model(tiny_net()) if use_ducat else tiny_net()
    objective = METHODS[method](AttackSettings(eps=0.05, step_size=0.02, steps=3), DucatSettings(),
                                generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _blobs()
    losses = []
    for _ in range(30):
        out = objective(model, x, y, ducat_active=use_ducat, augment=lambda v: v)
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_ducat_needs_a_dummy_class_model():
    objective = METHODS["pgd_at"](AttackSettings(steps=1), DucatSettings())
    x, y = _blobs(8)
    with pytest.raises(TypeError, match="DummyClassModel"):
        objective(tiny_net(), x, y, ducat_active=True, augment=lambda v: v)


@pytest.mark.parametrize("mode", ["raw", "original", "merged"])
def test_training_attack_modes_attack_different_functions(mode):
    torch.manual_seed(0)
    model = widen_model(tiny_net(), make_pairing(3, seed=1))
    with torch.no_grad():  # make the dummy rows differ from the originals
        model.net[-1].weight[3:] += torch.randn(3, 16)
    x, y = _blobs(16)
    settings = AttackSettings(eps=0.1, step_size=0.05, steps=2, mode=mode)
    objective = METHODS["pgd_at"](settings, DucatSettings(), generator=torch.Generator().manual_seed(0))
    x_adv = objective.craft(model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    others = [m for m in ("raw", "original", "merged") if m != mode]
    other = METHODS["pgd_at"](AttackSettings(eps=0.1, step_size=0.05, steps=2, mode=others[0]), DucatSettings(),
                              generator=torch.Generator().manual_seed(0)).craft(model, x, y)
    assert not torch.equal(x_adv, other)
