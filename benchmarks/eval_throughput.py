#!/usr/bin/env python
"""Evaluation throughput: attacks with per-example early stopping against every attack on every example.

One process, one model, the same test examples, the same seed. Two comparisons:

1. AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square; ``pyautoattack``).
   ``early``: ducat's evaluation path, ``ducat.evaluate.evaluate(..., attacks=("autoattack",))``.
   It calls ``AutoAttack(version="standard").run_standard_evaluation``, which runs each attack
   only on the examples that are still robust after the attacks before it.
   ``all``: every attack on every clean-correct example, separately, then a per-example AND of the
   four results. This is pyautoattack's ``run_standard_evaluation_individual`` (the ``individual``
   mode of the original AutoAttack code, which research code often uses to report per-attack
   numbers), with the standard version's settings.
2. ducat's PGD sequence, ``evaluate(..., attacks=("pgd10", "pgd100", "targeted", "margin"))``
   (plus ``logsumexp`` for a DUCAT model), with ``early_stop=True`` (``ducat eval``'s default)
   against ``early_stop=False`` (``ducat eval --no-early-stop``). PGD-10, PGD-100 and the
   random-target PGD-10 run on every clean-correct example in both modes: their rows are standalone
   figures. The early stop applies to the attacks that come after them: PGD-100 margin with
   restarts, the targeted PGD-100 margin toward the top-9 classes, and, for DUCAT models, PGD-100
   with logsumexp-merged gradients. The figure compared is the per-example worst case.
   (``evaluate`` does not stop early across PGD and AutoAttack: AutoAttack runs on every
   clean-correct example, so its row stays a standalone figure comparable to the literature.)

Each comparison prints wall time, CPU time of this process, images/s (examples evaluated divided by
wall time), the all/early ratio, both robust accuracies and a per-example comparison of the
robustness masks.

Why the robust accuracies can differ at batch size > 1 (same seed): every attack here draws its
random start (and Square its random squares) for a whole batch at once. With early stopping an
example sits in a different batch, at a different position, than when every example is attacked,
so it gets a different random start. pyautoattack reseeds with ``seed`` at every batch of every
attack; ducat's PGD seeds its generator with ``seed * 1000 + offset + index of the batch's first
example``. The outcome of an attack on an example is otherwise independent of the other examples in
its batch (eval-mode BatchNorm, per-example losses and step sizes). At ``--batch-size 1`` every
example is its own batch in both modes, gets the same random draws, and the two masks must agree
example by example; ``--exact-check N`` runs both comparisons that way on the examples whose results
differed plus the first others up to N, and checks it.

Model: by default a small_cnn trained in this script with PGD-AT (PGD-10, eps 0.1, step eps/4,
10 epochs, about 10-20 s on one core) on scikit-learn's 8x8 digits, ducat's offline dataset; the
first ``--n-examples`` test images are attacked. ``--checkpoint`` evaluates a ducat run directory or
checkpoint on its own dataset instead (the deployed, projected classifier for a DUCAT model).

    python benchmarks/eval_throughput.py                       # ~3 min on 2 busy cores
    python benchmarks/eval_throughput.py --eps 0.2             # same model, larger eps: most examples break early
    python benchmarks/eval_throughput.py --eps 0.2 --exact-check 10   # + batch-size-1 equality check
    python benchmarks/eval_throughput.py --checkpoint runs/x   # a trained run

Square keeps the standard version's 5000 queries: ducat's evaluation path builds its own AutoAttack,
and a reduced query budget would make the comparison cheaper than the evaluation it measures.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import ducat
from ducat.attacks import PGD
from ducat.data import load_split
from ducat.dummy import DummyClassModel, deployed
from ducat.eval import EvalSettings, evaluate, load_target
from ducat.models import build_model

AA_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Timer:
    """Wall and process CPU time of a block."""

    def __enter__(self) -> "Timer":
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


class WorkCounter:
    """Images through the model's forward, split by whether autograd was on (those are followed by a
    backward pass). A measure of the work done that does not depend on the load on the machine."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.grad = self.nograd = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        n = int(inputs[0].shape[0])
        if torch.is_grad_enabled():
            self.grad += n
        else:
            self.nograd += n

    def close(self) -> None:
        self.handle.remove()


