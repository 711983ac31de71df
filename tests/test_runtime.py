"""Runtime setup: wait policy, automatic thread count, seeds, determinism, bf16 and channels_last checks."""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ducat import runtime
from ducat.models import build_model
from ducat.runtime import (
    auto_threads,
    cgroup_cpu_limit,
    channels_last_faster,
    configure_determinism,
    configure_threads,
    native_bf16,
    prepare_environment,
    seed_everything,
)


def test_wait_policy_is_set_only_when_unset():
    env: dict[str, str] = {}
    prepare_environment(env)
    assert env == {"GOMP_SPINCOUNT": "1000"}
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(user)
        prepare_environment(env)
        assert env == user


def test_prepare_environment_says_whether_torch_was_imported_already():
    assert prepare_environment({}) is False  # this test process imported torch above


def test_runtime_module_imports_without_torch():
    """The CLI runs prepare_environment() before anything imports torch; the module itself must not."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('rt', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); env = {}; "
            "ok = m.prepare_environment(env); print(ok, 'torch' in sys.modules, env['GOMP_SPINCOUNT'])")
    out = subprocess.run([sys.executable, "-c", code, runtime.__file__], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "1000"]


SPIN_PROBE = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("rt", sys.argv[2])
rt = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)
if sys.argv[1] == "before":
    rt.prepare_environment()
import torch
if sys.argv[1] == "after":
    rt.prepare_environment()
torch.set_num_threads(2)
x = torch.randn(2_000_000)
cpu, wall = time.process_time(), time.perf_counter()
for _ in range(60):
    torch.relu(x)  # a parallel region; then the main thread sleeps while the worker waits at the barrier
    time.sleep(0.005)
print((time.process_time() - cpu) / (time.perf_counter() - wall))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else True,
                    reason="needs 2 usable cores")
def test_wait_policy_works_only_when_set_before_torch_is_imported():
    """A spinning OpenMP worker burns CPU while the main thread sleeps; one with ducat's short spin does not. Measured
    in real processes: the CPU time per wall second with the policy set before and after ``import torch``."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def cpu_per_wall(when: str) -> float:
        out = subprocess.run([sys.executable, "-c", SPIN_PROBE, when, runtime.__file__], capture_output=True,
                             text=True, check=True, env=env)
        return float(out.stdout)

    before, after = cpu_per_wall("before"), cpu_per_wall("after")
    assert before < 0.7 * after, (before, after)  # measured idle: about 0.28 against 0.93


@pytest.mark.parametrize("torch_default,cores,quota,want", [
    (2, 2, None, 2),    # torch's default fits
    (8, 2, None, 2),    # affinity mask (taskset, cpusets) smaller than the machine
    (8, 16, 2.5, 3),    # container quota of 2.5 CPUs: 3 threads, not 8
    (4, 16, 0.5, 1),
    (1, 16, None, 1),   # OMP_NUM_THREADS=1 stays 1
])
def test_auto_threads(monkeypatch, torch_default, cores, quota, want):
    monkeypatch.setattr(runtime, "usable_cores", lambda: cores)
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: quota)
    assert auto_threads(torch_default) == want


def test_configure_threads_auto_in_a_fresh_process():
    """In a new process (torch's default untouched) auto gives min(default, usable cores)."""
    code = ("import os, torch; from ducat.runtime import configure_threads; d = torch.get_num_threads(); "
            "n = configure_threads(None); print(d, n, torch.get_num_threads(), len(os.sched_getaffinity(0)))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(Path(runtime.__file__).parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    default, chosen, now, cores = map(int, out.stdout.split())
    assert chosen == now and 1 <= chosen <= min(default, cores)
    limit = cgroup_cpu_limit()
    assert chosen == (min(default, cores, -int(-limit // 1)) if limit else min(default, cores))


def test_configure_threads_with_a_request():
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
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


def test_configure_determinism_off_in_a_fresh_process_loads_no_compiler():
    """Off is torch's default: nothing to change, so torch's compiler (about 1 s to import) is not loaded,
    which every job of a launched grid would pay; warn-only mode still counts as on."""
    code = ("import sys, torch; from ducat.runtime import configure_determinism; configure_determinism(False); "
            "print('torch._inductor' in sys.modules, torch.are_deterministic_algorithms_enabled()); "
            "torch.use_deterministic_algorithms(True, warn_only=True); configure_determinism(False); "
            "print(torch.are_deterministic_algorithms_enabled(), "
            "torch.is_deterministic_algorithms_warn_only_enabled())")
    env = dict(os.environ, PYTHONPATH=str(Path(runtime.__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["False", "False", "False", "False"]


def test_native_bf16_matches_the_cpu_flags(monkeypatch):
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
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


@pytest.mark.parametrize("cap", ["AVX2", "avx512_core", "AVX2_VNNI_2"])
def test_native_bf16_is_false_where_onednn_is_capped_below_bf16(monkeypatch, cap):
    """How CI's AVX2-only machines are emulated here: oneDNN capped at AVX2 emulates bf16 on any CPU."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert native_bf16("cpu") is False


def test_training_precision_is_fp32_unless_bf16_is_asked_for(monkeypatch):
    """auto trains in fp32 everywhere (bf16 training lost accuracy in the measured comparison); run.amp=bf16
    trains in bf16, with a warning where the hardware has no native bf16."""
    from ducat.config import RunConfig
    from ducat.train import setup

    assert not setup.use_bf16(RunConfig()) and not setup.use_bf16(RunConfig(amp="off"))
    assert setup.use_bf16(RunConfig(amp="bf16"))
    cpu = torch.device("cpu")
    assert setup.emulated_bf16_warning(RunConfig(), cpu) is None
    monkeypatch.setattr(setup, "native_bf16", lambda device: False)
    assert "no native bf16" in setup.emulated_bf16_warning(RunConfig(amp="bf16"), cpu)
    monkeypatch.setattr(setup, "native_bf16", lambda device: True)
    assert setup.emulated_bf16_warning(RunConfig(amp="bf16"), cpu) is None


def test_channels_last_rule():
    assert channels_last_faster(build_model("small_cnn", 10, 1), "cpu")
    assert not channels_last_faster(build_model("mlp", 10, 1), "cpu")
    assert not channels_last_faster(build_model("small_cnn", 10, 1), "meta")



def test_the_command_line_loads_without_torch_so_it_can_set_the_wait_policy_first():
    """``import ducat.cli`` must not import torch: its ``main`` sets the OpenMP wait policy, which libgomp reads
    only when torch loads it."""
    code = ("import sys, ducat, ducat.cli; assert 'torch' not in sys.modules, 'torch imported'; "
            "ducat.cli.prepare_environment(); import os; print(os.environ['GOMP_SPINCOUNT'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1000"
