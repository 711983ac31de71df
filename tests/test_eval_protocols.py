"""`ducat eval`: the paper's protocol against adaptive attacks, on models with a known answer."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from ducat.attacks import PGD
from ducat.cli import main
from ducat.dummy import DummyClassModel, make_pairing
from ducat.eval import EvalSettings, build_plan, evaluate
from ducat.eval.runner import AttackResult, ResultCache, seed_for

C = 2


class SinkNet(nn.Module):
    """Two classes told apart by mean brightness (0.3 vs 0.7), which any eps = 0.3 attack can flip,
    so the projected classifier is not robust at all. The dummy logits are the original ones plus
    100 x the pixels' standard deviation, zero on clean inputs: a CE attack on the raw 2C logits
    raises it and lands in the dummy class of the *true* label, which the projection scores as
    correct."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        s = flat.mean(1) - 0.5
        z = torch.stack([-10 * s, 10 * s], dim=1)
        return torch.cat([z, z + 100 * flat.std(1, keepdim=True)], dim=1)


def sink_data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % C
    x = (0.3 + 0.4 * y.float()).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    return x, y


def test_sink_model_fools_the_paper_protocol_not_the_adaptive_one():
    model = DummyClassModel(SinkNet(), make_pairing(C))
    x, y = sink_data()
    report = evaluate(model, x, y, EvalSettings(eps=0.3, attacks=("pgd10", "margin", "targeted")), progress=False)
    assert report.clean_accuracy == 1.0
    assert report.accuracy("paper-pgd10") >= 0.9
    assert report.sink_rate >= 0.9
    assert report.accuracy("adaptive-pgd10") <= 0.05
    assert report.worst_case["robust_accuracy"] <= 0.05


def _train_tiny_plain(steps: int = 150) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from ducat.data import load_split

    torch.manual_seed(0)
    data = load_split("digits", None, train=True)
    x, y = data.images[:512].float() / 255, data.labels[:512]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test = load_split("digits", None, train=False)
    return model.eval(), test.images[:24].float() / 255, test.labels[:24]


def test_autoattack_equals_pyautoattack_called_directly():
    from pyautoattack import AutoAttack

    model, x, y = _train_tiny_plain()
    report = evaluate(model, x, y, EvalSettings(eps=0.08, attacks=("autoattack",), seed=3, workers=1), progress=False)
    x_adv, _ = AutoAttack(model, eps=0.08, norm="Linf", seed=3, version="standard").run_standard_evaluation(
        x, y, batch_size=256)
    with torch.no_grad():
        direct = (model(x_adv).argmax(1) == y).sum().item() / len(y)
    assert report.clean_accuracy > 0.8
    assert report.accuracy("adaptive-autoattack") == pytest.approx(direct, abs=1e-9)
    assert report.accuracy("paper-autoattack") == report.accuracy("adaptive-autoattack")  # plain model


def independent_pgd(model, x, y, eps, step, steps, start):
    """A from-scratch L-inf PGD on CE with a given random start (no shared code with ducat)."""
    x_adv = (x + start).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x_adv), y, reduction="sum")
        loss.backward()
        with torch.no_grad():
            x_adv = x_adv + step * x_adv.grad.sign()
            x_adv = torch.clamp(torch.clamp(x_adv, x - eps, x + eps), 0, 1)
    return x_adv.detach()


