"""Multi-process training through torch.distributed (started by ``torchrun``).

``torchrun --nproc_per_node N -m ducat train PRESET ...`` starts N ranks (gloo on CPU, NCCL on
CUDA, one GPU per rank). Every rank draws the same shuffled global batch (one shared generator) and
trains on its contiguous share of it; DistributedDataParallel averages the gradients. Random crops,
flips and attack random starts come from a stream of each rank's own, reseeded from the run's seed,
the epoch and the rank at every epoch (:meth:`DistContext.stream_seed`), so no two ranks draw the same
augmentation and a resume continues every rank's stream exactly. BatchNorm statistics are synchronised
across ranks on CUDA (``run.sync_bn=auto``), so a global batch of 128 normalises as on one GPU; PyTorch's
SyncBatchNorm has no CPU kernel, so gloo ranks keep per-rank statistics. With equal shares and no
per-example randomness or BatchNorm, a step equals the one-process step on the global batch up to
floating-point summation order. A global batch smaller than the world size (a last batch of a few
images) is skipped by every rank: a rank with no examples would have no loss. Only rank 0 writes logs and
checkpoints; validation is sharded and the counts are summed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ducat.runtime import derive_seed


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """Contiguous share of ``n`` rows for this rank (as ``torch.tensor_split``)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def stream_seed(self, seed: int, epoch: int) -> int:
        """Seed of this rank's augmentation and attack stream in ``epoch`` (63 bits)."""
        return derive_seed(seed, "epoch", epoch, "rank", self.rank)


def context_from_env(device_name: str) -> DistContext:
    """Initialise the process group when started by torchrun (``WORLD_SIZE`` > 1): NCCL with one GPU per
    process (its ``LOCAL_RANK``) when the run uses CUDA, gloo otherwise. ValueError, before any process group
    exists, when this node has fewer GPUs than torchrun started processes on it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        if use_cuda:
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            if local_size > torch.cuda.device_count():
                raise ValueError(f"torchrun started {local_size} processes on this node but it has "
                                 f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node <= the GPU count "
                                 "(or run.device=cpu for gloo)")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)  # before the group, so NCCL binds this process to its own GPU
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return DistContext(rank, world_size, local_rank)


def close_process_group() -> None:
    """End the process group of this process, if one was started (NCCL warns about a leaked one at exit).

    All ranks meet at a barrier first: rank 0 hosts the rendezvous store, and a rank that tears the group down while
    another still uses it can abort at exit ("terminate called without an active exception", seen with gloo on a
    loaded machine)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
