"""``ducat eval``: robust accuracy under the paper's protocol and under adaptive attacks, side by side.

Protocols (``docs/method.md``, "Evaluation protocols"):

- ``paper``: the released code's evaluation. Attacks maximise CE on the raw 2C logits; predictions
  are scored after the projection, so an input pushed into the dummy class of its own label counts
  as defended.
- ``raw-autoattack``: the released code's AutoAttack call: AutoAttack on the raw 2C logits and no
  projection anywhere (a dummy prediction counts as an error). Kept only to reproduce that path.
- ``adaptive``: attacks on the projected classifier itself: PGD and AutoAttack (Croce & Hein, ICML
  2020) on max-merged logits, PGD and AutoAttack with logsumexp-merged gradients, a CW margin loss
  with restarts, and targeted margin attacks toward the top-9 merged classes. The **worst case**
  counts an example as robust only if it survived every attack run, of either protocol, scored on
  the deployed (projected) classifier.

PGD-10, PGD-100 and AutoAttack run on every clean-correct example (standalone figures, comparable to
the literature). The further adaptive attacks run only on the examples still robust after
everything before them (per-example early stopping): their rows are cumulative ("worst so far").
AutoAttack is the official code as repackaged by ``pyautoattack``; torchattacks' port is weaker
(10 iterations instead of 100) and is never used here. For a model without dummy classes the
protocols coincide and run once. Every finished attack is cached (``eval_cache/``) so an
interrupted evaluation resumes where it stopped and gives the same report.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ducat.attacks import PGD
from ducat.checkpoint import CheckpointError, load_checkpoint, load_weights
from ducat.config import ConfigError, _parse_fraction
from ducat.data import DataError, dataset_info, load_split
from ducat.dummy import DummyClassModel, OriginalLogits, project_predictions

ATTACK_NAMES = ("pgd10", "pgd100", "autoattack", "logsumexp", "margin", "targeted", "eps-sweep")
FAST_ATTACKS = ("pgd10", "logsumexp", "margin", "targeted", "eps-sweep")
PROTOCOLS = ("paper", "raw-autoattack", "adaptive")
SWEEP_FACTORS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class EvalSettings:
    """What to run. ``eps`` in [0,1] pixel units (L-inf); ``step_size`` defaults to eps/4."""

    eps: float
    attacks: tuple[str, ...] = ATTACK_NAMES
    protocols: tuple[str, ...] = PROTOCOLS
    n_examples: int | None = None
    batch_size: int = 256
    seed: int = 0
    early_stop: bool = True
    step_size: float | None = None
    margin_restarts: int = 2
    n_targets: int = 9

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        unknown = [a for a in self.attacks if a not in ATTACK_NAMES]
        if unknown:
            raise ConfigError(f"unknown attack '{unknown[0]}'; choose from: {', '.join(ATTACK_NAMES)}")
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown:
            raise ConfigError(f"unknown protocol '{unknown[0]}'; choose from: {', '.join(PROTOCOLS)}")
        if self.batch_size < 1 or (self.n_examples is not None and self.n_examples < 1):
            raise ConfigError("batch size and n_examples must be >= 1")
        self.step = self.step_size if self.step_size is not None else self.eps / 4


@dataclass
class EvalReport:
    """Results; accuracies are fractions in [0, 1]. ``masks`` maps ``protocol/attack`` to a boolean
    per-example robustness array (``(N,)``), plus ``labels`` and raw predictions."""

    n_examples: int
    epsilon: float
    norm: str
    clean_accuracy: float
    results: list[dict[str, Any]]
    worst_case: dict[str, Any]
    sink_rate: float | None
    eps_sweep: list[dict[str, float]]
    sanity: list[dict[str, str]]
    settings: dict[str, Any]
    dummy_classes: bool
    wall_time_s: float
    masks: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("masks")
        return data

    def accuracy(self, protocol: str, attack: str) -> float | None:
        return next((r["robust_accuracy"] for r in self.results
                     if r["protocol"] == protocol and r["attack"] == attack), None)

    def to_markdown(self) -> str:
        pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
        attacks = list(dict.fromkeys(r["attack"] for r in self.results))
        lines = [f"Robust accuracy (%) of the deployed classifier, L-inf eps = {self.epsilon:.5g}, "
                 f"first {self.n_examples} test examples, seed {self.settings['seed']}, batch size "
                 f"{self.settings['batch_size']}.", ""]
        if not self.dummy_classes:
            lines += ["The model has no dummy classes: the protocols coincide and ran once.", ""]
        lines += ["| attack | paper protocol | adaptive | note |", "|---|---|---|---|",
                  f"| clean | {pct(self.clean_accuracy)} | {pct(self.clean_accuracy)} | projected prediction |"]
        for attack in attacks:
            note = next((r.get("note", "") for r in self.results if r["attack"] == attack and r.get("note")), "")
            lines.append(f"| {attack} | {pct(self.accuracy('paper', attack))} | "
                         f"{pct(self.accuracy('adaptive', attack))} | {note} |")
        raw = self.accuracy("raw-autoattack", "AutoAttack")
        if raw is not None:
            lines.append(f"| AutoAttack, raw 2C, no projection | {pct(raw)} | | released code's call (raw-autoattack) |")
        lines.append(f"| **worst case per example** | | **{pct(self.worst_case['robust_accuracy'])}** | "
                     "every attack run, both protocols |")
        if self.sink_rate is not None:
            lines += ["", f"Sink rate: {pct(self.sink_rate)}% of paper-protocol PGD-10 adversarial examples are predicted "
                      "as the dummy class of their own label (counted as robust by the paper's protocol)."]
        if self.eps_sweep:
            lines += ["", "Eps sweep (PGD-10): " + ", ".join(
                f"{s['eps']:.3g}: {pct(s['adaptive'])}" + (f" (paper {pct(s['paper'])})" if s.get("paper") is not None else "")
                for s in self.eps_sweep)]
        lines += ["", "Sanity checks:"] + [f"- {s['status']}: {s['check']}" for s in self.sanity]
        lines += ["", f"Wall time {self.wall_time_s:.1f} s."]
        return "\n".join(lines)


# ---- model views ---------------------------------------------------------------------------------
def deployed(model: nn.Module) -> nn.Module:
    return model.projected("max") if isinstance(model, DummyClassModel) else model


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(projected predictions, raw argmax) for ``x``, batched, no grad."""
    projected, raw = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            z = model(x[i:i + batch_size])
            raw.append(z.argmax(1))
            projected.append(project_predictions(z, model.dummy_index) if isinstance(model, DummyClassModel)
                             else z.argmax(1))
    return torch.cat(projected), torch.cat(raw)