def test_pgd_matches_an_independent_pgd_on_the_same_start():
    model, x, y = _train_tiny_plain(60)
    eps = 0.1
    start = (torch.rand(x.shape, generator=torch.Generator().manual_seed(7)) * 2 - 1) * eps
    ours = PGD(model, eps, eps / 4, 10, generator=torch.Generator().manual_seed(7))(x, y)
    theirs = independent_pgd(model, x, y, eps, eps / 4, 10, start)
    assert torch.allclose(ours, theirs, atol=1e-6)
    # and evaluate()'s PGD-10 row is that attack's accuracy (its seed derives from the spec and the first example)
    settings = EvalSettings(eps=eps, attacks=("pgd10",))
    report = evaluate(model, x, y, settings, progress=False)
    clean = model(x).argmax(1) == y
    (spec,) = build_plan(settings, is_dummy=False)
    seed = seed_for(settings, spec, int(clean.nonzero()[0]))
    start = (torch.rand(x[clean].shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * eps
    x_adv = independent_pgd(model, x[clean], y[clean], eps, eps / 4, 10, start)
    with torch.no_grad():
        expected = (model(x_adv).argmax(1) == y[clean]).sum().item() / len(y)
    assert report.accuracy("adaptive-pgd10") == pytest.approx(expected)


@pytest.fixture(scope="module")
def ducat_run(tmp_path_factory):
    from ducat.config import load_config
    from ducat.train import train

    out = tmp_path_factory.mktemp("ducat-run")
    config = load_config("cpu-digits-small_cnn-pgd_at-ducat", [
        f"run.out={out}", "data.n_train=400", "optim.epochs=5", "optim.milestones=[4]", "ducat.start_epoch=3",
        "attack.steps=5", "validation.pgd_steps=3", "validation.n_examples=60", "run.progress=false",
        "run.tensorboard=false"])
    train(config, log=lambda s: None)
    return out


@pytest.mark.slow
def test_adaptive_worst_case_is_never_above_the_paper_protocol(ducat_run, tmp_path):
    assert main(["eval", str(ducat_run), "--attacks", "pgd10,pgd100,logsumexp,margin,targeted", "--n-examples", "40",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) >= {"n_examples", "epsilon", "norm", "clean_accuracy", "results", "worst_case"}
    assert report["n_examples"] == 40 and report["norm"] == "Linf" and report["worst_case"]["protocol"] == "adaptive"
    worst = report["worst_case"]["robust_accuracy"]
    paper = [r["robust_accuracy"] for r in report["results"] if r["protocol"] == "paper"]
    assert paper and all(worst <= acc for acc in paper)
    assert all(0 <= r["robust_accuracy"] <= 1 for r in report["results"])
    assert (tmp_path / "masks.npz").is_file() and (tmp_path / "report.md").is_file()


@pytest.mark.slow
def test_interrupted_eval_resumes_with_the_same_report(ducat_run, tmp_path, monkeypatch):
    args = ["eval", str(ducat_run), "--attacks", "pgd10,margin", "--n-examples", "30", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    import ducat.eval.attacks as attacks

    def interrupted_margin():
        def factory(context):
            raise KeyboardInterrupt
        return factory

    with monkeypatch.context() as patch:
        patch.setattr(attacks, "margin_restarts", interrupted_margin)
        assert main([*args, "--out", str(tmp_path / "resumed")]) == 130  # interrupted (Ctrl-C) after PGD-10
    cached = sorted(p.name for p in (tmp_path / "resumed" / "eval_cache").iterdir())
    assert any(name.startswith("paper-pgd10") for name in cached)
    assert not any(name.startswith("adaptive-margin") for name in cached)
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 0
    a = json.loads((tmp_path / "straight" / "report.json").read_text())
    b = json.loads((tmp_path / "resumed" / "report.json").read_text())
    for report in (a, b):
        report.pop("wall_time_s")
    assert a == b


def test_cache_is_not_reused_for_examples_it_never_attacked(tmp_path):
    """An attack run after more earlier attacks attacks fewer examples; its cached result must not
    stand in when the same attack now has more examples to attack (they are not 'broken')."""
    first_half = np.arange(10) < 5
    cache = ResultCache(tmp_path, "f" * 64, 10)
    cache.put("adaptive-margin", AttackResult(first_half.copy(), np.zeros(10, np.int64), np.zeros(10, np.int64),
                                              first_half.copy()))
    assert cache.get("adaptive-margin", np.ones(10, dtype=bool)) is None
    fewer = np.arange(10) < 3
    assert cache.get("adaptive-margin", fewer).robust.tolist() == fewer.tolist()
    assert ResultCache(tmp_path, "e" * 64, 10).get("adaptive-margin", fewer) is None  # another run's fingerprint


def test_cache_depends_on_the_batch_size(tmp_path):  # random starts are drawn per batch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    x, y = torch.rand(10, 1, 2, 2), torch.randint(0, 3, (10,))
    for batch_size in (256, 3):
        evaluate(model, x, y, EvalSettings(eps=0.1, attacks=("pgd10",), batch_size=batch_size),
                 cache_dir=str(tmp_path), progress=False)
    assert len(list(tmp_path.glob("*pgd10*.npz"))) == 2


@pytest.mark.parametrize("args, needle", [
    (["eval", "/no/such/run"], "does not exist"),
    (["eval", "RUN", "--attacks", "pgd10,deepfool"], "unknown attack 'deepfool'"),
    (["eval", "RUN", "--autoattack", "apgd-ce,deepfool"], "autoattack must name some of apgd-ce"),
    (["eval", "RUN", "--eps", "0"], "eps must be > 0"),
    (["eval", "RUN", "--eps=-8/255"], "eps must be > 0"),
    (["eval", "RUN", "--eps", "abc"], "--eps must be a number"),
    (["eval", "RUN", "--model", "resnet18", "--dataset", "digits", "--eps", "0.1"], "does not fit the model"),
    (["eval", "RUN", "--dataset", "mnist-9000", "--model", "mlp"], "unknown dataset"),
])
def test_eval_bad_input_is_one_line_and_exit_2(args, needle, ducat_run, capsys):  # no compute before the error
    args = [str(ducat_run / "last.pt") if a == "RUN" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ducat: error: ") and err.count("\n") == 1, err
    assert needle in err


@pytest.mark.parametrize("is_dummy", [True, False])
def test_the_report_lists_exactly_the_attacks_of_the_plan(is_dummy):
    """The plan is the one list of attacks: every spec run appears in report.json and report.md, nothing else."""
    model = DummyClassModel(SinkNet(), make_pairing(C)) if is_dummy else nn.Sequential(nn.Flatten(), nn.Linear(16, C))
    x, y = sink_data(12)
    settings = EvalSettings(eps=0.3, attacks=("pgd10", "dawa", "margin", "targeted", "eps-sweep"), dawa_steps=3)
    plan = build_plan(settings, is_dummy)
    report = evaluate(model, x, y, settings, progress=False)
    at_eval_eps = {s.key for s in plan if s.eps_factor == 1.0}
    listed = {r["id"] for r in report.results if r["protocol"] == r["id"].split("-")[0] or r["id"] in at_eval_eps}
    assert at_eval_eps <= listed and {r["id"] for r in report.results if r["protocol"] == "adaptive"} <= at_eval_eps
    assert {s.key for s in plan} <= set(report.masks)  # the sweep's results too
    markdown = report.to_markdown()
    assert all(f"`{key}`" in markdown for key in at_eval_eps)
    assert markdown.count("\n- `") == len({r["id"] for r in report.results})
    assert set(report.worst_case["attacks"]) == {s.key for s in plan if s.in_worst_case}


def test_equal_effort_gives_a_plain_model_as_many_attack_runs_as_a_dummy_class_model():
    """Random restarts alone tilt a worst-case comparison against the model that faces more attacks: with
    equal_effort the plain model meets the difference as extra margin restarts on its survivors."""
    from ducat.eval import effort
    from ducat.eval.settings import CHECK_SIZES

    for settings in (EvalSettings(eps=0.3), EvalSettings(eps=0.3, attacks=("pgd10", "autoattack", "margin"),
                                                         margin_restarts=1)):
        fair = replace(settings, equal_effort=True)
        plain, dummy = build_plan(fair, is_dummy=False), build_plan(fair, is_dummy=True)
        assert effort(plain) == effort(dummy) > effort(build_plan(settings, is_dummy=False))
        extra = next(s for s in plain if s.id == "adaptive-extra-restarts")
        assert extra.in_worst_case and extra.runs == effort(dummy) - effort(build_plan(settings, is_dummy=False))
        assert [s.key for s in dummy] == [s.key for s in build_plan(settings, is_dummy=True)]  # DUCAT's plan as is
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, C))
    x, y = sink_data(12)
    settings = EvalSettings(eps=0.05, attacks=("pgd10", "margin"), margin_restarts=1, dawa_steps=3,
                            equal_effort=True, workers=1, indicators=False, **{k: 0 for k in CHECK_SIZES})
    report = evaluate(model, x, y, settings, progress=False)
    assert report.accuracy("adaptive-extra-restarts") is not None
    assert report.worst_case["robust_accuracy"] <= report.accuracy("adaptive-margin")


def test_autoattack_rows_can_run_a_subset_of_autoattack(monkeypatch):
    import pyautoattack

    from ducat.config import ConfigError

    ran = []

    class Recording(pyautoattack.AutoAttack):
        def run_standard_evaluation(self, *args, **kwargs):
            ran.append(list(self.attacks_to_run))
            return super().run_standard_evaluation(*args, **kwargs)

    monkeypatch.setattr(pyautoattack, "AutoAttack", Recording)
    settings = EvalSettings(eps=0.3, attacks=("autoattack",), autoattack=("apgd-t", "apgd-ce"), workers=1,
                            indicators=False, transfer_steps=0, unbounded_examples=0, unit_test_examples=0,
                            convergence_examples=0, square_queries=0)
    assert settings.autoattack == ("apgd-ce", "apgd-t")  # AutoAttack's own order
    x, y = sink_data(8)
    report = evaluate(DummyClassModel(SinkNet(), make_pairing(C)), x, y, settings, progress=False)
    assert ran == [["apgd-ce", "apgd-t"]] * 2  # the paper-protocol and the adaptive row
    assert {r["attack"] for r in report.results if "autoattack" in r["id"]} == {"AutoAttack (apgd-ce, apgd-t)"}
    with pytest.raises(ConfigError, match="autoattack must name some of"):
        EvalSettings(eps=0.3, autoattack=("apgd-ce", "deepfool"))
