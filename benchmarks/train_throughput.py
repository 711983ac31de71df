#!/usr/bin/env python
"""Training throughput of ducat's *defaults* against a typical research-code loop, idle and contended.

PGD-10 + DUCAT on small_cnn (2C head), Fashion-MNIST 28x28, batch 128, eps 0.1, step 0.025, SGD lr 0.1.
Each loop runs in its own process, so that each gets the environment it would have in real use (the
OpenMP runtime reads it when torch is imported):

  ref        typical research code, torch's defaults (``ref-env``: the same code in a process with
             ducat's environment, its OpenMP spin count, which separates ducat's own gains from the
             wait policy's on a machine that other jobs load): torchvision ``FashionMNIST`` returning PIL images,
             ``Compose([RandomCrop(28, padding=2), RandomHorizontalFlip(), ToTensor()])``,
             ``DataLoader(batch_size=128, shuffle=True, num_workers=2, persistent_workers=True)``; PGD steps
             call ``loss.backward()`` through all parameters; separate forwards of ``x`` and ``x_adv``; the
             DUCAT soft-label CE inline; ``.item()`` statistics every step.
  ducat-0.1  ducat as it shipped before this work: fp32, NCHW, no BatchNorm folding, torch's thread count
             and OpenMP wait policy (``run.amp=off run.channels_last=off run.threads=<cores>``).
  defaults   ducat with no flags: ``Trainer(config)`` on the preset, in a process whose environment
             ``ducat.runtime.prepare_environment()`` set before torch was imported, as the CLI does. The
             library then picks the threads (``configure_threads(None)``), the training precision
             (``ducat.train.setup.use_bf16`` of ``run.amp=auto``), channels_last where
             ``channels_last_faster``, and BatchNorm folding in the attack (``ducat.attacks.fold``).
  -cl, -fold  the defaults without one of their means (same process as ``defaults``):
             ``run.channels_last='off'``, or the objective's ``fold_bn`` off.
  +bf16      the defaults with bf16 autocast training (``run.amp=bf16``) where they train in fp32, or
  -bf16      in fp32 (``run.amp='off'``) where they train in bf16.

Measurement. Every loop trains its own model from the same seed on the first ``--n`` (256) training
images; 2 warm-up steps each, then ``--rounds`` rounds. A round times one epoch (``--n`` / 128 steps)
of every loop in a rotated order, and the fp32 and bf16 ``torch.mm`` rate (2048 x 2048) in the
defaults' process at the thread count it is using. Ratios to ``ref`` are taken within a round; medians
over rounds are reported. Achieved GFLOP/s = (2K + 6) F x images/s, F = conv + linear FLOPs of one
forward (the reference's extra weight gradients in PGD are not credited). "% of matmul" compares with
the matmul rate of the precision the loop trains in, measured in the same round. On a shared machine
other users' jobs load the rounds unevenly (and a spinning OpenMP loop collapses under such load), so
every round records its background load -- cores kept busy by processes outside this benchmark, from
``/proc`` -- and the table uses the rounds with less than 0.5 busy cores when there are at least two.

Contention. Then the defaults run idle and, ``--cycles`` times, contended and idle again: the
competitor is a separate process running ``relu(a @ a)`` on 512 x 512 fp32 forever with torch's
default threads (see ``benchmarks/contention.py``), started and stopped by this script. Slowdown =
median over contended phases of their mean epoch time / the mean of the idle phases on either side.
``--contend-all`` also measures ``ref`` and ``ducat-0.1`` (one cycle).

The last line reads ``defaults: ratio R.RRx, P% of <fp32|bf16> matmul, contention slowdown S.Sx``.

    python benchmarks/train_throughput.py                  # ~4 min on 2 cores
    python benchmarks/train_throughput.py --quick          # ~2 min: 3 rounds, no ablations
    python benchmarks/train_throughput.py --contend-all    # + ref and ducat-0.1 under contention (slow)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from contention import (
    SRC,
    alternate,
    background_cores,
    clean_env,
    fmt_cores,
    load_sample,
    slowdowns,
)

PRESET = "cpu-fmnist-small_cnn-pgd_at-ducat"
BATCH = 128
WARM_STEPS = 2
KINDS = ("ref", "ref-env", "old", "new")  # worker processes; ref-env: ref with ducat's environment
QUIET_CORES = 0.5  # rounds with less background load (cores busy outside this benchmark) count as idle


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + " ".join(f"{v:.2f}" for v in os.getloadavg())


# =========================================== worker side ===========================================
def torchvision_fmnist(tmp: Path, transform) -> Any:
    """``torchvision.datasets.FashionMNIST`` over the local idx files (decompressed into ``tmp``)."""
    from torchvision import datasets

    from ducat.data.readers import FASHION_MNIST_SYSTEM_DIRS

    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]:
        for directory in FASHION_MNIST_SYSTEM_DIRS:
            if (directory / stem).is_file():
                shutil.copyfile(directory / stem, raw / stem)
                break
            if (directory / f"{stem}.gz").is_file():
                with gzip.open(directory / f"{stem}.gz", "rb") as src, open(raw / stem, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                break
        else:
            raise SystemExit(f"Fashion-MNIST file {stem}[.gz] not found in {FASHION_MNIST_SYSTEM_DIRS}")
    return datasets.FashionMNIST(str(tmp), train=True, transform=transform, download=False)


class RefLoop:
    """Research-code style PGD-10 + DUCAT training (see the module docstring)."""

    def __init__(self, cfg, n: int, tmp: Path, workers: int):
        import torch
        from torch.utils.data import DataLoader, Subset
        from torchvision import transforms

        from ducat.runs import build_run_model

        self.cfg = cfg
        torch.manual_seed(cfg.run.seed)
        self.model = build_run_model(cfg)
        o = cfg.optim
        self.opt = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        tv = torchvision_fmnist(tmp, transforms.Compose(
            [transforms.RandomCrop(28, padding=2), transforms.RandomHorizontalFlip(), transforms.ToTensor()]))
        self.loader = DataLoader(Subset(tv, range(n)), batch_size=BATCH, shuffle=True, num_workers=workers,
                                 persistent_workers=workers > 0)
        self.last: dict[str, float] = {}

    def attack(self, x, y):
        import torch
        import torch.nn.functional as F

        a = self.cfg.attack
        self.model.eval()
        x_adv = (x + torch.empty_like(x).uniform_(-a.eps, a.eps)).clamp(0, 1)
        for _ in range(a.steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(self.model(x_adv), y)
            loss.backward()  # weight grads computed too; they accumulate and are zeroed before the update
            x_adv = x_adv.detach() + a.step_size * x_adv.grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - a.eps), x + a.eps).clamp(0, 1)
        self.model.train()
        return x_adv.detach()

    def step(self, x, y) -> float:
        import torch.nn.functional as F

        from ducat.dummy import soft_labels

        u, index = self.cfg.ducat, self.model.dummy_index
        x_adv = self.attack(x, y)
        z_clean, z_adv = self.model(x), self.model(x_adv)
        ce_clean = -(soft_labels(y, u.beta1, index) * F.log_softmax(z_clean, 1)).sum(1).mean()
        ce_adv = -(soft_labels(y, 1 - u.beta2, index) * F.log_softmax(z_adv, 1)).sum(1).mean()
        loss = u.alpha * ce_clean + (1 - u.alpha) * ce_adv
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.correct = (z_adv.argmax(1) == y).sum().item()  # per-step statistics, synchronising like research code
        return loss.item()

    def epoch(self, epoch: int, max_steps: int | None = None) -> float:
        self.model.train()
        losses, t = [], time.perf_counter()
        for i, (x, y) in enumerate(self.loader):
            if max_steps is not None and i >= max_steps:
                break
            losses.append(self.step(x, y))
        secs = time.perf_counter() - t
        self.last = {"train_loss": sum(losses) / max(len(losses), 1)}
        return secs


class DucatLoop:
    """``Trainer(config).train_epoch`` on the first ``n`` images with ``overrides``; optional folding."""

    def __init__(self, base: list[str], overrides: list[str], fold: bool, out: Path):
        import dataclasses

        from ducat.config import load_config
        from ducat.train import Trainer

        self.cfg = load_config(PRESET, base + overrides + [f"run.out={out}"])
        self.trainer = Trainer(self.cfg, log=lambda s: None)
        objective = self.trainer.objective
        objective.attack = dataclasses.replace(objective.attack, fold_bn=fold and objective.attack.fold_bn)
        self.model, self.last = self.trainer.model, {}

    def epoch(self, epoch: int, max_steps: int | None = None) -> float:
        import torch

        tr, full = self.trainer, self.trainer.train_data
        if max_steps is not None:  # warm-up: the same shapes on the first max_steps batches
            tr.train_data = full.subset(torch.arange(min(len(full), max_steps * BATCH)))
        try:
            t = time.perf_counter()
            self.last = tr.train_epoch(epoch)
            return time.perf_counter() - t
        finally:
            tr.train_data = full


def library_defaults() -> dict[str, Any]:
    """What the library picks with no flags on this CPU, for the report: precision, layout, threads."""
    import torch

    from ducat.config import RunConfig
    from ducat.models import build_model
    from ducat.runtime import channels_last_faster, native_bf16
    from ducat.train.setup import use_bf16

    return {"amp": "bf16" if use_bf16(RunConfig()) else "fp32",
            "cl": "on" if channels_last_faster(build_model("small_cnn", 10, 1), "cpu") else "off",
            "threads": torch.get_num_threads(), "native_bf16": native_bf16("cpu")}


def ablations(amp: str, native_bf16: bool) -> dict[str, tuple[list[str], bool, str]]:
    """The variants of the defaults: name -> (config overrides, BN folding, precision they train in). No ``+bf16``
    where this CPU only emulates bf16 (about 20x slower than fp32: it would only measure the emulation)."""
    variants = {"-cl": (["run.channels_last='off'"], True, amp), "-fold": ([], False, amp)}
    if amp == "bf16":
        return {"-bf16": (["run.amp='off'"], True, "fp32"), **variants}
    return ({"+bf16": (["run.amp=bf16"], True, "bf16")} if native_bf16 else {}) | variants


def matmul_gflops(dtype_name: str, n: int = 2048, reps: int = 3) -> float:
    """Median GFLOP/s of ``torch.mm`` on n x n matrices (2 n^3 FLOPs per product) at the current threads."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def build_runners(kind: str, args, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The loops of one worker process and facts for the report."""
    import torch

    from ducat.config import load_config
    from ducat.models import count_flops

    base = [f"data.n_train={args.n}", "data.val_fraction=0", "validation.select=last", "data.n_test=128",
            "ducat.start_epoch=1", "run.progress=false", "run.tensorboard=false", "run.device=cpu"]
    runners: dict[str, Any] = {}
    info: dict[str, Any] = {"torch_default_threads": torch.get_num_threads()}
    if kind in ("ref", "ref-env"):
        runners[kind] = RefLoop(load_config(PRESET, base + [f"run.out={tmp / kind}"]), args.n, tmp, args.workers)
        info.update(flops=count_flops(runners[kind].model, (1, 28, 28)), steps=runners[kind].cfg.attack.steps)
    elif kind == "old":
        old = ["run.amp='off'", "run.channels_last='off'", f"run.threads={torch.get_num_threads()}"]
        runners["ducat-0.1"] = DucatLoop(base, old, False, tmp / "old")
    else:
        from ducat.train.setup import setup_runtime

        setup_runtime(load_config(PRESET, base).run)  # what ``train()`` does first: threads, determinism
        info.update(spec=library_defaults())
        runners["defaults"] = DucatLoop(base, [], True, tmp / "defaults")
        variants = {} if args.quick else ablations(info["spec"]["amp"], info["spec"]["native_bf16"])
        for name, (overrides, fold, _) in variants.items():
            runners[name] = DucatLoop(base, overrides, fold, tmp / name)
    return runners, info


