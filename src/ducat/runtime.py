"""Process-wide runtime setup, done once before any compute: OpenMP wait policy, threads, seeds, precision.

Why this exists: when another CPU-bound process shares the cores, torch's defaults (one OpenMP thread
per core, libgomp spinning at every barrier) made ducat's small operators wait a scheduler time slice
for a descheduled thread, and training steps ran 10-100x slower (measured in ``benchmarks/contention.py``
and ``docs/performance.md``). The remedy has two parts: threads that sleep instead of spinning
(``OMP_WAIT_POLICY=PASSIVE``, read by the OpenMP runtime when torch is first imported, so it must be
set before that), and a thread count that follows the cores other processes leave free
(:class:`ThreadGovernor`, re-checked every few seconds from ``/proc/stat``; other processes may start
after us, so a count chosen at start-up is not enough).

This module does not import torch at import time, so that :func:`prepare_environment` can run first.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}
STAT_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (not idle, iowait, guest)
CpuSample = tuple[float, float, float]  # (wall clock s, busy CPU s of the watched cores, this process's CPU s)


def prepare_environment(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set the OpenMP wait policy to passive unless the user set one. Call before torch is imported.

    Returns whether the setting can still take effect, i.e. torch was not imported yet (the OpenMP
    runtime reads its environment once, when torch loads it). Child processes inherit the setting."""
    for key, value in WAIT_POLICY.items():
        environ.setdefault(key, value)
    return "torch" not in sys.modules


# ---- free cores -------------------------------------------------------------------------------------
def usable_cores() -> list[int]:
    """The CPUs this process may run on (its affinity mask; all CPUs where that is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """The CPU quota of this container in cores (cgroup v2 ``cpu.max``), None when unlimited or unknown."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def busy_seconds(stat_text: str, cores: list[int], ticks_per_second: float) -> float:
    """CPU seconds the given cores spent busy since boot, from the text of ``/proc/stat``."""
    wanted = {f"cpu{c}" for c in cores}
    total = 0
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] in wanted:
            values = [int(v) for v in fields[1:]]
            total += sum(values[i] for i in STAT_BUSY_FIELDS if i < len(values))
    return total / ticks_per_second


def read_sample(cores: list[int]) -> CpuSample | None:
    """(now, busy CPU seconds of ``cores``, this process's CPU seconds); None without ``/proc/stat``."""
    try:
        text = Path("/proc/stat").read_text()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    return time.monotonic(), busy_seconds(text, cores, ticks), time.process_time()


def others_busy(before: CpuSample, after: CpuSample) -> float:
    """Average number of cores other processes kept busy between two samples (>= 0)."""
    wall = after[0] - before[0]
    if wall <= 0:
        return 0.0
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall)


def thread_target(capacity: float, others: float, max_threads: int) -> int:
    """Threads for ``capacity`` cores of which ``others`` are busy with other processes: the free cores,
    rounded down unless at least 0.75 of a core is free, between 1 and ``max_threads``.

    Rounding down keeps a second thread off a core another process mostly holds: a thread that waits
    for a time slice stalls every barrier of every operator (see the module docstring)."""
    return max(1, min(max_threads, math.floor(capacity - others + 0.25)))


