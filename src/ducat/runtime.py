"""Process-wide runtime setup, done once before any compute: OpenMP wait policy, threads, seeds, precision.

Why this exists: with libgomp's default wait policy a thread that reaches a barrier spins (about
300,000 iterations) before it sleeps. When another CPU-bound process shares the cores, the spinning
thread holds a core that the thread it waits for needs, and every small operator waits for a scheduler
time slice. Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) cures that but slows an idle step, since waking
a thread costs more than a small operator takes. A short spin (``GOMP_SPINCOUNT=1000``, tens of
microseconds) then sleep keeps most of both (the measurements: ``docs/performance.md``, "Contention: cause
and fix"; ``benchmarks/contention.py``). OpenMP reads its environment once, when torch is first imported,
so :func:`prepare_environment` must run before that. GOMP_SPINCOUNT is libgomp's (the
OpenMP runtime of torch's Linux x86 wheels); other runtimes ignore it. Fewer threads than cores did not
help under contention (a process's share of a busy CPU grows with its runnable threads), so the thread
count is chosen once, from the CPUs this process may use, and not adapted to other processes' load.

This module does not import torch at import time, so that :func:`prepare_environment` can run first.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

SPIN_COUNT = ("GOMP_SPINCOUNT", "1000")  # a short spin at a barrier, then sleep
USER_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # either one set by the user is left alone


def prepare_environment(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set ``GOMP_SPINCOUNT=1000`` unless the user set a wait policy or spin count. Call before torch is
    imported.

    Returns whether the setting can still take effect, i.e. torch was not imported yet (the OpenMP
    runtime reads its environment once, when torch loads it). Child processes inherit the setting."""
    if not any(key in environ for key in USER_WAIT_SETTINGS):
        environ[SPIN_COUNT[0]] = SPIN_COUNT[1]
    return "torch" not in sys.modules


# ---- threads ----------------------------------------------------------------------------------------
def usable_cores() -> int:
    """How many CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cgroup_cpu_limit(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """The CPU quota of this container in cores (cgroup v2 ``cpu.max``), None when unlimited or unknown."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def auto_threads(torch_default: int) -> int:
    """torch's default count (physical cores, or ``OMP_NUM_THREADS``) capped by the CPUs this process may
    use and by the container's CPU quota: torch sees every CPU of the machine, not the quota."""
    limit = cgroup_cpu_limit()
    cap = min(usable_cores(), math.ceil(limit)) if limit else usable_cores()
    return max(1, min(torch_default, cap))


def configure_threads(requested: int | None) -> int:
    """Set torch's intra-op threads to ``requested``, or (None) to :func:`auto_threads`; returns the count.

    Call once at start-up, before any compute: "auto" starts from ``torch.get_num_threads()``, which is
    torch's default only until something sets it."""
    import torch  # not at import time: prepare_environment runs first

    if requested is not None and requested < 1:
        raise ValueError(f"threads must be >= 1, got {requested}")
    threads = requested or auto_threads(torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads


# ---- determinism, seeds ------------------------------------------------------------------------------
CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode needs a fixed workspace


def configure_determinism(deterministic: bool) -> None:
    """Deterministic algorithms on or off, process-wide, and cuDNN's autotuner off or on with them.

    Deterministic mode gives bit-exact resumes on the CPU. On CUDA it also needs cuBLAS's fixed workspace
    (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts; set here unless the user set it), and it turns off
    ``cudnn.benchmark``, which may pick a different convolution algorithm in every process. Otherwise the
    autotuner is on: a training run calls the same few convolution shapes millions of times."""
    import torch  # not at import time: prepare_environment runs first

    if deterministic:
        os.environ.setdefault(*CUBLAS_WORKSPACE)
    if torch.are_deterministic_algorithms_enabled() != deterministic or \
            torch.is_deterministic_algorithms_warn_only_enabled():  # only on a change: the call loads torch's
        torch.use_deterministic_algorithms(deterministic)  # compiler (about 1 s), once per run of a launched grid
    torch.backends.cudnn.benchmark = not deterministic


def derive_seed(*parts: object) -> int:
    """A seed for one use of a random stream, independent of every other use: SHA-256 of the parts joined by
    ``/``, its first 8 bytes little-endian, 63 bits (``derive_seed(run_seed, "epoch", 3, "rank", 1)``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed torch's global generators (CPU and every CUDA device), Python's and NumPy's."""
    import random  # with numpy and torch below: not at import time

    import numpy as np
    import torch  # not at import time: prepare_environment runs first

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# ---- devices ---------------------------------------------------------------------------------------
def cuda_unavailable_reason() -> str | None:
    """Why this process cannot use CUDA, in one line (None when it can): a torch build without CUDA, no
    driver, a driver too old for the build, or no visible device (the driver's own message where it gives one)."""
    import torch  # not at import time: prepare_environment runs first

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if torch.cuda.is_available():
        return None
    try:
        torch.cuda.init()
    except Exception as exc:  # the driver's explanation: not found, too old, ...
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return "no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES?)"


# ---- precision and memory format ----------------------------------------------------------------------
def native_bf16(device: Any) -> bool:
    """True where bf16 matmuls and convolutions run in hardware: a CUDA GPU of compute capability 8.0 or
    later (``torch.cuda.is_bf16_supported()`` also counts emulation on a V100 or T4), or a CPU with
    AVX512-BF16 or AMX-BF16 whose oneDNN build has bf16 kernels and whose oneDNN is not capped below them
    (``ONEDNN_MAX_CPU_ISA=AVX2``, which is how an AVX2-only CPU is emulated on a newer one). Elsewhere bf16
    is emulated and slower than fp32."""
    import torch  # not at import time: prepare_environment runs first

    device = torch.device(device)
    if device.type == "cuda":  # bf16 tensor cores from Ampere (8.0) on; older GPUs emulate it
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    flags = cpu_capabilities()
    if not (flags.get("avx512_bf16") or flags.get("amx_bf16")) or onednn_capped_below_bf16():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else torch.backends.mkldnn.is_available()


ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def onednn_capped_below_bf16() -> bool:
    """True where ``ONEDNN_MAX_CPU_ISA`` (or its old name ``DNNL_MAX_CPU_ISA``) caps oneDNN at an instruction set
    without bf16 dot products, which oneDNN then emulates."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return cap.strip().upper() in ONEDNN_ISAS_WITHOUT_BF16


def cpu_capabilities() -> Mapping[str, Any]:
    """CPU feature flags from torch's cpuinfo (``torch.cpu.get_capabilities``), else ``/proc/cpuinfo``."""
    import torch  # not at import time: prepare_environment runs first

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
    (oneDNN) and CUDA: faster for small_cnn, whose max-pool runs several times faster in NHWC, and no slower
    for the ResNets (``docs/performance.md``, "The means of the defaults"); a model without convolutions gains
    nothing from the layout."""
    import torch  # not at import time: prepare_environment runs first
    from torch import nn

    if torch.device(device).type not in ("cpu", "cuda"):
        return False
    return any(isinstance(m, nn.Conv2d) for m in model.modules())