def worker(kind: str, args) -> None:
    """Serve the driver: one JSON line per command read from stdin."""
    import torch

    tmp = Path(tempfile.mkdtemp(prefix=f"ducat-bench-{kind}-"))
    try:
        runners, info = build_runners(kind, args, tmp)
        warm = {}
        for name, r in runners.items():
            t = time.perf_counter()
            r.epoch(1, max_steps=WARM_STEPS)
            warm[name] = time.perf_counter() - t
        print(json.dumps(info | {"runners": list(runners), "warm": warm, "pid": os.getpid()}), flush=True)
        for line in sys.stdin:
            cmd, *rest = line.split()
            if cmd == "epoch":
                r = runners[rest[0]]
                secs = r.epoch(int(rest[1]))
                reply = {"secs": secs, "loss": r.last.get("train_loss"), "threads": torch.get_num_threads()}
            elif cmd == "kernels":
                reply = kernel_seconds(runners[rest[0]], int(rest[1]))
            else:  # matmul
                reply = {d: matmul_gflops(d) for d in rest} | {"threads": torch.get_num_threads()}
            print(json.dumps(reply), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


KERNELS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::addmm", "aten::mm", "aten::bmm")


def kernel_seconds(runner, epoch: int) -> dict[str, float]:
    """One profiled epoch: its wall time and the time spent inside the convolution and matrix-product kernels
    (the operators that do the counted FLOPs; self time, so nothing is counted twice)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        runner.epoch(epoch)
        secs = time.perf_counter() - t
    kernels = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in KERNELS) / 1e6
    return {"secs": secs, "kernels": kernels, "threads": torch.get_num_threads()}


# ---- --means: one PGD step per precision, layout and folding, per model ------------------------------
MEANS_MODELS = {"small_cnn": (1, 28, 128), "resnet18": (3, 32, 32), "mlp": (1, 28, 128)}  # channels, size, batch


def pgd_step_ms(view, x, y, reps: int) -> list[float]:
    """Per-call ms of one PGD step: forward and input-gradient backward, as ``ducat.attacks.PGD`` does."""
    import torch
    import torch.nn.functional as F

    times = []
    for _ in range(reps):
        t = time.perf_counter()
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(view(xx).float(), y), xx)
        times.append(1000 * (time.perf_counter() - t))
    return times


def means_table(reps: int) -> None:
    """Median ms per PGD step (eval mode) for fp32/bf16 x NCHW/channels_last x fold off/on, interleaved."""
    import contextlib

    import torch

    from ducat.attacks.fold import folded
    from ducat.dummy import widen_model
    from ducat.models import build_model
    from ducat.runtime import native_bf16

    precisions = ("fp32", "bf16") if native_bf16("cpu") else ("fp32",)
    if len(precisions) == 1:
        print("bf16 skipped: this CPU has no native bf16 (emulated, about 20x slower than fp32)\n")
    print(f"## one PGD step (forward + input-gradient backward, eval mode), median ms over {reps} interleaved "
          f"repetitions; {torch.get_num_threads()} threads; uptime {uptime()}\n")
    print("| model     | batch | precision | layout | unfolded ms | folded ms | fold speed-up | cl speed-up |")
    print("|-----------|-------|-----------|--------|-------------|-----------|---------------|-------------|")
    for name, (channels, size, batch) in MEANS_MODELS.items():
        torch.manual_seed(0)
        x, y = torch.rand(batch, channels, size, size), torch.randint(0, 10, (batch,))
        cells = {}
        for layout in ("nchw", "cl"):
            model = widen_model(build_model(name, 10, channels)).eval()
            xl = x
            if layout == "cl":
                model, xl = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            for precision in precisions:
                ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                       else contextlib.nullcontext())
                cells[layout, precision] = (model, folded(model), xl, ctx)
        times: dict[tuple[str, str, bool], list[float]] = {}
        for r in range(reps):
            for key, (model, fv, xl, ctx) in (list(cells.items()) if r % 2 == 0 else list(cells.items())[::-1]):
                for fold, view in ((False, model), (True, fv)) if r % 2 == 0 else ((True, fv), (False, model)):
                    with ctx:
                        pgd_step_ms(view, xl, y, 1)  # warm
                        times.setdefault((*key, fold), []).extend(pgd_step_ms(view, xl, y, 1))
        for precision in precisions:
            for layout in ("nchw", "cl"):
                off, on = med(times[layout, precision, False]), med(times[layout, precision, True])
                nchw = med(times["nchw", precision, True])
                speedup = f"{off / on:12.2f}x" if cells[layout, precision][1] is not cells[layout, precision][0] \
                    else f"{'n/a (no BN)':>13s}"
                print(f"| {name:9s} | {batch:5d} | {precision:9s} | {layout:6s} | {off:11.1f} | {on:9.1f} | "
                      f"{speedup} | {nchw / on if layout == 'cl' else 1:10.2f}x |", flush=True)


# =========================================== driver side ===========================================
class Worker:
    def __init__(self, kind: str, args, env: dict[str, str]):
        cmd = [sys.executable, __file__, "--worker", kind, "--n", str(args.n), "--workers", str(args.workers)]
        cmd += ["--quick"] if args.quick else []
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"benchmark worker exited with code {self.proc.wait()}")
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_rounds(workers: dict[str, Worker], rounds: int, n: int, precisions: set[str]) -> dict[str, Any]:
    """Interleaved rounds; returns images/s per loop and round, matmul rates (of ``precisions``, in the
    defaults' process) and thread counts."""
    owner = {name: w for w in workers.values() for name in w.info["runners"]}
    names = list(owner)
    ips: dict[str, list[float]] = {k: [] for k in names}
    threads: dict[str, list[int]] = {k: [] for k in names}
    loss: dict[str, float] = {}
    mm: list[dict[str, float]] = []
    background: list[float | None] = []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        before = load_sample()
        mm.append(workers["new"].ask("matmul " + " ".join(sorted(precisions | {"fp32"}))))
        for name in (order if r % 2 == 0 else order[::-1]):
            out = owner[name].ask(f"epoch {name} {2 + r}")
            ips[name].append(n / out["secs"])
            threads[name].append(out["threads"])
            loss[name] = out["loss"]
        background.append(background_cores(before, load_sample()))
        print(f"  round {r + 1}/{rounds}: background {fmt_cores(background[-1])} cores; mm fp32 {mm[-1]['fp32']:.0f} "
              f"GFLOP/s ({mm[-1]['threads']} thr); img/s " + ", ".join(f"{k} {ips[k][-1]:.0f}" for k in names),
              flush=True)
    return {"names": names, "ips": ips, "threads": threads, "loss": loss, "mm": mm, "background": background}


def contention(worker: Worker, name: str, min_epochs: int, min_secs: float, cycles: int) -> dict[str, Any]:
    """Epoch times of ``name`` idle, then ``cycles`` x (with the competitor running, idle again)."""
    epoch = 100

    def run_phase() -> dict[str, Any]:
        nonlocal epoch
        times, threads, t0 = [], [], time.perf_counter()
        while len(times) < min_epochs or time.perf_counter() - t0 < min_secs:
            out = worker.ask(f"epoch {name} {epoch}")
            epoch += 1
            times.append(out["secs"])
            threads.append(out["threads"])
        return {"times": times, "threads": threads}

    phases = alternate(run_phase, cycles, None)
    return {"phases": phases, "slowdown": med(slowdowns(phases))}


def med(v) -> float:
    return statistics.median(list(v))


def report(res: dict[str, Any], f: float, k: int, precision: dict[str, str]) -> dict[str, dict[str, float]]:
    """The throughput table; returns ratio and % of matmul per loop."""
    names, mm = res["names"], res["mm"]
    quiet = [i for i, b in enumerate(res["background"]) if b is not None and b < QUIET_CORES]
    use = quiet if len(quiet) >= 2 else list(range(len(mm)))
    ips = {name: [v[i] for i in use] for name, v in res["ips"].items()}
    mm = [mm[i] for i in use]
    print(f"\n## rounds used below: {len(use)} of {len(res['mm'])} "
          + (f"(those with background load < {QUIET_CORES} cores)" if use == quiet else
             f"(all: fewer than 2 rounds had background load < {QUIET_CORES} cores)")
          + "; background cores per round: " + ", ".join(fmt_cores(b) for b in res["background"]))
    useful = (2 * k + 6) * f
    print(f"\n## FLOPs: F = {f / 1e6:.2f} MFLOP per forward (conv + linear); a ducat step does (2K + 6) F = "
          f"{2 * k + 6} F = {useful / 1e6:.1f} MFLOP per image (K = {k}); the reference executes (3K + 6) F")
    print(f"## matmul (torch.mm 2048 x 2048, defaults' process): fp32 median {med(m['fp32'] for m in mm):.1f} GFLOP/s"
          + (f", bf16 median {med(m['bf16'] for m in mm):.1f}" if "bf16" in mm[0] else "")
          + f" at {sorted({m['threads'] for m in mm})} threads\n")
    print("| loop        | trains in | img/s median (min-max) | x ref median (min-max) | x ref-env     | GFLOP/s "
          "| % of its matmul | threads | loss  |")
    print("|-------------|-----------|------------------------|------------------------|---------------|---------"
          "|-----------------|---------|-------|")
    out = {}
    for name in names:
        v = ips[name]
        ratios = [a / b for a, b in zip(v, ips["ref"])]
        ratios_env = [a / b for a, b in zip(v, ips["ref-env"])]
        p = precision[name]
        pct = [100 * useful * a / 1e9 / m[p] for a, m in zip(v, mm)]
        out[name] = {"ratio": med(ratios), "pct": med(pct), "precision": p}
        print(f"| {name:11s} | {p:9s} | {med(v):6.1f} ({min(v):6.1f}-{max(v):6.1f}) | {med(ratios):5.2f} "
              f"({min(ratios):5.2f}-{max(ratios):5.2f})    | {med(ratios_env):12.2f}x "
              f"| {useful * med(v) / 1e9:7.1f} | {med(pct):14.0f}% "
              f"| {','.join(map(str, sorted(set(res['threads'][name])))):>7s} | {res['loss'][name]:5.3f} |")
    spread = {k: (max(v) - min(v)) / med(v) for k, v in ips.items()}
    print(f"\nnoise: img/s spread (max-min)/median over rounds: median {med(spread.values()):.0%}, "
          f"worst {max(spread.values()):.0%}; % of matmul is taken per round against that round's matmul")
    return out


def ceiling(worker: Worker, n: int, ref_info: dict[str, Any], precision: str, mm: list[dict[str, float]]) -> None:
    """How close to the matmul rate the defaults' step could come if every operator but the convolutions and
    matrix products took no time: the counted FLOPs over the time of those kernels alone, as they ran in a
    profiled epoch (the profiler slows the small operators, not these)."""
    useful = (2 * ref_info["steps"] + 6) * ref_info["flops"] * n
    out = worker.ask("kernels defaults 50")
    rate = med(m[precision] for m in mm)
    print(f"\n## ceiling: in one profiled epoch of the defaults ({out['secs']:.2f} s, {out['threads']} threads) the "
          f"convolution and matrix-product kernels took {out['kernels']:.2f} s "
          f"({100 * out['kernels'] / out['secs']:.0f}%)"
          f"; the counted FLOPs over that time are {useful / out['kernels'] / 1e9:.0f} GFLOP/s = "
          f"{100 * useful / out['kernels'] / 1e9 / rate:.0f}% of the {precision} matmul rate ({rate:.0f}): the most "
          "any step of this model reaches with these kernels, however fast everything else")


def print_contention(name: str, c: dict[str, Any]) -> None:
    for ph in c["phases"]:
        print(f"  {name:10s} {ph['kind']:9s}: {len(ph['times'])} epochs, mean {statistics.mean(ph['times']):.2f} s, "
              f"threads {sorted(set(ph['threads']))}, background {fmt_cores(ph['background'])} cores")
    print(f"  {name:10s} slowdown per contended phase (vs the idle phases on either side): "
          + ", ".join(f"{v:.2f}x" for v in slowdowns(c["phases"])) + f"; median {c['slowdown']:.1f}x", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="training images per timed epoch, a multiple of 128")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 8, --quick 3)")
    p.add_argument("--quick", action="store_true", help="3 rounds, no ablations")
    p.add_argument("--cycles", type=int, default=2, help="contended phases of the defaults, each between idle ones")
    p.add_argument("--contend-all", action="store_true", help="also measure ref and ducat-0.1 under contention")
    p.add_argument("--workers", type=int, default=2, help="DataLoader num_workers of the reference loop")
    p.add_argument("--json", help="also write the measurements to this JSON file")
    p.add_argument("--means", type=int, metavar="REPS", help="only the per-PGD-step table of fold/layout/precision")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n % BATCH or args.n < BATCH:
        raise SystemExit(f"--n must be a positive multiple of {BATCH}")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args.worker, args)
    if args.means:
        sys.path.insert(0, str(SRC))
        return means_table(args.means)
    t_start = time.perf_counter()
    print("# ducat training throughput: PGD-10 + DUCAT, small_cnn (2C head), Fashion-MNIST 28x28, batch 128\n")
    print(f"uptime at start: {uptime()}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, python "
          f"{platform.python_version()}")
    sys.path.insert(0, str(SRC))
    from ducat.runtime import prepare_environment

    env = clean_env({})  # torch's defaults: no thread or wait-policy variables
    # what ``ducat.cli`` does before torch is imported, applied to the defaults' process environment
    new_env = dict(env)
    prepare_environment(new_env)
    workers = {kind: Worker(kind, args, new_env if kind in ("new", "ref-env") else env) for kind in KINDS}
    try:
        spec = workers["new"].info["spec"]
        print(f"defaults as the library picks them here: amp {spec['amp']}, channels_last {spec['cl']}, "
              f"BN folding in the attack on, threads {spec['threads']}; torch default threads "
              f"{workers['ref'].info['torch_default_threads']}")
        if not spec["native_bf16"]:
            print("+bf16 skipped: this CPU has no native bf16 (no AVX512-BF16 or AMX); emulated bf16 runs about 20x "
                  "slower than fp32 and would measure only the emulation")
        print("warm-up s: " + ", ".join(f"{k} {v:.1f}" for w in workers.values() for k, v in w.info["warm"].items()))
        variants = {} if args.quick else ablations(spec["amp"], spec["native_bf16"])
        precision = {"ref": "fp32", "ref-env": "fp32", "ducat-0.1": "fp32", "defaults": spec["amp"],
                     **{name: v[2] for name, v in variants.items()}}
        rounds = args.rounds or (3 if args.quick else 8)
        res = run_rounds(workers, rounds, args.n, set(precision.values()))
        table = report(res, workers["ref"].info["flops"], workers["ref"].info["steps"], precision)
        ceiling(workers["new"], args.n, workers["ref"].info, precision["defaults"], res["mm"])
        print(f"\n## contention: one competitor ({os.cpu_count()} threads of relu(a @ a)); idle, then "
              f"{args.cycles} x (contended, idle)")
        cont = {"defaults": contention(workers["new"], "defaults", 3, 6.0, args.cycles)}
        print_contention("defaults", cont["defaults"])
        if args.contend_all:
            for kind, name in (("old", "ducat-0.1"), ("ref", "ref")):
                cont[name] = contention(workers[kind], name, 2, 4.0, 1)
                print_contention(name, cont[name])
        if args.json:
            Path(args.json).write_text(json.dumps({"rounds": res, "contention": cont, "table": table}, indent=1))
    finally:
        for w in workers.values():
            w.close()
    d = table["defaults"]
    print(f"\nuptime at end: {uptime()}; total benchmark time {time.perf_counter() - t_start:.0f} s")
    print(f"defaults: ratio {d['ratio']:.2f}x, {d['pct']:.0f}% of {d['precision']} matmul, "
          f"contention slowdown {cont['defaults']['slowdown']:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
