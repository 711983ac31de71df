"""One generic loop over an attack plan, with per-example early stopping and an on-disk cache as its state.

For every :class:`~ducat.eval.plan.AttackSpec` in order: pick the examples it attacks (its scope),
craft adversarial inputs batch by batch with seeds derived from the spec's key, score them, and fold
the result into the per-example worst case. Worker processes (:mod:`ducat.eval.workers`) attack the
batches in parallel, those of consecutive attacks on every clean-correct example at once (:func:`waves`);
each batch's result depends only on its examples, its attack and its seed.
Every finished attack is written to the cache, so an interrupted evaluation resumes where it stopped
and gives the same report.

A cached result is used only when everything that determines it is the same: the model's weights,
the inputs and labels, the settings, the code (:func:`code_version`) and the spec's key; and only if
it attacked every example asked for now. A cache file that does not read back as such a result is
ignored and recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ducat.attacks import predictions
from ducat.eval.attacks import AttackContext, model_views
from ducat.eval.indicators import batch_flags
from ducat.eval.settings import EvalSettings
from ducat.eval.vocabulary import AttackSpec, Scope, Scoring, View
from ducat.eval.workers import MapFn, worker_pool
from ducat.fileio import atomic_write_bytes
from ducat.runtime import derive_seed


@dataclass
class AttackResult:
    """Per-example outcome of one attack, numpy ``(N,)`` arrays: ``robust`` (bool; False where not attacked),
    ``raw`` and ``projected`` predictions on the adversarial input (-1 where not attacked), ``attacked``;
    ``indicators``: the attack-failure flags by name, ``(N,)`` bool each (:mod:`ducat.eval.indicators`)."""

    robust: np.ndarray
    raw: np.ndarray
    projected: np.ndarray
    attacked: np.ndarray
    indicators: dict[str, np.ndarray] = field(default_factory=dict)

    def restricted(self, on: np.ndarray) -> "AttackResult":
        """This result seen on the examples ``on`` only (a cached run may have attacked more)."""
        return AttackResult(self.robust & on, np.where(on, self.raw, -1), np.where(on, self.projected, -1), on.copy(),
                            {name: flag & on for name, flag in self.indicators.items()})


@dataclass
class Outcome:
    """Everything the plan produced: clean correctness and raw clean predictions ``(N,)``, each spec's
    result by key, the per-example worst case over the specs that count, and AutoAttack's logs by key."""

    clean: np.ndarray
    clean_raw: np.ndarray
    results: dict[str, AttackResult]
    worst: np.ndarray
    logs: dict[str, list[str]]


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the code that produces attack results: ducat's attack, eval, model and dummy-class sources,
    and the torch and pyautoattack versions."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(f"torch {torch.__version__}, pyautoattack {version('pyautoattack')}".encode())
    for path in sorted([*root.glob("attacks/*.py"), *root.glob("eval/*.py"), *root.glob("models/*.py"),
                        root / "dummy.py"]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{tuple(t.shape)} {t.dtype}".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names and values)."""
    state = sorted(model.state_dict().items())
    return hashlib.sha256("".join(name + tensor_digest(value) for name, value in state).encode()).hexdigest()


def seed_for(settings: EvalSettings, spec: AttackSpec, first_index: int) -> int:
    """The seed of one batch of one attack: derived from the evaluation seed, the spec's key and the
    batch's first example, so attacks are independent of each other and of the plan's order (63 bits)."""
    return derive_seed(settings.seed, spec.key, first_index)


class ResultCache:
    """Attack results on disk, one ``.npz`` per spec, named by its key and the run's fingerprint (indicator
    flags stored as ``indicator/<name>``)."""

    FIELDS = ("robust", "raw", "projected", "attacked")
    FLAG = "indicator/"

    def __init__(self, directory: Path | None, fingerprint: str, n: int):
        self.directory, self.fingerprint, self.n = directory, fingerprint, n

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}-{self.fingerprint[:24]}.npz"

    def get(self, key: str, on: np.ndarray) -> AttackResult | None:
        """The cached result restricted to ``on``, or None (missing, unreadable, or did not attack all of ``on``)."""
        if self.directory is None or not self._path(key).is_file():
            return None
        try:
            with np.load(self._path(key), allow_pickle=False) as data:
                arrays = {name: data[name] for name in self.FIELDS}
                flags = {name[len(self.FLAG):]: data[name] for name in data.files if name.startswith(self.FLAG)}
        except Exception:  # a damaged zip raises many types (BadZipFile, EOFError, NotImplementedError, ...)
            return None
        if any(a.shape != (self.n,) for a in [*arrays.values(), *flags.values()]) or arrays["robust"].dtype != bool \
                or arrays["attacked"].dtype != bool or any(f.dtype != bool for f in flags.values()):
            return None
        if (on & ~arrays["attacked"]).any():
            return None
        return AttackResult(**arrays, indicators=flags).restricted(on)

    def put(self, key: str, result: AttackResult) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **{name: getattr(result, name) for name in self.FIELDS},
                 **{self.FLAG + name: flag for name, flag in result.indicators.items()})
        atomic_write_bytes(self._path(key), buffer.getvalue())


