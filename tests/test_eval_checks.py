"""The checks of the evaluation itself (``docs/evaluation.md``), each on a tiny model whose right answer is known:
the PGD trace, the attack-failure indicators, the attack unit test, the transfer row, the convergence check, the
Square follow-up, the label check, and the cache of the checks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from ducat.attacks import PGD, PGDTrace
from ducat.config import ConfigError
from ducat.dummy import DummyClassModel, make_pairing
from ducat.eval import EvalSettings, evaluate
from ducat.eval.indicators import run_flags

OFF = {"unbounded_examples": 0, "unit_test_examples": 0, "transfer_steps": 0, "convergence_examples": 0,
       "square_queries": 0}


class Brightness(nn.Module):
    """``classes`` classes told apart by mean brightness: class k is nearest to the level (k + 0.5) / classes,
    logits ``-sharpness * (mean - level_k)^2``; ``flip`` reverses the levels (the buffer ``levels``, so that the
    weights tell the two apart). With ``masked`` its input gradient is exactly zero (the mean goes through
    ``detach``) while its decisions stay the same: shattered gradients, as some defenses have."""

    def __init__(self, classes: int = 2, sharpness: float = 200.0, masked: bool = False, flip: bool = False):
        super().__init__()
        levels = (torch.arange(classes) + 0.5) / classes
        self.register_buffer("levels", levels.flip(0) if flip else levels)
        self.sharpness, self.masked = sharpness, masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3))
        if self.masked:
            mean = mean.detach() + 0 * mean
        return -self.sharpness * (mean[:, None] - self.levels) ** 2


def levels_data(classes: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant 1x4x4 images at each class's level (``n`` of them, labels cycling)."""
    y = torch.arange(n) % classes
    x = ((y.float() + 0.5) / classes).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    return x, y


def digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A random MLP on 24 digits test images labelled with its own predictions (all clean-correct)."""
    from ducat.data import load_split

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = load_split("digits", None, train=False).images[:24].float() / 255
    with torch.no_grad():
        return model, x, model(x).argmax(1)


def test_the_pgd_trace_records_the_run_and_changes_nothing():
    model, x, y = digits_mlp()
    plain = PGD(model, 0.1, 0.025, 10, generator=torch.Generator().manual_seed(3))
    traced = PGD(model, 0.1, 0.025, 10, generator=torch.Generator().manual_seed(3), trace=True)
    a, b = plain(x, y), traced(x, y)
    assert torch.equal(a, b) and plain.trace is None
    trace = traced.trace
    assert trace.objective.shape == trace.prediction.shape == (11, len(y)) and trace.grad_norm.shape == (len(y),)
    with torch.no_grad():
        assert torch.allclose(trace.objective[-1], nn.functional.cross_entropy(model(b), y, reduction="none"))
        assert torch.equal(trace.prediction[-1], model(b).argmax(1))
    assert (trace.grad_norm > 0).all() and trace.objective[-1].mean() > trace.objective[0].mean()


def test_silent_success_and_a_still_rising_loss_are_read_from_the_trace():
    y = torch.tensor([0, 0, 0])
    prediction = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 0, 1]])  # rows: start, step 1, returned point
    objective = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.1], [1.0, 1.0, 2.0]])
    flags = run_flags(PGDTrace(objective, prediction, torch.tensor([1.0, 0.0, 1e-12])), y, lambda p: p)
    assert flags["silent"].tolist() == [True, False, False]  # only example 0 was adversarial, then lost
    assert flags["rising"].tolist() == [False, False, True]  # example 2 gained most of its loss in the last step
    assert flags["vanishing"].tolist() == [False, True, True]
    assert "silent" not in run_flags(PGDTrace(objective, prediction, torch.ones(3)), y, None)  # no exact decision


def test_masked_gradients_fire_the_indicators_and_the_square_follow_up():
    """Zero input gradients: PGD and AutoAttack's white-box attacks cannot move, Square (no gradient) breaks the
    examples; the indicators say so, and the follow-up runs. The same model unmasked fires nothing of that."""
    x, y = levels_data(10, 20)
    settings = EvalSettings(eps=0.08, attacks=("pgd10", "autoattack"), workers=1, **OFF | {"square_queries": 100})
    report = evaluate(Brightness(10, masked=True), x, y, settings, progress=False)
    rows = {row["id"]: row for row in report.checks["indicators"]}
    assert rows["adaptive-pgd10"]["counts"]["vanishing_gradient"] == 20 and rows["adaptive-pgd10"]["verdict"] == "WARN"
    assert "vanishing_gradient" in rows["adaptive-autoattack"]["fired"] and "square" in rows["adaptive-autoattack"][
        "fired"]
    assert report.checks["square_followup"] is not None and "adaptive-square-followup" in report.masks
    assert report.accuracy("adaptive-pgd10") > 0.9 and report.worst_case["robust_accuracy"] < 0.1
    clear = evaluate(Brightness(10), x, y, EvalSettings(eps=0.08, attacks=("pgd10",), **OFF), progress=False)
    assert clear.checks["indicators"][0]["counts"]["vanishing_gradient"] == 0 and clear.accuracy("adaptive-pgd10") == 0


def test_a_weak_attack_fails_its_unit_test_and_a_strong_one_passes():
    model, x, y = digits_mlp()
    checks = OFF | {"unit_test_examples": 8}
    weak = evaluate(model, x, y, EvalSettings(eps=0.15, attacks=("pgd10",), step_size=1e-4, **checks), progress=False)
    strong = evaluate(model, x, y, EvalSettings(eps=0.15, attacks=("pgd100",), **checks), progress=False)
    weak_test, strong_test = weak.checks["unit_test"], strong.checks["unit_test"]
    assert weak_test["valid"] >= 4 and weak_test["attacks"]["adaptive-pgd10"]["status"] == "FAIL"
    assert strong_test["attacks"]["adaptive-pgd100"] == {"tests": strong_test["valid"], "found": strong_test["valid"],
                                                          "status": "PASS"}
    assert any(c["status"] == "WARN" and "unit test" in c["check"] for c in weak.checks["summary"])


def test_the_paper_protocol_fails_the_unit_test_of_a_dummy_class_head():
    """On a 2C head the refitted problem keeps the dummy logits: CE on the raw 2C logits can settle in dummy(y),
    while PGD on the projected classifier finds the known adversarial examples."""
    from ducat.dummy import widen_model

    model, x, y = digits_mlp()
    torch.manual_seed(1)
    wide = widen_model(model, make_pairing(10), dummy_init="random").eval()
    with torch.no_grad():
        y = wide.projected()(x).argmax(1)
    report = evaluate(wide, x, y, EvalSettings(eps=0.15, attacks=("pgd100",), **OFF | {"unit_test_examples": 8}),
                      progress=False)
    tests = report.checks["unit_test"]["attacks"]
    assert tests["adaptive-pgd100"]["status"] == "PASS"
    assert tests["paper-pgd100"]["found"] < tests["paper-pgd100"]["tests"]


def test_the_transfer_row_scores_a_surrogates_examples_on_the_deployed_classifier(tmp_path):
    x, y = levels_data(2, 12)
    model = DummyClassModel(nn.Sequential(Brightness(2), _Duplicate()), make_pairing(2))
    settings = EvalSettings(eps=0.3, attacks=("pgd10",), **OFF | {"transfer_steps": 10})
    same = evaluate(model, x, y, settings, cache_dir=tmp_path, surrogate=Brightness(2), progress=False)
    inverted = evaluate(model, x, y, settings, cache_dir=tmp_path, surrogate=Brightness(2, flip=True),
                        progress=False)
    assert same.accuracy("adaptive-transfer") == 0.0 and same.checks["transfer"]["transfer_failures"] == 0
    assert inverted.accuracy("adaptive-transfer") == 1.0  # a surrogate that does not transfer: served fresh
    assert inverted.checks["transfer"]["transfer_failures"] == 12
    assert "adaptive-transfer" not in same.worst_case["attacks"]  # a check, not counted
    default = evaluate(model, x, y, settings, progress=False)  # no surrogate: the original C logits
    assert default.checks["transfer"]["source"] == "original C logits"


class _Duplicate(nn.Module):
    """(B, C) -> (B, 2C): the dummy logits copy the original ones, a bit lower."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z, z - 1.0], dim=1)