# ---- the evaluation ------------------------------------------------------------------------------
class _Cache:
    """Per-attack results on disk, keyed by the model's weights and the settings."""

    def __init__(self, directory: Path | None, fingerprint: str):
        self.directory, self.fingerprint = directory, fingerprint
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
        return self.directory / f"{safe}-{self.fingerprint[:16]}.npz"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        if self.directory is None or not self._path(key).is_file():
            return None
        with np.load(self._path(key)) as data:
            return dict(data)

    def put(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        if self.directory is None:
            return
        path = self._path(key)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)


def model_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Evaluator:
    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: EvalSettings,
                 cache: _Cache, progress: Callable[[str], None]):
        self.model, self.x, self.y, self.s = model, x, y, settings
        self.cache, self.progress = cache, progress
        self.is_dummy = isinstance(model, DummyClassModel)
        self.view = deployed(model)

    def _seeded(self, offset: int) -> torch.Generator:
        return torch.Generator(device=self.x.device).manual_seed(self.s.seed * 1000 + offset)

    def run(self, key: str, craft: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
            on: np.ndarray, eps: float | None = None) -> dict[str, np.ndarray]:
        """Attack the examples where ``on`` is True (batched); robust mask of all N examples
        (False where ``on`` is False), projected and raw predictions on the adversarial inputs."""
        cached = self.cache.get(key)
        # a cached attack counts only if it attacked every example asked for now (an attack run after
        # fewer earlier attacks has more examples to attack than the same attack run after more)
        if cached is not None and "attacked" in cached and not (on & ~cached["attacked"]).any():
            self.progress(f"{key} (cached)")
            return {"robust": cached["robust"] & on, "raw": np.where(on, cached["raw"], -1),
                    "projected": np.where(on, cached["projected"], -1)}
        self.progress(key)
        n = len(self.y)
        robust = np.zeros(n, dtype=bool)
        raw = np.full(n, -1, dtype=np.int64)
        projected = np.full(n, -1, dtype=np.int64)
        index = np.flatnonzero(on)
        for start in range(0, len(index), self.s.batch_size):
            idx = torch.as_tensor(index[start:start + self.s.batch_size], device=self.x.device)
            x_adv = craft(self.x[idx], self.y[idx], idx)
            if (x_adv - self.x[idx]).abs().max().item() > (eps or self.s.eps) + 1e-6:
                raise RuntimeError(f"attack {key} left the eps-ball")  # an attack bug, never a silent pass
            proj, z = _predict(self.model, x_adv, self.s.batch_size)
            robust[idx.cpu().numpy()] = (proj == self.y[idx]).cpu().numpy()
            raw[idx.cpu().numpy()] = z.cpu().numpy()
            projected[idx.cpu().numpy()] = proj.cpu().numpy()
        result = {"robust": robust, "raw": raw, "projected": projected}
        self.cache.put(key, {**result, "attacked": np.asarray(on, dtype=bool)})
        return result

    # attack constructors: each returns craft(x, y, idx) -> x_adv
    def pgd(self, target: nn.Module, steps: int, loss: str = "ce", eps: float | None = None, offset: int = 0):
        eps = self.s.eps if eps is None else eps

        def craft(x, y, idx):
            attack = PGD(target, eps, eps / 4 if eps != self.s.eps else self.s.step, steps, loss=loss,
                         generator=self._seeded(offset + int(idx[0])))
            return attack(x, y)
        return craft

    def targeted_random(self, dummy: bool, offset: int, projected: bool = False):
        """Targeted PGD-10 (CE) toward a random other class, or its dummy class.

        On the raw logits (the paper's protocol) or, with ``projected``, on the deployed classifier.
        """
        c = self.model.num_classes if self.is_dummy else int(self.view(self.x[:1]).shape[1])

        def craft(x, y, idx):
            g = torch.Generator().manual_seed(self.s.seed * 1000 + offset + int(idx[0]))
            target = (y.cpu() + torch.randint(1, c, (len(y),), generator=g)) % c
            target = target.to(y.device)
            if dummy:
                target = self.model.dummy_index[target]
            attack = PGD(self.view if projected else self.model, self.s.eps, self.s.step, 10, targeted=True,
                         generator=self._seeded(offset + int(idx[0])))
            return attack(x, y, target)
        return craft

    def _first_success(self, x, y, runs: int, run_attack):
        """Run ``run_attack(i, sub)`` for i < runs on the examples not yet fooled; keep each one's first success."""
        best = x.clone()
        alive = torch.ones(len(y), dtype=torch.bool, device=x.device)
        for i in range(runs):
            sub = alive.nonzero().squeeze(1)
            if len(sub) == 0:
                break
            x_adv = run_attack(i, sub)
            with torch.no_grad():
                fooled = self.view(x_adv).argmax(1) != y[sub]
            best[sub[fooled]] = x_adv[fooled]
            alive[sub[fooled]] = False
        return best

    def targeted_top(self, offset: int):
        """Targeted PGD-100 margin toward each of the top merged classes (projected classifier)."""
        def craft(x, y, idx):
            with torch.no_grad():
                scores = self.view(x).scatter(1, y[:, None], float("-inf"))
            k = min(self.s.n_targets, scores.shape[1] - 1)
            targets = scores.topk(k, dim=1).indices

            def run_attack(rank, sub):
                attack = PGD(self.view, self.s.eps, self.s.step, 100, loss="margin", targeted=True,
                             generator=self._seeded(offset + rank * 7919 + int(idx[0])))
                return attack(x[sub], y[sub], targets[sub, rank])
            return self._first_success(x, y, k, run_attack)
        return craft

    def margin_restarts(self, offset: int):
        def craft(x, y, idx):
            def run_attack(restart, sub):
                attack = PGD(self.view, self.s.eps, self.s.step, 100, loss="margin",
                             generator=self._seeded(offset + restart * 104729 + int(idx[0])))
                return attack(x[sub], y[sub])
            return self._first_success(x, y, self.s.margin_restarts, run_attack)
        return craft

    def autoattack(self, target: nn.Module, log: list[str]):
        from pyautoattack import AutoAttack

        def craft(x, y, idx):
            aa = AutoAttack(target, eps=self.s.eps, norm="Linf", seed=self.s.seed, version="standard",
                            device=x.device)
            handler = _ListHandler(log)
            aa.logger.addHandler(handler)
            aa.logger.setLevel(logging.DEBUG)
            try:
                x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=self.s.batch_size)
            finally:
                aa.logger.removeHandler(handler)
            return x_adv
        return craft


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


