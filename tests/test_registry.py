"""An attack is one registered factory: a toy attack registered in this file alone appears in the plan, in
report.json and report.md, and in the reproduce table, with no other edit."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_protocols import C, SinkNet, sink_data  # noqa: E402 (the tests' two-class sink model)

from ducat.dummy import DummyClassModel, make_pairing
from ducat.eval import (
    ATTACKS,
    EvalSettings,
    Protocol,
    View,
    attack_names,
    build_plan,
    evaluate,
    register_attack,
    table_columns,
)
from ducat.reproduce.results import Results, TableRow
from ducat.reproduce.scales import SCALES
from ducat.reproduce.text import _table1


def uniform_noise(ctx):
    """Uniform noise in the eps-ball: an attack that ignores the model, whose result is known for SinkNet."""
    def craft(x, y, seed):
        generator = torch.Generator().manual_seed(seed)
        noise = (torch.rand(x.shape, generator=generator) * 2 - 1) * ctx.eps
        return (x + noise.to(x.device)).clamp(0, 1)
    return craft


@pytest.fixture
def toy_attack():
    entry = register_attack("adaptive-toy-noise", name="toynoise", protocol=Protocol.ADAPTIVE, view=View.MAX_MERGED,
                            label="uniform noise in the ball", column="uniform noise, adaptive")(
        lambda settings: uniform_noise)
    yield entry
    ATTACKS.pop(entry.id)


def test_a_registered_attack_is_in_the_plan_the_reports_and_the_reproduce_table(toy_attack, tmp_path):
    assert "toynoise" in attack_names() and toy_attack.id not in [s.id for s in build_plan(EvalSettings(eps=0.1,
                                                                                                  attacks=("pgd10",)),
                                                                                      True)]
    settings = EvalSettings(eps=0.05, attacks=("pgd10", "toynoise"), workers=1, indicators=False, transfer_steps=0,
                            unbounded_examples=0, unit_test_examples=0, convergence_examples=0, square_queries=0)
    assert toy_attack.id in [spec.id for spec in build_plan(settings, is_dummy=True)]
    x, y = sink_data(12)
    report = evaluate(DummyClassModel(SinkNet(), make_pairing(C)), x, y, settings, progress=False)
    assert report.accuracy(toy_attack.id) == 1.0  # noise of 0.05 never moves a mean of 0.3 or 0.7 past 0.5
    assert json.loads(json.dumps(report.to_json()))["results"][-1]["id"] == toy_attack.id
    assert toy_attack.id in report.masks and "uniform noise in the ball" in report.to_markdown()
    assert (toy_attack.id, "uniform noise, adaptive") in table_columns()
    row = TableRow("pgd_at", "PGD-AT", ["pgd_at-s0"], values={c: [0.5] for c, _ in table_columns()})
    assert "uniform noise, adaptive" in _table1(Results([row], {}, {}), SCALES["smoke"])
