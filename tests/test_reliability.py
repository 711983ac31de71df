"""Never lose a run, never run a checkpoint.

- crash consistency: a training subprocess SIGKILLed in the middle of a checkpoint write resumes
  to the same weights, metrics and summary as an uninterrupted run (``benchmarks/crash_resume.py``
  runs the same harness at more kill points);
- a corrupted or truncated checkpoint is reported with its name and the last good one, never
  silently replaced by a fresh start; a failed write leaves the previous checkpoint loadable;
- a checkpoint whose pickle would run code is refused before it runs, by the library and the CLI;
- a checkpoint that declares more bytes than its limit (a zip bomb) is refused before anything is
  inflated, and malformed contents are one-line errors naming the file;
- a non-finite loss stops the run naming the epoch and step, with the last good checkpoint intact;
- fuzzing: random invalid command lines for ``train``, ``eval`` and ``reproduce`` all end in exit 2
  and one ``ducat: error:`` line, without a traceback and before any compute.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import pickle
import re
import shlex
import shutil
import sys
import traceback
import zipfile
from collections import Counter
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import fields
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ducat.checkpoint import (
    CheckpointError,
    check_training_state,
    checkpoint_config,
    checkpoint_size_limit,
    load_checkpoint,
    save_checkpoint,
)
from ducat.cli import main
from ducat.config import TrainConfig, describe, load_config, preset_names
from ducat.train import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
PRESET = "cpu-digits-small_cnn-pgd_at-ducat"
TINY = ["data.n_train=200", "data.batch_size=50", "attack.steps=2", "validation.pgd_steps=2",
        "validation.n_examples=40", "run.progress=false", "run.tensorboard=false", "run.deterministic=true",
        "run.threads=1", "run.device=cpu", "optim.milestones=[2]", "ducat.start_epoch=2"]  # bit-exact: the CPU


def _crash_resume_module():
    spec = importlib.util.spec_from_file_location("crash_resume", ROOT / "benchmarks" / "crash_resume.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("crash_resume", module)
    spec.loader.exec_module(module)
    return module


crash = _crash_resume_module()


def tiny(run_dir: Path, epochs: int = 3, extra=()) -> list[str]:
    return [PRESET, f"run.out={run_dir}", f"optim.epochs={epochs}", *TINY, *extra]


def quiet_train(args: list[str], resume: bool = False):
    return train(load_config(args[0], args[1:]), resume=resume, log=lambda s: None)


def interrupted_run(run_dir: Path, epochs: int = 3, stop_at: int = 3) -> None:
    """A run stopped (Ctrl-C) at the start of epoch ``stop_at``: last.pt = stop_at-1, prev.pt = stop_at-2."""
    args = tiny(run_dir, epochs)
    trainer = Trainer(load_config(args[0], args[1:]), log=lambda s: None)
    original = trainer.train_epoch

    def stop(epoch, progress=None):
        if epoch == stop_at:
            raise KeyboardInterrupt
        return original(epoch, progress)

    trainer.train_epoch = stop
    with pytest.raises(KeyboardInterrupt):
        trainer.run()


def weights(run_dir: Path, name: str = "last.pt") -> dict:
    return load_checkpoint(run_dir / name)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("ducat: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch tiny run (in-process) to compare resumed runs against."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    quiet_train(tiny(run_dir))
    return run_dir


# ---- 1. crash consistency: SIGKILL, resume, compare -------------------------------------------------

@pytest.fixture(scope="module")
def reference_subprocess_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("crash") / "reference"
    crash.reference_run(run_dir)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("point", [
    "replaced:last.pt.sha256@2",  # checksum of the new last.pt in place, its data not: falls back to prev.pt
    "replaced:last.pt@2",         # checkpoint of epoch 2 in place, the run killed right after
    "replaced:last.pt@4",         # final checkpoint in place, run not finished (summary, safetensors)
])
def test_sigkill_in_a_checkpoint_write_then_resume_gives_the_same_run(point, reference_subprocess_run, tmp_path):
    trial = crash.hook_trial(point, reference_subprocess_run, tmp_path / "run")
    assert trial.kills == 1, trial.problems  # the process really died by SIGKILL at that point
    assert not trial.lost, trial.problems    # weights of last.pt/best.pt bit-identical, metrics and summary equal


def test_restart_after_a_crash_before_the_first_checkpoint_has_one_row_per_epoch(tmp_path):
    # a first attempt killed after writing its epoch-1 metrics row but before its first checkpoint
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 9.9}) + "\n" + '{"epo')
    quiet_train(tiny(run_dir, epochs=2))  # nothing to resume: the user starts the run again
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["train_loss"] != 9.9


def test_resume_writes_a_saved_epoch_checkpoint_that_a_kill_left_unwritten(tmp_path):
    # killed after last.pt of epoch 1 but before epoch_1.pt (run.save_epochs): the resume writes it, so that
    # the DUCAT runs forking from a trunk at epoch 1 find it (found by tests/test_launch.py's killed trunk)
    run_dir = tmp_path / "run"
    args = tiny(run_dir, extra=("run.save_epochs=[1]",))
    config = load_config(args[0], args[1:])
    train(config, log=lambda s: None, until_epoch=1)
    epoch_1 = weights(run_dir, "epoch_1.pt")
    (run_dir / "epoch_1.pt").unlink()
    lines: list[str] = []
    train(config, resume=True, log=lines.append, until_epoch=2)
    assert load_checkpoint(run_dir / "epoch_1.pt")["epoch"] == 1
    assert same_weights(weights(run_dir, "epoch_1.pt"), epoch_1)
    assert any("wrote the missing epoch_1.pt from last.pt" in line for line in lines), lines
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2


def test_crash_hook_is_inert_unless_asked(monkeypatch, tmp_path):
    from ducat.fileio import CRASH_ENV, crash_point

    monkeypatch.delenv(CRASH_ENV, raising=False)
    crash_point("replaced", "last.pt")
    monkeypatch.setenv(CRASH_ENV, "replaced:last.pt@3")
    crash_point("replaced", "last.pt")  # 1st and 2nd hits: still alive
    crash_point("replaced", "last.pt")
    crash_point("temp-written", "last.pt")
    save_checkpoint({"model": {"w": torch.ones(1)}}, tmp_path / "other.pt")  # other file names: inert


# ---- 2. corrupted / truncated checkpoints, failed writes --------------------------------------------

def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "bitflip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated-no-checksum":
        path.write_bytes(data[: len(data) // 2])
        path.with_name(path.name + ".sha256").unlink()


@pytest.mark.parametrize("how", ["truncated", "bitflip", "empty", "truncated-no-checksum"])
def test_corrupted_last_pt_names_the_file_and_the_previous_one(straight_run, tmp_path, how):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    _corrupt(run_dir / "last.pt", how)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(run_dir / "last.pt")
    message = str(info.value)
    assert "\n" not in message and str(run_dir / "last.pt") in message and str(run_dir / "prev.pt") in message
    assert load_checkpoint(run_dir / "prev.pt")["epoch"] == 2  # the one it names is good
    code, _, err = cli(["eval", str(run_dir / "last.pt"), "--attacks", "pgd10", "--n-examples", "5",
                        "--no-progress"])
    assert_one_line_error(code, err, str(run_dir / "last.pt"), str(run_dir / "prev.pt"))


def test_resume_with_a_corrupted_last_pt_falls_back_to_prev_pt_loudly(straight_run, tmp_path):
    run_dir = tmp_path / "run"
    interrupted_run(run_dir)  # last.pt = epoch 2, prev.pt = epoch 1
    _corrupt(run_dir / "last.pt", "truncated")
    code, out, err = cli(["train", "--resume", str(run_dir)])
    assert code == 0, err
    assert "warning:" in out and str(run_dir / "last.pt") in out and "resuming from the previous checkpoint" in out
    assert "after epoch 1" in out  # resumed from prev.pt, not from scratch
    assert same_weights(weights(run_dir), weights(straight_run))
    rows = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


@pytest.mark.parametrize("prev", ["corrupted", "missing"])
def test_resume_with_no_usable_checkpoint_is_exit_2_never_a_fresh_start(tmp_path, prev):
    run_dir = tmp_path / "run"
    interrupted_run(run_dir)
    _corrupt(run_dir / "last.pt", "truncated")
    if prev == "corrupted":
        _corrupt(run_dir / "prev.pt", "bitflip")
    else:
        (run_dir / "prev.pt").unlink()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, _, err = cli(["train", "--resume", str(run_dir)])
    assert_one_line_error(code, err, str(run_dir / "last.pt"))
    if prev == "corrupted":
        assert str(run_dir / "prev.pt") in err and "unusable too" in err
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing overwritten: no fresh start (the lock file is the only addition)


def _is_temp_of(file, name: str) -> bool:
    """Is ``file`` the temporary copy ``atomic_write_bytes`` writes before renaming it to ``name``?"""
    return isinstance(file, (str, Path)) and re.fullmatch(rf"\.{re.escape(name)}\.\d+\.[0-9a-f]{{8}}\.tmp",
                                                          Path(file).name) is not None


class _DiskFull:
    """Makes the write or the rename of one file fail with ENOSPC."""

    def __init__(self, name: str, stage: str):
        self.name, self.stage, self.calls = name, stage, 0
        self.real_replace, self.real_open = os.replace, open

    def replace(self, src, dst):
        if self.stage == "rename" and Path(dst).name == self.name:
            self.calls += 1
            raise OSError(28, "No space left on device")
        return self.real_replace(src, dst)

    def open(self, file, mode="r", *args, **kwargs):
        handle = self.real_open(file, mode, *args, **kwargs)
        if self.stage == "write" and _is_temp_of(file, self.name):
            self.calls += 1
            handle.write(b"\0" * 10)  # a partial write, then the disk is full

            def full(data):
                raise OSError(28, "No space left on device")

            handle.write = full
        return handle


@pytest.mark.parametrize("stage", ["write", "rename"])
def test_failed_checkpoint_write_keeps_the_previous_checkpoint_loadable(straight_run, tmp_path, monkeypatch, stage):
    import ducat.fileio as fileio

    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    old = load_checkpoint(run_dir / "last.pt")
    disk = _DiskFull("last.pt", stage)
    monkeypatch.setattr(fileio.os, "replace", disk.replace)
    monkeypatch.setattr(fileio, "open", disk.open, raising=False)
    new_state = {**old, "epoch": 99}
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(new_state, run_dir / "last.pt")
    monkeypatch.undo()
    assert disk.calls == 1
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == old["epoch"]  # old file, its own checksum
    assert same_weights(load_checkpoint(run_dir / "last.pt")["model"], old["model"])
    assert load_checkpoint(run_dir / "prev.pt")["epoch"] == old["epoch"]
    assert not list(run_dir.glob(".*.tmp"))  # the failed write's temporary is gone


def test_disk_full_during_training_is_one_line_and_the_run_resumes(straight_run, tmp_path, monkeypatch):
    import ducat.fileio as fileio

    run_dir = tmp_path / "run"
    disk = _DiskFull("last.pt", "write")
    real_open = disk.open
    seen = Counter()

    def open_failing_on_second_last_pt(file, mode="r", *args, **kwargs):
        if _is_temp_of(file, "last.pt"):
            seen["last"] += 1
            if seen["last"] == 2:
                return real_open(file, mode, *args, **kwargs)
        return disk.real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(fileio, "open", open_failing_on_second_last_pt, raising=False)
    code, _, err = cli(["train", *tiny(run_dir)])
    monkeypatch.undo()
    assert_one_line_error(code, err, "cannot write checkpoint", str(run_dir / "last.pt"), "epoch 2",
                          "No space left on device", "the last good checkpoint is", "(epoch 1)")
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    code, _, err = cli(["train", "--resume", str(run_dir)])
    assert code == 0, err
    assert same_weights(weights(run_dir), weights(straight_run))


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}


def test_disk_full_while_writing_the_final_model_is_one_line_and_resume_finishes(straight_run, tmp_path,
                                                                                  monkeypatch):
    """Probe: a 21-line SafetensorError (exit 1). Now: one line naming the file and the intact checkpoint."""
    import ducat.fileio as fileio

    run_dir = tmp_path / "run"
    disk = _DiskFull("model.safetensors", "write")
    monkeypatch.setattr(fileio, "open", disk.open, raising=False)
    code, _, err = cli(["train", *tiny(run_dir)])
    monkeypatch.undo()
    assert disk.calls == 1
    assert_one_line_error(code, err, f"cannot write {run_dir / 'model.safetensors'} (No space left on device)",
                          f"the last good checkpoint is {run_dir / 'last.pt'} (epoch 3)",
                          f"ducat train --resume {run_dir}")
    files = _files(run_dir)
    assert "model.safetensors" not in files and "summary.json" not in files  # nothing torn, no temporary left
    assert not [name for name in files if name.endswith(".tmp")]
    assert same_weights(weights(run_dir), weights(straight_run))  # the checkpoints are intact
    assert same_weights(weights(run_dir, "best.pt"), weights(straight_run, "best.pt"))
    code, _, err = cli(["train", "--resume", str(run_dir)])  # after freeing space: writes the final files
    assert code == 0, err
    assert same_weights(weights(run_dir, "model.safetensors"), weights(straight_run, "model.safetensors"))
    assert json.loads((run_dir / "summary.json").read_text())["best_epoch"] == \
        json.loads((straight_run / "summary.json").read_text())["best_epoch"]


def test_disk_full_after_best_pt_names_best_pt_and_resume_continues_from_it(tmp_path, monkeypatch):
    """Probe: epoch 1 wrote best.pt, then last.pt failed; the message said "no checkpoint of this run was
    written yet" and --resume refused. Now the message names best.pt, and --resume continues from it."""
    import ducat.fileio as fileio

    eligible_from_1 = ["ducat.start_epoch=1"]  # so that epoch 1 is a best epoch: best.pt is written first
    reference = tmp_path / "reference"
    quiet_train(tiny(reference, extra=eligible_from_1))
    run_dir = tmp_path / "run"
    disk = _DiskFull("last.pt", "write")
    monkeypatch.setattr(fileio, "open", disk.open, raising=False)
    code, _, err = cli(["train", *tiny(run_dir, extra=eligible_from_1)])
    monkeypatch.undo()
    assert disk.calls == 1
    assert_one_line_error(code, err, f"cannot write checkpoint {run_dir / 'last.pt'} at epoch 1",
                          f"the last good checkpoint is {run_dir / 'best.pt'} (epoch 1)",
                          f"ducat train --resume {run_dir}")
    assert "no checkpoint" not in err
    assert not (run_dir / "last.pt").exists() and load_checkpoint(run_dir / "best.pt")["epoch"] == 1
    code, out, err = cli(["train", "--resume", str(run_dir)])
    assert code == 0, err
    assert f"resuming from {run_dir / 'best.pt'}" in out and "after epoch 1" in out
    for name in ("last.pt", "best.pt"):  # the same run as one that never failed
        assert same_weights(weights(run_dir, name), weights(reference, name)), name
    assert crash.metric_rows(run_dir) == crash.metric_rows(reference)


