"""What a run is built from: the schedule, the objective, the model, the data, the optimizer, the DDP wrapper,
and the process-wide runtime settings (set by the caller, never by a constructor)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ducat.checkpoint import checkpoint_size_limit, load_checkpoint
from ducat.config import RunConfig, TrainConfig
from ducat.data import TensorData, load_split, split_train_val
from ducat.distributed import DistContext, context_from_env
from ducat.errors import RunError
from ducat.models import deterministic_pooling
from ducat.objectives import METHODS, AttackSettings, DucatSettings, Objective
from ducat.runs import build_run_model, load_into_run_model, select_device
from ducat.runtime import (
    channels_last_faster,
    configure_determinism,
    configure_threads,
    derive_seed,
    native_bf16,
)


def setup_runtime(run: RunConfig) -> int:
    """Process-wide torch settings of a run: intra-op threads (``run.threads``, automatic when unset) and
    deterministic algorithms. Returns the thread count."""
    threads = configure_threads(run.threads)
    configure_determinism(run.deterministic)
    return threads


def run_device(requested: str) -> torch.device:
    """The device ``run.device`` names (:func:`ducat.runs.select_device`); RunError, one line naming what was found,
    when it cannot be used."""
    try:
        return select_device(requested)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def placement(requested: str) -> tuple[torch.device, DistContext]:
    """The device of this process (:func:`run_device`; a torchrun rank's own GPU) and its torchrun context;
    RunError (one line) when they cannot be had."""
    device = run_device(requested)
    try:
        dist = context_from_env(requested)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return device, dist


def use_channels_last(run: RunConfig, model: nn.Module, device: torch.device) -> bool:
    """Whether the run keeps the model and its inputs channels_last: ``run.channels_last``, where auto means
    where it is faster (models with 2-d convolutions; :func:`ducat.runtime.channels_last_faster`)."""
    return run.channels_last == "on" or (run.channels_last == "auto" and channels_last_faster(model, device))


def use_bf16(run: RunConfig) -> bool:
    """Whether the training step runs under bf16 autocast: only with ``run.amp=bf16``. auto trains in fp32:
    in the measured comparison bf16-trained models did not match the fp32 ones' accuracy
    (docs/performance.md, "bf16 accuracy")."""
    return run.amp == "bf16"


def emulated_bf16_warning(run: RunConfig, device: torch.device) -> str | None:
    """A warning when ``run.amp=bf16`` asks for bf16 where the hardware has none (emulated: slower than fp32)."""
    if run.amp == "bf16" and not native_bf16(device):
        return f"run.amp=bf16: {device} has no native bf16 (AVX512-BF16, AMX or CUDA), so it runs slower than fp32"
    return None


def training_autocast(enabled: bool, device: torch.device):
    """The autocast context of the training step (bf16 when ``enabled``); attacks for evaluation never use it."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def learning_rate(epoch: int, config: TrainConfig) -> float:
    """lr of 1-based ``epoch``: ``lr * gamma ** (number of milestones m with epoch > m)``."""
    o = config.optim
    return o.lr * o.gamma ** sum(epoch > m for m in o.milestones)


def ducat_active(epoch: int, config: TrainConfig) -> bool:
    return config.ducat.enabled and epoch >= config.ducat.start_epoch


def build_objective(config: TrainConfig, generator: torch.Generator | None,
                    forward_module: nn.Module | None = None) -> Objective:
    """The method's objective; ``forward_module`` (e.g. the DDP wrapper) runs the training forward pass."""
    a, u = config.attack, config.ducat
    attack = AttackSettings(eps=a.eps, step_size=a.step_size, steps=a.steps, mode=a.mode, bn_eval=a.bn == "eval",
                            random_start=a.random_start, norm=a.norm,
                            fold_bn=not config.run.compile)  # the folded graph runs eagerly
    ducat = DucatSettings(alpha=u.alpha, beta1=u.beta1, beta2=u.beta2)
    method = METHODS[config.method.name]
    return method(attack, ducat, generator, forward_module, params=method.Params(**config.method.params))


def build_model(config: TrainConfig, resume: bool, log) -> nn.Module:
    """A fresh model, or (``finetune.checkpoint``, not resuming) the fine-tuning start, seeded by ``run.seed``
    without touching the global RNG."""
    f = config.finetune
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        model = build_run_model(config)
        if f.checkpoint is None or resume:
            return model
        state = load_checkpoint(f.checkpoint, max_bytes=checkpoint_size_limit(model))
        log(f"fine-tuning from {f.checkpoint} at epoch {f.start_epoch}")
        return load_into_run_model(config, state["model"], f.checkpoint)


def load_data(config: TrainConfig, device: torch.device) -> tuple[TensorData, TensorData, TensorData | None]:
    """(train, validation, test or None) on ``device``; the test split only when it selects or validates."""
    d = config.data
    full = load_split(d.dataset, d.root, train=True)
    if d.n_train is not None:
        full = full.subset(torch.arange(min(d.n_train, len(full))))
    train, val = split_train_val(full, d.val_fraction, config.run.seed)
    test = None
    if config.validation.select == "test" or d.val_fraction == 0:
        test = load_split(d.dataset, d.root, train=False)
        if d.n_test is not None:
            test = test.subset(torch.arange(min(d.n_test, len(test))))
        test = test.to(device)
    return train.to(device), val.to(device), test


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay; on CUDA the fused kernel (one launch per step for all parameters)."""
    o = config.optim
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           fused=fused or None)


def use_sync_bn(run: RunConfig, dist: DistContext, device: torch.device, model: nn.Module) -> bool:
    """Whether BatchNorm statistics are synchronised across torchrun ranks: ``run.sync_bn``, where auto means on
    for a multi-process CUDA run of a model with BatchNorm (a global batch then normalises as on one GPU).
    RunError for ``on`` without CUDA: PyTorch's SyncBatchNorm has no CPU kernel."""
    if not dist.enabled or run.sync_bn == "off":
        return False
    if run.sync_bn == "on" and device.type != "cuda":
        raise RunError("run.sync_bn=on needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel)")
    return device.type == "cuda" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def prepare_model(model: nn.Module, run: RunConfig, dist: DistContext, device: torch.device) -> nn.Module:
    """The model as this process trains it: SyncBatchNorm across CUDA ranks (:func:`use_sync_bn`), and adaptive
    pooling whose backward is deterministic in deterministic mode on CUDA (:func:`deterministic_pooling`)."""
    if use_sync_bn(run, dist, device, model):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if run.deterministic and device.type == "cuda":
        deterministic_pooling(model)
    return model


GENERATOR_STATE_BYTES = {"cpu": torch.Generator().get_state().numel(), "cuda": 16}  # mt19937; philox seed + offset


def restore_generator(generator: torch.Generator, rng: dict[str, Any], seed: int, epoch: int, log) -> None:
    """Set ``generator`` to the saved state of a checkpoint's ``rng`` entry. A state saved on another device type
    (:data:`GENERATOR_STATE_BYTES`) cannot continue here: the generator is then seeded from ``seed`` and the
    checkpoint's ``epoch`` instead, with a warning (weights and optimizer state continue exactly, the random
    stream does not). ValueError for a state of neither device type's size."""
    saved, here = rng["generator"], generator.device.type
    sizes = {device: n for device, n in GENERATOR_STATE_BYTES.items() if n == saved.numel()}
    saved_on = rng.get("device", here if here in sizes else next(iter(sizes), None))
    if saved_on not in sizes:
        raise ValueError(f"a random state of {saved.numel()} bytes is no generator's")
    if saved_on == here:
        generator.set_state(saved.to("cpu"))
        return
    generator.manual_seed(derive_seed(seed, "resumed on another device after epoch", epoch))
    log(f"warning: the checkpoint's random state comes from a {saved_on} generator and cannot continue on "
        f"{here}; the random stream restarts from run.seed and epoch {epoch}, so this run will "
        "not be bit-identical to one trained on a single device")


def wrap_distributed(model: nn.Module, dist: DistContext, device: torch.device) -> nn.Module:
    """The module the training forward pass runs through: DistributedDataParallel across torchrun ranks
    (gradients averaged), the model itself in one process."""
    if not dist.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, epoch: int,
                     config: TrainConfig, progress: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Everything a resume needs, as plain data and tensors (``weights_only`` loadable)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "config": config.to_json(), "num_classes": num_classes,
            "rng": {"generator": generator.get_state(), "device": generator.device.type}, **progress}