def run_fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: EvalSettings,
                    surrogate: nn.Module | None = None) -> str:
    """What every cached result of one evaluation depends on, hashed (the transfer row's surrogate included)."""
    fields = {k: v for k, v in asdict(settings).items() if k not in ("attacks", "protocols", "n_examples")}
    models = [model_fingerprint(m) for m in (model, surrogate) if m is not None]
    text = json.dumps([*models, tensor_digest(x, y), fields, code_version()], default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class _Shared:
    """What every batch of the plan needs; worker processes inherit it when they are forked."""

    plan: list[AttackSpec]
    model: nn.Module
    views: dict[View, nn.Module]
    settings: EvalSettings
    x: torch.Tensor
    y: torch.Tensor


def run_plan(plan: list[AttackSpec], model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: EvalSettings,
             cache: ResultCache, progress: Callable[[str, int, int], None] = lambda *a: None,
             surrogate: nn.Module | None = None, survivors: np.ndarray | None = None) -> Outcome:
    """Run ``plan`` on ``model`` (eval mode) and ``(x, y)``: ``x`` ``(N, C, H, W)`` in [0,1], ``y`` ``(N,)``.

    ``settings.workers`` (resolved, not None) processes attack the batches (:mod:`ducat.eval.workers`), the
    batches of all the attacks of one :func:`waves` group at once. ``surrogate``: the transfer row's model
    (eval mode). ``survivors`` ``(N,)``: the examples robust so far (a follow-up to an earlier plan; default
    every clean-correct one)."""
    projected, raw = predictions(model, x, settings.batch_size)
    clean = (projected == y).cpu().numpy()
    results: dict[str, AttackResult] = {}
    logs: dict[str, list[str]] = {}
    worst = clean.copy() if survivors is None else clean & survivors
    shared = _Shared(plan, model, model_views(model, surrogate), settings, x, y)
    with worker_pool(settings.workers, shared) as map_jobs:
        for wave in waves(plan):
            for number in wave:
                progress(plan[number].key, number + 1, len(plan))
            crafted = [n for n in wave if plan[n].rescores is None]
            wave_results, wave_logs = _run_wave([(n, plan[n]) for n in crafted], worst, clean, settings, cache,
                                                map_jobs)
            results |= wave_results | {plan[n].key: rescored(plan[n], results | wave_results, y.cpu().numpy())
                                       for n in wave if n not in crafted}
            logs |= wave_logs
            worst = worst_after([plan[n] for n in wave], results, worst, clean)
    return Outcome(clean, raw.cpu().numpy(), results, worst, logs)


def rescored(spec: AttackSpec, results: dict[str, AttackResult], labels: np.ndarray) -> AttackResult:
    """The result of a spec that scores the adversarial inputs of ``spec.rescores`` again by the raw 2C argmax:
    the one place a result is rescored."""
    source = results[spec.rescores]
    return AttackResult((source.raw == labels) & source.attacked, source.raw, source.projected, source.attacked)


def worst_after(specs: list[AttackSpec], results: dict[str, AttackResult], worst: np.ndarray,
                clean: np.ndarray) -> np.ndarray:
    """The per-example worst case ``(N,)`` once ``specs`` are in: robust only where every counted result is (a
    check's rerun counts toward its own check's worst case)."""
    for spec in specs:
        if spec.in_worst_case or (spec.variant and spec.scoring is Scoring.PROJECTED):
            worst = worst & (results[spec.key].robust | ~clean)
    return worst


def waves(plan: list[AttackSpec]) -> list[list[int]]:
    """The plan's attacks (indices) in groups whose batches can run at once: consecutive attacks of every
    clean-correct example, which do not depend on each other's results; an attack of the survivors of all
    the attacks before it (early stopping) forms a group alone."""
    groups: list[list[int]] = []
    for number, spec in enumerate(plan):
        if groups and spec.scope is Scope.CLEAN_CORRECT and plan[groups[-1][-1]].scope is Scope.CLEAN_CORRECT:
            groups[-1].append(number)
        else:
            groups.append([number])
    return groups


def _run_wave(numbered: list[tuple[int, AttackSpec]], survivors: np.ndarray, clean: np.ndarray,
              settings: EvalSettings, cache: ResultCache,
              map_jobs: MapFn) -> tuple[dict[str, AttackResult], dict[str, list[str]]]:
    """(results, AutoAttack log lines) by key of the crafting attacks ``numbered`` (their numbers in the plan the
    workers hold, and the specs), from the cache where it has them; each computed attack is cached as soon as its
    last batch is in, so an interruption keeps it."""
    results, logs, jobs, pending = {}, {}, [], {}
    number_of = {spec.key: number for number, spec in numbered}
    for _, spec in numbered:
        on = survivors if spec.scope is Scope.SURVIVORS else clean
        if (cached := cache.get(spec.key, on)) is not None:
            results[spec.key] = cached
            continue
        n = len(on)
        pending[spec.key] = AttackResult(np.zeros(n, bool), np.full(n, -1, np.int64), np.full(n, -1, np.int64),
                                         on.copy(), {})
        jobs += [(spec, batch) for batch in split_batches(np.flatnonzero(on), settings.batch_size, settings.workers)]
    left = Counter(spec.key for spec, _ in jobs)
    lines: dict[int, list[str]] = {}
    for index, (robust, raw, projected, log, flags) in map_jobs(_attack_batch, [(number_of[spec.key], batch)
                                                                                for spec, batch in jobs]):
        spec, batch = jobs[index]
        result = pending[spec.key]
        result.robust[batch], result.raw[batch], result.projected[batch], lines[index] = robust, raw, projected, log
        for name, flag in flags.items():
            result.indicators.setdefault(name, np.zeros(len(result.robust), bool))[batch] = flag
        left[spec.key] -= 1
        if not left[spec.key]:  # complete: keep it, with its AutoAttack log lines in batch order
            logs[spec.key] = [line for i, (s, _) in enumerate(jobs) if s.key == spec.key for line in lines.pop(i)]
            cache.put(spec.key, result)
    return results | pending, logs


def split_batches(index: np.ndarray, batch_size: int, workers: int) -> list[np.ndarray]:
    """The examples ``index`` in consecutive batches of near-equal size: as few as a limit of ``batch_size``
    per batch allows, but at least one per worker (as far as there are examples)."""
    parts = min(len(index), max(workers, math.ceil(len(index) / batch_size)))
    return np.array_split(index, parts) if parts else []


def _attack_batch(shared: _Shared, job: tuple[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list,
                                                                          dict[str, np.ndarray]]:
    """One batch of one attack: (robust, raw and projected predictions on the adversarial inputs, log lines,
    attack-failure flags by name)."""
    number, batch = job
    spec, settings, x, y = shared.plan[number], shared.settings, shared.x, shared.y
    context = AttackContext(shared.model, shared.views, settings, settings.budget(spec.eps_factor),
                            strength=spec.strength)
    idx = torch.as_tensor(batch, device=x.device)
    x_adv = spec.factory(context)(x[idx], y[idx], seed_for(settings, spec, int(batch[0])))
    _check_budget(spec, x_adv, x[idx], context)
    projected, raw = predictions(shared.model, x_adv, settings.batch_size)
    correct = projected == y[idx] if spec.scoring is Scoring.PROJECTED else raw == y[idx]
    flags = batch_flags(context, spec.view, x_adv, y[idx], raw, correct) if settings.indicators else {}
    return correct.cpu().numpy(), raw.cpu().numpy(), projected.cpu().numpy(), context.log, flags


def _check_budget(spec: AttackSpec, x_adv: torch.Tensor, x: torch.Tensor, ctx: AttackContext) -> None:
    """An attack that leaves the eps-ball or [0,1] is a bug, never a silent pass."""
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if ctx.settings.norm == "Linf" else delta.norm(dim=1)
    if len(size) and (size.max().item() > ctx.eps * (1 + 1e-4) + 1e-6 or x_adv.min() < 0 or x_adv.max() > 1):
        raise RuntimeError(f"attack {spec.key} left the {ctx.settings.norm} eps-ball or [0,1]")


def print_progress(enabled: bool) -> Callable[[str, int, int], None]:
    """One line per attack on stderr (a log file stays readable), with the time since the evaluation started."""
    started = time.perf_counter()

    def report(key: str, number: int, total: int) -> None:
        if enabled:
            print(f"[{time.perf_counter() - started:6.0f} s] attack {number}/{total}: {key}", file=sys.stderr)
    return report