class AALog(logging.Handler):
    """Collects pyautoattack's per-attack summary lines (``robust accuracy after ...``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("robust accuracy after") or msg.startswith("robust accuracy by"):
            self.lines.append(msg)


def train_digits_model(epochs: int, eps: float, seed: int) -> torch.nn.Module:
    """small_cnn, PGD-AT (PGD-10, step eps/4) on the digits train split, SGD lr 0.05 -> 0.005 at 80%."""
    torch.manual_seed(seed)
    train = load_split("digits", None, train=True)
    x, y = train.images.float() / 255, train.labels
    model = build_model("small_cnn", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, int(epochs * 0.8))], 0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            model.eval()
            x_adv = PGD(model, eps, eps / 4, 10, generator=g)(x[b], y[b])
            model.train()
            loss = F.cross_entropy(model(x_adv), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def mask_line(early: np.ndarray, full: np.ndarray) -> str:
    both = int((early & full).sum())
    only_e, only_f = int((early & ~full).sum()), int((~early & full).sum())
    return (f"per-example: robust in both {both}, only with early stopping {only_e}, only in the all-attacks run "
            f"{only_f}, broken in both {int((~early & ~full).sum())}")


def aa_early(model, x, y, eps, seed, bs) -> tuple[np.ndarray, Timer, list[str]]:
    """ducat's path: ``evaluate`` with AutoAttack only (standard version, early stopping inside)."""
    log = AALog()
    logger = logging.getLogger("auto-attack")
    logger.addHandler(log)
    try:
        settings = EvalSettings(eps=eps, attacks=("autoattack",), protocols=("adaptive",), batch_size=bs, seed=seed)
        with Timer() as t:
            report = evaluate(model, x, y, settings, cache_dir=None, progress=False)
    finally:
        logger.removeHandler(log)
    return report.masks["adaptive-autoattack"].astype(bool), t, log.lines


def aa_all(model, x, y, eps, seed, bs) -> tuple[np.ndarray, Timer, list[str]]:
    """Every standard-version attack on every clean-correct example, separately; per-example AND."""
    from pyautoattack import AutoAttack

    view = deployed(model)
    view.eval()
    log = AALog()
    lines = []
    robust = np.ones(len(y), dtype=bool)
    with Timer() as t:
        aa = AutoAttack(view, eps=eps, norm="Linf", seed=seed, version="standard", device=x.device)
        aa.logger.addHandler(log)
        aa.logger.setLevel(logging.DEBUG)
        try:
            adv = aa.run_standard_evaluation_individual(x, y, batch_size=bs)
        finally:
            aa.logger.removeHandler(log)
        for name in AA_ATTACKS:
            x_adv = adv[name][0]
            if (x_adv - x).abs().max().item() > eps + 1e-6:
                raise RuntimeError(f"{name} left the eps-ball")
            with torch.no_grad():
                correct = torch.cat([view(x_adv[i:i + bs]).argmax(1) for i in range(0, len(x), bs)]) == y
            robust &= correct.cpu().numpy()
            lines.append(f"{name:8s} alone: {100 * correct.float().mean().item():6.2f}%")
    return robust, t, [*lines, *log.lines]


def pgd_sequence(model, x, y, eps, seed, bs, early_stop: bool) -> tuple[np.ndarray, Timer, list[str]]:
    settings = EvalSettings(eps=eps, attacks=("pgd10", "pgd100", "targeted", "margin", "logsumexp"),
                            protocols=("adaptive",), batch_size=bs, seed=seed, early_stop=early_stop)
    with Timer() as t:
        report = evaluate(model, x, y, settings, cache_dir=None, progress=False)
    rows = [f"{r['attack']}: {100 * r['robust_accuracy']:.2f}%" for r in report.results if r["protocol"] == "adaptive"]
    return report.masks["worst_case"].astype(bool), t, rows


def measure(model: torch.nn.Module, run) -> dict:
    """Run ``run()`` -> (mask, Timer, log lines) while counting the images through ``model``."""
    counter = WorkCounter(model)
    try:
        mask, t, log = run()
    finally:
        counter.close()
    return {"mask": mask, "wall": t.wall, "cpu": t.cpu, "grad": counter.grad, "nograd": counter.nograd, "log": log}


