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
from ducat.eval.plan import EvalSettings, build_plan
from ducat.eval.report import EvalReport, build_report, write_report
from ducat.eval.runner import ResultCache, print_progress, run_fingerprint, run_plan, tensor_digest
from ducat.eval.workers import can_fork, default_workers
from ducat.provenance import file_sha256, provenance
from ducat.runtime import channels_last_faster


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: EvalSettings,
             cache_dir: str | Path | None = None, progress: bool = True,
             provenance: dict[str, Any] | None = None) -> EvalReport:
    """Evaluate ``model`` (a :class:`~ducat.dummy.DummyClassModel` or any C-class classifier taking [0,1]
    inputs) on ``x`` ``(N, C, H, W)`` in [0,1] with labels ``y`` ``(N,)``.

    Runs :func:`~ducat.eval.plan.build_plan`'s attacks with the model in eval mode (its mode is restored
    afterwards). ``cache_dir`` keeps every finished attack, so a rerun resumes."""
    start = time.perf_counter()
    if settings.n_examples is not None:
        x, y = x[:settings.n_examples], y[:settings.n_examples]
    settings = resolve_workers(settings, x.device)
    is_dummy = isinstance(model, DummyClassModel)
    plan = build_plan(settings, is_dummy)
    cache = ResultCache(None if cache_dir is None else Path(cache_dir), run_fingerprint(model, x, y, settings), len(y))
    with eval_mode(model):
        outcome = run_plan(plan, model, x, y, settings, cache, print_progress(progress))
    dummy_index = model.dummy_index.cpu().numpy() if is_dummy else None
    report = build_report(plan, outcome, y.cpu().numpy(), settings, dummy_index, time.perf_counter() - start)
    report.provenance = provenance or {}
    return report


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
    from ducat.models import build_model
    from ducat.runs import model_from_checkpoint, resolve_checkpoint

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


def default_output(target: Path) -> Path:
    """``RUN_DIR/eval`` for a run directory, ``<checkpoint's directory>/eval`` for a file."""
    return (target if target.is_dir() else target.parent) / "eval"


def evaluate_checkpoint(target: str | Path, out: str | Path | None = None, *, eps: float | None = None,
                        settings: dict[str, Any] | None = None, data_root: str | None = None,
                        dataset: str | None = None, model_name: str | None = None, device: str = "auto",
                        progress: bool = True) -> EvalReport:
    """Evaluate a run directory or checkpoint on its dataset's test split and write the report files.

    ``eps`` defaults to the run's training eps and ``data_root`` to the run's ``data.root``; ``settings`` are
    further :class:`EvalSettings` fields."""
    from ducat.runs import select_device

    target = Path(target)
    dev = select_device(device)
    resolve_workers(EvalSettings(eps=eps or 1.0, **(settings or {})), dev)  # checked before any loading
    if dataset is not None:
        dataset_info(dataset)
    model, dataset, train_eps, facts = load_target(target, dataset, model_name)
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
    if channels_last_faster(model, dev):  # the model is ours here, its layout free to choose
        model = model.to(memory_format=torch.channels_last)
    out = Path(out) if out is not None else default_output(target)
    facts = provenance(str(dev)) | {"checkpoint": facts, "examples": f"first {n} of the {dataset} test split",
                                    "examples_sha256": tensor_digest(x, y)}
    report = evaluate(model, x, y, config, cache_dir=out / "eval_cache", progress=progress, provenance=facts)
    write_report(report, out)
    return report