# ---- threads ----------------------------------------------------------------------------------------
class ThreadGovernor:
    """Keeps torch's intra-op thread count at the number of cores other processes leave free.

    ``tick()`` is called between steps (training step, evaluation batch, or every forward via
    :meth:`attach`); when ``interval`` seconds have passed it measures the busy time of the usable
    cores since the last check, subtracts this process's own CPU time and sets the thread count. A
    tick that is not due costs one clock read. ``requested`` fixes the count (no measuring). Where
    ``/proc/stat`` does not exist the count stays at its start value."""

    def __init__(self, requested: int | None = None, interval: float = 2.0,
                 sample: Callable[[list[int]], CpuSample | None] = read_sample,
                 set_threads: Callable[[int], None] | None = None):
        self.cores = usable_cores()
        limit = cgroup_cpu_limit()
        self.capacity = min(len(self.cores), limit) if limit else float(len(self.cores))
        self.max_threads = max(1, math.ceil(self.capacity))
        self.requested, self.interval, self._sample = requested, interval, sample
        self._set = set_threads or _torch_set_num_threads
        self.threads = 0
        self.history: list[tuple[float, float, int]] = []  # (time, others busy, threads) per decision
        self._last = sample(self.cores) if requested is None else None
        self._due = time.monotonic() + interval
        self.apply(requested or self.max_threads)

    def apply(self, threads: int) -> None:
        if threads != self.threads:
            self._set(threads)
            self.threads = threads

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._due or self._last is None:
            return
        self._due = now + self.interval
        current = self._sample(self.cores)
        if current is None:
            return
        others = others_busy(self._last, current)
        self._last = current
        self.apply(thread_target(self.capacity, others, self.max_threads))
        self.history.append((now, others, self.threads))

    def probe(self, seconds: float = 0.1) -> int:
        """Measure other processes' load over ``seconds`` now (sleeping) and set the count; returns it."""
        if self.requested is not None or self._last is None:
            return self.threads
        time.sleep(seconds)
        self._due = 0.0
        self.tick()
        return self.threads

    def attach(self, model: Any) -> Any:
        """Tick before every forward of ``model`` (covers attack loops ducat does not own, e.g.
        AutoAttack); returns the hook handle (``handle.remove()`` detaches)."""
        return model.register_forward_pre_hook(lambda module, args: self.tick())


def _torch_set_num_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def configure_threads(requested: int | None) -> ThreadGovernor:
    """The process's thread policy: ``requested`` threads, or (None) the free cores, measured now and
    then followed by the returned governor's ``tick()``/``attach()``."""
    if requested is not None and requested < 1:
        raise ValueError(f"threads must be >= 1, got {requested}")
    governor = ThreadGovernor(requested)
    governor.probe()
    return governor


# ---- determinism, seeds ------------------------------------------------------------------------------
def configure_determinism(deterministic: bool) -> None:
    """Deterministic algorithms (bit-exact resume on CPU) on or off, process-wide."""
    import torch

    torch.use_deterministic_algorithms(deterministic)


def seed_everything(seed: int) -> None:
    """Seed torch's global generators (CPU and every CUDA device), Python's and NumPy's."""
    import random

    import numpy as np
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# ---- precision and memory format ----------------------------------------------------------------------
def native_bf16(device: Any) -> bool:
    """True where bf16 matmuls and convolutions run in hardware: CUDA with bf16 support, or a CPU
    with AVX512-BF16 or AMX-BF16 whose oneDNN build has bf16 kernels. Elsewhere bf16 is emulated and
    slower than fp32."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = cpu_capabilities()
    if not (flags.get("avx512_bf16") or flags.get("amx_bf16")):
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else torch.backends.mkldnn.is_available()


def cpu_capabilities() -> Mapping[str, Any]:
    """CPU feature flags from torch's cpuinfo (``torch.cpu.get_capabilities``), else ``/proc/cpuinfo``."""
    import torch

    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return get()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return {flag: True for flag in line.split(":", 1)[1].split()}
    except OSError:
        pass
    return {}


def channels_last_faster(model: Any, device: Any) -> bool:
    """Whether to train ``model`` channels_last on ``device``: models with 2-d convolutions, on CPU
    (oneDNN) and CUDA. Measured on CPU in ``docs/performance.md``: 1.25-1.33x for small_cnn (max-pool
    and BN run 3-5x faster in NHWC); a model without convolutions only pays the layout conversions."""
    import torch
    from torch import nn

    if torch.device(device).type not in ("cpu", "cuda"):
        return False
    return any(isinstance(m, nn.Conv2d) for m in model.modules())