def test_the_convergence_check_passes_a_robust_model_and_warns_on_a_weak_attack():
    robust_x, robust_y = levels_data(2, 12)  # levels 0.25 and 0.75, boundary 0.5: no eps = 0.1 attack can cross
    checks = OFF | {"convergence_examples": 12}
    robust = evaluate(Brightness(2, sharpness=20), robust_x, robust_y,
                      EvalSettings(eps=0.1, attacks=("pgd10", "margin"), **checks), progress=False)
    conv = robust.checks["convergence"]
    assert robust.worst_case["robust_accuracy"] == 1.0 and conv["attacks"]  # nothing broke: every attack reran
    assert conv["moved_points"] == 0.0 and conv["status"] == "PASS"
    x, y = levels_data(2, 12)  # eps 0.3 crosses the boundary 0.25 away, 10 steps of 0.021 do not, 20 do
    weak = evaluate(Brightness(2, sharpness=20), x, y, EvalSettings(eps=0.3, attacks=("pgd10",), step_size=0.021,
                                                                    **checks), progress=False)
    conv = weak.checks["convergence"]
    assert weak.worst_case["robust_accuracy"] > 0.5 and conv["status"] == "WARN" and conv["moved_points"] > 50


def test_labels_outside_the_classes_are_refused_before_any_attack(tmp_path):
    x, y = levels_data(2, 6)
    for labels in (y + 2, y - 1, y.float()):
        with pytest.raises(ConfigError, match="labels must"):
            evaluate(Brightness(2), x, labels, EvalSettings(eps=0.1), cache_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"labels must be in \[0, 2\)"):
        evaluate(DummyClassModel(nn.Sequential(Brightness(2), _Duplicate()), make_pairing(2)), x, y + 2,
                 EvalSettings(eps=0.1), progress=False)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing was attacked


def test_the_checks_resume_from_the_cache_and_recompute_when_their_settings_change(tmp_path, monkeypatch):
    import ducat.eval.runner as runner

    model, x, y = digits_mlp()
    settings = EvalSettings(eps=0.03, attacks=("pgd10",), unit_test_examples=4, unbounded_examples=4,
                            convergence_examples=8, square_queries=0, workers=1)
    first = evaluate(model, x, y, settings, cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "checks").glob("*@unit-test-*.npz")) and list((tmp_path / "checks").glob("*@x2-*.npz"))
    calls = []
    monkeypatch.setattr(runner, "_attack_batch", lambda shared, job: calls.append(job) or 1 / 0)
    again = evaluate(model, x, y, settings, cache_dir=tmp_path, progress=False)
    assert not calls and again.checks == first.checks
    with pytest.raises(ZeroDivisionError):  # another size of a check: nothing of the first run is reused
        evaluate(model, x, y, replace(settings, unit_test_examples=5), cache_dir=tmp_path, progress=False)


def test_indicators_leave_every_result_unchanged():
    model, x, y = digits_mlp()
    on, off = (evaluate(model, x, y, EvalSettings(eps=0.1, attacks=("pgd10", "margin"), indicators=flag, **OFF),
                        progress=False) for flag in (True, False))
    assert on.masks.keys() == off.masks.keys()
    assert all(np.array_equal(on.masks[k], off.masks[k]) for k in on.masks) and on.results == off.results
    assert on.checks["indicators"][0]["counts"]["traced"] > 0
    assert off.checks == {}  # nothing checked, nothing reported (no PASS that could not have failed)
    assert "Checks of the evaluation itself" not in off.to_markdown()
