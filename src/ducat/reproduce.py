"""``ducat reproduce``: the paper's grid, evaluated under both protocols, with tables and figures.

The grid: PGD-AT, TRADES, MART and Consistency-AT, each without and with DUCAT, over seeds; the
hard-label toy case; ablations of PGD-AT+DUCAT over the start epoch, beta1, beta2 and alpha.
DUCAT runs fork from their base run's checkpoint at the epoch before the DUCAT start epoch
(fine-tuning with the base model's C-output head widened to 2C, dummy rows copied from the original
rows) instead of carrying a 2C head with hard labels from epoch 1 as the paper does; the pre-DUCAT
epochs are then shared, which halves the cost. Every run is evaluated under the paper's protocol
and adaptively (``ducat.evaluate``); a rerun skips finished runs and cached evaluations.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ducat import analysis
from ducat.config import ConfigError, TrainConfig, load_config
from ducat.data import load_split
from ducat.dummy import DummyClassModel
from ducat.runs import model_from_checkpoint
from ducat.train import train

METHODS = ("pgd_at", "trades", "mart", "consistency")
METHOD_LABELS = {"pgd_at": "PGD-AT", "trades": "TRADES", "mart": "MART", "consistency": "Consistency-AT"}


@dataclass(frozen=True)
class Scale:
    """One reproduction scale: which presets, how much data, how many epochs, how hard to attack."""

    name: str
    family: str  # preset prefix, e.g. "cpu-fmnist-small_cnn"
    overrides: tuple[str, ...]
    epochs: int
    milestones: tuple[int, ...]
    start_epoch: int
    seeds: int
    eval_examples: int
    eval_attacks: tuple[str, ...]
    ablations: dict[str, tuple[float, ...]] = field(default_factory=dict)
    ablation_attacks: tuple[str, ...] = ("pgd10", "margin")
    n_targets: int = 9
    margin_restarts: int = 2
    tsne_examples: int = 300
    transfer_examples: int = 500


SCALES = {
    "smoke": Scale(
        "smoke", "cpu-digits-small_cnn",
        ("data.n_train=200", "data.batch_size=50", "attack.steps=2", "validation.pgd_steps=2",
         "validation.n_examples=40", "optim.lr=0.05"),
        epochs=3, milestones=(2,), start_epoch=3, seeds=1, eval_examples=24,
        # every figure and table in CI time (one value per ablation, few examples): numbers are noise.
        # AutoAttack is exercised by the evaluation tests instead.
        eval_attacks=("pgd10", "pgd100", "logsumexp", "margin", "targeted"),
        ablations={"start_epoch": (2,), "beta1": (1.0,), "beta2": (0.5,), "alpha": (0.3,)},
        ablation_attacks=("pgd10",), n_targets=2, margin_restarts=1, tsne_examples=40, transfer_examples=40),
    "mini": Scale(
        "mini", "cpu-fmnist-small_cnn",
        ("data.n_train=8000", "validation.n_examples=1000"),
        epochs=10, milestones=(7, 9), start_epoch=8, seeds=1, eval_examples=500,
        # AutoAttack (APGD-T, FAB-T and Square with 5000 queries) costs ~20 CPU-minutes per run here:
        # the mini scale leaves it out and says so in its report; the paper scale runs it.
        eval_attacks=("pgd10", "pgd100", "logsumexp", "margin", "targeted", "eps-sweep"),
        ablations={"start_epoch": (6, 9), "beta1": (0.5, 1.0), "beta2": (0.5, 0.75), "alpha": (0.3, 0.7)},
        n_targets=3, margin_restarts=1, tsne_examples=400, transfer_examples=500),
    "paper": Scale(
        "paper", "paper-cifar10-resnet18", (),
        epochs=130, milestones=(100, 105), start_epoch=105, seeds=3, eval_examples=10000,
        eval_attacks=("pgd10", "pgd100", "autoattack", "logsumexp", "margin", "targeted", "eps-sweep"),
        ablation_attacks=("pgd10", "autoattack", "margin"),
        ablations={"start_epoch": (95, 100, 110, 115), "beta1": (0.5, 0.6, 0.9, 1.0),
                   "beta2": (0.5, 0.75, 0.9), "alpha": (0.3, 0.4, 0.6, 0.7)},
        tsne_examples=1000, transfer_examples=10000),
}


@dataclass
class GridRun:
    """One training run of the grid. ``fork_from``: (base run name, epoch) to fine-tune from."""

    name: str
    preset: str
    overrides: list[str]
    method: str
    ducat: bool
    seed: int
    fork_from: tuple[str, int] | None = None
    group: str = "main"  # main | toy | ablation
    ablation: tuple[str, float] | None = None


def plan(scale: Scale, methods: tuple[str, ...] = METHODS) -> list[GridRun]:
    """Every run of the grid, base runs before the DUCAT runs that fork from them."""
    schedule = [f"optim.epochs={scale.epochs}", f"optim.milestones=[{', '.join(map(str, scale.milestones))}]",
                f"ducat.start_epoch={scale.start_epoch}", *scale.overrides]
    fork_epochs = sorted({scale.start_epoch - 1, *(int(t) - 1 for t in scale.ablations.get("start_epoch", ()))}
                         - {0})
    runs: list[GridRun] = []
    for seed in range(scale.seeds):
        seeded = [*schedule, f"run.seed={seed}"]
        for method in methods:
            base = f"{method}-s{seed}"
            runs.append(GridRun(base, f"{scale.family}-{method}", [*seeded, f"run.save_epochs={fork_epochs}"],
                                method, False, seed))
            runs.append(GridRun(f"{method}-ducat-s{seed}", f"{scale.family}-{method}-ducat", seeded, method, True,
                                seed, (base, scale.start_epoch - 1)))
    if "pgd_at" in methods:
        runs.append(GridRun("pgd_at-toy-s0", f"{scale.family}-pgd_at-toy", [*schedule, "run.seed=0"], "pgd_at",
                            True, 0, ("pgd_at-s0", scale.start_epoch - 1), group="toy"))
        for param, values in scale.ablations.items():
            for value in values:
                extra = [f"ducat.{param}={value}"]
                fork = ("pgd_at-s0", scale.start_epoch - 1)
                if param == "start_epoch":
                    fork = ("pgd_at-s0", int(value) - 1)
                runs.append(GridRun(f"ablation-{param}-{value:g}", f"{scale.family}-pgd_at-ducat",
                                    [*schedule, "run.seed=0", *extra], "pgd_at", True, 0, fork, group="ablation",
                                    ablation=(param, value)))
    return runs


def run_config(run: GridRun, out: Path, data_root: str | None) -> TrainConfig:
    overrides = [*run.overrides, f"run.out={out / 'runs' / run.name}", "run.progress=false"]
    if data_root:
        overrides.append(f"data.root={data_root}")
    if run.fork_from is not None:
        base, epoch = run.fork_from
        checkpoint = out / "runs" / base / f"epoch_{epoch}.pt"
        overrides += [f"finetune.checkpoint={checkpoint}", f"finetune.start_epoch={epoch + 1}"]
        if not checkpoint.is_file():  # validated once the base run exists; keep the error readable
            return _config_without_checkpoint(run, overrides)
    return load_config(run.preset, overrides)


def _config_without_checkpoint(run: GridRun, overrides: list[str]) -> TrainConfig:
    config = load_config(run.preset, [o for o in overrides if not o.startswith("finetune.checkpoint=")])
    config.finetune.checkpoint = next(o.split("=", 1)[1] for o in overrides if o.startswith("finetune.checkpoint="))
    return config


def train_run(run: GridRun, config: TrainConfig, nproc: int, log) -> None:
    """Train (or resume, or skip) one run."""
    run_dir = Path(config.run.out)
    if (run_dir / "summary.json").is_file():
        log(f"  {run.name}: finished, skipped")
        return
    resume = (run_dir / "last.pt").is_file()
    log(f"  {run.name}: {'resuming' if resume else 'training'}")
    if nproc > 1:
        args = ["--resume", str(run_dir)] if resume else [run.preset, *_config_overrides(config)]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "ducat", "train", *args]
        subprocess.run(command, check=True)
        return
    train(config, resume=resume, log=lambda s: None)


def _config_overrides(config: TrainConfig) -> list[str]:
    flat = []
    for section, values in config.to_dict().items():
        for key, value in values.items():
            flat.append(f"{section}.{key}={json.dumps(value)}")
    return flat


# ---- evaluation ---------------------------------------------------------------------------------
def evaluate_run(run: GridRun, run_dir: Path, scale: Scale, data_root: str | None, log) -> None:
    """Paper-protocol and adaptive evaluation of a finished run (cached in ``run_dir/eval``)."""
    from ducat.eval import evaluate_checkpoint

    cached = (run_dir / "eval" / "report.json").is_file()
    log(f"  {run.name}: evaluating" + (" (finished attacks are reused from eval/eval_cache)" if cached else ""))
    attacks = scale.ablation_attacks if run.group == "ablation" else scale.eval_attacks
    evaluate_checkpoint(run_dir, out=run_dir / "eval", data_root=data_root, progress=False,
                        settings={"n_examples": scale.eval_examples, "attacks": attacks,
                                  "n_targets": scale.n_targets, "margin_restarts": scale.margin_restarts})


def _report_json(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "eval" / "report.json").read_text())


def _accuracy(report: dict[str, Any], key: str) -> float:
    return next((row["robust_accuracy"] for row in report["results"] if row["id"] == key), math.nan)


def _masks(run_dir: Path) -> dict[str, np.ndarray]:
    return dict(np.load(run_dir / "eval" / "masks.npz"))


# ---- the whole reproduction --------------------------------------------------------------------
def reproduce(scale_name: str, out: Path, data_root: str | None = None, seeds: int | None = None,
              nproc: int = 1, log=print) -> Path:
    """Run (or continue) the grid at ``scale_name`` and write ``out/report.md`` with figures."""
    if scale_name not in SCALES:
        raise ConfigError(f"unknown scale '{scale_name}'; choose one of: {', '.join(SCALES)}")
    scale = SCALES[scale_name]
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds}")
        scale = Scale(**{**scale.__dict__, "seeds": seeds})
    runs = plan(scale)
    for run in runs:  # every config validated before any compute
        run_config(run, out, data_root)
    load_split(load_config(runs[0].preset, list(runs[0].overrides)).data.dataset, data_root, train=False)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"reproduce --scale {scale.name}: {len(runs)} runs into {out / 'runs'}")
    for run in runs:
        train_run(run, run_config(run, out, data_root), nproc, log)
    train_time = time.perf_counter() - started
    log("evaluating")
    for run in runs:
        evaluate_run(run, out / "runs" / run.name, scale, data_root, log)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    report = build_report(scale, runs, out, data_root, figures)
    wall = time.perf_counter() - started
    report += (f"\n\n---\nWall time: {wall / 60:.1f} min ({train_time / 60:.1f} min of it training, this invocation; "
               f"finished runs are skipped on a rerun). Machine: {_machine()}.\n")
    (out / "report.md").write_text(report)
    log(f"report written to {out / 'report.md'} ({wall / 60:.1f} min)")
    return out / "report.md"


def _machine() -> str:
    import os
    import platform

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {device}, torch {torch.__version__}"


def build_report(scale: Scale, runs: list[GridRun], out: Path, data_root: str | None, figures: Path) -> str:
    """Tables and figures from finished, evaluated runs."""
    rdir = lambda name: out / "runs" / name  # noqa: E731
    sections = [f"# DUCAT reproduction, scale `{scale.name}`", "",
                f"Preset family `{scale.family}`; {scale.epochs} epochs, lr decays after epochs "
                f"{list(scale.milestones)}, DUCAT from epoch {scale.start_epoch}; {scale.seeds} seed(s); evaluation "
                f"on the first {scale.eval_examples} test examples. DUCAT runs fork from their base run's checkpoint "
                f"at epoch {scale.start_epoch - 1} (C-output head widened to 2C, dummy rows copied), so the "
                "pre-DUCAT epochs are shared with the base run; the paper instead carries a 2C head with hard labels "
                "from epoch 1.", "",
                "Protocols: **paper** attacks cross-entropy on the raw 2C logits and scores after the projection "
                "(the paper's evaluation); **adaptive worst** is the per-example worst case over attacks on the "
                "projected classifier (max- and logsumexp-merged logits, margin loss, targeted runs).", ""]

    # Table 1 layout
    rows = []
    for run in runs:
        if run.group != "main":
            continue
        report = _report_json(rdir(run.name))
        rows.append({"method": METHOD_LABELS[run.method], "ducat": run.ducat, "seed": run.seed,
                     "clean": report["clean_accuracy"],
                     "paper": {a: _accuracy(report, key) for a, key in (("PGD-10", "paper-pgd10"), ("PGD-100", "paper-pgd100"),
                                                                     ("AutoAttack", "paper-autoattack"))},
                     "adaptive_worst": report["worst_case"]["robust_accuracy"]})
    sections += ["## Main results (layout of the paper's table 1; accuracy %, mean ± std over seeds)", "",
                 analysis.main_table(rows), "",
                 "A '-' means the attack was not run at this scale"
                 + (" (AutoAttack is left out of the CPU scales for time; `ducat eval RUN` runs it on any run, and "
                    "the evaluation tests check ducat's AutoAttack call against pyautoattack's own)."
                    if "autoattack" not in scale.eval_attacks else "."), ""]
    strongest = "AutoAttack" if "autoattack" in scale.eval_attacks else "PGD-100"
    strongest_key = "paper-autoattack" if "autoattack" in scale.eval_attacks else "paper-pgd100"

    # Fig. 2: always-failed overlap among the four base defenses (PGD-10)
    base_runs = [r for r in runs if r.group == "main" and not r.ducat and r.seed == 0]
    labels = _masks(rdir(base_runs[0].name))["labels"]
    robust = {METHOD_LABELS[r.method]: _masks(rdir(r.name))["adaptive-pgd10"] for r in base_runs}
    overlap = analysis.always_failed_overlap(robust, labels, int(labels.max()) + 1)
    analysis.plot_always_failed_overlap(overlap, figures / "fig2_always_failed.png")
    sections += ["## Always-failed examples across the four base defenses (paper fig. 2)", "",
                 f"Share of test examples uniformly defended by all four: {100 * overlap['uniform_defended']:.1f}%; "
                 f"uniformly failed by all four: {100 * overlap['uniform_failed']:.1f}% "
                 f"(together {100 * (overlap['uniform_defended'] + overlap['uniform_failed']):.1f}%; the paper "
                 "reports > 80% on CIFAR-10).", "", "![](figures/fig2_always_failed.png)", ""]

    # Fig. 3: transfer between robust models
    transfer = transfer_between(base_runs, out, scale, data_root)
    analysis.plot_transfer_matrix(transfer, figures / "fig3_transfer.png")
    sections += ["## Transfer between robust models (paper fig. 3)", "",
                 "PGD-10 examples crafted on each base model (surrogate) and replayed on the others, split by whether "
                 "they fooled the surrogate.", "", "![](figures/fig3_transfer.png)", ""]

    # Fig. 4: toy case vs DUCAT
    toy_names = {"toy (hard labels)": "pgd_at-toy-s0", "DUCAT (soft labels)": "pgd_at-ducat-s0", "PGD-AT": "pgd_at-s0"}
    curves = {}
    for label, name in toy_names.items():
        report = _report_json(rdir(name))
        curves[label] = {"clean": report["clean_accuracy"], "PGD-10 (paper)": _accuracy(report, "paper-pgd10"),
                         f"{strongest} (paper)": _accuracy(report, strongest_key),
                         "adaptive worst": report["worst_case"]["robust_accuracy"]}
    analysis.toy_case_plot(curves, figures / "fig4_toy_case.png")
    sections += ["## The hard-label toy case (paper fig. 4)", "", "![](figures/fig4_toy_case.png)", ""]

    # Fig. 5: trade-off scatter with the SOTA points of table 2
    points = []
    for row in rows:
        name = row["method"] + (" + DUCAT" if row["ducat"] else "")
        points.append({"name": name, "clean": row["clean"], "robust": row["paper"][strongest],
                       "group": f"paper protocol, {strongest}"})
        points.append({"name": name, "clean": row["clean"], "robust": row["adaptive_worst"], "group": "adaptive worst case"})
    analysis.tradeoff_scatter(points, figures / "fig5_tradeoff.png")
    sections += ["## Accuracy-robustness trade-off (paper fig. 5 / table 2)", "",
                 "SOTA points are the paper's table 2 (CIFAR-10, ResNet-18, AutoAttack); this grid's points are at "
                 f"scale `{scale.name}` ({strongest} under the paper's protocol, arrows to the adaptive worst case) "
                 "and only comparable among themselves.", "", "![](figures/fig5_tradeoff.png)", ""]

    # Fig. 6: measured training time per epoch
    times = {}
    for method in METHODS:
        base_rows = _steady(_metrics(rdir(f"{method}-s0")))
        ducat_rows = _steady([r for r in _metrics(rdir(f"{method}-ducat-s0")) if r["ducat_active"]])
        times[METHOD_LABELS[method]] = {"base": float(np.median([r["epoch_time_s"] for r in base_rows])),
                                        "ducat": float(np.median([r["epoch_time_s"] for r in ducat_rows]))}
    analysis.training_time_bars(times, figures / "fig6_training_time.png")
    sections += ["## Training time per epoch, measured (paper fig. 6)", "",
                 "Median wall time of an epoch (training only, validation excluded), each run's first epoch left out "
                 "as warm-up. The DUCAT column covers only the epochs with DUCAT active. Times are as measured on "
                 "this machine; other jobs running beside it make them noisy at small scales.", "",
                 "| method | base s/epoch | DUCAT s/epoch | overhead |", "|---|---|---|---|"]
    for method, t in times.items():
        sections.append(f"| {method} | {t['base']:.1f} | {t['ducat']:.1f} | {100 * (t['ducat'] / t['base'] - 1):+.0f}% |")
    sections += ["", "![](figures/fig6_training_time.png)", ""]

    # Figs. 7 and 9: ablations
    sections += ["## Ablations of PGD-AT + DUCAT (paper figs. 7 and 9)", ""]
    defaults = {"start_epoch": scale.start_epoch, "beta1": 0.75, "beta2": 1.0, "alpha": 0.5}
    for param in scale.ablations:
        entries = [(defaults[param], "pgd_at-ducat-s0")] + [
            (r.ablation[1], r.name) for r in runs if r.group == "ablation" and r.ablation[0] == param]
        entries.sort()
        values, clean, paper, adaptive = [], [], [], []
        for value, name in entries:
            report = _report_json(rdir(name))
            values.append(value)
            clean.append(report["clean_accuracy"])
            paper.append(_accuracy(report, "paper-pgd10"))
            adaptive.append(report["worst_case"]["robust_accuracy"])
        analysis.ablation_plot(param, values, clean, paper, adaptive, figures / f"fig7_ablation_{param}.png")
        sections += [f"![](figures/fig7_ablation_{param}.png)", ""]

    # Fig. 8: confusion under the paper-protocol attack, raw 2C predictions
    ducat_dir = rdir("pgd_at-ducat-s0")
    masks = _masks(ducat_dir)
    model, _, _ = model_from_checkpoint(ducat_dir)
    confusion = analysis.confusion_under_attack(masks["labels"], masks["paper-pgd10/raw_predictions"],
                                                model.num_classes, model.dummy_index.numpy())
    analysis.plot_confusion(confusion, figures / "fig8_confusion.png")
    sink = _report_json(ducat_dir).get("sink_rate")
    sections += ["## Where the paper's attack sends inputs (paper fig. 8)", "",
                 f"Raw 2C predictions of PGD-AT + DUCAT under the paper-protocol PGD-10. Sink rate (adversarial "
                 f"examples predicted as the dummy of their own class): {_pct(sink)}. These count as robust under "
                 "the paper's protocol; an attack on the projected classifier is not fooled into them.", "",
                 "![](figures/fig8_confusion.png)", ""]

    # Fig. 10: t-SNE of penultimate features
    tsne_figure(out, scale, data_root, figures / "fig10_tsne.png")
    sections += ["## Penultimate features, t-SNE (paper fig. 10)", "", "![](figures/fig10_tsne.png)", ""]

    # Table 4: targeted attacks
    columns = (("paper-targeted-original", "random other class, paper protocol"),
               ("adaptive-targeted-original", "random other class, projected"),
               ("paper-targeted-dummy", "dummy of a random other class, paper protocol"),
               ("adaptive-targeted-top", f"PGD-100 margin to the top-{scale.n_targets} classes, projected"))
    targeted = {}
    for label, row_name in (("PGD-AT", "pgd_at-s0"), ("PGD-AT + DUCAT", "pgd_at-ducat-s0")):
        report = _report_json(rdir(row_name))
        targeted[label] = {title: None if math.isnan(_accuracy(report, key)) else _accuracy(report, key)
                           for key, title in columns}
    sections += ["## Targeted attacks (paper table 4)", "",
                 "Accuracy (%) under targeted attacks; '-' where the attack does not apply (a C-output model has "
                 "no dummy classes). The top-k margin attack runs on the survivors of the untargeted attacks.", "",
                 analysis.targeted_table(targeted), ""]
    return "\n".join(sections)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _steady(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Epoch rows without a run's first epoch (warm-up: allocator, oneDNN kernel selection), if others exist."""
    return rows[1:] or rows


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _test_tensors(config: TrainConfig, data_root: str | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_split(config.data.dataset, data_root, train=False)
    return test.images[:n].float() / 255, test.labels[:n]


def transfer_between(base_runs: list[GridRun], out: Path, scale: Scale, data_root: str | None) -> dict[str, Any]:
    """PGD-10 examples crafted on each base model, success measured on every other base model."""
    from ducat.attacks import PGD

    models = {}
    for run in base_runs:
        model, config, _ = model_from_checkpoint(out / "runs" / run.name)
        models[METHOD_LABELS[run.method]] = model.eval()
    x, y = _test_tensors(config, data_root, scale.transfer_examples)
    on_surrogate, on_target = {}, {}
    for surrogate, model in models.items():
        attack = PGD(model, config.attack.eps, config.attack.eps / 4, 10, generator=torch.Generator().manual_seed(0))
        x_adv = torch.cat([attack(x[i:i + 256], y[i:i + 256]) for i in range(0, len(y), 256)])
        with torch.no_grad():
            on_surrogate[surrogate] = (model(x_adv).argmax(1) != y).numpy()
            for target, other in models.items():
                if target != surrogate:
                    on_target[(surrogate, target)] = (other(x_adv).argmax(1) != y).numpy()
    return analysis.transfer_matrix(on_surrogate, on_target)


def tsne_figure(out: Path, scale: Scale, data_root: str | None, path: Path) -> Path:
    """Penultimate features of clean and paper-protocol PGD-10 inputs, PGD-AT vs PGD-AT + DUCAT."""
    from ducat.attacks import PGD

    panels = {}
    for label, name in (("PGD-AT", "pgd_at-s0"), ("PGD-AT + DUCAT", "pgd_at-ducat-s0")):
        model, config, _ = model_from_checkpoint(out / "runs" / name)
        model.eval()
        x, y = _test_tensors(config, data_root, scale.tsne_examples)
        x_adv = PGD(model, config.attack.eps, config.attack.eps / 4, 10, generator=torch.Generator().manual_seed(0))(x, y)
        features = np.concatenate([analysis.penultimate_features(model, x), analysis.penultimate_features(model, x_adv)])
        is_adv = np.r_[np.zeros(len(y), bool), np.ones(len(y), bool)]
        labels = np.r_[y.numpy(), y.numpy()]
        panels[label] = (features, labels, is_adv, isinstance(model, DummyClassModel))
    return analysis.tsne_panels(panels, path)