def compare(title: str, n: int, model: torch.nn.Module, early, full, rounds: int,
            names: tuple[str, str]) -> dict:
    """Time ``early()`` and ``full()`` ``rounds`` times, alternating which goes first; print the table."""
    print(f"\n## {title}")
    runs: dict[str, list[dict]] = {"early": [], "full": []}
    for r in range(rounds):
        order = (("early", early), ("full", full)) if r % 2 == 0 else (("full", full), ("early", early))
        for key, fn in order:
            runs[key].append(measure(model, fn))
        if rounds > 1:
            e, f = runs["early"][-1], runs["full"][-1]
            print(f"  round {r + 1}: early {e['wall']:6.1f} s, all {f['wall']:6.1f} s, "
                  f"ratio {f['wall'] / e['wall']:.2f}x")
    for key in runs:  # the attacks are seeded: every round must give the same per-example result
        if any((run["mask"] != runs[key][0]["mask"]).any() for run in runs[key]):
            raise RuntimeError(f"{key}: per-example results changed between rounds")
    med = lambda key, field: float(np.median([run[field] for run in runs[key]]))  # noqa: E731
    for key, name in zip(("early", "full"), names):
        first = runs[key][0]
        print(f"  {name:30s} wall {med(key, 'wall'):7.1f} s  cpu {med(key, 'cpu'):7.1f} s  "
              f"{n / med(key, 'wall'):6.2f} images/s  robust accuracy {100 * first['mask'].mean():6.2f}%")
        print(f"      model forward passes (images): {first['grad']:,} with autograd (each followed by a backward), "
              f"{first['nograd']:,} without")
        if len(first["log"]) <= 8:
            for line in first["log"]:
                print(f"      {line}")
        else:
            print(f"      ({len(first['log'])} per-batch lines from pyautoattack not shown)")
    e, f = runs["early"][0], runs["full"][0]
    ratios = [b["wall"] / a["wall"] for a, b in zip(runs["early"], runs["full"])]
    cpu_ratios = [b["cpu"] / a["cpu"] for a, b in zip(runs["early"], runs["full"])]
    work = (f["grad"] + f["nograd"]) / max(1, e["grad"] + e["nograd"])
    grad_work = f["grad"] / max(1, e["grad"])
    spread = f" (rounds: {min(ratios):.2f}-{max(ratios):.2f})" if rounds > 1 else ""
    print(f"  ratio all / early: wall {np.median(ratios):.2f}x{spread}, cpu {np.median(cpu_ratios):.2f}x; "
          f"forward passes {work:.2f}x (with autograd {grad_work:.2f}x)")
    print(f"  {mask_line(e['mask'], f['mask'])}")
    equal = bool((e["mask"] == f["mask"]).all())
    print("  robust accuracies: " + ("EQUAL, and the masks agree on every example" if equal else
          f"DIFFER by {100 * abs(e['mask'].mean() - f['mask'].mean()):.2f} points (see 'why they can differ' below)"))
    return {"equal": equal, "ratio_wall": float(np.median(ratios)), "ratio_cpu": float(np.median(cpu_ratios)),
            "ratio_work": work, "early": e, "full": f,
            "images_s": (n / med("early", "wall"), n / med("full", "wall"))}


