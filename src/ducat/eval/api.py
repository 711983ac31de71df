"""Entry points: :func:`evaluate` a model on tensors, :func:`evaluate_checkpoint` a run or checkpoint file."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ducat.attacks import eval_mode
from ducat.checkpoint import CheckpointError, checkpoint_size_limit, load_checkpoint, load_weights
from ducat.config import ConfigError
from ducat.data import dataset_info, load_split
from ducat.dummy import DummyClassModel
from ducat.eval.checks import CheckRun, run_checks
from ducat.eval.load import load_function
from ducat.eval.plan import build_plan
from ducat.eval.report import EvalReport, build_report, write_report
from ducat.eval.runner import ResultCache, print_progress, run_fingerprint, run_plan, tensor_digest
from ducat.eval.settings import EvalSettings
from ducat.eval.workers import can_fork, default_workers
from ducat.models import build_model
from ducat.provenance import file_sha256, provenance
from ducat.runs import model_from_checkpoint, resolve_checkpoint, select_device
from ducat.runtime import channels_last_faster


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: EvalSettings,
             cache_dir: str | Path | None = None, progress: bool = True,
             provenance: dict[str, Any] | None = None, surrogate: nn.Module | None = None) -> EvalReport:
    """Evaluate ``model`` (a :class:`~ducat.dummy.DummyClassModel` or any C-class classifier taking [0,1]
    inputs) on ``x`` ``(N, C, H, W)`` in [0,1] with labels ``y`` ``(N,)`` in [0, C).

    Runs :func:`~ducat.eval.plan.build_plan`'s attacks with the model in eval mode (its mode is restored
    afterwards), then the checks of the evaluation itself (:mod:`ducat.eval.checks`). ``surrogate``: a
    C-class model the transfer row crafts its examples on (default: the original C logits of a DUCAT model).
    ``cache_dir`` keeps every finished attack, so a rerun resumes."""
    start = time.perf_counter()
    if settings.n_examples is not None:
        x, y = x[:settings.n_examples], y[:settings.n_examples]
    check_labels(model, x, y)
    settings = resolve_workers(settings, x.device)
    is_dummy = isinstance(model, DummyClassModel)
    plan = build_plan(settings, is_dummy, surrogate is not None)
    cache_path = None if cache_dir is None else Path(cache_dir)
    cache = ResultCache(cache_path, run_fingerprint(model, x, y, settings, surrogate), len(y))
    run = CheckRun(model, x, y, settings, surrogate, None if cache_path is None else cache_path / "checks",
                   print_progress(progress))
    with eval_mode(model), eval_mode(surrogate, surrogate is not None):
        outcome = run_plan(plan, model, x, y, settings, cache, run.progress, surrogate)
        checks, followups = run_checks(plan, outcome, run) if settings.checks else ({}, [])
    dummy_index = model.dummy_index.cpu().numpy() if is_dummy else None
    report = build_report(plan + followups, outcome, y.cpu().numpy(), settings, dummy_index,
                          time.perf_counter() - start)
    report.checks, report.provenance = checks, provenance or {}
    return report


def check_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """ConfigError unless ``y`` holds one integer label in [0, C) per example of ``x``, C the model's classes
    (a DUCAT model's original classes), checked before any attack runs."""
    if y.dim() != 1 or len(y) != len(x) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ConfigError(f"labels must be an integer tensor of shape ({len(x)},), got {y.dtype} {tuple(y.shape)}")
    if isinstance(model, DummyClassModel):
        classes = model.num_classes
    else:
        with torch.no_grad(), eval_mode(model):
            classes = model(x[:1]).shape[1]
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ConfigError(f"labels must be in [0, {classes}) for a model with {classes} classes, got labels from "
                          f"{int(y.min())} to {int(y.max())}")


def resolve_workers(settings: EvalSettings, device: torch.device) -> EvalSettings:
    """``settings`` with its number of worker processes decided (:func:`~ducat.eval.workers.default_workers`);
    more than one needs a CPU run on Linux."""
    if settings.workers is None:
        return replace(settings, workers=default_workers(device))
    if settings.workers > 1 and not can_fork(device):
        raise ConfigError(f"{settings.workers} evaluation workers need a CPU run on Linux (this one: "
                          f"{device.type} on {sys.platform}); use 1")
    return settings


def load_target(target: Path, dataset: str | None = None,
                model_name: str | None = None) -> tuple[nn.Module, str, float | None, dict[str, Any]]:
    """(model, dataset name, training eps or None, checkpoint facts) for a run directory, a ducat
    checkpoint, or a foreign state dict (``model_name`` and ``dataset`` given). A ducat checkpoint's facts
    include its run's ``data_root``."""
    if not target.exists():
        raise CheckpointError(f"checkpoint '{target}' does not exist")
    if model_name is None:
        path = resolve_checkpoint(target)
        model, config, state = model_from_checkpoint(path)
        epoch = state.get("epoch")  # reported as found only if it is one (the weights do not depend on it)
        epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None
        return model, config.data.dataset, config.attack.eps, {"path": str(path), "epoch": epoch,
                                                               "sha256": file_sha256(path),
                                                               "data_root": config.data.root}
    if dataset is None:
        raise ConfigError("--model needs --dataset (the model's classes and input shape come from it)")
    info = dataset_info(dataset)
    model = build_model(model_name, info.num_classes, info.in_channels)
    weights = load_checkpoint(target, max_bytes=checkpoint_size_limit(model))["model"]
    load_weights(model if any(k.startswith("net.") for k in weights) else model.net, weights, str(target))
    return model, dataset, None, {"path": str(target), "epoch": None, "sha256": file_sha256(target)}


def default_output(target: Path | None, load: str | None = None) -> Path:
    """``RUN_DIR/eval`` for a run directory, ``<checkpoint's directory>/eval`` for a file, ``eval-FUNCTION`` in the
    current directory for ``--load MODULE:FUNCTION``."""
    if target is None:
        return Path(f"eval-{(load or 'model').rpartition(':')[2]}")
    return (target if target.is_dir() else target.parent) / "eval"


def load_surrogate(surrogate: str | Path, dataset: str) -> tuple[nn.Module, dict[str, Any]]:
    """The transfer row's surrogate: a run directory or ducat checkpoint of the same dataset (its deployed
    classifier is attacked), with its checkpoint facts."""
    model, surrogate_dataset, _, facts = load_target(Path(surrogate))
    if dataset_info(surrogate_dataset).name != dataset_info(dataset).name:
        raise ConfigError(f"--surrogate '{surrogate}' was trained on {surrogate_dataset}, the model on {dataset}")
    facts.pop("data_root", None)
    return model, facts


def evaluate_checkpoint(target: str | Path | None, out: str | Path | None = None, *, eps: float | None = None,
                        settings: dict[str, Any] | None = None, data_root: str | None = None,
                        dataset: str | None = None, model_name: str | None = None, device: str = "auto",
                        progress: bool = True, load: str | None = None,
                        surrogate: str | Path | None = None) -> EvalReport:
    """Evaluate a run directory or checkpoint (``target``), or the model the function ``load``
    (``MODULE:FUNCTION``, :mod:`ducat.eval.load`) returns, on its dataset's test split and write the report files.

    ``eps`` defaults to the run's training eps and ``data_root`` to the run's ``data.root``; ``settings`` are
    further :class:`EvalSettings` fields; ``surrogate``: the transfer row's run directory or checkpoint."""
    target = None if target is None else Path(target)
    dev = select_device(device)
    resolve_workers(EvalSettings(eps=eps or 1.0, **(settings or {})), dev)  # checked before any loading
    if dataset is not None:
        dataset_info(dataset)
    model, dataset, train_eps, facts = (load_target(target, dataset, model_name) if load is None
                                        else load_function(load, dataset))
    saved_root = facts.pop("data_root", None)  # where the run found its data
    data_root = data_root if data_root is not None else saved_root
    eps = eps if eps is not None else train_eps
    if eps is None:
        raise ConfigError("give --eps for a checkpoint without a ducat config")
    config = EvalSettings(eps=eps, **(settings or {}))
    test = load_split(dataset, data_root, train=False)
    n = len(test) if config.n_examples is None else min(config.n_examples, len(test))
    x, y = (test.images[:n].float() / 255).to(dev), test.labels[:n].to(dev)
    model = model.to(dev)
    if load is None and channels_last_faster(model, dev):  # the model is ours here, its layout free to choose
        model = model.to(memory_format=torch.channels_last)
    other, other_facts = load_surrogate(surrogate, dataset) if surrogate is not None else (None, None)
    out = Path(out) if out is not None else default_output(target, load)
    facts = provenance(str(dev)) | {"loaded" if load else "checkpoint": facts, "surrogate": other_facts,
                                    "examples": f"first {n} of the {dataset} test split",
                                    "examples_sha256": tensor_digest(x, y)}
    report = evaluate(model, x, y, config, cache_dir=out / "eval_cache", progress=progress, provenance=facts,
                      surrogate=None if other is None else other.to(dev))
    write_report(report, out)
    return report
