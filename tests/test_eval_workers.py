"""Evaluation worker processes: the same per-example results as one process, errors that surface at once."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from torch import nn

from ducat.cli import main
from ducat.config import ConfigError
from ducat.dummy import DummyClassModel, make_pairing
from ducat.eval import EvalSettings, evaluate
from ducat.eval.api import resolve_workers
from ducat.eval.runner import split_batches
from ducat.eval.workers import WorkerError, can_fork, worker_pool

pytestmark = pytest.mark.skipif(not can_fork(torch.device("cpu")), reason="worker processes are forked on Linux only")


def trained_digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small classifier trained on sklearn digits (about 0.9 clean), and 48 test images."""
    from ducat.data import load_split

    torch.manual_seed(0)
    train = load_split("digits", None, train=True)
    x, y = train.images[:512].float() / 255, train.labels[:512]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    test = load_split("digits", None, train=False)
    return model.eval(), test.images[:48].float() / 255, test.labels[:48]


def test_batches_are_near_equal_at_most_batch_size_and_at_least_one_per_worker():
    index = np.arange(3, 103)  # 100 examples
    for batch_size, workers, sizes in [(500, 1, [100]), (500, 2, [50, 50]), (30, 1, [25] * 4), (30, 2, [25] * 4),
                                       (500, 3, [34, 33, 33]), (1, 1, [1] * 100)]:
        batches = split_batches(index, batch_size, workers)
        assert [len(b) for b in batches] == sizes
        assert np.array_equal(np.concatenate(batches), index)  # consecutive, each example once
    assert [len(b) for b in split_batches(np.arange(2), 500, 8)] == [1, 1]
    assert split_batches(np.arange(0), 500, 2) == []


@pytest.mark.parametrize("attacks", [("pgd10", "margin", "targeted"), ("autoattack",)])
def test_two_workers_give_the_per_example_results_of_one_process(attacks):
    """With the same batches, which worker computes a batch changes nothing: every mask is identical."""
    model, x, y = trained_digits_mlp()
    small_checks = {"unbounded_examples": 4, "unit_test_examples": 4, "transfer_steps": 5,
                    "convergence_examples": 0 if "autoattack" in attacks else 8}  # AutoAttack x2 is the slow part
    reports = [evaluate(model, x, y, EvalSettings(eps=0.1, attacks=attacks, batch_size=12, workers=workers,
                                                  **small_checks), progress=False) for workers in (1, 2)]
    one, two = reports
    assert 0.1 < one.worst_case["robust_accuracy"] < one.clean_accuracy  # some examples broken, some not
    assert one.masks.keys() == two.masks.keys()
    assert all(np.array_equal(one.masks[k], two.masks[k]) for k in one.masks)
    assert one.results == two.results and one.sanity == two.sanity and one.checks == two.checks
    assert one.settings["workers"] == 1 and two.settings["workers"] == 2


def test_default_workers_follow_the_threads_and_split_the_examples():
    model, x, y = trained_digits_mlp()
    threads = torch.get_num_threads()
    report = evaluate(model, x, y, EvalSettings(eps=0.1, attacks=("pgd10",)), progress=False)
    assert report.settings["workers"] == threads
    assert f"({threads} worker" in report.to_markdown()


def _raise(shared, job):
    raise job


def _exit(shared, job):
    os._exit(3)


def _square(shared, job):
    return shared * job * job


def test_pool_maps_in_order_and_surfaces_a_task_error_with_its_type():
    with worker_pool(2, 10) as map_jobs:
        assert sorted(map_jobs(_square, list(range(7)))) == [(i, 10 * i * i) for i in range(7)]
        with pytest.raises(KeyError, match="lost"):
            list(map_jobs(_raise, [KeyError("lost")]))
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C inside a task stops the evaluation as one
            list(map_jobs(_raise, [KeyboardInterrupt()]))
    with worker_pool(1, 10) as map_jobs:
        assert list(map_jobs(_square, [3, 1])) == [(0, 90), (1, 10)]


def test_a_dead_worker_is_an_error_at_once_not_a_hang():
    started = time.monotonic()
    with worker_pool(2, None) as map_jobs:
        with pytest.raises(WorkerError, match="exit code 3"):
            list(map_jobs(_exit, [0, 1]))
    assert time.monotonic() - started < 30


def test_workers_end_with_the_pool():
    with worker_pool(2, 1) as map_jobs:
        assert sorted(map_jobs(_square, [1, 2])) == [(0, 1), (1, 4)]
        children = {int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == os.getpid()
                    and _cmdline(int(p)) == _cmdline(os.getpid())}  # forked workers, not conftest's background lane
        assert len(children) >= 2
    assert not any(_alive(pid) for pid in children)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_an_attack_that_leaves_the_ball_in_a_worker_still_raises(monkeypatch):
    import ducat.eval.attacks as attacks

    def escaping(view, steps):
        def factory(context):
            return lambda x, y, seed: (x + 0.5).clamp(0, 1)
        return factory

    monkeypatch.setattr(attacks, "pgd", escaping)
    model = DummyClassModel(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), make_pairing(2))
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8) % 2
    with pytest.raises(RuntimeError, match="left the Linf eps-ball"):
        evaluate(model, x, y, EvalSettings(eps=0.1, attacks=("pgd10",), workers=2), progress=False)


def test_more_than_one_worker_needs_a_linux_cpu():
    settings = EvalSettings(eps=0.1, workers=2)
    assert resolve_workers(settings, torch.device("cpu")).workers == 2
    with pytest.raises(ConfigError, match="need a CPU run on Linux"):
        resolve_workers(settings, torch.device("cuda"))
    assert resolve_workers(EvalSettings(eps=0.1), torch.device("cuda")).workers == 1


def test_bad_workers_option_is_one_line_and_exit_2(capsys):
    assert main(["eval", "/no/such/run", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ducat: error: --workers must be >= 1") and err.count("\n") == 1
