"""Building run models from configs and checkpoints, and picking devices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ducat.checkpoint import CheckpointError, checkpoint_config, classifier_outputs, load_checkpoint, load_weights
from ducat.config import TrainConfig, config_from_dict
from ducat.data import dataset_info
from ducat.dummy import check_pairing, make_pairing, widen_model
from ducat.models import build_model
from ducat.runtime import cuda_unavailable_reason, native_bf16


def select_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when usable, else CPU. ValueError, naming what was found, when ``cuda`` or ``cuda:N``
    is asked for and cannot be used."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise ValueError(f"device '{name}' requested but CUDA cannot be used: {reason}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}' requested but this process sees {torch.cuda.device_count()} GPU(s)")
    return device


def describe_device(device: torch.device, requested: str = "auto") -> str:
    """One line naming the device a run computes on, e.g. ``device: cuda:0 (NVIDIA H100, 79 GiB, native bf16)``;
    for ``auto`` on a CPU, why no GPU is used."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        bf16 = "native bf16" if native_bf16(torch.device("cuda", index)) else "bf16 emulated"
        return f"device: cuda:{index} ({props.name}, {props.total_memory / 2**30:.0f} GiB, {bf16})"
    why = f" (no GPU used: {cuda_unavailable_reason()})" if requested == "auto" and device.type == "cpu" else ""
    return f"device: {device}{why}"


def build_plain_model(config: TrainConfig) -> nn.Module:
    """The C-output classifier of a config (normalization inside when ``model.normalize``)."""
    info = dataset_info(config.data.dataset)
    mean, std = (info.mean, info.std) if config.model.normalize else (None, None)
    return build_model(config.model.name, info.num_classes, info.in_channels, mean, std)


def build_run_model(config: TrainConfig) -> nn.Module:
    """A fresh model for a config: 2C-output :class:`DummyClassModel` when DUCAT is enabled."""
    model = build_plain_model(config)
    if not config.ducat.enabled:
        return model
    num_classes = dataset_info(config.data.dataset).num_classes
    return widen_model(model, make_pairing(num_classes, config.ducat.pairing_seed), dummy_init="random")


def load_into_run_model(config: TrainConfig, weights: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Model for ``config`` initialised from ``weights`` (C- or 2C-output checkpoint).

    A C-output checkpoint loaded into a DUCAT config is widened (dummy rows per
    ``ducat.dummy_init``); a 2C checkpoint keeps its own pairing."""
    num_classes = dataset_info(config.data.dataset).num_classes
    outputs = classifier_outputs(weights)
    if outputs not in (num_classes, 2 * num_classes):
        raise CheckpointError(f"checkpoint '{source}' has {outputs} outputs; {config.data.dataset} needs "
                              f"{num_classes} (plain) or {2 * num_classes} (DUCAT)")
    if outputs == 2 * num_classes:
        if not config.ducat.enabled:
            raise CheckpointError(f"checkpoint '{source}' is a DUCAT model ({outputs} outputs); "
                                  "set ducat.enabled=true to continue it")
        if "dummy_index" not in weights:
            raise CheckpointError(f"checkpoint '{source}' has 2C outputs but no 'dummy_index' pairing")
        if not _is_pairing(weights["dummy_index"], num_classes):
            raise CheckpointError(f"checkpoint '{source}' has a 'dummy_index' that is not a permutation of "
                                  f"[{num_classes}, {2 * num_classes})")
        plain = build_plain_model(config)
        wide = widen_model(plain, weights["dummy_index"], dummy_init="random")
        load_weights(wide, weights, source)
        return wide
    plain = build_plain_model(config)
    load_weights(plain, weights, source)
    if not config.ducat.enabled:
        return plain
    return widen_model(plain, make_pairing(num_classes, config.ducat.pairing_seed), dummy_init=config.ducat.dummy_init)


def _is_pairing(dummy_index: torch.Tensor, num_classes: int) -> bool:
    try:
        check_pairing(dummy_index)
    except ValueError:
        return False
    return dummy_index.numel() == num_classes


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path stands for: a file itself; a run directory's ``best.pt``, else its ``last.pt``."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = next((p for p in (path / "best.pt", path / "last.pt") if p.is_file()), None)
    if found is None:
        raise CheckpointError(f"run directory '{path}' has no best.pt or last.pt")
    return found


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild the model of a ducat checkpoint (or run directory) with its saved config."""
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    saved = checkpoint_config(state, path)
    if saved is None:
        raise CheckpointError(f"checkpoint '{path}' has no ducat config; build the model yourself and "
                              "pass it to ducat.evaluate (or use --model/--dataset)")
    saved.setdefault("finetune", {})["checkpoint"] = None  # the source may be gone; not needed here
    saved.setdefault("run", {})["out"] = str(path.parent)  # where it was trained may be gone or reused
    config = config_from_dict(saved)
    model = load_into_run_model(config, state["model"], str(path))
    return model, config, state

