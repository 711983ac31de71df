#!/usr/bin/env python
"""One command that verifies a GPU machine: ``python benchmarks/gpu_check.py`` (``--device cpu``: the same checks at
toy size on the CPU, which CI runs so that this script cannot rot).

It needs no internet: it writes a small CIFAR-10 in torchvision's file layout (``cifar-10-batches-py``, pickled
batches of bytes keys, a uint8 ``(N, 3072)`` array and a label list; pickled with protocol 4, since ducat's
restricted unpickler refuses the ``_codecs`` calls with which Python 3 writes bytes at protocol 2). Then it runs the
``ducat`` command line as a user would, each check in its own process, and prints one ``PASS``/``FAIL``/``SKIP`` line
per check with the reason:

- ``train``: the paper's preset (ResNet-18, PGD-10 + DUCAT) for an epoch, stopped (``--until-epoch``), resumed;
- ``bf16``: the same in bf16 autocast (``SKIP`` where the device only emulates bf16);
- ``other-device``: the run resumed on the other device type (CUDA -> CPU on a GPU; on a CPU, asking for CUDA is
  refused with one line);
- ``eval``: ``ducat eval`` with AutoAttack under both protocols;
- ``deterministic``: ``run.deterministic=true`` twice, and whether the two runs' weights are identical;
- ``torchrun``: ``torchrun --nproc_per_node 2`` training (NCCL with 2 GPUs or more, gloo on the CPU otherwise);
- ``reproduce --nproc``: the first run of the smoke grid through ``ducat reproduce``'s torchrun path.

Then a throughput table of the paper's ResNet-18 PGD-10 + DUCAT training step: images/s and peak memory at batch
128 and 512, channels_last on and off, fp32 (TF32 convolutions where the GPU has them) and bf16, with the epoch time
the cost model (``ducat.presets``) projects for the same step beside the measured one, and the kernel launches of
one step. The last line counts the checks: ``gpu_check: N PASS, M FAIL, K SKIP``; the exit code is 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Size:
    """How big the checks run: training images, batch, attack steps, model, eval examples, throughput batches."""

    images: int
    batch: int
    steps: int
    model: str
    eval_examples: int
    eps: str
    batches: tuple[int, ...]
    timed_steps: int


SIZES = {"cuda": Size(2048, 128, 10, "resnet18", 200, "8/255", (128, 512), 10),
         "cpu": Size(64, 32, 2, "small_cnn", 8, "0.3", (16,), 2)}  # eps 0.3: AutoAttack stops after APGD-CE


def write_cifar10(root: Path, images: int, seed: int = 0) -> None:
    """``root/cifar-10-batches-py``: five training batches and a test batch of random images (the checks test the
    machinery, not the accuracy), ``images`` in all for training and a fifth of that for testing."""
    rng = np.random.default_rng(seed)
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)
    sizes = [images // 5] * 5 + [max(images // 5, 16)]
    for name, n in zip([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], sizes):
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=4))


class Checks:
    """Runs ``ducat`` commands and keeps one verdict line per check."""

    def __init__(self, device: str, size: Size, out: Path):
        self.device, self.size, self.out = device, size, out
        self.lines: list[tuple[str, str, str]] = []

    def train_args(self, name: str, *extra: str) -> list[str]:
        s = self.size
        return ["train", "paper-cifar10-resnet18-pgd_at-ducat", f"data.root={self.out / 'data'}",
                f"data.n_train={s.images}", f"data.batch_size={s.batch}", "data.val_fraction=0.1",
                f"model.name={s.model}", f"attack.steps={s.steps}", "optim.epochs=2", "optim.milestones=[1]",
                "ducat.start_epoch=1", "validation.n_examples=32", "validation.pgd_steps=2", "run.progress=false",
                "run.tensorboard=false", f"run.device={self.device}", f"run.out={self.out / name}", *extra]

    def ducat(self, *args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else []
        return subprocess.run([sys.executable, *launcher, "-m", "ducat", *args], capture_output=True, text=True,
                              timeout=900)

    def record(self, name: str, status: str, reason: str) -> None:
        self.lines.append((name, status, reason))
        print(f"{status} {name}: {reason}", flush=True)

    def expect(self, name: str, *commands: list[str], torchrun: int = 0, note: str = "",
               then: Callable[[], str] = lambda: "") -> None:
        """Run the ``ducat`` commands in order; PASS when each exits 0 (with ``then()`` appended to the reason), FAIL
        with the last line of the first failure."""
        started = time.perf_counter()
        for args in commands:
            done = self.ducat(*args, torchrun=torchrun)
            if done.returncode != 0:
                last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
                self.record(name, "FAIL", f"`ducat {' '.join(args[:2])} ...` exited {done.returncode}: {last}")
                return
        self.record(name, "PASS", f"{note}{time.perf_counter() - started:.0f} s{then()}")


def check_training(c: Checks) -> None:
    c.expect("train", c.train_args("fp32", "--until-epoch", "1"), ["train", "--resume", str(c.out / "fp32")],
             note="trained one epoch, stopped, resumed to the second; ")
    from ducat.runtime import native_bf16

    if not native_bf16(c.device):
        c.record("bf16", "SKIP", f"{c.device} emulates bf16 (slower than fp32); nothing to verify")
    else:
        c.expect("bf16", c.train_args("bf16", "run.amp=bf16", "--until-epoch", "1"),
                 ["train", "--resume", str(c.out / "bf16")], note="bf16 autocast, stopped and resumed; ")


def check_other_device(c: Checks) -> None:
    if c.device == "cuda":
        c.expect("other-device", c.train_args("moved", "--until-epoch", "1"),
                 ["train", "--resume", str(c.out / "moved"), "run.device=cpu"],
                 note="trained on CUDA to epoch 1, resumed on the CPU; ")
        return
    done = c.ducat(*c.train_args("moved", "run.device=cuda"))
    err = done.stderr.strip()
    ok = done.returncode == 2 and err.startswith("ducat: error:") and len(err.splitlines()) == 1
    c.record("other-device", "PASS" if ok else "FAIL", f"asking for CUDA here: exit {done.returncode}, {err!r}")


def check_eval(c: Checks) -> None:
    c.expect("eval", ["eval", str(c.out / "fp32"), "--attacks", "autoattack", "--protocols", "paper,adaptive",
                      "--eps", c.size.eps, "--n-examples", str(c.size.eval_examples), "--device", c.device,
                      "--no-progress"], note="AutoAttack, paper protocol and adaptive; ")


def check_deterministic(c: Checks) -> None:
    from ducat.checkpoint import load_checkpoint

    def compare() -> str:
        a, b = (load_checkpoint(c.out / f"det{i}" / "last.pt")["model"] for i in (0, 1))
        return f", weights {'identical' if all(torch.equal(a[k], b[k]) for k in a) else 'DIFFER'}"

    runs = [c.train_args(f"det{i}", "run.deterministic=true", "optim.epochs=1", "optim.milestones=[]") for i in (0, 1)]
    c.expect("deterministic", *runs, note="two runs; ", then=compare)


def check_distributed(c: Checks) -> None:
    gpus = torch.cuda.device_count() if c.device == "cuda" else 0
    device = "cuda" if gpus >= 2 else "cpu"
    backend = "NCCL" if device == "cuda" else "gloo"
    c.expect("torchrun", c.train_args("ddp", f"run.device={device}", "optim.epochs=1", "optim.milestones=[]"),
             torchrun=2, note=f"2 processes, {backend}; ")
    script = ("import sys; from pathlib import Path; from ducat.reproduce import SCALES, plan, run_config;"
              "from ducat.reproduce.grid import train_run; run = plan(SCALES['smoke'])[0];"
              f"config = run_config(run, Path(sys.argv[1]), None); config.run.device = '{device}';"
              "train_run(run, config, Path(sys.argv[1]), 2, print); print('RUN', run.name)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, str(c.out / "grid")], capture_output=True, text=True,
                          timeout=900)
    name = done.stdout.split("RUN ")[-1].strip() if "RUN " in done.stdout else "?"
    ok = done.returncode == 0 and (c.out / "grid" / "runs" / name / "summary.json").is_file()
    last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
    c.record("reproduce --nproc", "PASS" if ok else "FAIL",
             f"first smoke run on 2 processes ({backend}), {time.perf_counter() - started:.0f} s" if ok else last)


# ---- throughput ------------------------------------------------------------------------------------------------------
def training_step(size: Size, batch: int, channels_last: bool, bf16: bool, device: str):
    """A closure running one PGD-10 + DUCAT training step of the paper's recipe at ``batch`` on ``device``."""
    from ducat.config import load_config
    from ducat.runs import build_run_model
    from ducat.train.setup import build_objective, build_optimizer, training_autocast

    config = load_config("paper-cifar10-resnet18-pgd_at-ducat", [f"model.name={size.model}", "run.out=."])
    model = build_run_model(config).to(device)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory).train()
    objective, optimizer = build_objective(config, None), build_optimizer(model, config)
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=memory)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with training_autocast(bf16, torch.device(device)):
            out = objective(model, x, y, ducat_active=True, augment=lambda t: t)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    return step


