"""``ducat quickstart``: PGD-AT and PGD-AT+DUCAT on scikit-learn's digits, offline, on the CPU.

Trains the two ``cpu-digits`` presets and prints, on the digits test split, the clean accuracy and
PGD-10 accuracy of the deployed (projected) classifier under two attacks: the paper's protocol
(CE on the raw 2C logits) and the attack on the projected classifier (CE on max-merged logits).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ducat.attacks import PGD, correct_under_attack, eval_mode
from ducat.config import load_config
from ducat.data import load_split
from ducat.dummy import deployed
from ducat.runs import model_from_checkpoint
from ducat.train import train


def pgd_accuracies(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
                   seed: int = 0) -> dict[str, float]:
    """Clean, paper-protocol PGD and projected-classifier PGD accuracy (fractions) on ``(x, y)``."""
    out = {}
    with eval_mode(model):
        out["clean"] = correct_under_attack(model, x, y).float().mean().item()
        for name, target in (("pgd_paper", model), ("pgd_projected", deployed(model))):
            attack = PGD(target, eps, eps / 4, steps, generator=torch.Generator().manual_seed(seed))
            out[name] = correct_under_attack(model, x, y, attack, batch_size=len(y)).float().mean().item()
    return out


def quickstart(out: Path, epochs: int = 30, progress: bool = True) -> dict[str, dict[str, float]]:
    """Train both runs into ``out/pgd_at`` and ``out/pgd_at-ducat``; print and return the table."""
    start = time.perf_counter()
    test = load_split("digits", None, train=False)
    x, y = test.images.float() / 255, test.labels
    rows = {}
    for name in ("pgd_at", "pgd_at-ducat"):
        run_dir = out / name
        overrides = [f"run.out={run_dir}", f"run.progress={str(progress).lower()}", "run.tensorboard=false"]
        # --epochs scales the preset's schedule (milestones, DUCAT start) with the run, as `ducat train --epochs`
        config = load_config(f"cpu-digits-small_cnn-{name}", overrides, epochs=epochs)
        if (run_dir / "summary.json").exists():
            print(f"{run_dir} already finished; evaluating it")
        else:
            resume = (run_dir / "last.pt").exists()  # an interrupted quickstart continues where it stopped
            print(f"{'resuming' if resume else 'training'} {name} ({config.optim.epochs} epochs) into {run_dir}",
                  flush=True)
            train(config, resume=resume, log=print if progress else lambda s: None)
        model, config, _ = model_from_checkpoint(run_dir)
        rows[name] = pgd_accuracies(model, x, y, config.attack.eps)
    wall = time.perf_counter() - start
    print(format_table(rows, len(y), config.attack.eps))
    print(f"\nruns written to {out} ({wall:.0f} s). The paper-protocol column attacks the raw 2C logits and "
          "scores after the projection, as the paper did; the projected column attacks the deployed classifier. "
          "For AutoAttack and the adaptive worst case run: ducat eval " + str(out / "pgd_at-ducat"))
    return rows


def format_table(rows: dict[str, dict[str, float]], n: int, eps: float) -> str:
    lines = [f"digits test split, {n} images, L-inf eps {eps:g}, PGD-10 (step eps/4), accuracy of the deployed "
             "classifier (%)", "",
             "| run | clean | PGD-10 paper protocol | PGD-10 on projected classifier |", "|---|---|---|---|"]
    for name, r in rows.items():
        cells = (100 * r[k] for k in ("clean", "pgd_paper", "pgd_projected"))
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
    return "\n".join(lines)