def _square_gain(log: list[str]) -> float | None:
    """Accuracy points Square (black-box) removed after the white-box attacks of one AutoAttack run."""
    after = {m.group(1).lower(): float(m.group(2)) for m in
             (re.search(r"robust accuracy after ([A-Z-]+): ([\d.]+)%", line) for line in log) if m}
    if "square" not in after or "fab-t" not in after:
        return None
    return after["fab-t"] - after["square"]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: EvalSettings,
             cache_dir: Path | None = None, progress: bool = True) -> EvalReport:
    """Evaluate ``model`` (a DummyClassModel or any C-class classifier) on ``x`` ``(N, C, H, W)``
    in [0,1] with labels ``y`` ``(N,)``; see the module docstring for what runs."""
    start = time.perf_counter()
    if settings.n_examples is not None:
        x, y = x[:settings.n_examples], y[:settings.n_examples]
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=_count_stages(settings, isinstance(model, DummyClassModel)), unit="attack")

    def step(name: str) -> None:
        if bar is not None:
            bar.set_description(name)
            bar.update(1)

    # random starts are drawn per batch, so the batch size is part of what a cached result means
    cache = _Cache(None if cache_dir is None else Path(cache_dir), hashlib.sha256(
        (model_fingerprint(model) + json.dumps([settings.eps, settings.seed, len(y), settings.step,
                                                settings.margin_restarts, settings.n_targets,
                                                settings.batch_size])).encode()).hexdigest())
    ev = _Evaluator(model, x, y, settings, cache, step)
    is_dummy, attacks = ev.is_dummy, settings.attacks
    projected, raw = _predict(model, x, settings.batch_size)
    clean = (projected == y).cpu().numpy()
    labels = y.cpu().numpy()
    masks: dict[str, np.ndarray] = {"labels": labels, "clean": clean, "clean/raw_predictions": raw.cpu().numpy()}
    results: list[dict[str, Any]] = []
    worst = clean.copy()
    aa_logs: dict[str, list[str]] = {}

    def record(protocol: str, attack: str, out: dict[str, np.ndarray], note: str = "", raw_scored: bool = False):
        nonlocal worst
        mask = out["robust"] if not raw_scored else (out["raw"] == labels) & clean
        masks[f"{protocol}/{attack}"] = mask
        masks[f"{protocol}/{attack}/raw_predictions"] = out["raw"]
        results.append({"protocol": protocol, "attack": attack, "robust_accuracy": float(mask.mean()),
                        **({"note": note} if note else {})})
        if not raw_scored:
            worst &= out["robust"] | ~clean

    adaptive_view = ev.view
    sink_rate = None
    # 1. the paper's protocol (raw 2C CE attacks, projected scoring); for plain models this is the one run
    if is_dummy and "paper" in settings.protocols:
        if "pgd10" in attacks:
            out = ev.run("paper-pgd10", ev.pgd(model, 10, offset=1), clean)
            record("paper", "PGD-10", out)
            sink_rate = float(np.mean(out["raw"] == model.dummy_index.cpu().numpy()[labels]))
        if "pgd100" in attacks:
            record("paper", "PGD-100", ev.run("paper-pgd100", ev.pgd(model, 100, offset=2), clean))
        if "autoattack" in attacks:
            aa_logs["paper"] = []
            out = ev.run("paper-autoattack", ev.autoattack(model, aa_logs["paper"]), clean)
            record("paper", "AutoAttack", out, note="attack on raw 2C logits, projected scoring")
            if "raw-autoattack" in settings.protocols:
                record("raw-autoattack", "AutoAttack", out, note="raw 2C argmax, no projection", raw_scored=True)
        if "targeted" in attacks:
            record("paper", "targeted PGD-10 (original classes)",
                   ev.run("paper-targeted-original", ev.targeted_random(False, 3), clean))
            record("paper", "targeted PGD-10 (dummy classes)",
                   ev.run("paper-targeted-dummy", ev.targeted_random(True, 4), clean))
            record("paper", "PGD-10 on original logits",
                   ev.run("paper-original-logits", ev.pgd(OriginalLogits(model), 10, offset=5), clean))

    # 2. adaptive: the deployed classifier attacked end to end
    protocols_for = ["adaptive"] + ([] if is_dummy else ["paper"])
    if "adaptive" in settings.protocols or not is_dummy:
        def both(attack, out, note=""):
            for protocol in protocols_for:
                record(protocol, attack, out, note)

        if "pgd10" in attacks:
            both("PGD-10", ev.run("adaptive-pgd10", ev.pgd(adaptive_view, 10, offset=11), clean))
        if "pgd100" in attacks:
            both("PGD-100", ev.run("adaptive-pgd100", ev.pgd(adaptive_view, 100, offset=12), clean))
        if "autoattack" in attacks:
            aa_logs["adaptive"] = []
            both("AutoAttack", ev.run("adaptive-autoattack", ev.autoattack(adaptive_view, aa_logs["adaptive"]), clean))
        if "targeted" in attacks:
            both("targeted PGD-10 (original classes)", ev.run("adaptive-targeted-original",
                                                              ev.targeted_random(False, 13, projected=True), clean))
        survivors = lambda: worst.copy() if settings.early_stop else clean.copy()  # noqa: E731
        note = "cumulative: run on survivors of the attacks above" if settings.early_stop else ""
        if is_dummy and "logsumexp" in attacks:
            lse = model.projected("logsumexp")
            record("adaptive", "PGD-100, logsumexp-merged gradients",
                   ev.run("adaptive-lse-pgd100" + _es(settings), ev.pgd(lse, 100, offset=14), survivors()), note)
            if "autoattack" in attacks:
                aa_logs["adaptive-lse"] = []
                record("adaptive", "AutoAttack, logsumexp-merged gradients",
                       ev.run("adaptive-lse-autoattack" + _es(settings), ev.autoattack(lse, aa_logs["adaptive-lse"]),
                              survivors()), note)
        if "margin" in attacks:
            out = ev.run("adaptive-margin" + _es(settings), ev.margin_restarts(15), survivors())
            for protocol in protocols_for:
                record(protocol, f"PGD-100 margin, {settings.margin_restarts} restarts", out, note)
        if "targeted" in attacks:
            out = ev.run("adaptive-targeted-top" + _es(settings), ev.targeted_top(16), survivors())
            for protocol in protocols_for:
                record(protocol, f"PGD-100 targeted margin, top-{settings.n_targets} classes", out, note)

    # 3. eps sweep with PGD-10 (deployed view; and the paper's attack for DUCAT models)
    sweep = []
    if "eps-sweep" in attacks:
        for factor in SWEEP_FACTORS:
            eps = min(1.0, settings.eps * factor)
            row = {"eps": eps}
            if eps == 0:
                row["adaptive"] = float(clean.mean())
                row["paper"] = float(clean.mean()) if is_dummy else None
            else:
                row["adaptive"] = float(ev.run(f"sweep-adaptive-x{factor:g}", ev.pgd(adaptive_view, 10, eps=eps, offset=17),
                                               clean, eps)["robust"].mean())
                row["paper"] = (float(ev.run(f"sweep-paper-x{factor:g}", ev.pgd(model, 10, eps=eps, offset=18),
                                             clean, eps)["robust"].mean()) if is_dummy else None)
            sweep.append(row)
    if bar is not None:
        bar.close()

    masks["worst_case"] = worst
    report = EvalReport(
        n_examples=len(y), epsilon=settings.eps, norm="Linf", clean_accuracy=float(clean.mean()), results=results,
        worst_case={"protocol": "adaptive", "robust_accuracy": float(worst.mean())}, sink_rate=sink_rate,
        eps_sweep=sweep, sanity=[], settings={k: v for k, v in asdict(settings).items()}, dummy_classes=is_dummy,
        wall_time_s=time.perf_counter() - start, masks=masks)
    report.sanity = sanity_checks(report, aa_logs)
    return report