def test_resume_refuses_a_checkpoint_past_the_runs_last_epoch(tmp_path):
    run_dir = tmp_path / "run"
    interrupted_run(run_dir)  # last.pt = epoch 2 of 3
    state = load_checkpoint(run_dir / "last.pt")
    state.pop("format_version")
    save_checkpoint({**state, "epoch": 10**9, "best_epoch": 2}, run_dir / "last.pt", keep_previous=False)
    before = _files(run_dir)
    code, _, err = cli(["train", "--resume", str(run_dir)])
    assert_one_line_error(code, err, str(run_dir / "last.pt"), "epoch 1000000000 is past the run's last epoch (3)")
    assert _files(run_dir) == before


# ---- 3. untrusted checkpoints ----------------------------------------------------------------------

class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _malicious(path: Path, marker: Path, fmt: str) -> Path:
    state = {"model": {"net.fc.weight": torch.zeros(10, 4)}, "config": "{}", "evil": _Payload(marker)}
    if fmt == "zip":
        torch.save(state, path)
    elif fmt == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state))
    return path


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw-pickle"])
def test_code_executing_checkpoint_is_refused_and_never_runs(tmp_path, fmt):
    marker = tmp_path / "pwned"
    evil = _malicious(tmp_path / "evil.pt", marker, fmt)
    # control: the payload is live -- a plain unpickle would run it
    control = tmp_path / "control"
    _malicious(tmp_path / "control.pt", control, fmt)
    if fmt == "raw-pickle":
        pickle.loads((tmp_path / "control.pt").read_bytes())
    else:
        torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()

    with pytest.raises(CheckpointError, match="refused") as info:
        load_checkpoint(evil)
    assert str(evil) in str(info.value) and "\n" not in str(info.value)
    for argv in (["eval", str(evil), "--no-progress"],
                 ["eval", str(evil), "--model", "small_cnn", "--dataset", "digits", "--eps", "0.1"],
                 ["train", PRESET, f"finetune.checkpoint={evil}", f"run.out={tmp_path / 'tuned'}", *TINY]):
        code, _, err = cli(argv)
        assert_one_line_error(code, err, str(evil), "refused")
    assert not marker.exists()
    assert not (tmp_path / "tuned" / "last.pt").exists()


