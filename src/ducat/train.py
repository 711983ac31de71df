"""The training loop: every base method, with or without DUCAT, from scratch, fine-tuned or resumed.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per
epoch), ``last.pt`` / ``prev.pt`` / ``best.pt`` checkpoints, ``model.safetensors`` (best weights),
``summary.json`` and TensorBoard logs under ``tb/``. A run is never silently restarted: training
into a directory that already holds a checkpoint needs ``resume=True``.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ducat.attacks import PGD
from ducat.checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint
from ducat.config import TrainConfig, config_from_dict, describe
from ducat.data import TensorData, TensorLoader, dataset_info, load_split, random_crop_flip, split_train_val
from ducat.distributed import DistContext, context_from_env
from ducat.dummy import DummyClassModel, project_predictions
from ducat.objectives import METHODS, AttackSettings, DucatSettings, Objective
from ducat.runs import build_run_model, load_into_run_model, select_device


class RunError(RuntimeError):
    """A run that cannot start or continue (existing run without resume, non-finite loss, ...)."""


@dataclass
class RunResult:
    run_dir: Path
    epochs: int
    best_epoch: int
    best: dict[str, Any]
    last: dict[str, Any]
    wall_time_s: float


def learning_rate(epoch: int, config: TrainConfig) -> float:
    """lr of 1-based ``epoch``: ``lr * gamma ** (number of milestones m with epoch > m)``."""
    o = config.optim
    return o.lr * o.gamma ** sum(epoch > m for m in o.milestones)


def ducat_active(epoch: int, config: TrainConfig) -> bool:
    return config.ducat.enabled and epoch >= config.ducat.start_epoch


def build_objective(config: TrainConfig, generator: torch.Generator | None) -> Objective:
    a, m, u = config.attack, config.method, config.ducat
    attack = AttackSettings(a.eps, a.step_size, a.steps, a.mode, a.bn == "eval", a.random_start)
    ducat = DucatSettings(u.alpha, u.beta1, u.beta2)
    extra: dict[str, Any] = {
        "pgd_at": {},
        "trades": {"beta": m.trades_beta},
        "mart": {"beta": m.mart_beta, "exclude_dummy": m.mart_exclude_dummy},
        "consistency": {"lam": m.consistency_lambda, "temperature": m.consistency_temperature},
    }[m.name]
    return METHODS[m.name](attack, ducat, generator=generator, **extra)


def predict(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Deployed prediction: projected for a DUCAT model, argmax otherwise; ``(B,)``."""
    if isinstance(model, DummyClassModel):
        return project_predictions(logits, model.dummy_index)
    return logits.argmax(dim=1)


def deployed_view(model: nn.Module) -> nn.Module:
    """The C-class classifier a user deploys: max-merged logits for DUCAT models."""
    return model.projected("max") if isinstance(model, DummyClassModel) else model


def validate_model(model: nn.Module, data: TensorData, config: TrainConfig, seed: int = 0,
                   autocast: Callable[[], Any] = nullcontext, dist: DistContext = DistContext()) -> dict[str, float]:
    """Clean and PGD accuracy of the deployed (projected) classifier on the first
    ``validation.n_examples`` of ``data`` (sharded across ranks, counts summed).

    The PGD attack targets the projected classifier (CE on max-merged logits), the same steps and
    eps as training, step eps/4. Uses its own seeded generator so it never moves training RNG."""
    v, a = config.validation, config.attack
    n = len(data) if v.n_examples is None else min(len(data), v.n_examples)
    view = deployed_view(model)
    generator = torch.Generator(device=data.images.device).manual_seed(seed + dist.rank)
    attack = PGD(view, a.eps, a.eps / 4, v.pgd_steps, generator=generator)
    counts = torch.zeros(2, device=data.images.device)
    mine = dist.shard(n)
    was_training = model.training
    model.eval()
    try:
        for start in range(mine.start, mine.stop, v.batch_size):
            x = data.images[start:min(mine.stop, start + v.batch_size)].float() / 255
            y = data.labels[start:min(mine.stop, start + v.batch_size)]
            with torch.no_grad(), autocast():
                counts[0] += (view(x).argmax(1) == y).sum()
            with autocast():
                x_adv = attack(x, y)
            with torch.no_grad(), autocast():
                counts[1] += (view(x_adv).argmax(1) == y).sum()
    finally:
        model.train(was_training)
    clean, robust = dist.all_reduce_sum(counts).tolist()
    return {"clean_acc": clean / max(n, 1), "pgd_acc": robust / max(n, 1), "n": n}