def _es(settings: EvalSettings) -> str:
    return "" if settings.early_stop else "-all"


def _count_stages(settings: EvalSettings, is_dummy: bool) -> int:
    """Number of attack stages ``evaluate`` runs (for the progress bar's ETA)."""
    has = lambda name: name in settings.attacks  # noqa: E731
    paper = is_dummy and "paper" in settings.protocols
    adaptive = "adaptive" in settings.protocols or not is_dummy
    stages = 0
    if paper:
        stages += has("pgd10") + has("pgd100") + has("autoattack") + 3 * has("targeted")
    if adaptive:
        stages += has("pgd10") + has("pgd100") + has("autoattack") + has("margin") + 2 * has("targeted")
        stages += is_dummy * has("logsumexp") * (1 + has("autoattack"))
    stages += (len(SWEEP_FACTORS) - 1) * (2 if is_dummy else 1) * has("eps-sweep")
    return stages


def sanity_checks(report: EvalReport, aa_logs: dict[str, list[str]]) -> list[dict[str, str]]:
    """PASS/WARN signals that an evaluation may be too weak (Carlini et al. 2019, Tramer et al. 2020)."""
    checks = []
    for protocol in ("paper", "adaptive"):
        a10, a100 = report.accuracy(protocol, "PGD-10"), report.accuracy(protocol, "PGD-100")
        if a10 is not None and a100 is not None:
            ok = a100 <= a10 + 0.005
            checks.append({"check": f"{protocol}: PGD-100 ({100 * a100:.2f}) not above PGD-10 ({100 * a10:.2f})",
                           "status": "PASS" if ok else "WARN"})
    for name, log in aa_logs.items():
        gain = _square_gain(log)
        if gain is not None:
            ok = gain <= 0.5
            checks.append({"check": f"{name} AutoAttack: black-box Square removed {gain:.2f} points after the "
                                    "white-box attacks (more than 0.5 suggests gradient masking)",
                           "status": "PASS" if ok else "WARN"})
    if report.eps_sweep:
        values = [s["adaptive"] for s in report.eps_sweep]
        monotone = all(b <= a + 0.005 for a, b in zip(values, values[1:]))
        checks.append({"check": "adaptive robust accuracy does not rise with eps", "status": "PASS" if monotone else "WARN"})
        last = report.eps_sweep[-1]
        checks.append({"check": f"adaptive robust accuracy at the largest eps ({last['eps']:.3g}) is "
                                f"{100 * last['adaptive']:.2f}% (should be near 0)",
                       "status": "PASS" if last["adaptive"] <= 0.05 else "WARN"})
    return checks


