"""The epoch loop: every base method, with or without DUCAT, from scratch, fine-tuned, forked or resumed."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from ducat.checkpoint import CheckpointError, checkpoint_size_limit, load_weights
from ducat.config import TrainConfig
from ducat.data import TensorLoader, dataset_info, random_crop_flip
from ducat.dummy import deployed_prediction
from ducat.errors import RunError
from ducat.runs import describe_device
from ducat.train.progress import EpochProgress
from ducat.train.setup import (
    build_model,
    build_objective,
    build_optimizer,
    checkpoint_state,
    ducat_active,
    emulated_bf16_warning,
    learning_rate,
    load_data,
    placement,
    prepare_model,
    restore_generator,
    training_autocast,
    use_bf16,
    use_channels_last,
    wrap_distributed,
)
from ducat.train.state import RunResult, RunState
from ducat.train.validate import epoch_validation

DEVICE_BOUND = ("fused", "foreach", "capturable")  # which kernels step; a checkpoint may come from another device


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(saved)``, then ValueError unless the result is this optimizer with other values:
    the same hyperparameters but the learning rate (set every epoch; a resume has the same config), and per-parameter
    state tensors of their parameter's shape (``load_state_dict`` checks neither; a wrong one fails mid-epoch).
    The kernel choices (:data:`DEVICE_BOUND`: fused on CUDA, not on the CPU) stay this optimizer's own."""
    def settings() -> list[dict[str, Any]]:
        return [{k: v for k, v in group.items() if k not in ("params", "lr", *DEVICE_BOUND)}
                for group in optimizer.param_groups]

    expected, own = settings(), [{k: group.get(k) for k in DEVICE_BOUND} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, kernels in zip(optimizer.param_groups, own):  # this device's kernels, not the saving device's
        group.update(kernels)
    if settings() != expected:
        raise ValueError("its optimizer settings differ from the config's")
    for param, values in optimizer.state.items():
        if not all(v is None or isinstance(v, torch.Tensor) and v.shape in (param.shape, torch.Size()) for v in
                   values.values()):
            raise ValueError("its optimizer state does not have the parameters' shapes")


class Trainer:
    """Runs one training configuration: ``Trainer(config).run()``; ``resume=True`` continues the run in
    ``config.run.out`` from its last checkpoint. Process-wide settings (threads, determinism) are the
    caller's: see :func:`ducat.train.setup.setup_runtime`."""

    def __init__(self, config: TrainConfig, resume: bool = False, log: Callable[[str], None] = print):
        self.config, self.resume = config, resume
        self.device, self.dist = placement(config.run.device)
        self.log = log if self.dist.is_main else (lambda line: None)  # one voice: rank 0's
        self.state = RunState(config, self.log, str(self.device))
        self.state.check(resume)
        self.log(describe_device(self.device, config.run.device))
        self.info = dataset_info(config.data.dataset)
        self.model = build_model(config, resume, self.log).to(self.device)  # checkpoint errors before any data
        self.train_data, self.val_data, self.test_data = load_data(config, self.device)
        self.model = prepare_model(self.model, config.run, self.dist, self.device)
        self.channels_last = use_channels_last(config.run, self.model, self.device)
        self.bf16 = use_bf16(config.run)
        if warning := emulated_bf16_warning(config.run, self.device):
            self.log(warning)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.optimizer = build_optimizer(self.model, config)
        self.generator = torch.Generator(device=self.device).manual_seed(config.run.seed)  # shuffling, shared
        # crops, flips and attack starts: the shared generator in one process, a stream per rank under torchrun
        self.stream = torch.Generator(device=self.device) if self.dist.enabled else self.generator
        self.start_epoch = config.finetune.start_epoch if config.finetune.checkpoint else 1
        if resume:
            self._restore()
        if config.run.compile:
            self.model.compile()  # in place: state_dict keys and isinstance checks are unchanged
        self.objective = build_objective(config, self.stream, wrap_distributed(self.model, self.dist, self.device))

    def _restore(self) -> None:
        state = self.state.restore(max_bytes=checkpoint_size_limit(self.model), write=self.dist.is_main)
        path = self.state.saved[0]
        load_weights(self.model, state["model"], str(path))
        try:
            load_optimizer_state(self.optimizer, state["optimizer"])
            restore_generator(self.generator, state["rng"], self.config.run.seed, state["epoch"], self.log)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint '{path}' does not fit this run: its optimizer or RNG state is not "
                                  f"this model's ({type(exc).__name__})") from None
        self.start_epoch = state["epoch"] + 1

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        d = self.config.data
        if not d.augment:
            return x
        return random_crop_flip(x, d.crop_padding, d.flip, self.stream).contiguous(memory_format=self.memory_format)

    def train_epoch(self, epoch: int, progress: Any = None) -> dict[str, float]:
        """One epoch of training; the epoch's training statistics (summed over ranks)."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(epoch, self.config)
        active = ducat_active(epoch, self.config)
        if self.dist.enabled:
            self.stream.manual_seed(self.dist.stream_seed(self.config.run.seed, epoch))
        loader = TensorLoader(self.train_data, self.config.data.batch_size, shuffle=True, generator=self.generator)
        self.model.train()
        totals = torch.zeros(4, device=self.device)  # loss sum, adv correct, clean correct, clean seen
        seen = 0
        check_every = 1 if self.device.type == "cpu" else 50
        for step, (x, y) in enumerate(loader, start=1):
            if self.dist.enabled:  # every rank drew the same global batch; train on this rank's share
                if len(y) < self.dist.world_size:
                    continue  # some rank would get no example (and no loss); every rank skips it alike
                mine = self.dist.shard(len(y))
                x, y = x[mine], y[mine]
            x = x.contiguous(memory_format=self.memory_format)
            with training_autocast(self.bf16, self.device):
                out = self.objective(self.model, x, y, ducat_active=active, augment=self._augment)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if step % check_every == 0 and not torch.isfinite(out.loss):
                raise RunError(f"non-finite loss ({out.loss.item()}) at epoch {epoch}, step {step}; "
                               + self.state.last_good())
            self.optimizer.step()
            with torch.no_grad():
                totals[0] += out.loss.detach().float() * len(y)
                totals[1] += (deployed_prediction(self.model, out.logits_adv) == y).sum()
                if out.logits_clean is not None:
                    totals[2] += (deployed_prediction(self.model, out.logits_clean) == y).sum()
                    totals[3] += len(y)
            seen += len(y)
            if progress is not None:
                progress.step()
        local_seen = seen
        totals = self.dist.all_reduce_sum(torch.cat([totals, torch.tensor([seen], device=self.device)]))
        loss, adv, clean, clean_n, seen = totals.tolist()
        if not math.isfinite(loss):
            raise RunError(f"non-finite loss in epoch {epoch}; " + self.state.last_good())
        return {"train_loss": loss / seen, "train_adv_acc": adv / seen,
                "train_clean_acc": clean / clean_n if clean_n else float("nan"),
                "world_size": self.dist.world_size, "rank0_images": local_seen}

    def run(self, until_epoch: int | None = None) -> RunResult | None:
        """Train from the start epoch to the last (or to ``until_epoch``, leaving the run resumable and
        unfinished: ``None`` is returned). Returns the finished run's result."""
        c, main = self.config, self.dist.is_main
        last_epoch = c.optim.epochs if until_epoch is None else min(until_epoch, c.optim.epochs)
        if main:
            self.state.begin(self.resume, self.start_epoch)
        started = time.perf_counter() - self.state.elapsed_s
        steps = math.ceil(len(self.train_data) / c.data.batch_size)
        progress = EpochProgress(c.run.progress and main, steps, last_epoch, self.log, self.state.run_dir,
                                 c.run.tensorboard and main)
        last: dict[str, Any] = {}
        with progress:
            for epoch in range(self.start_epoch, last_epoch + 1):
                last = self._epoch(epoch, progress, started)
        self.dist.barrier()  # rank 0's last checkpoint is on disk before any rank returns
        wall_time = time.perf_counter() - started
        if until_epoch is not None and last_epoch < c.optim.epochs:
            return None
        if not main:
            return RunResult(self.state.run_dir, c.optim.epochs, self.state.best_epoch, last, last, wall_time)
        return self.state.finish(last, wall_time)

    def _epoch(self, epoch: int, progress: EpochProgress, started: float) -> dict[str, Any]:
        c, state = self.config, self.state
        progress.start_epoch(epoch)
        t0 = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch, "lr": learning_rate(epoch, c), "ducat_active": ducat_active(epoch, c)}
        row.update(self.train_epoch(epoch, progress))
        row["epoch_time_s"] = time.perf_counter() - t0
        row["train_images_per_s"] = len(self.train_data) / row["epoch_time_s"]
        metrics, score = epoch_validation(self.model, self.val_data, self.test_data, c, self.dist)
        row.update(metrics)
        # A DUCAT run's best checkpoint is chosen among its DUCAT epochs: earlier epochs are the plain
        # base method and would make "the DUCAT model" a PGD-AT model in disguise.
        eligible = not c.ducat.enabled or epoch >= c.ducat.start_epoch
        improved = eligible and (c.validation.select == "last" or score >= state.best_metric)
        if improved:
            state.best_metric, state.best_epoch = score, epoch
        row["best_epoch"] = state.best_epoch
        if self.dist.is_main:
            # The metrics row goes first: a crash before the checkpoint re-runs this epoch on resume
            # (rows past the checkpoint are dropped), never a checkpoint without its row.
            state.append_metrics(row)
            progress_fields = {"best_metric": state.best_metric, "best_epoch": state.best_epoch,
                               "wall_time_s": time.perf_counter() - started}
            state.save(epoch, improved, checkpoint_state(self.model, self.optimizer, self.generator, epoch, c,
                                                         progress_fields, self.info.num_classes))
            progress.end_epoch(row)
        return row