class Trainer:
    """Runs one training configuration. ``Trainer(config).run()``; ``resume=True`` continues
    the run in ``config.run.out`` from its last checkpoint."""

    def __init__(self, config: TrainConfig, resume: bool = False, log: Callable[[str], None] = print):
        self.config, self.resume, self.log = config, resume, log
        self.run_dir = Path(config.run.out)
        self._check_run_dir()
        try:
            self.device = select_device(config.run.device)  # a CUDA device on a machine without one
        except ValueError as exc:
            raise RunError(str(exc)) from None
        self.dist = context_from_env(config.run.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        if config.run.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(config.run.seed)
        self.info = dataset_info(config.data.dataset)
        self.model = self._build_model().to(self.device)  # checkpoint errors before reading any data
        self.train_data, self.val_data, self.test_data = self._load_data()
        if config.run.sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise RunError("run.sync_bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel)")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if self._channels_last():
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.optim.lr, momentum=config.optim.momentum,
                                         weight_decay=config.optim.weight_decay)
        self.generator = torch.Generator(device=self.device).manual_seed(config.run.seed)
        self.start_epoch = config.finetune.start_epoch if config.finetune.checkpoint else 1
        self.best_metric, self.best_epoch = -math.inf, 0
        self.saved: tuple[Path, int] | None = None  # the last good checkpoint of this run and its epoch
        if resume:
            self._restore()
        if config.run.compile:
            self.model.compile()  # in place: state_dict keys and isinstance checks are unchanged
        self.objective = build_objective(config, self.generator)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.objective.train_module = DistributedDataParallel(self.model, device_ids=device_ids)

    # ---- setup -------------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        last = self.run_dir / "last.pt"
        if self.resume:
            if not last.exists() and not (self.run_dir / "prev.pt").exists():
                raise RunError(f"nothing to resume: '{self.run_dir}' has no checkpoint (last.pt)")
        elif last.exists():
            raise RunError(f"'{self.run_dir}' already holds a run; pass --resume to continue it, "
                           "or set run.out to a new directory")

    def _load_data(self) -> tuple[TensorData, TensorData, TensorData | None]:
        d = self.config.data
        full = load_split(d.dataset, d.root, train=True)
        if d.n_train is not None:
            full = full.subset(torch.arange(min(d.n_train, len(full))))
        train, val = split_train_val(full, d.val_fraction, self.config.run.seed)
        test = None
        if self.config.validation.select == "test" or d.val_fraction == 0:
            test = load_split(d.dataset, d.root, train=False)
            if d.n_test is not None:
                test = test.subset(torch.arange(min(d.n_test, len(test))))
            test = test.to(self.device)
        return train.to(self.device), val.to(self.device), test

    def _build_model(self) -> nn.Module:
        f = self.config.finetune
        if f.checkpoint is None or self.resume:
            return build_run_model(self.config)
        state = load_checkpoint(f.checkpoint)
        self.log(f"fine-tuning from {f.checkpoint} at epoch {f.start_epoch}")
        return load_into_run_model(self.config, state["model"], f.checkpoint)

    def _channels_last(self) -> bool:
        setting = self.config.run.channels_last
        return setting == "on" or (setting == "auto" and self.device.type == "cuda")

    def autocast(self):
        amp = self.config.run.amp
        use = amp == "bf16" or (amp == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if use else nullcontext()

    def _restore(self) -> None:
        path = self.run_dir / "last.pt"
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            previous = self.run_dir / "prev.pt"
            if not previous.is_file():
                raise
            try:
                state = load_checkpoint(previous)
            except CheckpointError as prev_exc:
                raise CheckpointError(f"cannot resume '{self.run_dir}': {exc}; and the previous checkpoint is "
                                      f"unusable too ({prev_exc})") from None
            self.log(f"warning: {exc}; resuming from the previous checkpoint {previous} instead")
            path = previous
        saved = config_from_dict(json.loads(state["config"]))
        if saved.to_dict() | {"run": None} != self.config.to_dict() | {"run": None}:
            raise RunError(f"the config differs from the one saved in '{self.run_dir}'; resume with the saved "
                           "config (ducat train --resume RUN_DIR) or start a new run")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"].to("cpu"))
        self.start_epoch = state["epoch"] + 1
        self.saved = (path, state["epoch"])
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self._truncate_metrics(state["epoch"])
        self.log(f"resuming {self.run_dir} after epoch {state['epoch']}")

    def _truncate_metrics(self, last_epoch: int) -> None:
        """Drop metric lines written after the checkpoint being resumed (a crash between the two)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        text = path.read_text()
        rows = [line for line in text.splitlines() if line.strip()]
        keep = []
        for line in rows:
            try:
                if json.loads(line)["epoch"] <= last_epoch:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                break  # a torn last line
        kept = "".join(line + "\n" for line in keep)
        if kept != text:  # atomic: a crash here must not lose the rows being kept
            atomic_write_bytes(path, kept.encode())

    # ---- training ----------------------------------------------------------------------------
    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        d = self.config.data
        if not d.augment:
            return x
        return random_crop_flip(x, d.crop_padding, d.flip, self.generator)

    def train_epoch(self, epoch: int, progress: Any = None) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(epoch, self.config)
        active = ducat_active(epoch, self.config)
        loader = TensorLoader(self.train_data, self.config.data.batch_size, shuffle=True, generator=self.generator)
        self.model.train()
        totals = torch.zeros(4, device=self.device)  # loss sum, adv correct, clean correct, clean seen
        seen = 0
        check_every = 1 if self.device.type == "cpu" else 50
        for step, (x, y) in enumerate(loader, start=1):
            if self.dist.enabled:  # every rank drew the same global batch; train on this rank's share
                mine = self.dist.shard(len(y))
                x, y = x[mine], y[mine]
            if self._channels_last():
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                out = self.objective(self.model, x, y, ducat_active=active, augment=self._augment)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if step % check_every == 0 and not torch.isfinite(out.loss):
                raise RunError(f"non-finite loss ({out.loss.item()}) at epoch {epoch}, step {step}; "
                               + self._last_good())
            self.optimizer.step()
            with torch.no_grad():
                totals[0] += out.loss.detach().float() * len(y)
                totals[1] += (predict(self.model, out.logits_adv) == y).sum()
                if out.logits_clean is not None:
                    totals[2] += (predict(self.model, out.logits_clean) == y).sum()
                    totals[3] += len(y)
            seen += len(y)
            if progress is not None:
                progress.update(1)
        local_seen = seen
        totals = self.dist.all_reduce_sum(torch.cat([totals, torch.tensor([seen], device=self.device)]))
        loss, adv, clean, clean_n, seen = totals.tolist()
        if not math.isfinite(loss):
            raise RunError(f"non-finite loss in epoch {epoch}; " + self._last_good())
        return {"train_loss": loss / seen, "train_adv_acc": adv / seen,
                "train_clean_acc": clean / clean_n if clean_n else float("nan"),
                "world_size": self.dist.world_size, "rank0_images": local_seen}

    def _last_good(self) -> str:
        if self.saved is None:
            return f"no checkpoint of this run was written yet ('{self.run_dir / 'last.pt'}' does not exist)"
        return f"the last good checkpoint is {self.saved[0]} (epoch {self.saved[1]}), unchanged"

    def _checkpoint_state(self, epoch: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "config": self.config.to_json(),
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state()},
            "num_classes": self.info.num_classes,
        }

    def run(self) -> RunResult:
        c = self.config
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.run_dir / "config.yaml", describe(c).encode())
            if not self.resume:  # rows of an earlier attempt that crashed before its first checkpoint
                self._truncate_metrics(self.start_epoch - 1)
        writer = self._tensorboard() if main else None
        eval_split = self.val_data if len(self.val_data) else self.test_data
        selection_split = self.test_data if c.validation.select == "test" else eval_split
        start_time = time.perf_counter()
        last: dict[str, Any] = {}
        steps_per_epoch = math.ceil(len(self.train_data) / c.data.batch_size)
        progress = self._progress(steps_per_epoch * (c.optim.epochs - self.start_epoch + 1)) if main else None
        try:
            for epoch in range(self.start_epoch, c.optim.epochs + 1):
                if progress is not None:
                    progress.set_description(f"epoch {epoch}/{c.optim.epochs}")
                t0 = time.perf_counter()
                row: dict[str, Any] = {"epoch": epoch, "lr": learning_rate(epoch, c),
                                       "ducat_active": ducat_active(epoch, c)}
                row.update(self.train_epoch(epoch, progress))
                train_time = time.perf_counter() - t0
                row["epoch_time_s"] = train_time
                row["train_images_per_s"] = len(self.train_data) / train_time
                metrics = validate_model(self.model, eval_split, c, autocast=self.autocast, dist=self.dist)
                row.update({f"val_{k}": v for k, v in metrics.items()})
                if selection_split is not eval_split:
                    test_metrics = validate_model(self.model, selection_split, c, autocast=self.autocast,
                                                  dist=self.dist)
                    row.update({f"test_{k}": v for k, v in test_metrics.items()})
                    score = test_metrics["pgd_acc"]
                else:
                    score = metrics["pgd_acc"]
                # A DUCAT run's best checkpoint is chosen among its DUCAT epochs: earlier epochs are the
                # plain base method and would make "the DUCAT model" a PGD-AT model in disguise.
                eligible = not c.ducat.enabled or epoch >= c.ducat.start_epoch
                improved = eligible and (c.validation.select == "last" or score >= self.best_metric)
                if improved:
                    self.best_metric, self.best_epoch = score, epoch
                row["best_epoch"] = self.best_epoch
                last = row
                if not main:
                    continue
                # The metrics row goes first: a crash before the checkpoint below re-runs this epoch on
                # resume (rows past the checkpoint are dropped), never a checkpoint without its row.
                self._append_metrics(row)
                self._save_checkpoints(epoch, improved)
                if writer is not None:
                    for key, value in row.items():
                        if isinstance(value, (int, float)) and key != "epoch":
                            writer.add_scalar(key, value, epoch)
                    writer.flush()
                if progress is not None:
                    progress.set_postfix(loss=f"{row['train_loss']:.3f}", val_clean=f"{metrics['clean_acc']:.3f}",
                                         val_pgd=f"{metrics['pgd_acc']:.3f}")
                else:
                    self.log(f"epoch {epoch}: loss {row['train_loss']:.4f} val clean {metrics['clean_acc']:.4f} "
                             f"val pgd {metrics['pgd_acc']:.4f} ({train_time:.1f}s)")
        finally:
            if progress is not None:
                progress.close()
            if writer is not None:
                writer.close()
        wall_time = time.perf_counter() - start_time
        self.dist.barrier()  # rank 0's last checkpoint is on disk before any rank returns
        if not main:
            return RunResult(self.run_dir, c.optim.epochs, self.best_epoch, last, last, wall_time)
        return self._finish(last, wall_time)

    def _save_checkpoints(self, epoch: int, improved: bool) -> None:
        state = self._checkpoint_state(epoch)
        targets = [("best.pt", False)] if improved else []
        targets.append(("last.pt", True))
        if epoch in self.config.run.save_epochs:
            targets.append((f"epoch_{epoch}.pt", False))
        for name, keep_previous in targets:
            try:
                save_checkpoint(state, self.run_dir / name, keep_previous=keep_previous)
            except OSError as exc:  # disk full, quota, permissions: say so in one line, keep the old file
                raise RunError(f"cannot write checkpoint {self.run_dir / name} at epoch {epoch} "
                               f"({exc.strerror or exc}); {self._last_good()}") from None
            if name == "last.pt":
                self.saved = (self.run_dir / name, epoch)

    def _finish(self, last: dict[str, Any], wall_time: float) -> RunResult:
        rows = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines() if line]
        best = next((r for r in rows if r["epoch"] == self.best_epoch), rows[-1])
        last = last or rows[-1]
        best_state = load_checkpoint(self.run_dir / "best.pt")
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in best_state["model"].items()},
                  str(self.run_dir / "model.safetensors"), metadata={"config": self.config.to_json()})
        summary = {"run_dir": str(self.run_dir), "epochs": self.config.optim.epochs, "best_epoch": self.best_epoch,
                   "selected_on": self.config.validation.select, "best": best, "last": last,
                   "wall_time_s": wall_time}
        atomic_write_bytes(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        return RunResult(self.run_dir, self.config.optim.epochs, self.best_epoch, best, last, wall_time)

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _tensorboard(self):
        if not self.config.run.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tb"))

    def _progress(self, total: int):
        if not self.config.run.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)


def train(config: TrainConfig, resume: bool = False, log: Callable[[str], None] = print) -> RunResult:
    """Train one configuration; see :class:`Trainer`."""
    return Trainer(config, resume=resume, log=log).run()
