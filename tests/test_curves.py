"""Training curves from real ``metrics.jsonl`` files: reading (torn last line, missing file, bad rows),
the data actually drawn on each panel, the DUCAT shading, run labels and the written PNG."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from ducat.analysis import curves
from ducat.errors import MetricsError


def _rows(lr: float, shift: float, ducat_from: int | None) -> list[dict]:
    """Rows with the trainer's keys, including ones the curves ignore; epoch 1 has no clean training
    accuracy (NaN), as the trainer logs for PGD-AT without DUCAT."""
    rows = []
    for epoch in range(1, 6):
        rows.append({"epoch": epoch, "lr": lr * (0.1 if epoch > 4 else 1.0),
                     "ducat_active": ducat_from is not None and epoch >= ducat_from,
                     "train_loss": 2.0 / epoch, "train_adv_acc": 0.10 * epoch + shift,
                     "train_clean_acc": math.nan if epoch == 1 else 0.15 * epoch + shift,
                     "world_size": 1, "rank0_images": 170, "epoch_time_s": 0.07, "train_images_per_s": 2400.0,
                     "val_clean_acc": 0.12 * epoch + shift, "val_pgd_acc": 0.08 * epoch + shift, "val_n": 30,
                     "best_epoch": epoch})
    return rows


def _write_run(run_dir, rows, tail: str = ""):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row) + "\n" for row in rows)  # as ducat.train appends them
    (run_dir / "metrics.jsonl").write_text(lines + tail)
    return run_dir


def test_read_metrics_returns_the_rows_in_file_order(tmp_path):
    rows = _rows(0.1, 0.0, 3)
    read = curves.read_metrics(_write_run(tmp_path / "run", rows))
    assert [json.dumps(r) for r in read] == [json.dumps(r) for r in rows]  # NaN compares equal as text


def test_torn_last_line_is_skipped_but_a_torn_middle_line_is_an_error(tmp_path):
    rows = _rows(0.1, 0.0, 3)
    torn = json.dumps(rows[0])[:30]
    assert [r["epoch"] for r in curves.read_metrics(_write_run(tmp_path / "a", rows, tail=torn))] == [1, 2, 3, 4, 5]
    run = _write_run(tmp_path / "b", rows[:2], tail=torn + "\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(MetricsError, match=r"metrics.jsonl' line 3 is not JSON"):
        curves.read_metrics(run)
    with pytest.raises(MetricsError, match="holds no complete metrics row"):
        curves.read_metrics(_write_run(tmp_path / "c", [], tail=torn))


@pytest.mark.parametrize("content", [None, "", "\n\n", '["epoch", 1]\n', '{"lr": 0.1}\n', '{"epoch": 1, "lr": "x"}\n'])
def test_unusable_metrics_raise_one_line_naming_the_file(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(MetricsError) as info:
        curves.read_metrics(run)
    message = str(info.value)
    assert str(run / "metrics.jsonl") in message and "\n" not in message


def test_missing_run_directory_is_a_metrics_error(tmp_path):
    with pytest.raises(MetricsError, match="no metrics file"):
        curves.read_metrics(tmp_path / "nowhere")


def _lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_plotted_lines_are_the_rows_in_percent(tmp_path):
    runs = {"plain": _rows(0.1, 0.0, None), "ducat": _rows(0.05, 0.02, 3)}
    fig = curves.draw_training_curves(runs)
    clean_ax, adv_ax, lr_ax = fig.axes[:3]
    for name, rows in runs.items():
        epochs = [r["epoch"] for r in rows]
        expected = {clean_ax: ("val_clean_acc", "train_clean_acc"), adv_ax: ("val_pgd_acc", "train_adv_acc")}
        for ax, (val_key, train_key) in expected.items():
            lines = _lines(ax)
            for key, style in ((val_key, "-"), (train_key, "--")):
                line = lines[f"{name} {key}"]
                assert line.get_linestyle() == style
                np.testing.assert_array_equal(line.get_xdata(), epochs)
                np.testing.assert_allclose(line.get_ydata(), [100 * r[key] for r in rows], equal_nan=True)
        lr_line = _lines(lr_ax)[f"{name} lr"]
        np.testing.assert_allclose(lr_line.get_ydata(), [r["lr"] for r in rows])
    assert lr_ax.get_yscale() == "log" and clean_ax.get_ylabel() == "accuracy (%)"
    colours = {name: to_rgb(_lines(clean_ax)[f"{name} val_clean_acc"].get_color()) for name in runs}
    assert colours["plain"] != colours["ducat"]
    assert to_rgb(_lines(adv_ax)["ducat train_adv_acc"].get_color()) == colours["ducat"]
    shaded = clean_ax.patches  # only the DUCAT run is ever active: epochs 3..5
    assert len(shaded) == 1
    assert (shaded[0].get_x(), shaded[0].get_x() + shaded[0].get_width()) == (2.5, 5.5)
    assert to_rgb(shaded[0].get_facecolor()) == colours["ducat"]


def test_active_spans_split_at_inactive_epochs():
    epochs = np.arange(1, 9)
    active = np.array([0, 1, 1, 0, 1, 1, 1, 0], bool)
    assert curves.active_spans(epochs, active) == [(1.5, 3.5), (4.5, 7.5)]
    assert curves.active_spans(epochs, np.zeros(8, bool)) == []


def test_training_curves_writes_a_png_and_labels_same_named_runs_by_parent(tmp_path):
    a = _write_run(tmp_path / "a" / "run", _rows(0.1, 0.0, None))
    b = _write_run(tmp_path / "b" / "run", _rows(0.1, 0.05, 2))
    c = _write_run(tmp_path / "c" / "other", _rows(0.1, 0.1, 4))
    assert curves.run_labels([a, b, c]) == ["a/run", "b/run", "other"]
    out = curves.training_curves([a, b, c], tmp_path / "fig" / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(out)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 1000 and float(pixels.std()) > 0
    with pytest.raises(MetricsError, match="given more than once"):
        curves.run_labels([a, tmp_path / "a" / "." / "run"])
    with pytest.raises(MetricsError, match="distinct labels"):
        curves.training_curves([a, b], tmp_path / "x.png", labels=["one"])


def test_a_missing_run_fails_before_anything_is_drawn(tmp_path):
    a = _write_run(tmp_path / "a", _rows(0.1, 0.0, None))
    with pytest.raises(MetricsError, match="no metrics file"):
        curves.training_curves([a, tmp_path / "typo"], tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()