def test_code_executing_last_pt_is_refused_on_resume_and_eval(tmp_path):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    interrupted_run(run_dir)
    (run_dir / "prev.pt").unlink()
    for name in ("last.pt", "best.pt"):
        (run_dir / f"{name}.sha256").unlink()  # a swapped-in file has no matching checksum
        _malicious(run_dir / name, marker, "zip")
    code, _, err = cli(["train", "--resume", str(run_dir)])
    assert_one_line_error(code, err, str(run_dir / "last.pt"), "refused")
    code, _, err = cli(["eval", str(run_dir), "--no-progress"])
    assert_one_line_error(code, err, str(run_dir / "best.pt"), "refused")
    assert not marker.exists()


# ---- 4. non-finite loss ----------------------------------------------------------------------------

def test_non_finite_loss_names_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # epoch 1 at the preset's lr, then lr x 1e30 from epoch 2: the weights blow up within epoch 2
    code, _, err = cli(["train", *tiny(run_dir, extra=["optim.milestones=[1]", "optim.gamma=1e30"])])
    assert_one_line_error(code, err, "non-finite loss", "at epoch 2, step ", str(run_dir / "last.pt"), "(epoch 1)")
    state = load_checkpoint(run_dir / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]


def test_non_finite_loss_in_the_first_epoch_says_no_checkpoint_exists(tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = cli(["train", *tiny(run_dir, extra=["optim.lr=1e30"])])
    assert_one_line_error(code, err, "non-finite loss", "at epoch 1, step ", "no checkpoint of this run was written")
    assert not (run_dir / "last.pt").exists()


# ---- 5. fuzzing the command line --------------------------------------------------------------------

class ComputeStarted(Exception):
    """Raised by the stand-ins of training, evaluation and the reproduction grid."""


def _no_compute(*args, **kwargs):
    raise ComputeStarted


FUZZ: dict[str, Counter] = {name: Counter() for name in ("train", "eval", "reproduce")}
FUZZ_REPORT = os.environ.get("DUCAT_FUZZ_REPORT")  # append the counts as JSON lines to this file


def _report_fuzz(command: str) -> None:
    counts = dict(FUZZ[command])
    print(f"\nfuzz {command}: {counts}")
    if FUZZ_REPORT:
        with open(FUZZ_REPORT, "a") as f:
            f.write(json.dumps({"command": command, **counts}) + "\n")


def _check_invalid(command: str, argv: list[str]) -> None:
    """Run ``main(argv)``; it must end in exit 2 and one ``ducat: error:`` line, with no compute."""
    counts = FUZZ[command]
    counts["tried"] += 1
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse exiting by itself would show up here
            counts["system_exit"] += 1
            raise AssertionError(f"SystemExit({exc.code}) for {argv!r}: {err.getvalue()!r}") from None
        except ComputeStarted:
            counts["compute_started"] += 1
            raise AssertionError(f"invalid input reached compute: {argv!r}") from None
        except Exception:
            counts["tracebacks"] += 1
            raise AssertionError(f"traceback for {argv!r}:\n{traceback.format_exc()}") from None
    text = err.getvalue()
    if not (code == 2 and text.startswith("ducat: error: ") and text.endswith("\n")
            and len(text.splitlines()) == 1 and "Traceback" not in text):
        counts["bad_output"] += 1
        raise AssertionError(f"exit {code}, stderr {text!r} for {argv!r}")
    counts["exit_2_one_line"] += 1


# DUCAT_FUZZ_EXAMPLES=N and DUCAT_FUZZ_RANDOM=1 (fresh random inputs instead of the fixed sequence) for longer hunts
FUZZ_SETTINGS = settings(max_examples=int(os.environ.get("DUCAT_FUZZ_EXAMPLES", 100)), deadline=None,
                         derandomize=not os.environ.get("DUCAT_FUZZ_RANDOM"), database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                HealthCheck.filter_too_much])

# text that never looks like an option (argparse) and has no surrogates (not valid in argv)
safe_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
word = st.from_regex(r"[a-z_]{1,10}", fullmatch=True)
# user text with line breaks of every kind (str.splitlines breaks on all of them)
tricky_text = st.one_of(safe_text, st.builds(lambda a, brk, b: a + brk + b, word, st.sampled_from(
    ["\n", "\r\n", "\r", "\v", "\f", "\x1c", "\x85", "\u2028", "\u2029"]), word))
not_a_number = st.sampled_from(["abc", "ten", "[1, 2]", "{a: 1}", "true", "1..2", "0x", "--", "nan?", "[", "{",
                                "!!python/object/apply:os.system ['true']", "1/0", "'5'", "2001-12-14"])
non_finite = st.sampled_from([".nan", ".inf", "-.inf", "nan", "inf", "-inf", "1e999", "1.0e+999", "-1e999",
                              "1e308/1e-308"])
fraction = st.floats(min_value=0.01, max_value=0.99).map(lambda x: f"{x + 1:.3f}")  # 1.01 .. 1.99
def _config_fields() -> dict[str, dict[str, str]]:
    """{section: {key: annotation text}} of TrainConfig."""
    config = TrainConfig()
    return {f.name: {g.name: str(g.type) for g in fields(getattr(config, f.name))} for f in fields(TrainConfig)}


CONFIG_FIELDS = _config_fields()
KNOWN_SECTIONS = set(CONFIG_FIELDS)
# value ranges the validator enforces, each with values outside it
OUT_OF_RANGE = {
    "data.val_fraction": ["1", "1.5", "-0.1", "-1e-9"],
    "data.batch_size": ["0", "-1", "-1000"], "data.crop_padding": ["-1"], "data.n_train": ["0", "-5"],
    "data.n_test": ["0", "-5"], "attack.eps": ["-0.1", "-8/255"], "attack.step_size": ["-1", "-2/255"],
    "attack.steps": ["-1"], "ducat.alpha": ["1.5", "-0.5"], "ducat.beta1": ["2", "-1"], "ducat.beta2": ["1.01"],
    "optim.epochs": ["0", "-3"], "optim.lr": ["0", "-0.1"], "optim.momentum": ["-0.9"],
    "optim.weight_decay": ["-1e-4"], "optim.gamma": ["0", "-0.1"], "validation.pgd_steps": ["-1"],
    "validation.n_examples": ["0", "-1"], "validation.batch_size": ["0", "-256"], "run.threads": ["0", "-2"],
    "run.save_epochs": ["[0]", "[-1]", "[100000]", "[1, 100000]"], "finetune.start_epoch": ["0", "100000"],
    "run.seed": [str(2**64), str(2**63), str(-2**63 - 1)], "ducat.pairing_seed": [str(2**64), str(-2**70)],
    "method.temperature": ["0", "-0.5"], "method.beta": ["-1", "-6"], "method.lam": ["-1"],
    "method.trades_beta": ["-1"], "method.consistency_lambda": ["-1"],  # legacy keys (configs saved before 31f8ff2)
}
CHOICES = {"data.dataset": None, "model.name": None, "method.name": None, "attack.mode": None, "attack.bn": None,
           "ducat.dummy_init": None, "validation.select": None, "run.amp": None, "run.channels_last": None,
           "run.device": None}
