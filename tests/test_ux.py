"""What a user meets first: shortening a preset, the schedule warning, run directories, the L2 threat model,
the presets table and its cost model, --threads, --version, interrupts, progress output, ``ducat plot``."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from ducat.cli import main
from ducat.config import (
    ConfigError,
    ScheduleWarning,
    config_name,
    load_config,
    new_run_dir,
    scale_schedule,
    validate,
)
from ducat.objectives import METHODS

# a few seconds per run: 100 digits images, 1-step attacks; no optim.* (each test sets its schedule)
TINY = ["data.n_train=100", "data.batch_size=50", "attack.steps=1", "validation.pgd_steps=1",
        "validation.n_examples=20", "run.progress=false", "run.tensorboard=false"]
DIGITS = "cpu-digits-small_cnn-pgd_at-ducat"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("ducat: error: ") and err.count("\n") == 1, err
    return err


# --- shortening a preset: --epochs N ----------------------------------------------------------------------

@pytest.mark.parametrize("preset", [DIGITS, "cpu-fmnist-small_cnn-trades-ducat", "paper-cifar10-resnet18-mart-ducat"])
def test_scaled_schedule_keeps_order_range_and_proportions(preset):
    original = load_config(preset, ["run.out=x", "run.save_epochs=[5, 20]"])
    old = original.optim.epochs
    for n in range(1, 2 * old + 1):
        config = load_config(preset, ["run.out=x", "run.save_epochs=[5, 20]"])
        scale_schedule(config, n)
        validate(config)  # a valid config at every length
        o, start = config.optim, config.ducat.start_epoch
        assert o.epochs == n and o.milestones == sorted(o.milestones)
        assert all(1 <= m <= n - 1 for m in o.milestones) and 1 <= start <= n
        assert len(o.milestones) == (len(original.optim.milestones) if n > 1 else 0)
        for before, after, last in [*zip(original.optim.milestones, o.milestones, [n - 1] * 9),
                                    (original.ducat.start_epoch, start, n)]:
            exact = before * n / old  # rounded to the nearest epoch unless clamped into [1, last]
            assert abs(after - exact) <= 0.5 or after in (1, last), (n, before, after)
        assert config.run.save_epochs == sorted(set(config.run.save_epochs))
        assert all(1 <= e <= n for e in config.run.save_epochs)


def test_scaling_to_the_same_length_changes_nothing():
    config = load_config(DIGITS, ["run.out=x"])
    before = config.to_dict()
    scale_schedule(config, config.optim.epochs)
    assert config.to_dict() == before


def test_scaled_digits_schedule_is_the_documented_one():
    """The examples in ducat.config.schedule's docstring: 25*10/30 = 8.3 -> 8, 28*10/30 = 9.3 -> 9, 22*10/30 = 7.3
    -> 7; at 12 epochs 10, 11.2 -> 11, 8.8 -> 9."""
    ten = load_config(DIGITS, epochs=10)
    assert (ten.optim.milestones, ten.ducat.start_epoch) == ([8, 9], 7)
    twelve = load_config(DIGITS, epochs=12)
    assert (twelve.optim.milestones, twelve.ducat.start_epoch) == ([10, 11], 9)


def test_overrides_win_over_the_scaled_schedule():
    config = load_config(DIGITS, ["ducat.start_epoch=3", "optim.milestones=[4]"], epochs=10)
    assert config.optim.epochs == 10 and config.ducat.start_epoch == 3 and config.optim.milestones == [4]


def test_bad_epochs_is_refused():
    with pytest.raises(ConfigError, match="--epochs must be an integer >= 1"):
        load_config(DIGITS, epochs=0)


@pytest.mark.parametrize("args, needle", [
    (["train", DIGITS, "--epochs", "0"], "--epochs must be >= 1"),
    (["train", DIGITS, "--epochs", "5", "optim.epochs=5"], "not both"),
    (["train", "--resume", "/no/such/run", "--epochs", "5"], "--epochs cannot change a run being resumed"),
    (["quickstart", "--epochs", "-1"], "--epochs must be >= 1"),
    (["train", DIGITS, "optim.epochs=5"], "use --epochs N instead"),  # DUCAT start 22 past the end: says how
])
def test_epochs_misuse_is_one_line(args, needle, capsys):
    assert main(args) == 2
    assert needle in one_line_error(capsys)


def test_a_shortened_run_decays_its_lr_and_runs_ducat(tmp_path, capsys):
    """``ducat train PRESET --epochs 4``: milestones 25, 28 of 30 -> 3, 3 (4 would never act), DUCAT 22 -> 3."""
    assert main(["train", DIGITS, "--epochs", "4", f"run.out={tmp_path}", *TINY]) == 0
    assert capsys.readouterr().err == ""  # no schedule warning
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["lr"] == rows[2]["lr"] == 0.05 and rows[3]["lr"] == pytest.approx(0.05 * 0.1 ** 2)
    assert [r["ducat_active"] for r in rows] == [False, False, True, True]


# --- the milestone warning --------------------------------------------------------------------------------

def test_a_milestone_past_the_end_warns_in_one_line():
    with pytest.warns(ScheduleWarning) as caught:
        load_config("cpu-digits-small_cnn-pgd_at", ["optim.epochs=12", "run.out=x"])
    (warning,) = caught
    message = str(warning.message)
    assert "[25, 28]" in message and "(12)" in message and "--epochs" in message and "\n" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scaled schedule and the preset itself warn about nothing
        load_config("cpu-digits-small_cnn-pgd_at", ["run.out=x"], epochs=12)
        load_config("cpu-digits-small_cnn-pgd_at", ["run.out=x"])


def test_the_cli_prints_the_warning_once_before_training(tmp_path, capsys):
    args = ["train", "cpu-digits-small_cnn-pgd_at", "optim.epochs=2", "optim.milestones=[1, 2]",
            f"run.out={tmp_path / 'a'}", *TINY]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert err == "ducat: warning: optim.milestones [2] are at or past the last epoch (2) and never decay the lr; " \
                  "to shorten a preset with its schedule use --epochs N instead of optim.epochs\n"
    assert "training cpu-digits-small_cnn-pgd_at (2 epochs)" in out
    # bad input found after the config loaded (a checkpoint of another model): the error line alone
    assert main([*args[:4], "model.name=preact_resnet18", f"finetune.checkpoint={tmp_path / 'a' / 'last.pt'}",
                 f"run.out={tmp_path / 'b'}", *TINY]) == 2
    assert "does not fit the model" in one_line_error(capsys)


# --- run directories ----------------------------------------------------------------------------------------

def test_default_run_directory_is_named_after_the_config_and_never_reused(tmp_path, monkeypatch):
    import ducat.config.files as files

    monkeypatch.setattr(files.time, "strftime", lambda fmt: "20260102-030405")
    first = new_run_dir("cpu-digits", tmp_path)
    assert first == str(tmp_path / "cpu-digits-20260102-030405")
    Path(first).mkdir()
    second = new_run_dir("cpu-digits", tmp_path)
    assert second == first + "-2"
    Path(second).mkdir()
    assert new_run_dir("cpu-digits", tmp_path) == first + "-3"
    assert config_name("some/dir/my-recipe.yaml") == "my-recipe" and config_name(DIGITS) == DIGITS


def test_default_run_out_for_a_preset_and_a_yaml_file(tmp_path):
    assert re.fullmatch(rf"runs/{DIGITS}-\d{{8}}-\d{{6}}(-\d+)?", load_config(DIGITS).run.out)
    recipe = tmp_path / "my-recipe.yaml"
    recipe.write_text(f"base: {DIGITS}\noptim: {{lr: 0.01}}\n")
    assert re.fullmatch(r"runs/my-recipe-\d{8}-\d{6}(-\d+)?", load_config(str(recipe)).run.out)
    assert load_config(DIGITS, [f"run.out={tmp_path}"]).run.out == str(tmp_path)


def test_two_runs_without_run_out_get_two_directories(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", "cpu-digits-small_cnn-pgd_at", "--epochs", "1", *TINY]
    assert main(args) == 0 and main(args) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("cpu-digits-small_cnn-pgd_at-") for r in runs)
    assert all((r / "summary.json").is_file() for r in runs)
    assert capsys.readouterr().out.count("into runs/cpu-digits-small_cnn-pgd_at-") == 2


# --- the L2 threat model in training ------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_an_l2_training_attack_stays_in_its_l2_ball(method):
    from ducat.objectives.base import StepOutput
    from ducat.train.setup import build_model, build_objective

    eps = 0.5
    config = load_config(f"cpu-digits-small_cnn-{method}-ducat", ["run.out=x", "attack.norm=L2", f"attack.eps={eps}",
                                                                   "attack.step_size=0.2", "attack.steps=5"])
    model = build_model(config, False, print)
    objective = build_objective(config, torch.Generator().manual_seed(0))
    x = torch.rand(16, 1, 8, 8)
    y = torch.arange(16) % 10
    crafted = []
    original_craft = objective.craft

    def recording_craft(model, x_in, y_in):
        x_adv = original_craft(model, x_in, y_in)
        crafted.append((x_in, x_adv))
        return x_adv

    objective.craft = recording_craft
    assert isinstance(objective(model, x, y, ducat_active=True, augment=lambda t: t), StepOutput)
    (x_in, x_adv), = crafted
    delta = (x_adv - x_in).flatten(1)
    assert (delta.norm(dim=1) <= eps + 1e-5).all()
    assert delta.norm(dim=1).max() > eps / 2  # it moved: not a zero attack
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_validation_attacks_with_the_training_norm(monkeypatch):
    import ducat.train.validate as validate_module
    from ducat.data import load_split
    from ducat.train import validate_model
    from ducat.train.setup import build_model

    norms = []
    real_pgd = validate_module.PGD

    def recording_pgd(*args, **kwargs):
        norms.append(kwargs.get("norm"))
        return real_pgd(*args, **kwargs)

    monkeypatch.setattr(validate_module, "PGD", recording_pgd)
    config = load_config(DIGITS, ["run.out=x", "attack.norm=L2", "attack.eps=0.5", "validation.pgd_steps=2"])
    data = load_split("digits", None, train=False).subset(torch.arange(20))
    metrics = validate_model(build_model(config, False, print), data, config)
    assert norms == ["L2"] and 0 <= metrics["pgd_acc"] <= metrics["clean_acc"]


def test_attack_norm_is_checked(capsys):
    assert main(["train", DIGITS, "attack.norm=L1"]) == 2
    assert "unknown attack.norm 'L1'; choose one of: Linf, L2" in one_line_error(capsys)


# --- ducat presets and the cost model -----------------------------------------------------------------------

def test_presets_table_hides_base_presets_and_describes_every_other(capsys):
    from ducat.config import base_presets, preset_names

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    header, table = out.split("\n\n", 1)
    assert "not a measurement" in header and "est. CPU" in header and "est. GPU" in header
    assert "assumed" in header and "calibrated" in header and "--all" in header
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    bases = base_presets()
    assert bases >= {"cpu-digits", "cpu-fmnist", "paper-cifar10"} and not bases & set(rows)
    assert set(rows) == set(preset_names()) - bases
    for name, cells in rows.items():
        config = load_config(name, ["run.out=x"])
        assert cells[1:5] == [config.data.dataset, config.model.name, cells[3], str(config.optim.epochs)]
        assert cells[3].startswith(config.method.name) and ("+DUCAT" in cells[3]) == config.ducat.enabled
    assert rows["cpu-digits-small_cnn-pgd_at-toy"][3] == "pgd_at+DUCAT-toy"
    assert rows["cpu-digits-small_cnn-pgd_at-ducat"][3] == "pgd_at+DUCAT"
    assert main(["presets", "--all"]) == 0
    marked = [line.split()[0] for line in capsys.readouterr().out.split("\n\n", 1)[1].splitlines() if "(base)" in line]
    assert sorted(marked) == sorted(bases)


def _config(preset: str, *overrides: str):
    return load_config(preset, ["run.out=x", "optim.milestones=[]", *overrides])


def test_estimate_is_proportional_to_epochs():
    from ducat.presets import CPU_2_CORES, ONE_GPU, estimate_seconds, training_work

    short, long = _config("cpu-fmnist-small_cnn-pgd_at", "optim.epochs=5"), _config(
        "cpu-fmnist-small_cnn-pgd_at", "optim.epochs=10")
    assert training_work(long).flops == 2 * training_work(short).flops
    assert training_work(long).passes == 2 * training_work(short).passes
    for device in (CPU_2_CORES, ONE_GPU):
        assert estimate_seconds(long, device) == pytest.approx(2 * estimate_seconds(short, device))


def test_estimate_counts_views_attack_steps_and_ducat_epochs():
    from ducat.presets import forward_flops, training_work

    no_validation = ["validation.n_examples=1", "validation.pgd_steps=0"]
    pgd_at = training_work(_config("cpu-fmnist-small_cnn-pgd_at", *no_validation)).flops
    consistency = training_work(_config("cpu-fmnist-small_cnn-consistency", *no_validation)).flops
    assert consistency / pgd_at == pytest.approx(2, rel=1e-3)  # two augmented views, each a PGD-AT image
    k20 = training_work(_config("cpu-fmnist-small_cnn-pgd_at", "attack.steps=20", *no_validation)).flops
    assert k20 / pgd_at == pytest.approx((2 * 20 + 3) / (2 * 10 + 3), rel=1e-3)  # (2K + 3) F per image
    # a DUCAT epoch forwards [x; x']: (2K + 6) F instead of (2K + 3) F, on the 2C model
    config = _config("cpu-fmnist-small_cnn-pgd_at-ducat", "ducat.start_epoch=1", *no_validation)
    plain_f = forward_flops(_config("cpu-fmnist-small_cnn-pgd_at"))
    assert training_work(config).flops / pgd_at == pytest.approx(26 / 23 * forward_flops(config) / plain_f, rel=1e-3)


def test_estimate_charges_a_fixed_cost_per_pass():
    from ducat.presets import Throughput, training_work

    small, large = (training_work(_config("cpu-fmnist-small_cnn-pgd_at", f"data.batch_size={b}",
                                          "validation.n_examples=1")) for b in (64, 128))
    assert small.flops == large.flops and small.passes > 1.9 * large.passes
    only_passes = Throughput("x", float("inf"), 1.0, "")
    assert small.seconds(only_passes) == small.passes


@pytest.mark.parametrize("model, dataset", [
    pytest.param(*key, marks=pytest.mark.slow) if key[0] == "wrn28_10" else key
    for key in __import__("ducat.presets", fromlist=["COUNTED_FLOPS"]).COUNTED_FLOPS])
def test_counted_flops_are_what_count_flops_gives(model, dataset):
    from ducat.presets import COUNTED_FLOPS, _forward_flops

    _forward_flops.cache_clear()
    assert _forward_flops(model, dataset) == COUNTED_FLOPS[(model, dataset)]


# --- --threads, --version -----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["quickstart"], ["eval", "/no/such/run"], ["reproduce", "--scale", "smoke",
                                                                                 "--out", "/tmp/x"]])
def test_threads_below_one_is_one_line(command, capsys):
    assert main([*command, "--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in one_line_error(capsys)


def test_threads_are_set_before_the_evaluation_runs(monkeypatch, tmp_path):
    import ducat.eval

    seen = []
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # restored after the test
    monkeypatch.setattr(ducat.eval, "evaluate_checkpoint",
                        lambda *a, **k: seen.append((torch.get_num_threads(), os.environ["OMP_NUM_THREADS"])) or 1/0)
    before = torch.get_num_threads()
    try:
        with pytest.raises(ZeroDivisionError):
            main(["eval", str(tmp_path), "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    assert seen == [(1, "1")]  # this process, and the processes it would start


def test_version_is_printed_by_the_command():
    import subprocess
    import sys

    from ducat import __version__

    done = subprocess.run([sys.executable, "-m", "ducat", "--version"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1] / "src")
    assert done.returncode == 0 and done.stdout == f"ducat {__version__}\n"


# --- interrupts and wall time across resumes ----------------------------------------------------------------

@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_interrupt_says_how_to_continue(with_checkpoint, tmp_path, monkeypatch, capsys):
    import ducat.train

    def interrupted(config, **kwargs):
        if with_checkpoint:
            (Path(config.run.out) / "last.pt").write_bytes(b"a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(ducat.train, "train", interrupted)
    tmp_path.mkdir(exist_ok=True)
    assert main(["train", DIGITS, f"run.out={tmp_path}", "--epochs", "3"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ducat: interrupted; ")
    if with_checkpoint:
        assert err == f"ducat: interrupted; continue with: ducat train --resume {tmp_path}\n"
    else:
        assert "no epoch finished" in err and "--resume" not in err


def test_wall_time_is_the_total_across_resumes(tmp_path):
    from ducat.checkpoint import load_checkpoint

    args = ["train", DIGITS, "--epochs", "3", f"run.out={tmp_path}", *TINY]
    assert main([*args, "--until-epoch", "2"]) == 0
    first = load_checkpoint(tmp_path / "last.pt")["wall_time_s"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert first >= sum(r["epoch_time_s"] for r in rows) > 0
    assert main(["train", "--resume", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    third = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[2])
    assert third["epoch"] == 3 and summary["wall_time_s"] >= first + third["epoch_time_s"]


@pytest.mark.slow
def test_ctrl_c_on_a_real_run_prints_the_resume_command_and_the_run_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "ducat", "train", DIGITS, "--epochs", "30", f"run.out={run_dir}",
                                *TINY], cwd=Path(__file__).parents[1] / "src", stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "last.pt").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert err.endswith(f"ducat: interrupted; continue with: ducat train --resume {run_dir}\n")
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 30


# --- progress output ----------------------------------------------------------------------------------------

def _train_process(run_dir: Path, **streams):
    import subprocess
    import sys

    args = [sys.executable, "-m", "ducat", "train", DIGITS, "--epochs", "3", f"run.out={run_dir}",
            *[a for a in TINY if not a.startswith("run.progress")]]  # the default: run.progress=true
    return subprocess.Popen(args, cwd=Path(__file__).parents[1] / "src", **streams)


def test_a_log_file_gets_one_line_per_epoch_and_no_carriage_returns(tmp_path):
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        assert _train_process(tmp_path / "run", stdout=f, stderr=f).wait(timeout=300) == 0
    text = log.read_text()
    assert "\r" not in text
    epochs = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("val clean" in line and "val PGD" in line and "lr" in line for line in epochs)


@pytest.mark.slow
def test_a_terminal_gets_a_live_bar_and_keeps_every_epoch_line(tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    process = _train_process(tmp_path / "run", stdout=secondary, stderr=secondary)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 1 << 16)
        except OSError:  # the terminal closed: the process is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert process.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "0/2 [" in text and "step" in text  # tqdm's bar: 2 steps of 50 images per epoch
    lines = [line.split("\r")[-2 if line.endswith("\r") else -1] for line in text.split("\n")]  # as displayed
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ") and "loss" in line] == [
        "epoch 1/3", "epoch 2/3", "epoch 3/3"]


# --- ducat plot ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    for name, preset in (("plain", "cpu-digits-small_cnn-pgd_at"), ("ducat", DIGITS)):
        assert main(["train", preset, "--epochs", "3", f"run.out={root / name}", *TINY]) == 0
    return [root / "plain", root / "ducat"]


def test_plot_writes_a_png_of_several_runs(two_runs, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "curves.png"
    assert main(["plot", *map(str, two_runs), "--out", str(out), "--labels", "PGD-AT,PGD-AT+DUCAT"]) == 0
    assert f"written to {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import numpy as np

    image = np.asarray(Image.open(out).convert("L"))
    assert image.shape[1] > 1000 and len(np.unique(image)) > 20  # three panels drawn, not a blank canvas


@pytest.mark.parametrize("case, needle", [
    ("labels", "need 2 distinct labels for 2 runs"),
    ("missing", "no metrics file"),
    ("suffix", "--out must name a .png file"),
])
def test_plot_bad_input_is_one_line(case, needle, two_runs, tmp_path, capsys):
    runs = [*map(str, two_runs)]
    args = {"labels": ["plot", *runs, "--labels", "one", "--out", str(tmp_path / "a.png")],
            "missing": ["plot", runs[0], str(tmp_path / "nothing"), "--out", str(tmp_path / "a.png")],
            "suffix": ["plot", *runs, "--out", str(tmp_path / "a.pdf")]}[case]
    assert main(args) == 2
    assert needle in one_line_error(capsys)
    assert not (tmp_path / "a.png").exists()


# --- what the eval report answers, provenance, eval mode, the L2 evaluation ---------------------------------

def _report(results: dict[str, float], dummy_classes: bool = True):
    from ducat.eval.report import EvalReport

    rows = [{"id": key, "robust_accuracy": value} for key, value in results.items()]
    return EvalReport(n_examples=100, epsilon=0.1, norm="Linf", clean_accuracy=0.9, results=rows, worst_case={},
                      sink_rate=None, eps_sweep=[], sanity=[], settings={}, dummy_classes=dummy_classes,
                      wall_time_s=0.0)


def test_paper_autoattack_above_paper_pgd_is_warned_and_explained():
    from ducat.eval.report import sanity_checks

    warned = sanity_checks(_report({"paper-pgd10": 0.40, "paper-pgd100": 0.45, "paper-autoattack": 0.60}), {})
    (check,) = [c for c in warned if "AutoAttack" in c["check"]]
    assert check["status"] == "WARN"
    assert "AutoAttack (60.00) above PGD (40.00)" in check["check"] and "dummy(y)" in check["check"]
    for quiet in (_report({"paper-pgd10": 0.40, "paper-autoattack": 0.38}),
                  _report({"paper-pgd10": 0.40, "paper-autoattack": 0.60}, dummy_classes=False)):
        assert not any("AutoAttack" in c["check"] for c in sanity_checks(quiet, {}))


def _tiny_ducat_model(seed: int = 0):
    from ducat.data import load_split
    from ducat.dummy import widen_model

    torch.manual_seed(seed)
    data = load_split("digits", None, train=True)
    x, y = data.images[:512].float() / 255, data.labels[:512]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test = load_split("digits", None, train=False)
    # random dummy rows: copied rows tie every raw 2C margin at exactly 0, on which pyautoattack's Square L2 fails
    return widen_model(net.eval(), dummy_init="random"), test.images[:32].float() / 255, test.labels[:32]


def test_the_eps_sweep_at_the_eval_eps_is_the_pgd10_row():
    from ducat.eval import EvalSettings, build_plan, evaluate

    model, x, y = _tiny_ducat_model()
    settings = EvalSettings(eps=0.1, attacks=("pgd10", "eps-sweep"))
    assert not any(spec.key.endswith("@eps-x1") for spec in build_plan(settings, is_dummy=True))
    report = evaluate(model, x, y, settings, progress=False)
    (at_eps,) = [row for row in report.eps_sweep if row["eps"] == pytest.approx(0.1)]
    assert at_eps["adaptive"] == report.accuracy("adaptive-pgd10")
    assert at_eps["paper"] == report.accuracy("paper-pgd10")
    assert "at the evaluation eps it is the PGD-10 row" in report.to_markdown()


def test_evaluation_runs_in_eval_mode_and_restores_the_mode():
    from ducat.eval import EvalSettings, evaluate

    model, x, y = _tiny_ducat_model()
    model.train()
    batch_norm = model.net[2]
    running_mean = batch_norm.running_mean.clone()
    modes = []
    batch_norm.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    evaluate(model, x, y, EvalSettings(eps=0.1, attacks=("pgd10",)), progress=False)
    assert modes and not any(modes)  # every forward pass of the evaluation saw BatchNorm in eval mode
    assert torch.equal(batch_norm.running_mean, running_mean)  # a train-mode forward would have moved it
    assert model.training and all(m.training for m in model.modules())


def test_l2_evaluation_attacks_in_the_l2_ball_under_both_protocols(monkeypatch):
    import ducat.eval.attacks as eval_attacks
    from ducat.eval import EvalSettings, evaluate

    crafted = []
    real_pgd = eval_attacks.PGD

    class RecordingPGD(real_pgd):
        def __call__(self, x, y, target=None):
            x_adv = super().__call__(x, y, target)
            crafted.append((self.norm, (x_adv - x).flatten(1).norm(dim=1).max().item()))
            return x_adv

    monkeypatch.setattr(eval_attacks, "PGD", RecordingPGD)
    model, x, y = _tiny_ducat_model()
    report = evaluate(model, x, y, EvalSettings(eps=0.5, norm="L2", attacks=("pgd10",), workers=1, transfer_steps=0,
                                                unbounded_examples=0),  # the checks' attacks within the ball only
                      progress=False)  # one process: the recording happens here
    assert {r["id"] for r in report.results} == {"paper-pgd10", "adaptive-pgd10"}
    assert crafted and all(norm == "L2" and size <= 0.5 + 1e-5 for norm, size in crafted)
    assert report.worst_case["robust_accuracy"] <= min(report.accuracy("paper-pgd10"),
                                                       report.accuracy("adaptive-pgd10"))


@pytest.mark.slow
def test_l2_evaluation_runs_pgd_and_autoattack_l2_under_both_protocols(monkeypatch):
    import pyautoattack

    from ducat.eval import EvalSettings, evaluate

    norms = []

    class RecordingAutoAttack(pyautoattack.AutoAttack):
        def __init__(self, *args, **kwargs):
            norms.append(kwargs["norm"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pyautoattack, "AutoAttack", RecordingAutoAttack)
    model, x, y = _tiny_ducat_model()
    settings = EvalSettings(eps=0.5, norm="L2", attacks=("pgd10", "autoattack"), workers=1,  # recorded here
                            unbounded_examples=2, unit_test_examples=2, convergence_examples=4, transfer_steps=5)
    report = evaluate(model, x[:16], y[:16], settings, progress=False)
    ids = {r["id"] for r in report.results if not r.get("check")}  # the checks' own rows (transfer) aside
    assert ids == {"paper-pgd10", "paper-autoattack", "raw-autoattack", "adaptive-pgd10", "adaptive-autoattack"}
    # AutoAttack on the raw 2C logits and on the projection, and again in the checks: L2 every time
    assert report.norm == "L2" and len(norms) >= 2 and set(norms) == {"L2"}
    worst = report.worst_case["robust_accuracy"]
    assert report.worst_case["protocol"] == "adaptive"
    assert worst <= min(report.accuracy(k) for k in ids - {"raw-autoattack"})
    assert "L2 eps = 0.5" in report.to_markdown()


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("provenance")
    run_dir, eval_dir = root / "run", root / "eval"
    assert main(["train", DIGITS, "--epochs", "2", f"run.out={run_dir}", "run.device=cpu", *TINY]) == 0
    assert main(["eval", str(run_dir), "--attacks", "pgd10", "--n-examples", "20", "--no-progress",
                 "--out", str(eval_dir)]) == 0
    return run_dir, eval_dir


def test_the_report_names_the_checkpoint_it_scored(evaluated_run):
    import hashlib

    from ducat.checkpoint import load_checkpoint

    run_dir, eval_dir = evaluated_run
    scored = json.loads((eval_dir / "report.json").read_text())["provenance"]["checkpoint"]
    assert Path(scored["path"]) == run_dir / "best.pt"
    assert scored["sha256"] == hashlib.sha256((run_dir / "best.pt").read_bytes()).hexdigest()
    assert scored["epoch"] == load_checkpoint(run_dir / "best.pt")["epoch"]
    markdown = (eval_dir / "report.md").read_text()
    assert f"`{run_dir / 'best.pt'}` (epoch {scored['epoch']}, SHA-256 {scored['sha256']})" in markdown


def test_provenance_in_config_summary_and_report(evaluated_run):
    import hashlib
    import subprocess

    import yaml

    import ducat

    run_dir, eval_dir = evaluated_run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["provenance"]
    summary = json.loads((run_dir / "summary.json").read_text())
    report = json.loads((eval_dir / "report.json").read_text())["provenance"]
    head = subprocess.run(["git", "-C", str(Path(ducat.__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    for facts in (saved, summary["provenance"], report):
        assert facts["ducat"] == ducat.__version__ and facts["torch"] == torch.__version__.split("+")[0]
        assert facts["device"] == "cpu" and facts["command"]
        if head.returncode == 0:
            assert facts["git_commit"].startswith(head.stdout.strip())
    assert summary["best_checkpoint_sha256"] == hashlib.sha256((run_dir / "best.pt").read_bytes()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", report["examples_sha256"])
    assert report["examples"] == "first 20 of the digits test split"


def test_eval_defaults_to_the_training_norm_and_refuses_a_mismatched_default_eps(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", DIGITS, "--epochs", "2", "attack.norm=L2", "attack.eps=0.5", "attack.step_size=0.125",
                 f"run.out={run_dir}", *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--norm", "Linf", "--attacks", "pgd10"]) == 2
    assert "the run was trained against L2; give --eps" in one_line_error(capsys)
    assert main(["eval", str(run_dir), "--attacks", "pgd10", "--n-examples", "10", "--no-progress",
                 "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["norm"] == "L2" and report["epsilon"] == 0.5


@pytest.mark.slow
def test_an_interrupted_quickstart_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    import ducat.quickstart

    real_train = ducat.quickstart.train

    def stop_after_epoch_1(config, **kwargs):
        real_train(config, until_epoch=1, log=lambda s: None)
        raise KeyboardInterrupt

    monkeypatch.setattr(ducat.quickstart, "train", stop_after_epoch_1)
    assert main(["quickstart", "--out", str(tmp_path), "--epochs", "2", "--no-progress"]) == 130
    assert f"run: ducat quickstart --out {tmp_path} --epochs 2" in capsys.readouterr().err
    monkeypatch.setattr(ducat.quickstart, "train", real_train)
    assert main(["quickstart", "--out", str(tmp_path), "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"resuming pgd_at (2 epochs) into {tmp_path / 'pgd_at'}" in out
    assert f"training pgd_at-ducat (2 epochs) into {tmp_path / 'pgd_at-ducat'}" in out
    rows = [json.loads(line) for line in (tmp_path / "pgd_at" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
