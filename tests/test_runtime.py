"""Runtime setup: wait policy, thread governor decisions from /proc/stat samples, seeds, precision checks."""

import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ducat import runtime
from ducat.models import build_model
from ducat.runtime import (
    ThreadGovernor,
    busy_seconds,
    cgroup_cpu_limit,
    channels_last_faster,
    configure_determinism,
    configure_threads,
    native_bf16,
    others_busy,
    prepare_environment,
    seed_everything,
    thread_target,
)

STAT = """cpu  500 10 200 9000 40 0 7 3 0 0
cpu0 100 0 50 4500 20 0 2 1 0 0
cpu1 400 10 150 4500 20 0 5 2 0 0
intr 12345 0 0
ctxt 999
"""


def test_wait_policy_is_set_only_when_unset():
    env: dict[str, str] = {}
    prepare_environment(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    prepare_environment(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_prepare_environment_says_whether_torch_was_imported_already():
    assert prepare_environment({}) is False  # this test process imported torch above


def test_runtime_module_imports_without_torch():
    """The CLI runs prepare_environment() before anything imports torch; the module itself must not."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('rt', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); env = {}; "
            "ok = m.prepare_environment(env); print(ok, 'torch' in sys.modules, env['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code, runtime.__file__], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "PASSIVE"]


def test_busy_seconds_sums_busy_fields_of_the_given_cores():
    # cpu1: user 400 + nice 10 + system 150 + irq 0 + softirq 5 + steal 2 = 567 ticks; idle/iowait excluded
    assert busy_seconds(STAT, [1], 100) == pytest.approx(5.67)
    # cpu0: 100 + 0 + 50 + 0 + 2 + 1 = 153 ticks
    assert busy_seconds(STAT, [0, 1], 100) == pytest.approx(7.20)
    assert busy_seconds(STAT, [5], 100) == 0


def test_others_busy_subtracts_this_process_and_clamps():
    # 2 s of wall time, 3 CPU-s busy in total of which 1 CPU-s was ours -> others kept 1 core busy
    assert others_busy((10.0, 100.0, 5.0), (12.0, 103.0, 6.0)) == pytest.approx(1.0)
    assert others_busy((10.0, 100.0, 5.0), (12.0, 100.5, 6.0)) == 0.0  # jiffy rounding below our own time
    assert others_busy((10.0, 100.0, 5.0), (10.0, 101.0, 5.0)) == 0.0  # no time passed


@pytest.mark.parametrize("capacity,others,max_threads,want", [
    (2, 0.0, 2, 2), (2, 0.2, 2, 2), (2, 0.3, 2, 1), (2, 1.0, 2, 1), (2, 1.9, 2, 1), (2, 5.0, 2, 1),
    (8, 3.0, 8, 5), (8, 2.8, 8, 5), (8, 0.0, 4, 4), (1.5, 0.0, 2, 1),
])
def test_thread_target(capacity, others, max_threads, want):
    assert thread_target(capacity, others, max_threads) == want


class FakeStat:
    """Samples (time, busy CPU s, own CPU s) as a competitor starts and stops; counts reads."""

    def __init__(self, others_per_step: list[float]):
        self.others, self.reads = others_per_step, 0
        self.t, self.busy, self.own = 0.0, 0.0, 0.0

    def __call__(self, cores):
        if self.reads:
            load = self.others[min(self.reads - 1, len(self.others) - 1)]
            self.t += 2.0
            self.own += 2.0 * 0.9  # we keep ~0.9 core busy ourselves
            self.busy += 2.0 * (load + 0.9)
        self.reads += 1
        return self.t, self.busy, self.own


def make_governor(monkeypatch, stat, cores=2, interval=0.0, requested=None):
    monkeypatch.setattr(runtime, "usable_cores", lambda: list(range(cores)))
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: None)
    calls: list[int] = []
    gov = ThreadGovernor(requested, interval=interval, sample=stat, set_threads=calls.append)
    return gov, calls


def test_governor_follows_a_competitor_that_starts_and_stops(monkeypatch):
    stat = FakeStat([0.05, 1.0, 1.3, 1.0, 0.1, 0.0])
    gov, calls = make_governor(monkeypatch, stat)
    seen = []
    for _ in range(6):
        gov.tick()
        seen.append(gov.threads)
    assert seen == [2, 1, 1, 1, 2, 2]
    assert calls == [2, 1, 2]  # torch.set_num_threads only on a change
    assert [round(o, 2) for _, o, _ in gov.history] == [0.05, 1.0, 1.3, 1.0, 0.1, 0.0]


def test_governor_checks_only_when_due(monkeypatch):
    stat = FakeStat([1.0])
    gov, _ = make_governor(monkeypatch, stat, interval=3600)
    for _ in range(1000):
        gov.tick()
    assert stat.reads == 1 and gov.threads == 2  # the start-up sample only
    start = time.perf_counter()
    for _ in range(100_000):
        gov.tick()
    assert (time.perf_counter() - start) / 100_000 < 10e-6  # a tick that is not due costs microseconds


def test_requested_threads_are_fixed(monkeypatch):
    stat = FakeStat([1.5])
    gov, calls = make_governor(monkeypatch, stat, cores=4, requested=3)
    for _ in range(5):
        gov.tick()
    assert calls == [3] and stat.reads == 0


def test_governor_without_proc_stat_keeps_its_start_count(monkeypatch):
    gov, calls = make_governor(monkeypatch, lambda cores: None, cores=2)
    gov.tick()
    assert gov.probe() == 2 and calls == [2]


def test_attach_ticks_before_every_forward(monkeypatch):
    stat = FakeStat([1.0])
    gov, _ = make_governor(monkeypatch, stat)
    model = torch.nn.Linear(3, 2)
    handle = gov.attach(model)
    model(torch.zeros(1, 3))
    model(torch.zeros(1, 3))
    assert stat.reads == 3 and gov.threads == 1
    handle.remove()
    model(torch.zeros(1, 3))
    assert stat.reads == 3


@pytest.mark.skipif(not Path("/proc/stat").exists() or len(runtime.usable_cores()) < 2,
                    reason="needs Linux /proc/stat and 2 usable cores")
def test_probe_sees_a_real_busy_process():
    """A real competitor (a pure-Python busy loop, one core) must cost us a thread."""
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        before = torch.get_num_threads()
        try:
            gov = configure_threads(None)
            assert gov.threads <= gov.max_threads - 1
            assert gov.history[-1][1] >= 0.7 and torch.get_num_threads() == gov.threads
        finally:
            torch.set_num_threads(before)
    finally:
        competitor.kill()
        competitor.wait()


def test_configure_threads_with_a_request():
    before = torch.get_num_threads()
    try:
        assert configure_threads(1).threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError):
        configure_threads(0)


def test_cgroup_cpu_limit(tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("max 100000\n")
    assert cgroup_cpu_limit(f) is None
    f.write_text("150000 100000\n")
    assert cgroup_cpu_limit(f) == 1.5
    assert cgroup_cpu_limit(tmp_path / "missing") is None


def test_seed_everything_seeds_torch_python_and_numpy():
    seed_everything(7)
    first = (torch.rand(3), random.random(), np.random.rand())
    seed_everything(7)
    second = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


def test_configure_determinism_toggles_torch():
    was = torch.are_deterministic_algorithms_enabled()
    try:
        configure_determinism(True)
        assert torch.are_deterministic_algorithms_enabled()
        configure_determinism(False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)


def test_native_bf16_matches_the_cpu_flags():
    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    else:
        pytest.skip("needs /proc/cpuinfo")
    hardware = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert native_bf16("cpu") == (hardware and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    assert native_bf16("meta") is False
    if not torch.cuda.is_available():
        assert native_bf16("cuda") is False


def test_channels_last_rule():
    assert channels_last_faster(build_model("small_cnn", 10, 1), "cpu")
    assert not channels_last_faster(build_model("mlp", 10, 1), "cpu")
    assert not channels_last_faster(build_model("small_cnn", 10, 1), "meta")