def warm_up(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Untimed: import pyautoattack (about 2 s, else charged to whichever run comes first) and run
    the model forward and backward once at the batch shapes used."""
    import pyautoattack  # noqa: F401

    view = deployed(model)
    for batch in (x, x[:1]):
        xb = batch.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(view(xb), y[:len(xb)]), xb)
        with torch.no_grad():
            view(batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="ducat run directory or checkpoint (default: train a digits small_cnn here)")
    p.add_argument("--data-root", help="dataset root for --checkpoint")
    p.add_argument("--n-examples", type=int, default=200, help="first N test examples (default 200)")
    p.add_argument("--batch-size", type=int, default=256, help="attack batch size, both runs (default 256)")
    p.add_argument("--eps", type=float, help="L-inf eps (default: the training eps, 0.1 for the built-in model)")
    p.add_argument("--train-eps", type=float, default=0.1, help="PGD-AT eps of the built-in model (default 0.1)")
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: shared machine)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time each run this many times, alternating the order; medians reported (default 1)")
    p.add_argument("--only", choices=("autoattack", "pgd"), help="run one comparison only")
    p.add_argument("--exact-check", type=int, default=0, metavar="N",
                   help="also run both comparisons at batch size 1 on the examples whose results differed plus the "
                        "first others up to N, and check that the per-example results agree (slow: Square alone is "
                        "5000 single-image forwards per robust example)")
    args = p.parse_args()
    if args.rounds < 1 or args.n_examples < 1 or args.batch_size < 1:
        p.error("--rounds, --n-examples and --batch-size must be >= 1")
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)

    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
          f"ducat {ducat.__version__}, "
          f"pyautoattack {__import__('pyautoattack').__version__}, python {platform.python_version()}")
    print(f"torch threads: {torch.get_num_threads()}; load average at start (1/5/15 min): {loadavg()}")

    with Timer() as t_train:
        if args.checkpoint:
            model, dataset, train_eps, _ = load_target(Path(args.checkpoint))
            source = f"{args.checkpoint} ({dataset})"
        else:
            dataset, train_eps = "digits", args.train_eps
            model = train_digits_model(args.train_epochs, train_eps, args.seed)
            source = f"small_cnn, PGD-AT eps {train_eps:g}, {args.train_epochs} epochs on digits (trained here)"
    model.eval()
    eps = args.eps if args.eps is not None else train_eps
    if eps is None:
        p.error("--eps is needed for a checkpoint without a ducat config")
    test = load_split(dataset, args.data_root, train=False)
    n = min(args.n_examples, len(test))
    x, y = test.images[:n].float() / 255, test.labels[:n]
    with torch.no_grad():
        clean = (deployed(model)(x).argmax(1) == y).float().mean().item()
    kind = "; DUCAT (2C) model, deployed projected classifier attacked" if isinstance(model, DummyClassModel) else ""
    print(f"model: {source}{kind}"
          f"{'' if args.checkpoint else f'; trained in {t_train.wall:.1f} s'}")
    print(f"examples: first {n} test images of {dataset}; clean accuracy {100 * clean:.2f}%; L-inf eps {eps:g}; "
          f"seed {args.seed}; batch size {args.batch_size}")

    warm_up(model, x, y)
    summary = {}
    m = model  # every view (projected, logsumexp-merged) calls the model itself: count there
    if args.only in (None, "autoattack"):
        summary["AutoAttack"] = compare(
            "1. AutoAttack (standard: apgd-ce, apgd-t, fab-t, square with 5000 queries)", n, m,
            lambda: aa_early(model, x, y, eps, args.seed, args.batch_size),
            lambda: aa_all(model, x, y, eps, args.seed, args.batch_size), args.rounds,
            ("ducat eval (early stopping)", "each attack on all, AND"))
        print("      (pyautoattack's 'robust accuracy after' lines in the ducat run are fractions of the clean-correct "
              "examples, which is all ducat passes in)")
    if args.only in (None, "pgd"):
        summary["PGD sequence"] = compare(
            "2. ducat's PGD sequence: worst case over pgd10, pgd100, targeted, margin (+ logsumexp for DUCAT)", n, m,
            lambda: pgd_sequence(model, x, y, eps, args.seed, args.batch_size, True),
            lambda: pgd_sequence(model, x, y, eps, args.seed, args.batch_size, False), args.rounds,
            ("early_stop=True (default)", "early_stop=False"))

    print(f"\nload average at end (1/5/15 min): {loadavg()}; total {time.perf_counter() - t_start:.0f} s")
    print(f"\n## summary: {n} examples, eps {eps:g}; images/s = examples / wall time; ratio = all-attacks run / "
          "early stopping")
    for name, s in summary.items():
        print(f"  {name:13s} {s['images_s'][0]:6.2f} vs {s['images_s'][1]:6.2f} images/s; wall ratio "
              f"{s['ratio_wall']:.2f}x, cpu ratio {s['ratio_cpu']:.2f}x, forward-pass ratio {s['ratio_work']:.2f}x; "
              f"robust accuracy {100 * s['early']['mask'].mean():.2f}% vs {100 * s['full']['mask'].mean():.2f}% "
              f"({'equal' if s['equal'] else 'DIFFERENT'})")
    if not all(s["equal"] for s in summary.values()):
        print("  why they can differ: each attack draws its random start (Square: its random squares) per batch; "
              "early stopping puts an example in a different batch at a different position, so it gets different "
              "random draws. Rerun with --exact-check N: at batch size 1 the draws are the same and the masks "
              "must agree.")

    if args.exact_check:
        differing = sorted({int(i) for r in summary.values()
                            for i in np.flatnonzero(r["early"]["mask"] != r["full"]["mask"])})
        rest = [i for i in range(n) if i not in differing][:max(0, args.exact_check - len(differing))]
        idx = torch.tensor(sorted(differing + rest), dtype=torch.long)
        xk, yk, k = x[idx], y[idx], len(idx)
        print(f"\n## exact check: batch size 1 on {k} examples: the {len(differing)} whose result differed above "
              f"{differing} and the first {len(rest)} others (timings here are not the benchmark)")
        checks = {}
        if args.only in (None, "autoattack"):
            checks["AutoAttack"] = compare("AutoAttack at batch size 1", k, m,
                                           lambda: aa_early(model, xk, yk, eps, args.seed, 1),
                                           lambda: aa_all(model, xk, yk, eps, args.seed, 1), 1,
                                           ("ducat eval (early stopping)", "each attack on all, AND"))
        if args.only in (None, "pgd"):
            checks["PGD sequence"] = compare("PGD sequence at batch size 1", k, m,
                                             lambda: pgd_sequence(model, xk, yk, eps, args.seed, 1, True),
                                             lambda: pgd_sequence(model, xk, yk, eps, args.seed, 1, False), 1,
                                             ("early_stop=True (default)", "early_stop=False"))
        word = lambda robust: "robust" if robust else "broken"  # noqa: E731
        for i in differing:
            j = int((idx == i).nonzero())
            for name, r in summary.items():
                print(f"  example {i}, {name}: batch {args.batch_size}: early {word(r['early']['mask'][i])}, "
                      f"all {word(r['full']['mask'][i])}; batch 1: early {word(checks[name]['early']['mask'][j])}, "
                      f"all {word(checks[name]['full']['mask'][j])}")
        ok = all(c["equal"] for c in checks.values())
        print(f"\nexact check: {'PASS, per-example results identical at batch size 1' if ok else 'FAIL'}")
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