FREE_TEXT = {"data.root", "run.out"}  # any string is a valid value
NO_CUDA_HERE = [] if torch.cuda.is_available() else ["cuda", "cuda:0", "cuda:1"]  # invalid only without a GPU


@st.composite
def invalid_override(draw) -> str:
    kind = draw(st.sampled_from(["unknown-section", "unknown-key", "malformed", "bad-type", "non-finite",
                                 "out-of-range", "bad-choice", "missing-file"]))
    if kind == "unknown-section":
        section = draw(word.filter(lambda w: w not in KNOWN_SECTIONS))
        return f"{section}.{draw(word)}={draw(tricky_text)}"
    if kind == "unknown-key":
        section = draw(st.sampled_from(sorted(CONFIG_FIELDS)))
        key = draw(word.filter(lambda w: w not in CONFIG_FIELDS[section]))
        return f"{section}.{key}={draw(tricky_text)}"
    if kind == "malformed":
        return draw(st.one_of(
            word,  # no '='
            st.builds(lambda k, v: f"{k}={v}", word, safe_text),  # no dot
            st.builds(lambda a, b, c: f"{a}.{b}.{c}=1", word, word, word),  # two dots
            st.just("=5"), st.just(".=1"), st.just("optim.=1"), st.just(".epochs=1")))
    if kind == "out-of-range":
        dotted = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
        return f"{dotted}={draw(st.sampled_from(OUT_OF_RANGE[dotted]))}"
    if kind == "missing-file":
        return f"finetune.checkpoint=/nonexistent/{draw(tricky_text)}.pt"
    if kind == "bad-choice":
        dotted = draw(st.sampled_from(sorted(CHOICES)))
        value = draw(st.one_of(word.map(lambda w: f"zz{w}"), tricky_text.map(lambda w: f"zz{w}"),
                               st.sampled_from(["[]", "{}", "true", "[cpu]"])))
        if dotted == "run.device":
            value = draw(st.sampled_from([value, "cudax", "cuda:abc", "cuda:", "gpu", "cuda0", *NO_CUDA_HERE]))
        return f"{dotted}={value}"
    # bad-type / non-finite: a field whose declared type the value cannot have
    section = draw(st.sampled_from(sorted(CONFIG_FIELDS)))
    key = draw(st.sampled_from(sorted(CONFIG_FIELDS[section])))
    annotation = CONFIG_FIELDS[section][key]
    dotted = f"{section}.{key}"
    assume(dotted not in FREE_TEXT and dotted not in CHOICES and "str" not in annotation)
    if kind == "non-finite":
        assume("int" in annotation or "float" in annotation)
        return f"{dotted}={draw(non_finite)}"
    if "bool" in annotation:
        value = draw(st.one_of(st.sampled_from(["maybe", "2", "0.5", "[true]", "{a: 1}", "-1", "on?"]),
                               word.filter(lambda w: w not in ("true", "false", "yes", "no", "on", "off",
                                                               "y", "n"))))
    elif "list" in annotation:
        value = draw(st.sampled_from(["abc", "{a: 1}", "[x]", "[1.5]", "[true]", "[[1]]", "true"]))
    elif "int" in annotation:
        value = draw(st.one_of(not_a_number, fraction))
    else:  # float
        value = draw(not_a_number.filter(lambda v: v not in ("1/0",)) | st.just("1/0"))
    return f"{dotted}={value}"


VALID_OVERRIDES = st.sampled_from(["optim.epochs=2", "data.batch_size=32", "attack.eps=8/255", "ducat.alpha=0.3",
                                   "run.progress=false", "validation.select=last", "method.name=trades",
                                   "run.device=cpu", "optim.milestones=[1]", "data.n_train=100"])


@pytest.fixture
def no_compute(monkeypatch):
    import ducat.eval.api
    import ducat.reproduce
    import ducat.reproduce.results
    import ducat.train

    monkeypatch.setattr(ducat.train.Trainer, "run", _no_compute)  # Trainer() still checks the run dir
    monkeypatch.setattr(ducat.eval.api, "evaluate", _no_compute)
    monkeypatch.setattr(ducat.reproduce, "train_run", _no_compute)
    monkeypatch.setattr(ducat.reproduce.results, "evaluate_runs", _no_compute)  # imported when the stage runs


@st.composite
def train_argv(draw, files: Path) -> list[str]:
    kind = draw(st.sampled_from(["preset+overrides", "bad-config-name", "yaml-file", "resume", "argparse"]))
    if kind == "preset+overrides":
        preset = draw(st.sampled_from([p for p in preset_names() if p.startswith("cpu-")]))
        overrides = draw(st.lists(VALID_OVERRIDES, max_size=3))
        bad = draw(st.lists(invalid_override(), min_size=1, max_size=2))
        mixed = draw(st.permutations(overrides + bad))
        return ["train", preset, *mixed]
    if kind == "bad-config-name":
        name = draw(tricky_text.filter(lambda t: t.strip() and not t.startswith("-") and t not in preset_names()))
        assume(not Path(name).exists())
        return ["train", name, *draw(st.lists(VALID_OVERRIDES, max_size=2))]
    if kind == "yaml-file":
        path = files / f"cfg{draw(st.integers(0, 10**9))}.yaml"
        path.write_bytes(draw(yaml_document(files)))
        return ["train", str(path), *draw(st.lists(VALID_OVERRIDES, max_size=2))]
    if kind == "resume":
        run_dir = draw(resume_dir(files))
        extra = draw(st.lists(st.one_of(VALID_OVERRIDES, invalid_override(), st.just("run.threads=1")), max_size=2))
        config_arg = draw(st.sampled_from([[], [PRESET]]))
        return ["train", "--resume", str(run_dir), *config_arg, *extra]
    return ["train", *draw(argparse_noise())]


@st.composite
def argparse_noise(draw) -> list[str]:
    """Options argparse rejects: unknown flags, a flag without its value."""
    choice = draw(st.sampled_from(["unknown-flag", "resume-without-value", "resume-dashdash", "nothing"]))
    if choice == "unknown-flag":
        return [PRESET, f"--zz{draw(word)}"]
    if choice == "resume-without-value":
        return ["--resume"]
    if choice == "resume-dashdash":  # Python 3.11's argparse reads this as an empty list
        return ["--resume=--"]
    return []