def time_steps(step, n: int, device: str) -> float:
    """Seconds per step, the median of ``n`` after two warm-up steps."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step(), step()
    times = []
    for _ in range(n):
        sync()
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def kernels_per_step(step) -> int:
    """CUDA kernels one training step launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def projected_epoch_s(size: Size, batch: int, device: str) -> float:
    """The cost model's epoch time of this step on CIFAR-10's 49,000 training images (paper preset, 2% held out)."""
    from ducat.config import load_config
    from ducat.presets import CPU_2_CORES, ONE_GPU, Work, forward_flops, step_cost

    config = load_config("paper-cifar10-resnet18-pgd_at-ducat", [f"model.name={size.model}", "run.out=."])
    units, passes = step_cost("pgd_at", 10, ducat_active=True)
    n = 49_000
    work = Work(n * units * forward_flops(config), -(-n // batch) * passes)
    return work.seconds(ONE_GPU if device == "cuda" else CPU_2_CORES)


def throughput(size: Size, device: str) -> None:
    from ducat.runtime import native_bf16

    tf32 = device == "cuda" and torch.backends.cudnn.allow_tf32 and torch.cuda.get_device_capability()[0] >= 8
    precisions = [("fp32" + (" (TF32 conv)" if tf32 else ""), False)]
    precisions += [("bf16", True)] if native_bf16(device) else []
    print(f"\n{size.model} PGD-10 + DUCAT training step on {device}"
          + ("" if native_bf16(device) else " (bf16 skipped: emulated here)"))
    print("| batch | channels_last | precision | images/s | peak memory GiB | epoch s measured | epoch s projected |")
    print("|---|---|---|---|---|---|---|")
    for batch in size.batches:
        for channels_last in (True, False):
            for label, bf16 in precisions:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                step = training_step(size, batch, channels_last, bf16, device)
                seconds = time_steps(step, size.timed_steps, device)
                memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device == "cuda" else "-"
                rate = batch / seconds
                print(f"| {batch} | {'on' if channels_last else 'off'} | {label} | {rate:.0f} | {memory} | "
                      f"{49_000 / rate:.0f} | {projected_epoch_s(size, batch, device):.0f} |", flush=True)
    if device == "cuda":
        print(f"\nCUDA kernels per training step at batch 128: "
              f"{kernels_per_step(training_step(size, 128, True, False, device))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", help="working directory (default: a new temporary one)")
    parser.add_argument("--no-throughput", action="store_true", help="the checks only")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        from ducat.runtime import cuda_unavailable_reason

        print(f"gpu_check: no usable GPU ({cuda_unavailable_reason()}); run with --device cpu for the toy checks")
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1" if args.device == "cpu" else os.environ.get("OMP_NUM_THREADS", ""))
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check-"))
    size = SIZES[args.device]
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"gpu_check on {name}, torch {torch.__version__}, into {out}", flush=True)
    write_cifar10(out / "data", size.images)
    checks = Checks(args.device, size, out)
    for check in (check_training, check_other_device, check_eval, check_deterministic, check_distributed):
        check(checks)
    if not args.no_throughput:
        throughput(size, args.device)
    counts = {status: sum(s == status for _, s, _ in checks.lines) for status in ("PASS", "FAIL", "SKIP")}
    print(f"\ngpu_check: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
