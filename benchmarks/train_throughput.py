#!/usr/bin/env python
"""Training throughput of PGD-10 + DUCAT: ducat's loop against a typical research-code loop.

One process, one machine, the same model (small_cnn with a 2C head), the same Fashion-MNIST images,
batch 128, eps 0.1, step 0.025, 10 PGD steps, SGD lr 0.1. Prints images/s of every variant, the
ratio to the reference loop, the model FLOPs per training image (formula printed), the achieved
GFLOP/s, and the fp32 and bf16 matmul GFLOP/s of this machine measured in the same run.

Variants (``--variants``, comma-separated). ``ducat+...`` variants combine any of the parts
``cl``, ``bf16``, ``compile`` (config keys of the public API) and ``cl*``, ``bnfold*`` (a ``*``
marks a *proposed* library change, emulated in this script; it is not in the library):

  ref                 typical research code: torchvision ``FashionMNIST`` returning PIL images,
                      ``Compose([RandomCrop(28, padding=2), RandomHorizontalFlip(), ToTensor()])``,
                      ``DataLoader(batch_size=128, shuffle=True, num_workers=2)`` (persistent workers,
                      so the per-epoch worker start-up of these short epochs is not charged); PGD steps
                      call ``loss.backward()`` through all parameters (grads accumulate, zeroed before
                      the update); separate forwards ``model(x)``, ``model(x_adv)``; DUCAT soft-label CE
                      written inline with ``ducat.dummy.soft_labels``; ``.item()`` statistics per step.
  ref-nw0             the same with ``num_workers=0``.
  ref+tensors         ladder 1: data as uint8 tensors, ducat's TensorLoader + vectorised crop/flip.
  ref+tensors+igrad   ladder 2: + PGD gradients w.r.t. the input only (``torch.autograd.grad``).
  ref+tensors+igrad+cat  ladder 3: + one forward over ``cat([x, x_adv])`` (ducat's algorithm, inline).
  ducat               ``ducat.train.Trainer(config).train_epoch(epoch)``, preset
                      ``cpu-fmnist-small_cnn-pgd_at-ducat`` with its CPU defaults (fp32, NCHW, eager).
  +cl                 ``run.channels_last=on`` (the CPU default ``auto`` is off).
  +cl*                + the augmented batch kept channels_last (``random_crop_flip`` returns NCHW).
  +bnfold*            PGD steps run on a copy of the model with the eval-mode BatchNorms folded into
                      their convs (``torch.fx.experimental.optimization.fuse``), rebuilt every batch.
  +bf16               ``run.amp=bf16``: bf16 autocast on the CPU (run only with AVX512-BF16 or AMX).
  +compile            ``run.compile=true`` (``torch.compile``; compile time reported, not timed).

Measurement: every variant trains its own model from the same seed on the first ``--n`` (256)
training images; a warm-up (2 steps, not timed) per variant, then ``--rounds`` rounds; a round times
one epoch (``--n`` / 128 steps) of every variant, in a rotated order, plus one fp32 and one bf16
matmul. Short epochs and many rounds interleave the variants finely, so load from other processes on
a shared machine hits all of them alike. Ratios to ``ref`` are taken within a round; the median over
rounds is reported with its min-max range, and the run prints how noisy it was.
Accuracy is not measured in the timing run (a few steps of training say nothing about it):
``--accuracy-check`` trains fp32 and bf16 (two seeds each) for a few epochs and evaluates in fp32.

    python benchmarks/train_throughput.py --threads 1            # ~3-4 min on 2 cores
    python benchmarks/train_throughput.py --threads 1 --quick    # ~1 min
    python benchmarks/train_throughput.py --threads 1 --profile  # + torch.profiler tables
    python benchmarks/train_throughput.py --threads 1 --accuracy-check   # ~9 min

``--threads`` sets torch's intra-op threads for training and for the matmul reference alike (default:
torch's own default, one per core). On a machine shared with other busy processes use 1: the run
prints a 1-thread vs N-thread latency check that shows why.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ducat
from ducat.attacks import PGD, eval_mode
from ducat.config import load_config
from ducat.data import TensorData, TensorLoader, load_split
from ducat.dummy import DummyClassModel, soft_labels
from ducat.models import count_flops
from ducat.objectives.base import attacked_view
from ducat.runs import build_run_model
from ducat.train import Trainer, validate_model

PRESET = "cpu-fmnist-small_cnn-pgd_at-ducat"
BATCH = 128
WARM_STEPS = 2
REF_VARIANTS = ["ref", "ref-nw0", "ref+tensors", "ref+tensors+igrad", "ref+tensors+igrad+cat"]
DUCAT_PARTS = ["cl", "cl*", "bnfold*", "bf16", "compile"]
FULL_VARIANTS = ["ref", "ref+tensors", "ref+tensors+igrad", "ducat", "ducat+cl", "ducat+cl*", "ducat+bnfold*",
                 "ducat+cl+bnfold*", "ducat+bf16", "ducat+bf16+cl", "ducat+bf16+cl+bnfold*", "ducat+compile"]
QUICK_VARIANTS = ["ref", "ducat", "ducat+cl", "ducat+bf16+cl"]


# ---- machine -------------------------------------------------------------------------------------
def cpu_info() -> tuple[str, set[str]]:
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, flags


def bf16_cpu_support(flags: set[str]) -> tuple[bool, str]:
    native = sorted(f for f in ("avx512_bf16", "amx_bf16") if f in flags)
    onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    detail = (f"cpu flags: {', '.join(native) or 'no avx512_bf16 / amx_bf16'}; oneDNN bf16 kernels: {onednn}; "
              f"torch cpu capability: {torch.backends.cpu.get_cpu_capability()}")
    return bool(native) and onednn, detail


def matmul_gflops(n: int, dtype: torch.dtype, reps: int = 5) -> float:
    """Median GFLOP/s of ``torch.mm`` on n x n matrices (2 n^3 FLOPs per product)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def thread_check(model: nn.Module, threads: int) -> str:
    """Median ms of one PGD step (fwd + input-grad bwd, batch 128) at 1 thread and at ``threads``, ABAB."""
    model = build_like(model).eval()
    x, y = torch.rand(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))

    def step():
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xx), y), xx)

    before = torch.get_num_threads()
    times: dict[int, list[float]] = {1: [], threads: []}
    try:
        for t in (1, threads):
            torch.set_num_threads(t)
            step()
        for r in range(6):
            for t in ((1, threads) if r % 2 == 0 else (threads, 1)):
                torch.set_num_threads(t)
                t0 = time.perf_counter()
                step()
                times[t].append(1000 * (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(before)
    a, b = statistics.median(times[1]), statistics.median(times[threads])
    verdict = ("the cores are oversubscribed: use --threads 1 (and run.threads=1 for training)" if b > a else
               "more threads help here")
    return f"one PGD step at 1 thread {a:.0f} ms, at {threads} threads {b:.0f} ms -> {verdict}"


def build_like(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


# ---- data ------------------------------------------------------------------------------------------
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


# ---- the reference loop and its ladder -------------------------------------------------------------
class RefLoop:
    """Research-code style PGD-10 + DUCAT step; ``data``/``grads``/``forward`` select the ladder rung."""

    def __init__(self, cfg, n: int, data: str, grads: str, forward: str, workers: int, tv_dataset,
                 tensors: TensorData):
        self.cfg, self.grads, self.forward = cfg, grads, forward
        torch.manual_seed(cfg.run.seed)
        self.model = build_run_model(cfg)
        o = cfg.optim
        self.opt = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                   weight_decay=o.weight_decay)
        if data == "pil":
            from torch.utils.data import DataLoader, Subset

            self.loader = DataLoader(Subset(tv_dataset, range(n)), batch_size=BATCH, shuffle=True,
                                     num_workers=workers, persistent_workers=workers > 0)
        else:
            gen = torch.Generator().manual_seed(cfg.run.seed)
            self.loader = TensorLoader(tensors, BATCH, shuffle=True, augment=True,
                                       crop_padding=cfg.data.crop_padding, flip=cfg.data.flip, generator=gen)
        self.images_per_epoch = n
        self.last: dict[str, float] = {}

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.cfg.attack
        self.model.eval()
        x_adv = (x + torch.empty_like(x).uniform_(-a.eps, a.eps)).clamp(0, 1)
        for _ in range(a.steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(self.model(x_adv), y)
            if self.grads == "all":
                loss.backward()  # weight grads computed too; they accumulate and are zeroed before the update
                grad = x_adv.grad
            else:
                (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + a.step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - a.eps), x + a.eps).clamp(0, 1)
        self.model.train()
        return x_adv.detach()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        u = self.cfg.ducat
        x_adv = self.attack(x, y)
        if self.forward == "separate":
            z_clean, z_adv = self.model(x), self.model(x_adv)
        else:
            z_clean, z_adv = self.model(torch.cat([x, x_adv])).chunk(2)
        index = self.model.dummy_index
        ce_clean = -(soft_labels(y, u.beta1, index) * F.log_softmax(z_clean, 1)).sum(1).mean()
        ce_adv = -(soft_labels(y, 1 - u.beta2, index) * F.log_softmax(z_adv, 1)).sum(1).mean()
        loss = u.alpha * ce_clean + (1 - u.alpha) * ce_adv
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item(), (z_adv.argmax(1) == y).sum().item()

    def epoch(self, epoch: int, max_steps: int | None = None) -> float:
        self.model.train()
        losses = []
        t = time.perf_counter()
        for i, (x, y) in enumerate(self.loader):
            if max_steps is not None and i >= max_steps:
                break
            losses.append(self.step(x, y)[0])
        secs = time.perf_counter() - t
        self.last = {"train_loss": sum(losses) / max(len(losses), 1)}
        return secs


# ---- ducat's loop, through its public API, and the proposed changes ---------------------------------
def fold_bn(model: nn.Module) -> nn.Module:
    """Copy of an eval-mode model with each BatchNorm folded into its conv; parameters frozen."""
    from torch.fx.experimental.optimization import fuse

    folded = DummyClassModel(fuse(model.net), model.dummy_index) if isinstance(model, DummyClassModel) else fuse(model)
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded.eval()


def patch_bnfold(trainer: Trainer) -> None:
    """Proposed ``Objective.craft``: the same PGD (same RNG draws) on a BN-folded copy of the model."""
    obj = trainer.objective
    base = obj.craft

    def craft(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = obj.attack
        if not a.bn_eval:
            return base(model, x, y)
        with eval_mode(model):
            folded = fold_bn(model)
        pgd = PGD(attacked_view(folded, a.mode), a.eps, a.step_size, a.steps, a.random_start,
                  generator=obj.generator)
        return pgd(x, y)

    obj.craft = craft


def patch_cl_keep(trainer: Trainer) -> None:
    """Proposed: the augmented batch stays channels_last (``random_crop_flip`` returns NCHW-contiguous)."""
    augment = trainer._augment
    trainer._augment = lambda x: augment(x).contiguous(memory_format=torch.channels_last)


class DucatLoop:
    def __init__(self, name: str, parts: list[str], base: list[str], out: Path):
        overrides: list[str] = []
        self.patches: list[Callable[[Trainer], None]] = []
        for p in parts:
            if p in ("cl", "cl*"):
                overrides.append("run.channels_last='on'")
                if p == "cl*":
                    self.patches.append(patch_cl_keep)
            elif p == "bnfold*":
                self.patches.append(patch_bnfold)
            elif p == "bf16":
                overrides.append("run.amp=bf16")
            elif p == "compile":
                overrides.append("run.compile=true")
        slug = name.replace("*", "P").replace("+", "_").replace(" ", "_")
        self.cfg = load_config(PRESET, base + overrides + [f"run.out={out / slug}"])
        self.trainer = Trainer(self.cfg, log=lambda s: None)
        for patch in self.patches:
            patch(self.trainer)
        self.model = self.trainer.model
        self.images_per_epoch = len(self.trainer.train_data)
        self.last: dict[str, Any] = {}

    def epoch(self, epoch: int, max_steps: int | None = None) -> float:
        tr = self.trainer
        full = tr.train_data
        if max_steps is not None:  # warm-up / profiling: the same shapes on the first max_steps batches
            tr.train_data = full.subset(torch.arange(min(len(full), max_steps * BATCH)))
        try:
            t = time.perf_counter()
            self.last = tr.train_epoch(epoch)
            return time.perf_counter() - t
        finally:
            tr.train_data = full


def parse_variant(name: str) -> list[str] | None:
    """Parts of a ``ducat+...`` variant; None for a reference variant; SystemExit if unknown."""
    if name in REF_VARIANTS:
        return None
    head, *parts = name.split("+")
    if head != "ducat" or any(p not in DUCAT_PARTS for p in parts):
        raise SystemExit(f"unknown variant '{name}'; use one of {', '.join(REF_VARIANTS)} or ducat[+part...] "
                         f"with parts {', '.join(DUCAT_PARTS)}")
    return parts


def make_runner(name: str, n: int, base: list[str], out: Path, workers: int, tv_dataset, tensors):
    parts = parse_variant(name)
    if parts is None:
        cfg = load_config(PRESET, base + [f"run.out={out / 'ref'}"])
        spec = {"ref": ("pil", "all", "separate", workers), "ref-nw0": ("pil", "all", "separate", 0),
                "ref+tensors": ("tensor", "all", "separate", 0),
                "ref+tensors+igrad": ("tensor", "input", "separate", 0),
                "ref+tensors+igrad+cat": ("tensor", "input", "concat", 0)}[name]
        return RefLoop(cfg, n, spec[0], spec[1], spec[2], spec[3], tv_dataset, tensors)
    return DucatLoop(name, parts, base, out)


# ---- profiling ---------------------------------------------------------------------------------------
CATEGORIES = [
    ("conv forward", ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::conv2d")),
    ("conv backward", ("aten::convolution_backward", "aten::mkldnn_convolution_backward")),
    ("linear (addmm/mm)", ("aten::addmm", "aten::mm", "aten::linear", "aten::t", "aten::matmul")),
    ("batchnorm fwd+bwd", ("aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::batch_norm",
                           "aten::_batch_norm_impl_index", "aten::_native_batch_norm_legit",
                           "aten::_native_batch_norm_legit_no_training", "aten::_batch_norm_with_update",
                           "aten::batch_norm_backward")),
    ("relu fwd+bwd", ("aten::relu", "aten::relu_", "aten::clamp_min", "aten::clamp_min_", "aten::threshold_backward")),
    ("max-pool fwd+bwd", ("aten::max_pool2d_with_indices", "aten::max_pool2d_with_indices_backward",
                          "aten::max_pool2d")),
    ("adaptive avg-pool fwd+bwd", ("aten::_adaptive_avg_pool2d", "aten::_adaptive_avg_pool2d_backward",
                                   "aten::adaptive_avg_pool2d")),
    ("dtype casts (copy_/to)", ("aten::copy_", "aten::to", "aten::_to_copy")),
]


def conv_flops(model: nn.Module) -> int:
    """Forward FLOPs of the conv layers alone on one 1x28x28 image."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        total += 2 * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] * out[0].numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was = model.training
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, 28, 28))
    model.train(was)
    for h in hs:
        h.remove()
    return total


def profile_epoch(runner, label: str, f_total: int, f_conv: int, steps: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    n_steps = 2
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        runner.epoch(99, max_steps=n_steps)
        wall = time.perf_counter() - t
    events = prof.key_averages()
    print(f"\n## profile: {label}, {n_steps} steps of batch {BATCH} ({wall:.2f} s wall under the profiler)\n")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    per_cat = {c: 0.0 for c, _ in CATEGORIES}
    other = 0.0
    for e in events:
        for cat, names in CATEGORIES:
            if e.key in names:
                per_cat[cat] += e.self_cpu_time_total / 1e6
                break
        else:
            other += e.self_cpu_time_total / 1e6
    images = n_steps * BATCH
    # FLOPs of the profiled steps (the (2K + 6) F model split into convs and linears)
    conv_f = images * (2 * steps + 6) * f_conv
    lin_f = images * (2 * steps + 6) * (f_total - f_conv)
    conv_t = per_cat["conv forward"] + per_cat["conv backward"]
    print("self-CPU time by category:")
    for cat, secs in list(per_cat.items()) + [("everything else", other)]:
        note = ""
        if cat == "conv backward" and conv_t > 0:
            note = f"convs fwd+bwd: {conv_f / conv_t / 1e9:.1f} GFLOP/s ({conv_f / 1e9:.1f} GFLOP in {conv_t:.2f} s)"
        if cat.startswith("linear") and secs > 0:
            note = f"{lin_f / secs / 1e9:.1f} GFLOP/s"
        if cat == "everything else":
            note = "(elementwise attack/loss math, optimizer, autograd and Python overhead)"
        print(f"  {cat:28s} {secs:7.3f} s {100 * secs / total:5.1f}%  {note}")
    print(f"  {'total self CPU':28s} {total:7.3f} s")


# ---- accuracy check ----------------------------------------------------------------------------------
def evaluate(model: nn.Module, cfg, test: TensorData) -> dict[str, float]:
    fresh = build_run_model(cfg)  # fp32, NCHW, eager copy of the weights
    fresh.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    return validate_model(fresh, test, cfg)


def accuracy_check(args, base: list[str], out: Path, bf16_ok: bool) -> None:
    """Train fp32 and bf16+cl+bnfold* (seeds 0 and 1) for --acc-epochs epochs; evaluate all in fp32."""
    runs = [("fp32", []), ("bf16+cl+bnfold*", ["bf16", "cl", "bnfold*"])] if bf16_ok else [("fp32", [])]
    print(f"\n## accuracy check: {args.acc_n} training images x {args.acc_epochs} epochs of PGD-10 + DUCAT from "
          f"scratch (lr 0.1), evaluated in fp32 on the first {args.eval_n} test images (clean and PGD-10 "
          f"accuracy of the projected classifier, validate_model)\n")
    for seed in (0, 1):
        for label, parts in runs:
            b = [s for s in base if not s.startswith("data.n_train")] + [f"data.n_train={args.acc_n}",
                                                                          f"run.seed={seed}"]
            loop = DucatLoop(f"{label} seed {seed}", parts, b, out)
            t = time.perf_counter()
            for e in range(1, args.acc_epochs + 1):
                loop.epoch(e)
            secs = time.perf_counter() - t
            acc = evaluate(loop.model, loop.cfg, loop.trainer.test_data)
            print(f"  {label:16s} seed {seed}: {secs:6.1f} s ({args.acc_n * args.acc_epochs / secs:5.1f} img/s)  "
                  f"last-epoch loss {loop.last['train_loss']:.4f}  clean {acc['clean_acc']:.3f}  "
                  f"PGD-10 {acc['pgd_acc']:.3f}", flush=True)
    print(f"\n  binomial s.e. of one accuracy on {args.eval_n} images: about "
          f"{100 * (0.25 / args.eval_n) ** 0.5:.1f} points")


# ---- report ------------------------------------------------------------------------------------------
def med(v: list[float]) -> float:
    return statistics.median(v)


def report(names, ips, mm32, mm16, f, steps, losses, warm, n, rounds, threads) -> None:
    useful, ref_exec = (2 * steps + 6) * f, (3 * steps + 6) * f
    mm = med(mm32)
    print(f"\n## FLOPs per training image; F = count_flops(model, (1, 28, 28)) = {f / 1e6:.2f} MFLOP (one forward)\n")
    print("  ducat step = K x (F forward + F input-grad backward)    PGD step, weight grads skipped")
    print("             + 2F   forward of [x; x']                    clean and adversarial images")
    print("             + 4F   backward of [x; x'] (data + weight grads, 2F each)")
    print(f"             = (2K + 6) F = {2 * steps + 6} F = {useful / 1e6:.1f} MFLOP   (K = {steps})")
    print(f"  the reference executes (3K + 6) F = {3 * steps + 6} F = {ref_exec / 1e6:.1f} MFLOP: its PGD backward "
          "also computes weight grads")
    print("  assumptions: a layer's data grad and its weight grad each cost its forward FLOPs; conv and linear only "
          "(BN, ReLU,\n  pooling, elementwise ops not counted); the first conv's unneeded data grad in the training "
          "backward is not\n  subtracted (2.3% of F). Achieved GFLOP/s = (2K + 6) F x images/s for every variant, "
          "the reference's\n  wasted weight grads not credited.")
    print(f"\n## matmul on this machine (torch.mm 2048 x 2048, {threads} thread{'s' * (threads > 1)}), once per round "
          f"and at the end")
    print(f"  fp32: median {mm:.1f} GFLOP/s (min {min(mm32):.1f}, max {max(mm32):.1f})")
    if mm16:
        print(f"  bf16: median {med(mm16):.1f} GFLOP/s (min {min(mm16):.1f}, max {max(mm16):.1f})")
    print(f"\n## results: {n} images per epoch ({n // BATCH} steps), {rounds} rounds; img/s median (min-max); x ref = "
          f"variant / ref within each round, median (min-max)\n")
    head = (f"| {'variant':24s} | {'img/s':>21s} | {'x ref':>17s} | {'GFLOP/s':>7s} | {'% fp32 mm':>9s} "
            f"| {'% bf16 mm':>9s} | {'loss':>5s} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    ref = ips["ref"]
    for name in names:
        v = ips[name]
        ratios = [a / b for a, b in zip(v, ref)]
        gf = useful * med(v) / 1e9
        bf = f"{100 * gf / med(mm16):8.0f}%" if mm16 and "bf16" in name else f"{'':9s}"
        print(f"| {name:24s} | {med(v):6.1f} ({min(v):6.1f}-{max(v):6.1f}) | {med(ratios):5.2f} "
              f"({min(ratios):4.2f}-{max(ratios):4.2f}) | {gf:7.1f} | {100 * gf / mm:8.0f}% | {bf} "
              f"| {losses[name]:5.3f} |")
    spread = {k: (max(v) - min(v)) / med(v) for k, v in ips.items()}
    rspread = {k: (max(r) - min(r)) / med(r) for k in names if k != "ref"
               for r in [[a / b for a, b in zip(ips[k], ref)]]}
    worst = max(spread, key=spread.get)
    print(f"\nnoise: img/s spread (max-min)/median over the rounds: median {med(spread.values()):.0%} over variants, "
          f"worst {spread[worst]:.0%} ({worst});\n       spread of the per-round ratios to ref: median "
          f"{med(rspread.values()) if rspread else 0:.0%}; fp32 matmul spread {(max(mm32) - min(mm32)) / mm:.0%}")
    print(f"loss: mean training loss of each variant's last timed epoch; every model starts from the same weights and "
          f"has taken\n      {WARM_STEPS} + {rounds} x {n // BATCH} steps: a check that no variant changes what is "
          f"trained (accuracy: --accuracy-check)")
    slow = {k: v for k, v in warm.items() if v > 20}
    if slow:
        print("warm-up time incl. compilation (not timed): " + ", ".join(f"{k} {v:.0f} s" for k, v in slow.items()))
    if "ducat" in ips:
        d = med([a / b for a, b in zip(ips["ducat"], ref)])
        print(f"\nheadline: ducat with its CPU defaults: {d:.2f}x the reference loop, "
              f"{useful * med(ips['ducat']) / 1e9:.1f} GFLOP/s = {100 * useful * med(ips['ducat']) / 1e9 / mm:.0f}% "
              f"of fp32 matmul (targets: >= 2x, >= 80%)")
    for dtype in ("fp32", "bf16"):
        pool = [k for k in names if k.startswith("ducat") and ("bf16" in k) == (dtype == "bf16")]
        if not pool:
            continue
        best = max(pool, key=lambda k: med(ips[k]))
        g = useful * med(ips[best]) / 1e9
        extra = f", {100 * g / med(mm16):.0f}% of bf16 matmul" if dtype == "bf16" and mm16 else ""
        print(f"          fastest {dtype} ducat variant {best}: {med([a / b for a, b in zip(ips[best], ref)]):.2f}x, "
              f"{g:.1f} GFLOP/s = {100 * g / mm:.0f}% of fp32 matmul{extra}")


# ---- main --------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~1 minute: fewer rounds and variants, no compile")
    p.add_argument("--n", type=int, default=256, help="training images per timed epoch, a multiple of 128")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10, --quick 5)")
    p.add_argument("--variants", default=None, help=f"comma-separated (default: {','.join(FULL_VARIANTS)})")
    p.add_argument("--workers", type=int, default=2, help="DataLoader num_workers of the reference loop")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of ducat and its fastest variants")
    p.add_argument("--profile-rows", type=int, default=16)
    p.add_argument("--accuracy-check", action="store_true", help="only run the fp32-vs-bf16 accuracy check")
    p.add_argument("--acc-n", type=int, default=8192, help="training images of the accuracy check")
    p.add_argument("--acc-epochs", type=int, default=3)
    p.add_argument("--eval-n", type=int, default=1000, help="test images of the accuracy check")
    p.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    args = p.parse_args()
    n, rounds = args.n, args.rounds or (5 if args.quick else 10)
    if n % BATCH or n < BATCH:
        raise SystemExit(f"--n must be a positive multiple of {BATCH}")
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    variants = args.variants.split(",") if args.variants else list(QUICK_VARIANTS if args.quick else FULL_VARIANTS)
    for v in variants:
        parse_variant(v)
    if "ref" not in variants:
        variants.insert(0, "ref")
    cpu, flags = cpu_info()
    bf16_ok, bf16_detail = bf16_cpu_support(flags)

    t_start = time.perf_counter()
    print("# ducat training throughput: PGD-10 + DUCAT, small_cnn (2C head), Fashion-MNIST 28x28, batch 128\n")
    print(f"machine: {cpu}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, torchvision "
          f"{__import__('torchvision').__version__}, ducat {getattr(ducat, '__version__', '?')}, "
          f"python {platform.python_version()}")
    print(f"torch intra-op threads: {threads} (torch default here: {default_threads}); {bf16_detail}")
    print(f"load average at start (1/5/15 min): {loadavg()} on {os.cpu_count()} CPUs")
    tmp = Path(tempfile.mkdtemp(prefix="ducat-bench-"))
    try:
        base = [f"data.n_train={n}", "data.val_fraction=0", "validation.select=last", f"data.n_test={args.eval_n}",
                f"validation.n_examples={args.eval_n}", "ducat.start_epoch=1", "run.progress=false",
                "run.tensorboard=false", "run.device=cpu"]
        if args.accuracy_check:
            accuracy_check(args, base, tmp, bf16_ok)
            return
        skipped = [v for v in variants if "bf16" in v and not bf16_ok]
        if skipped:
            print(f"skipped (no AVX512-BF16/AMX: bf16 would be emulated and slow): {', '.join(skipped)}")
            variants = [v for v in variants if v not in skipped]
        if args.quick:
            variants = [v for v in variants if "compile" not in v]
        from torchvision import transforms

        tv = torchvision_fmnist(tmp / "tv", transforms.Compose(
            [transforms.RandomCrop(28, padding=2), transforms.RandomHorizontalFlip(), transforms.ToTensor()]))
        tensors = load_split("FashionMNIST", None, train=True).subset(torch.arange(n))
        if not torch.equal(tv.data[:n], tensors.images[:, 0]):
            raise SystemExit("torchvision and ducat read different Fashion-MNIST images")
        print(f"images per timed epoch: {n} ({n // BATCH} steps); rounds: {rounds}; warm-up {WARM_STEPS} steps per "
              f"variant; reference DataLoader num_workers={args.workers}")

        runners: dict[str, Any] = {}
        warm: dict[str, float] = {}
        for name in variants:
            r = make_runner(name, n, base, tmp, args.workers, tv, tensors)
            t = time.perf_counter()
            r.epoch(1, max_steps=WARM_STEPS)
            warm[name] = time.perf_counter() - t
            runners[name] = r
        names = list(runners)
        ref_model = runners["ref"].model
        f_total, steps = count_flops(ref_model, (1, 28, 28)), runners["ref"].cfg.attack.steps
        if default_threads > 1:
            print("thread check: " + thread_check(ref_model, default_threads))
        print("warm-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in warm.items()), flush=True)

        ips: dict[str, list[float]] = {k: [] for k in names}
        mm32, mm16 = [], []
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            if r % 2:
                order = order[::-1]
            mm32.append(matmul_gflops(2048, torch.float32))
            if bf16_ok:
                mm16.append(matmul_gflops(2048, torch.bfloat16))
            for name in order:
                secs = runners[name].epoch(2 + r)
                ips[name].append(runners[name].images_per_epoch / secs)
            print(f"  round {r + 1:2d}/{rounds}: fp32 mm {mm32[-1]:5.1f} GFLOP/s; img/s "
                  + ", ".join(f"{k} {ips[k][-1]:.0f}" for k in names), flush=True)
        mm32.append(matmul_gflops(2048, torch.float32))
        if bf16_ok:
            mm16.append(matmul_gflops(2048, torch.bfloat16))
        losses = {k: runners[k].last.get("train_loss", float("nan")) for k in names}
        report(names, ips, mm32, mm16, f_total, steps, losses, warm, n, rounds, threads)

        if args.profile:
            f_conv = conv_flops(ref_model)
            prof = runners.get("ducat") or make_runner("ducat", n, base, tmp, args.workers, tv, tensors)
            profile_epoch(prof, "ducat (CPU defaults: fp32, NCHW, eager)", f_total, f_conv, steps, args.profile_rows)
            done = {"ducat"}
            for dtype in ("fp32", "bf16"):
                pool = [k for k in names if k.startswith("ducat") and "compile" not in k
                        and ("bf16" in k) == (dtype == "bf16")]
                fastest = max(pool, key=lambda k: med(ips[k]), default="ducat")
                if fastest not in done:
                    done.add(fastest)
                    profile_epoch(runners[fastest], f"{fastest} (fastest {dtype} variant)", f_total, f_conv, steps,
                                  args.profile_rows)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "n": n, "rounds": rounds, "threads": threads, "F": f_total, "K": steps, "images_per_s": ips,
                "matmul_fp32_gflops": mm32, "matmul_bf16_gflops": mm16, "train_loss": losses, "warmup_s": warm,
            }, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"\nload average at end: {loadavg()}; total benchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
