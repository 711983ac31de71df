"""Analysis functions on synthetic masks with known answers, every figure rendered, and the package
layout: one module per figure, re-exported by ``ducat.analysis``, importable without touching the
caller's matplotlib backend."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torch import nn

import ducat
from ducat import analysis
from ducat.analysis import (
    ablation,
    confusion,
    overlap,
    tables,
    timing,
    toy,
    tradeoff,
    transfer,
    tsne,
)

SRC = Path(ducat.__file__).resolve().parents[1]


def test_always_failed_overlap_counts():
    labels = np.array([0, 0, 1, 1, 1])
    robust = {"A": np.array([1, 0, 1, 0, 1], bool), "B": np.array([1, 0, 0, 0, 1], bool),
              "C": np.array([1, 0, 1, 0, 0], bool)}
    out = overlap.always_failed_overlap(robust, labels, 2)
    # beaten counts per example: [0, 3, 1, 3, 1]
    assert out["counts"].tolist() == [[1, 0, 0, 1], [0, 2, 0, 1]]
    assert out["uniform_defended"] == pytest.approx(1 / 5) and out["uniform_failed"] == pytest.approx(2 / 5)


def test_transfer_rates_split_by_surrogate_success():
    fooled_a = np.array([1, 1, 0, 0], bool)
    out = transfer.transfer_matrix({"A": fooled_a, "B": np.array([0, 1, 1, 1], bool)},
                                   {("A", "B"): np.array([1, 0, 0, 0], bool), ("B", "A"): np.array([1, 1, 1, 0], bool)})
    assert out["given_success"][0, 1] == pytest.approx(0.5) and out["given_failure"][0, 1] == pytest.approx(0.0)
    assert out["given_success"][1, 0] == pytest.approx(2 / 3) and out["given_failure"][1, 0] == pytest.approx(1.0)
    assert np.isnan(out["given_success"][0, 0])


def test_confusion_puts_the_sink_on_the_right_diagonal():
    labels = np.array([0, 0, 1, 1])
    pairing = np.array([3, 2])  # dummy(0) = 3, dummy(1) = 2
    raw = np.array([3, 0, 2, 3])  # sink, clean, sink, dummy of the other class
    m = confusion.confusion_under_attack(labels, raw, 2, pairing)
    assert m.shape == (2, 4)
    assert m.tolist() == [[0.5, 0, 0.5, 0], [0, 0, 0.5, 0.5]]  # columns: 0, 1, dummy(0), dummy(1)
    assert confusion.confusion_under_attack(labels, np.array([0, 1, 1, 1]), 2).tolist() == [[0.5, 0.5], [0, 1]]


def test_tables_mean_std_and_layout():
    rows = [("PGD-AT", [[0.80, 0.82], [0.50, 0.52], [0.48, 0.50]]), ("PGD-AT + DUCAT", [[0.85], [0.70], [None]])]
    table = tables.main_table(["clean", "PGD-10 (paper)", "adaptive worst case"], rows).splitlines()
    assert table[0] == "| run | clean | PGD-10 (paper) | adaptive worst case |"
    assert table[2] == "| PGD-AT | 81.00 ± 1.41 | 51.00 ± 1.41 | 49.00 ± 1.41 |"
    assert table[3] == "| PGD-AT + DUCAT | 85.00 | 70.00 | - |"
    test = {"p": 0.0312, "only_base": 1, "only_other": 9}
    stats = {"clean": {"per_seed": [test, test], "effect": 0.016, "ci_low": 0.004, "ci_high": 0.028, "p": 0.0004,
                       "p_holm": 0.0016, "verdict": "gain"},
             "worst": {"per_seed": [test], "effect": 0.5, "ci_low": None, "ci_high": None, "p": None, "p_holm": None,
                       "verdict": "too few seeds for a verdict"}}
    lines = tables.significance_table([("PGD-AT + DUCAT", stats)]).splitlines()
    assert lines[2] == ("| PGD-AT + DUCAT | clean | +1.60 | [+0.40, +2.80] | 4.0e-04 | 0.0016 | gain | "
                        "0.031 (1/9), 0.031 (1/9) |")
    assert lines[3] == "| PGD-AT + DUCAT | worst | +50.00 | - | - | - | too few seeds for a verdict | 0.031 (1/9) |"
    assert [tables.p_text(p) for p in (0.0, 1e-301, 2.5e-40, float("nan"))] == ["< 1e-300", "< 1e-300", "2.5e-40", "-"]
    targeted = tables.targeted_table({"run": {"original": 0.5, "dummy": 0.25}}).splitlines()
    assert targeted[2] == "| run | 50.00 | 25.00 |"


def test_sota_csv_matches_the_papers_table_2():
    rows = {r["method"]: r for r in tradeoff.sota_points()}
    assert len(rows) == 16  # the text says 14 SOTAs; its table 2 lists 16
    assert (rows["AWP"]["clean"], rows["AWP"]["autoattack"]) == (85.17, 47.00)
    assert (rows["RiFT"]["clean"], rows["RiFT"]["autoattack"]) == (83.44, 53.65)
    assert (rows["VFD"]["clean"], rows["VFD"]["autoattack"]) == (88.30, 46.60)
    assert rows["DAJAT"]["record_source"] == "RobustBench" and rows["GAIRAT"]["record_source"] == "Liu et al. (2021)"


def test_penultimate_features_are_the_classifier_inputs():
    from ducat.dummy import widen_model

    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 3))
    model = widen_model(net)
    x = torch.rand(7, 1, 4, 4)
    features = tsne.penultimate_features(model, x)
    assert features.shape == (7, 5)
    assert np.allclose(features, torch.relu(net[1](x.flatten(1))).detach().numpy(), atol=1e-6)


def _is_png(path: Path) -> bool:
    """A PNG signature and an image that decodes to a non-trivial size with more than one colour."""
    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pixels = imread(path)
    return pixels.shape[0] > 200 and pixels.shape[1] > 200 and float(pixels.std()) > 0


def test_every_figure_renders(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    masks = {m: rng.random(200) > 0.5 for m in ("PGD-AT", "TRADES", "MART", "Consistency-AT")}
    paths = [
        overlap.plot_always_failed_overlap(overlap.always_failed_overlap(masks, labels, 10), tmp_path / "f2.png"),
        transfer.plot_transfer_matrix(transfer.transfer_matrix(
            masks, {(a, b): masks[b] for a in masks for b in masks if a != b}), tmp_path / "f3.png"),
        toy.toy_case_plot({"toy": {"clean": 0.9, "PGD-10": 0.8}, "DUCAT": {"clean": 0.9, "PGD-10": 0.6}},
                          tmp_path / "f4.png"),
        tradeoff.tradeoff_scatter([{"name": "x", "clean": 0.85, "robust": 0.6, "group": "paper"},
                                   {"name": "x", "clean": 0.85, "robust": 0.3, "group": "adaptive"}],
                                  tmp_path / "f5.png"),
        timing.training_time_bars({"PGD-AT": {"base": 10.0, "ducat": 11.5}}, tmp_path / "f6.png"),
        ablation.ablation_plot("beta1", [0.5, 0.75, 1.0], [0.8, 0.85, 0.86], [0.5, 0.6, 0.7], [0.4, 0.35, 0.3],
                               tmp_path / "f7.png"),
        confusion.plot_confusion(confusion.confusion_under_attack(labels, rng.integers(0, 20, 200), 10,
                                                                  np.arange(10, 20)), tmp_path / "sub" / "f8.png"),
        tsne.tsne_panels({"m": (rng.normal(size=(60, 8)), labels[:60], np.arange(60) >= 30, True)},
                         tmp_path / "f10.png"),
    ]
    assert paths[6] == tmp_path / "sub" / "f8.png"
    assert all(_is_png(p) for p in paths)


def test_package_reexports_every_name_its_callers_use():
    """Every ``analysis.<name>`` used by reproduce.py and the overhead benchmark, and every name in
    ``__all__``, resolves to the function of its figure module."""
    callers = [*(SRC / "ducat" / "reproduce").glob("*.py"), SRC.parent / "benchmarks" / "ducat_overhead.py"]
    used = {name for f in callers if f.exists() for name in re.findall(r"\banalysis\.(\w+)\(", f.read_text())}
    assert {"main_table", "always_failed_overlap", "tsne_panels", "penultimate_features", "read_metrics"} <= used
    assert used <= set(analysis.__all__)
    for name in analysis.__all__:
        obj = getattr(analysis, name)
        assert obj.__module__.startswith("ducat.analysis.") and obj.__module__ != "ducat.analysis"


CHILD = """
import json, sys
import matplotlib
before = matplotlib.rcParams["backend"]
import ducat.analysis as analysis
path = analysis.training_time_bars({"PGD-AT": {"base": 10.0, "ducat": 11.5}}, sys.argv[1])
print(json.dumps({"before": before, "after": matplotlib.get_backend(), "rc": matplotlib.rcParams["backend"],
                  "pyplot": "matplotlib.pyplot" in sys.modules, "path": str(path)}))
"""


def test_import_and_drawing_leave_the_backend_alone(tmp_path):
    """In a fresh process whose backend is svg, importing ducat.analysis and writing a PNG figure neither
    switches the backend nor imports pyplot."""
    env = {**os.environ, "MPLBACKEND": "svg", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "f6.png")], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] == "svg"
    assert (seen["after"], seen["rc"], seen["pyplot"]) == ("svg", "svg", False)
    assert _is_png(Path(seen["path"]))