@st.composite
def yaml_document(draw, files: Path) -> bytes:
    kind = draw(st.sampled_from(["bad-yaml", "not-a-mapping", "section-not-mapping", "bad-value", "base",
                                 "binary"]))
    if kind == "bad-yaml":
        return draw(st.sampled_from([b"data: [1, 2", b"a: b: c", b"{", b"\t- x\n y: 1", b"key: 'open",
                                     b"? [a, b]\n: 1"]))
    if kind == "not-a-mapping":
        return draw(st.sampled_from([b"- 1\n- 2", b"42", b"'text'", b"[data, model]"]))
    if kind == "section-not-mapping":
        section = draw(st.sampled_from(sorted(CONFIG_FIELDS)))
        return f"{section}: {draw(st.sampled_from(['5', '[1, 2]', 'text', 'null']))}\n".encode()
    if kind == "bad-value":
        override = draw(invalid_override())
        dotted, _, value = override.partition("=")
        if dotted.count(".") != 1 or not all(dotted.split(".")):  # malformed: an unknown top-level section
            return f"{json.dumps(dotted or 'x')}: {json.dumps(value)}\n".encode()
        section, key = dotted.split(".")
        return (f"base: {PRESET}\n{section}:\n  {key}: {json.dumps(value)}\n").encode()
    if kind == "base":
        target = draw(st.sampled_from(["self", "missing", "directory", "list"]))
        if target == "self":
            return b"base: loop.yaml\n"  # written below as a file that names itself
        if target == "missing":
            return f"base: no-such-{draw(word)}\n".encode()
        if target == "directory":
            return f"base: {files}\n".encode()
        return b"base: [a, b]\n"
    return draw(st.binary(min_size=1, max_size=40).filter(lambda b: not b.isascii()))


@st.composite
def resume_dir(draw, files: Path) -> Path:
    run_dir = files / f"run{draw(st.integers(0, 10**9))}"
    shutil.rmtree(run_dir, ignore_errors=True)
    state = draw(st.sampled_from(["missing", "empty", "garbage-config", "bad-config", "no-checkpoint"]))
    if state == "missing":
        return run_dir
    run_dir.mkdir(parents=True)
    if state == "garbage-config":
        (run_dir / "config.yaml").write_bytes(draw(st.sampled_from([b"", b"[1, 2", b"- a\n- b", b"\xff\xfe\x00",
                                                                    b"42", b"data: 5"])))
    elif state == "bad-config":
        (run_dir / "config.yaml").write_text("optim: {epochs: -1}\n")
    elif state == "no-checkpoint":
        (run_dir / "config.yaml").write_text(describe(load_config(PRESET, TINY + [f"run.out={run_dir}"])))
    return run_dir


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory) -> Path:
    files = tmp_path_factory.mktemp("fuzz")
    (files / "loop.yaml").write_text("base: loop.yaml\n")
    return files


def test_fuzz_train_invalid_input_is_one_line_exit_2(no_compute, fuzz_files):
    @FUZZ_SETTINGS
    @given(argv=train_argv(fuzz_files))
    def check(argv):
        _check_invalid("train", argv)

    check()
    _report_fuzz("train")