def write_report(report: EvalReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    (out / "report.md").write_text("# ducat eval\n\n" + report.to_markdown() + "\n")
    np.savez_compressed(out / "masks.npz", **report.masks)


# ---- checkpoints and the command line ------------------------------------------------------------
def load_target(target: Path, dataset: str | None = None, model_name: str | None = None) -> tuple[nn.Module, str, float | None]:
    """(model, dataset name, training eps or None) for a run dir / ducat checkpoint / foreign state dict."""
    from ducat.runs import model_from_checkpoint

    if not target.exists():
        raise CheckpointError(f"checkpoint '{target}' does not exist")
    if model_name is None:
        model, config, _ = model_from_checkpoint(target)
        return model, config.data.dataset, config.attack.eps
    if dataset is None:
        raise ConfigError("--model needs --dataset (the model's classes and input shape come from it)")
    from ducat.models import build_model

    info = dataset_info(dataset)
    model = build_model(model_name, info.num_classes, info.in_channels)
    weights = load_checkpoint(target)["model"]
    if any(k.startswith("net.") for k in weights):
        load_weights(model, weights, str(target))
    else:
        load_weights(model.net, weights, str(target))
    return model, dataset, None


def evaluate_checkpoint(target: str | Path, out: str | Path | None = None, *, eps: float | None = None,
                        n_examples: int | None = None, attacks: tuple[str, ...] = ATTACK_NAMES,
                        protocols: tuple[str, ...] = PROTOCOLS, data_root: str | None = None, seed: int = 0,
                        batch_size: int = 256, early_stop: bool = True, dataset: str | None = None,
                        model_name: str | None = None, device: str = "auto", progress: bool = True,
                        n_targets: int = 9, margin_restarts: int = 2) -> EvalReport:
    """Evaluate a run directory or checkpoint on its dataset's test split; writes the report files."""
    from ducat.runs import select_device

    target = Path(target)
    if eps is not None and not eps > 0:
        raise ConfigError(f"eps must be > 0, got {eps}")
    EvalSettings(eps=eps or 1.0, attacks=tuple(attacks), protocols=tuple(protocols))  # validate names first
    if dataset is not None:
        dataset_info(dataset)
    model, dataset, train_eps = load_target(target, dataset, model_name)
    eps = eps if eps is not None else train_eps
    if eps is None:
        raise ConfigError("give --eps for a checkpoint without a ducat config")
    settings = EvalSettings(eps=eps, attacks=tuple(attacks), protocols=tuple(protocols), n_examples=n_examples,
                            batch_size=batch_size, seed=seed, early_stop=early_stop, n_targets=n_targets,
                            margin_restarts=margin_restarts)
    test = load_split(dataset, data_root, train=False)
    n = len(test) if n_examples is None else min(n_examples, len(test))
    dev = select_device(device)
    x, y = (test.images[:n].float() / 255).to(dev), test.labels[:n].to(dev)
    model = model.to(dev)
    out = Path(out) if out is not None else (target if target.is_dir() else target.parent) / "eval"
    report = evaluate(model, x, y, settings, cache_dir=out / "eval_cache", progress=progress)
    write_report(report, out)
    return report


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="run directory or checkpoint (.pt or .safetensors)")
    parser.add_argument("--eps", help="L-inf budget in [0,1] units, e.g. 8/255 (default: the run's training eps)")
    parser.add_argument("--n-examples", type=int, help="evaluate the first N test examples (default: all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacks", help=f"comma-separated subset of: {', '.join(ATTACK_NAMES)} (default: all)")
    parser.add_argument("--protocols", help=f"comma-separated subset of: {', '.join(PROTOCOLS)} (default: all)")
    parser.add_argument("--fast", action="store_true", help="skip AutoAttack and PGD-100 (CPU-friendly)")
    parser.add_argument("--no-early-stop", action="store_true", help="run every attack on every clean-correct example")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/eval or the checkpoint's directory/eval)")
    parser.add_argument("--dataset", help="dataset of a foreign checkpoint without a ducat config")
    parser.add_argument("--model", help="architecture of a foreign checkpoint (a ducat model name)")
    parser.add_argument("--data-root", help="dataset root directory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    attacks = FAST_ATTACKS if args.fast else ATTACK_NAMES
    if args.attacks:
        attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    protocols = tuple(p.strip() for p in args.protocols.split(",")) if args.protocols else PROTOCOLS
    eps = _parse_fraction(args.eps, "--eps") if args.eps is not None else None
    if args.n_examples is not None and args.n_examples < 1:
        raise ConfigError(f"--n-examples must be >= 1, got {args.n_examples}")
    try:
        report = evaluate_checkpoint(args.target, args.out, eps=eps, n_examples=args.n_examples, attacks=attacks,
                                     protocols=protocols, data_root=args.data_root, seed=args.seed,
                                     batch_size=args.batch_size, early_stop=not args.no_early_stop,
                                     dataset=args.dataset, model_name=args.model, device=args.device,
                                     progress=not args.no_progress)
    except ValueError as exc:
        if isinstance(exc, (ConfigError, DataError, CheckpointError)):
            raise
        raise ConfigError(str(exc)) from None
    print(report.to_markdown())
    target = Path(args.target)
    out = Path(args.out) if args.out else (target if target.is_dir() else target.parent) / "eval"
    print(f"\nreport written to {out / 'report.md'} and {out / 'report.json'}")
    return 0
