"""Multi-process training through torch.distributed (started by ``torchrun``).

``torchrun --nproc_per_node N -m ducat train PRESET ...`` starts N ranks (gloo on CPU, NCCL on
CUDA, one GPU per rank). Every rank draws the same shuffled global batch and trains on its
contiguous share of it; DistributedDataParallel averages the gradients, so with equal shares a
step equals the one-process step on the global batch (up to floating-point summation order) when
the step has no per-example randomness and no BatchNorm; BatchNorm uses per-rank statistics unless
``run.sync_bn`` (CUDA only: PyTorch's SyncBatchNorm has no CPU kernel). Random starts and
augmentations are drawn per rank from one shared stream: statistically, not bitwise, equivalent.
Only rank 0 writes logs and checkpoints; validation is sharded and the counts are summed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def context_from_env(device_name: str) -> DistContext:
    """Initialise the process group when started by torchrun (``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistContext(rank, world_size, local_rank)