@pytest.fixture(scope="module")
def eval_targets(tmp_path_factory) -> dict[str, Path]:
    from ducat.runs import build_run_model

    root = tmp_path_factory.mktemp("eval-targets")
    config = load_config(PRESET, TINY + [f"run.out={root / 'run'}"])
    (root / "run").mkdir()
    model = build_run_model(config)
    save_checkpoint({"model": model.state_dict(), "config": config.to_json(), "epoch": 1}, root / "run" / "last.pt")
    (root / "garbage.pt").write_bytes(b"\x80\x04garbage" * 10)
    (root / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not a checkpoint")
    return {"valid": root / "run" / "last.pt", "valid-dir": root / "run", "garbage": root / "garbage.pt",
            "garbage-st": root / "garbage.safetensors", "empty-dir": root / "empty", "text": root / "notes.txt",
            "missing": root / "missing.pt", "missing-newline": root / "no\nsuch\u2028file.pt"}


@st.composite
def invalid_eval_option(draw) -> list[str]:
    option = draw(st.sampled_from(["--eps", "--n-examples", "--batch-size", "--seed", "--attacks", "--protocols",
                                   "--device", "--dataset", "--model"]))
    if option == "--eps":
        value = draw(st.one_of(st.sampled_from(["0", "-8/255", "-0.1", "abc", "nan", "inf", "1/0", "-inf", "1e999",
                                                "8/0", "", "0/1"]), not_a_number))
        return [f"--eps={value}"]
    if option in ("--n-examples", "--batch-size"):
        value = draw(st.one_of(st.sampled_from(["0", "-1", "-100", "1.5", "", "1e3"]), not_a_number))
        return [f"{option}={value}"]
    if option == "--seed":
        return [f"--seed={draw(st.sampled_from(['abc', '1.5', str(2**64), str(-2**64), str(10**30), '']))}"]
    if option == "--attacks":
        names = draw(st.lists(st.sampled_from(["pgd10", "margin", "cw", "deepfool", "zz"]), min_size=1, max_size=3))
        bad = draw(word.filter(lambda w: w not in ("pgd10", "margin", "cw", "pgd100", "autoattack", "targeted",
                                                   "apgd_ce", "apgd_t", "fab", "square", "pgd20")))
        return [f"--attacks={','.join([*names, 'zz' + bad])}"]
    if option == "--protocols":
        return [f"--protocols=zz{draw(tricky_text)}"]
    if option == "--device":
        return [f"--device={draw(st.sampled_from(['gpu', 'tpu', 'cuda:x', 'cudax', 'mps', 'zz', '', *NO_CUDA_HERE]))}"]
    if option == "--dataset":
        return [f"--dataset=zz{draw(tricky_text)}", "--model", "small_cnn"]
    return [f"--model=zz{draw(tricky_text)}", "--dataset", "digits"]


VALID_EVAL_OPTIONS = st.sampled_from([["--fast"], ["--no-progress"], ["--no-early-stop"], ["--n-examples", "5"],
                                      ["--attacks", "pgd10"], ["--eps", "0.1"], ["--seed", "3"]])


@st.composite
def eval_argv(draw, targets: dict[str, Path]) -> list[str]:
    name = draw(st.sampled_from(sorted(targets)))
    bad = draw(st.lists(invalid_eval_option(), min_size=0 if name not in ("valid", "valid-dir") else 1, max_size=2))
    flags = {b[0].split("=")[0] for b in bad}
    # argparse keeps the last value of an option: no valid value may follow an invalid one
    options = draw(st.lists(VALID_EVAL_OPTIONS.filter(lambda o: o[0] not in flags), max_size=2))
    if name == "valid-dir" and draw(st.booleans()):
        bad.append([f"--zz{draw(word)}"])  # argparse: unknown option
    parts = draw(st.permutations(options + bad))
    return ["eval", str(targets[name]), *[a for p in parts for a in p]]


def test_fuzz_eval_invalid_input_is_one_line_exit_2(no_compute, eval_targets, tmp_path):
    @FUZZ_SETTINGS
    @given(argv=eval_argv(eval_targets))
    def check(argv):
        _check_invalid("eval", [*argv, "--out", str(tmp_path / "eval")])

    check()
    _report_fuzz("eval")


@st.composite
def reproduce_argv(draw, files: Path) -> list[str]:
    scale = draw(st.sampled_from(["smoke", "mini", "paper"]))
    out = files / f"out{draw(st.integers(0, 10**9))}"
    args = {"--scale": scale, "--out": str(out)}
    faults = draw(st.lists(st.sampled_from(["scale", "no-scale", "no-out", "seeds", "nproc", "out-is-file",
                                            "out-under-file", "unknown-flag", "data-root", "dashdash"]), min_size=1,
                           max_size=2,
                           unique=True))
    extra: list[str] = []
    for fault in faults:
        if fault == "scale":
            args["--scale"] = draw(st.one_of(tricky_text.map(lambda w: "zz" + w),
                                             st.sampled_from(["", "SMOKE", "tiny"])))
        elif fault == "no-scale":
            args.pop("--scale", None)
        elif fault == "no-out":
            args.pop("--out", None)
        elif fault == "seeds":
            extra.append(f"--seeds={draw(st.sampled_from(['0', '-1', 'abc', '1.5', '', '-100']))}")
        elif fault == "nproc":
            extra.append(f"--nproc={draw(st.sampled_from(['0', '-1', 'abc', '1.5', '', '-8']))}")
        elif fault == "out-is-file":
            shutil.rmtree(out, ignore_errors=True)  # a directory left by an earlier example
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("a file")
        elif fault == "out-under-file":
            blocker = files / f"file{draw(st.integers(0, 10**9))}"
            blocker.write_text("a file")
            if "--out" in args:
                args["--out"] = str(blocker / "sub" / "out")
        elif fault == "unknown-flag":
            extra.append(f"--zz{draw(word)}")
        elif fault == "dashdash":
            extra.append(f"{draw(st.sampled_from(['--out', '--seeds', '--nproc', '--data-root', '--scale']))}=--")
        elif fault == "data-root":  # CIFAR files are not there
            args["--scale"] = "paper"
            extra.append(f"--data-root={files / 'no-such-root'}")
    argv = ["reproduce"]
    for key, value in args.items():
        argv += [key, value]
    return argv + extra


def test_fuzz_reproduce_invalid_input_is_one_line_exit_2(no_compute, fuzz_files):
    @FUZZ_SETTINGS
    @given(argv=reproduce_argv(fuzz_files))
    def check(argv):
        _check_invalid("reproduce", argv)

    check()
    _report_fuzz("reproduce")


# ---- 6. oversized checkpoints (zip bombs) and malformed contents -----------------------------------

BOMB_DECLARED = 2**30 + 2**24  # 1040 MiB of float32 zeros: just above the default cap of 1024 MiB


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A real torch zip checkpoint ``{"model": {"net.fc.weight": zeros}}`` whose 1040 MiB storage entry is
    rewritten deflate-compressed: about 5 MB on disk. Built without holding the storage in memory: the
    tensor is never touched (``torch.empty`` pages are mapped lazily), ``skip_data`` writes its entry as
    a hole, and the zeros are streamed into the new archive in 16 MiB chunks."""
    root = tmp_path_factory.mktemp("bomb")
    with torch.serialization.skip_data():
        torch.save({"model": {"net.fc.weight": torch.empty(BOMB_DECLARED // 4)}}, root / "plain.pt")
    zeros = bytes(2**24)
    with zipfile.ZipFile(root / "plain.pt") as plain, zipfile.ZipFile(root / "bomb.pt", "w") as out:
        for info in plain.infolist():
            if info.file_size == BOMB_DECLARED:
                entry = zipfile.ZipInfo(info.filename)
                entry.compress_type = zipfile.ZIP_DEFLATED
                with out.open(entry, "w") as f:
                    for _ in range(BOMB_DECLARED // len(zeros)):
                        f.write(zeros)
            else:
                out.writestr(info, plain.read(info.filename))
    (root / "plain.pt").unlink()
    return root / "bomb.pt"


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


@contextmanager
def peak_rss_growth():
    """Measures how far this process's peak RSS rises above its RSS at entry: yields a dict that holds
    ``bytes`` on exit. Resets the kernel's high-water mark first (``/proc/self/clear_refs``), so earlier
    peaks of the test process do not hide a new one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    base, result = _status_kib("VmRSS"), {}
    yield result
    result["bytes"] = (_status_kib("VmHWM") - base) * 1024


def test_zip_bomb_checkpoint_is_refused_before_anything_is_inflated(bomb, tmp_path, monkeypatch):
    from ducat.models import build_model

    assert bomb.stat().st_size < 10 * 2**20
    with zipfile.ZipFile(bomb) as archive:  # the bomb is what it claims: one entry declares 1040 MiB
        assert sum(i.file_size for i in archive.infolist()) > BOMB_DECLARED
    small_cnn = build_model("small_cnn", 20, 1)
    for max_bytes, needles in ((None, ["1040.0 MiB", "limit of 1024.0 MiB", "DUCAT_MAX_CHECKPOINT_MB"]),
                               (checkpoint_size_limit(small_cnn), ["1040.0 MiB", "3 x its parameters"])):
        with peak_rss_growth() as peak, pytest.raises(CheckpointError) as info:
            load_checkpoint(bomb, max_bytes=max_bytes)
        message = str(info.value)
        assert "\n" not in message and str(bomb) in message and "refused" in message
        assert all(n in message for n in needles), message
        print(f"\nzip bomb, max_bytes={max_bytes}: peak RSS growth {peak['bytes'] / 2**20:.1f} MiB")
        assert peak["bytes"] < 64 * 2**20, peak  # far below the 1040 MiB it declares
    # the CLI paths of the probe: ducat eval FILE, and finetune.checkpoint=FILE (imports warmed up first)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    tune = [PRESET, f"run.out={tmp_path / 'tuned'}", *TINY]
    for argv in (["eval", "{}", "--no-progress"], ["train", *tune, "finetune.checkpoint={}"]):
        assert cli([a.format(garbage) for a in argv])[0] == 2
        with peak_rss_growth() as peak:
            code, _, err = cli([a.format(bomb) for a in argv])
        assert_one_line_error(code, err, str(bomb), "1040.0 MiB")
        print(f"zip bomb, ducat {argv[0]}: peak RSS growth {peak['bytes'] / 2**20:.1f} MiB")
        assert peak["bytes"] < 64 * 2**20, (argv[0], peak)
    for bad in ("0", "-5", "abc", "nan"):
        monkeypatch.setenv("DUCAT_MAX_CHECKPOINT_MB", bad)
        with pytest.raises(CheckpointError, match="DUCAT_MAX_CHECKPOINT_MB must be a positive number"):
            load_checkpoint(bomb)


@pytest.mark.slow
def test_the_zip_bomb_is_real_torch_load_alone_inflates_it(bomb, monkeypatch):
    """Control for the test above: unchecked, the same file makes torch allocate its 1040 MiB, and the
    peak measurement sees it. With the cap raised, load_checkpoint reads it too (it is a valid file)."""
    with peak_rss_growth() as peak:
        state = torch.load(bomb, weights_only=True)
    assert state["model"]["net.fc.weight"].numel() * 4 == BOMB_DECLARED
    del state
    print(f"\nzip bomb, plain torch.load: peak RSS growth {peak['bytes'] / 2**20:.1f} MiB")
    assert peak["bytes"] > 0.9 * BOMB_DECLARED, peak
    monkeypatch.setenv("DUCAT_MAX_CHECKPOINT_MB", "2048")
    assert load_checkpoint(bomb)["model"]["net.fc.weight"].numel() * 4 == BOMB_DECLARED


def test_normal_checkpoints_load_within_their_architecture_bound(tmp_path):
    from safetensors.torch import save_file

    from ducat.models import build_model

    model = build_model("small_cnn", 20, 1)
    weights = model.state_dict()
    limit = checkpoint_size_limit(model)
    tensor_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert limit == 3 * tensor_bytes + 16 * 2**20
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 1, 8, 8)).sum().backward()
    optimizer.step()  # momentum buffers as big as the weights: a full training checkpoint
    save_checkpoint({"model": weights, "optimizer": optimizer.state_dict(), "config": "{}"}, tmp_path / "last.pt")
    assert same_weights(load_checkpoint(tmp_path / "last.pt", max_bytes=limit)["model"], weights)
    save_file(weights, str(tmp_path / "model.safetensors"))
    assert same_weights(load_checkpoint(tmp_path / "model.safetensors", max_bytes=limit)["model"], weights)
    torch.save(weights, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert same_weights(load_checkpoint(tmp_path / "legacy.pt", max_bytes=limit)["model"], weights)
    for name in ("last.pt", "model.safetensors", "legacy.pt"):  # the same files against a bound too small
        with pytest.raises(CheckpointError, match="more than the limit of 0.1 MiB"):
            load_checkpoint(tmp_path / name, max_bytes=2**17)


def _safetensors_bytes(header: bytes, length: int | None = None, data: bytes = b"") -> bytes:
    return (len(header) if length is None else length).to_bytes(8, "little") + header + data


@pytest.mark.parametrize("case", ["huge-length", "length-past-the-end", "offsets-past-the-end", "nested",
                                  "not-a-table", "empty"])
def test_bogus_safetensors_header_is_refused_without_allocating(tmp_path, case):
    path = tmp_path / "model.safetensors"
    table = json.dumps({"w": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}}).encode()
    path.write_bytes({
        "huge-length": _safetensors_bytes(b"{}", length=2**62),
        "length-past-the-end": _safetensors_bytes(b"{}", length=4096),
        "offsets-past-the-end": _safetensors_bytes(table, data=b"\0" * 16),
        "nested": _safetensors_bytes(b"[" * 100000 + b"]" * 100000),
        "not-a-table": _safetensors_bytes(b'{"w": 5}'),
        "empty": b"",
    }[case])
    with peak_rss_growth() as peak, pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value) and "not a valid safetensors" in str(info.value)
    assert peak["bytes"] < 64 * 2**20, peak


@pytest.fixture(scope="module")
def training_state(straight_run) -> dict:
    state = load_checkpoint(straight_run / "last.pt")
    check_training_state(state, straight_run / "last.pt")  # a real one passes
    return state


MALFORMED = {
    "model-not-tensors": {"model": {"net.fc.weight": [1.0]}},
    "optimizer-missing": {"optimizer": None},
    "optimizer-no-groups": {"optimizer": {"state": {}}},
    "rng-not-tensors": {"rng": {"generator": 2}}, "rng-missing": {"rng": {}},
    "rng-torch-wrong-size": {"rng": {"torch": torch.zeros(3, dtype=torch.uint8),
                                     "generator": torch.zeros(5056, dtype=torch.uint8)}},
    "epoch-negative": {"epoch": -1}, "epoch-bool": {"epoch": True}, "epoch-float": {"epoch": 1.5},
    "best-epoch-after-epoch": {"best_epoch": 99}, "best-metric-text": {"best_metric": "0.5"},
    "best-metric-nan": {"best_metric": math.nan},
    "config-missing": {"config": None}, "config-list": {"config": "[1, 2]"}, "config-number": {"config": "3"},
    "config-section-list": {"config": '{"finetune": [1]}'}, "config-not-json": {"config": "{data: 1"},
    "config-deep": {"config": "[" * 100000 + "]" * 100000},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_training_state_is_one_line_naming_the_file(training_state, tmp_path, case):
    path = tmp_path / "last.pt"
    save_checkpoint({**training_state, **MALFORMED[case]}, path)
    with pytest.raises(CheckpointError) as info:
        check_training_state(load_checkpoint(path), path)
    assert "\n" not in str(info.value) and str(path) in str(info.value), str(info.value)


BAD_CONFIG_TEXT = {"list": "[1, 2]", "number": "3", "string": '"text"', "section-list": '{"finetune": [1]}',
                   "section-number": '{"data": {}, "run": 5}', "not-json": "{data: 1",
                   "deep-list": "[" * 100000 + "]" * 100000, "deep-dict": '{"a": ' * 100000 + "{}" + "}" * 100000}


@pytest.mark.parametrize("case", sorted(BAD_CONFIG_TEXT))
def test_checkpoint_config_that_is_not_a_mapping_of_sections_is_one_line(case, tmp_path):
    path = tmp_path / "best.pt"
    with pytest.raises(CheckpointError) as info:
        checkpoint_config({"config": BAD_CONFIG_TEXT[case]}, path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert checkpoint_config({"model": {}}, path) is None  # a foreign checkpoint has no config: not an error
    assert checkpoint_config({"config": '{"data": {"dataset": "digits"}}'}, path) == {"data": {"dataset": "digits"}}


# ---- 7. fuzzing checkpoint contents -----------------------------------------------------------------
# Real .pt files whose entries have a wrong type or shape, through every command that reads a checkpoint.
# A command must refuse (exit 2, one line, nothing changed) every file whose faulty entry it reads; an entry
# it does not read (the optimizer, for ``ducat eval``) must not stop it: it reaches compute (stubbed here).

MISSING = object()  # the entry is deleted


def _reshaped(model: dict) -> dict:
    key = next(k for k, v in model.items() if v.dim() >= 2)
    return {**model, key: model[key].flatten()}


def _transposed(model: dict) -> dict:
    key = next(k for k, v in model.items() if k.endswith("fc.weight"))
    return {**model, key: model[key].t().contiguous()}


def _momentum(shape_of) -> Callable[[dict, dict], dict]:
    """The optimizer state with the first momentum buffer replaced by ``shape_of(buffer)``."""
    def fault(optimizer: dict, state: dict) -> dict:
        first = min(optimizer["state"])
        return {**optimizer, "state": {**optimizer["state"], first: {"momentum_buffer": shape_of(
            optimizer["state"][first]["momentum_buffer"])}}}
    return fault


def _group(change: Callable[[dict], dict]) -> Callable[[dict, dict], dict]:
    return lambda optimizer, state: {**optimizer, "param_groups": [change(dict(optimizer["param_groups"][0])),
                                                                   *optimizer["param_groups"][1:]]}


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


DEEP_LIST = "[" * 100000 + "]" * 100000
# field -> faults: a value, or a function (entry, whole state) -> value
CONTENT_FAULTS: dict[str, list] = {
    "config": [MISSING, 3, 2.5, None, True, [1], {"data": {}}, torch.zeros(2), "", "[1, 2]", "3", '"text"',
               '{"finetune": [1]}', '{"data": 5}', "{not json", DEEP_LIST, '{"a": ' * 50000 + "{}" + "}" * 50000,
               "{}", '{"zz": {}}', '{"data": {"dataset": "nope"}}', '{"optim": {"epochs": -1}}',
               '{"data": {"batch_size": "x"}}', '{"model": {"name": "resnet18"}}'],
    "model": [MISSING, [1], "text", 3, None, {}, {"net.fc.weight": [1.0]}, {1: torch.zeros(1)},
              {"net": {"fc": torch.zeros(1)}}, lambda m, s: dict(list(m.items())[:-1]),
              lambda m, s: {**m, "extra.weight": torch.zeros(3)}, lambda m, s: _reshaped(m),
              lambda m, s: _transposed(m), lambda m, s: {**m, "dummy_index": torch.zeros(10, dtype=torch.long)},
              lambda m, s: {**m, "dummy_index": torch.arange(10, 20).view(2, 5)},
              lambda m, s: {**m, "dummy_index": torch.arange(20, 40)}],
    "optimizer": [MISSING, 3, None, [1], "sgd", {}, {"state": {}}, {"state": [], "param_groups": []},
                  {"state": {}, "param_groups": 5}, {"state": {}, "param_groups": [1]},
                  {"state": {}, "param_groups": []},
                  _group(lambda g: _without(g, "params")), _group(lambda g: {**g, "params": g["params"][:-1]}),
                  _group(lambda g: {**g, "params": 5}), _group(lambda g: _without(g, "momentum")),
                  _group(lambda g: {**g, "momentum": "x"}), _group(lambda g: {**g, "nesterov": None}),
                  _group(lambda g: {**g, "weight_decay": [1]}), _momentum(lambda b: b.flatten()[:1]),
                  _momentum(lambda b: b.t().contiguous() if b.dim() == 2 else b.view(-1, 1)), _momentum(lambda b: 5),
                  _momentum(lambda b: "x")],
    "rng": [MISSING, 3, None, [1], {}, {"generator": 5}, {"generator": torch.zeros(5056)},
            {"generator": torch.zeros(2, 2528, dtype=torch.uint8)}, {"generator": torch.zeros(3, dtype=torch.uint8)},
            lambda r, s: {**r, "torch": torch.zeros(3, dtype=torch.uint8)}, lambda r, s: {**r, "torch": "x"}],
    "epoch": [MISSING, -1, 1.5, "3", True, None, [3], torch.tensor(3), 10**9, 2**70, -2**70],
    "best_metric": [MISSING, "0.5", None, math.nan, [0.5], True, torch.tensor(0.5)],
    "best_epoch": [MISSING, -1, 99, "1", 1.5, None, True, torch.tensor(1), 2**70],
}
# the entries each command reads (and must refuse when wrong)
READS = {"eval": {"config", "model"}, "eval-model": {"model"}, "finetune": {"model"},
         "resume": set(CONTENT_FAULTS)}


def _apply_faults(base: dict, faults: list[tuple[str, object]]) -> dict:
    state = dict(base)
    for field, fault in faults:
        if fault is MISSING:
            state.pop(field, None)
        else:
            state[field] = fault(state[field], state) if callable(fault) else fault
    return state


class ContentFuzz:
    """Runs one command on a checkpoint file and checks the outcome; counts what happened."""

    def __init__(self, root: Path, states: dict[str, dict], run_template: Path):
        self.root, self.states, self.run_template = root, states, run_template
        self.counts: Counter = Counter()

    def argv(self, command: str, file: Path) -> list[str]:
        out = ["--out", str(self.root / "eval-out"), "--no-progress", "--n-examples", "5"]
        return {"eval": ["eval", str(file), *out],
                "eval-model": ["eval", str(file), "--model", "small_cnn", "--dataset", "digits", "--eps", "0.1", *out],
                "finetune": ["train", PRESET, f"finetune.checkpoint={file}", f"run.out={self.root / 'tuned'}", *TINY],
                "resume": ["train", "--resume", str(self.root / "run")]}[command]

    def write(self, command: str, state: dict) -> Path:
        file = self.root / "run" / "last.pt" if command == "resume" else self.root / "file.pt"
        if command == "resume":
            shutil.rmtree(file.parent, ignore_errors=True)
            shutil.copytree(self.run_template, file.parent)  # config.yaml and metrics.jsonl of a real run; no prev.pt
        torch.save(state, file)  # as another tool would, without a checksum file
        return file

    def check(self, command: str, faults: list[tuple[str, object]], state: dict | None = None) -> None:
        """``state``: the file's content as is; else the base state of ``command`` with ``faults`` applied."""
        base = self.states["plain" if command == "eval-model" else "ducat"]
        file = self.write(command, _apply_faults(base, faults) if state is None else state)
        faults = [(field, _short(fault)) for field, fault in faults] or [("whole file", "")]
        watched = file.parent if command == "resume" else self.root / "tuned"
        before = _files(watched) if watched.is_dir() else {}
        argv = self.argv(command, file)
        self.counts["tried"] += 1
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(argv)
            except ComputeStarted:
                code = None
            except BaseException:
                self.counts["tracebacks"] += 1
                raise AssertionError(f"traceback for {command} {faults}:\n{traceback.format_exc()}") from None
        must_refuse = state is not None or any(field in READS[command] for field, _ in faults)
        if code is None:
            self.counts["compute_reached"] += 1
            assert not must_refuse, f"{command} reached compute with a faulty entry it reads: {faults}"
            return
        text = err.getvalue()
        assert code == 2 and text.startswith("ducat: error: ") and text.count("\n") == 1, (command, faults, text)
        assert must_refuse, f"{command} refused a file whose faults it does not read: {faults}: {text}"
        assert (_files(watched) if watched.is_dir() else {}) == before, (command, faults)
        self.counts["exit_2_one_line"] += 1


def _short(fault: object) -> str:
    if fault is MISSING:
        return "<missing>"
    return f"<function {fault.__qualname__}>" if callable(fault) else repr(fault)[:60]


def _compute_stub(*args, **kwargs):
    """Stands in for training and evaluation; the provenance an evaluation would write must be JSON."""
    json.dumps(kwargs.get("provenance"))
    raise ComputeStarted


@pytest.fixture
def content_fuzz(monkeypatch, training_state, straight_run, tmp_path) -> ContentFuzz:
    import ducat.eval.api
    import ducat.train
    from ducat.models import build_model

    monkeypatch.setattr(ducat.train.Trainer, "run", _compute_stub)
    monkeypatch.setattr(ducat.eval.api, "evaluate", _compute_stub)
    template = tmp_path / "template"
    template.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(straight_run / name, template / name)
    ducat_state = _without(training_state, "format_version")
    plain_state = {**ducat_state, "model": build_model("small_cnn", 10, 1).state_dict()}
    return ContentFuzz(tmp_path, {"ducat": ducat_state, "plain": plain_state}, template)


def test_checkpoint_contents_controls_reach_compute(content_fuzz):
    """The unaltered files pass every command (so the refusals below are the faults' doing)."""
    for command in READS:
        content_fuzz.check(command, [])
    assert content_fuzz.counts["compute_reached"] == len(READS)


PROBE_FAULTS = [  # the probe's findings: each was a traceback (exit 1) on main at 048b4d6
    ("eval", "config", "[1, 2]"), ("eval", "config", "3"), ("eval", "config", '{"finetune": [1]}'),
    ("eval", "config", DEEP_LIST), ("eval-model", "model", [1]), ("finetune", "model", [1]),
    ("finetune", "model", "text"), ("finetune", "model", 3), ("resume", "optimizer", MISSING),
    ("resume", "rng", {"generator": 5}), ("resume", "rng", None), ("resume", "epoch", "3"), ("resume", "epoch", 1.5)]


@pytest.mark.parametrize("command, field, fault", PROBE_FAULTS, ids=lambda v: _short(v)[:20])
def test_the_probes_checkpoint_faults_are_one_line_and_change_nothing(content_fuzz, command, field, fault):
    content_fuzz.check(command, [(field, fault)])
    assert content_fuzz.counts["exit_2_one_line"] == 1


def test_resume_from_a_plain_state_dict_is_one_line_and_changes_nothing(content_fuzz, training_state):
    content_fuzz.check("resume", [], state=training_state["model"])  # last.pt = {name: tensor}, as torch.save'd
    assert content_fuzz.counts["exit_2_one_line"] == 1


@pytest.mark.parametrize("field", sorted(CONTENT_FAULTS))
def test_every_checkpoint_content_fault_is_refused_by_resume(content_fuzz, field):
    """Each fault of each entry once, through ``ducat train --resume`` (which reads every entry)."""
    problems = []
    for fault in CONTENT_FAULTS[field]:
        try:
            content_fuzz.check("resume", [(field, fault)])
        except AssertionError as exc:
            problems.append(str(exc).splitlines()[0])
    assert not problems, problems


@st.composite
def content_faults(draw) -> tuple[str, list[tuple[str, object]]]:
    command = draw(st.sampled_from(sorted(READS)))
    fields_ = draw(st.lists(st.sampled_from(sorted(CONTENT_FAULTS)), min_size=1, max_size=2, unique=True))
    return command, [(f, draw(st.sampled_from(CONTENT_FAULTS[f]))) for f in fields_]


def test_fuzz_checkpoint_contents_through_every_command(content_fuzz):
    @FUZZ_SETTINGS
    @given(case=content_faults())
    def check(case):
        content_fuzz.check(*case)

    check()
    print(f"\nfuzz checkpoint contents: {dict(content_fuzz.counts)}")
    if FUZZ_REPORT:
        with open(FUZZ_REPORT, "a") as f:
            f.write(json.dumps({"command": "checkpoint-contents", **content_fuzz.counts}) + "\n")


def test_disk_full_while_eval_writes_its_report_is_one_line(tmp_path, monkeypatch, capsys):
    """An OSError writing ``ducat eval``'s outputs (here: the disk is full) is one line and exit 2."""
    import errno

    import ducat.eval.report as report_module

    run_dir = tmp_path / "run"
    quiet_train(tiny(run_dir, epochs=2))

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report_module, "atomic_write_bytes", disk_full)
    code = main(["eval", str(run_dir), "--attacks", "pgd10", "--n-examples", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ducat: error: cannot read or write") and err.count("\n") == 1, err
    assert "No space left on device" in err and "report.json" in err
