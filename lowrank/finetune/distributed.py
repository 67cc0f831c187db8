"""The Trainer's data-parallel pieces: process group set-up, per-rank batch slices, DDP / FSDP2 wrapping,
and gathering or scattering tensors that FSDP2 shards.

Every rank sees the same shuffled global batches and takes its own contiguous slice of each
(shard_bounds); a rank whose slice of a short last batch is empty runs one sample of that batch
with weight 0, so every rank runs the same forward/backward passes and collectives.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

__all__ = ["init_distributed", "is_main_process", "barrier", "shard_bounds", "RankBatches", "repeated_blocks",
           "fully_shard_model", "gradient_sync", "full_tensor", "shard_like", "copy_into", "all_reduce_sum",
           "gather_rows"]

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (if not joined yet); returns this rank's device
    (cuda:LOCAL_RANK for a CUDA device). gloo serves CPU devices, nccl CUDA ones."""
    if not dist.is_available():
        raise RuntimeError("TrainConfig.distributed needs torch.distributed, which this torch build lacks")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
        if missing:
            raise RuntimeError(f"TrainConfig.distributed is set but the environment lacks {missing}: launch with "
                               "`torchrun --nproc_per_node N ...` (or initialise torch.distributed yourself)")
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def is_main_process() -> bool:
    """True on rank 0, and in a run that is not distributed."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous slice of `size` items (slice sizes differ by at most one)."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class RankBatches(Sampler):
    """This rank's slice of every batch of `batches` (a batch sampler over the whole data set); an
    empty slice becomes the batch's last index, to be weighted 0 by the caller."""

    def __init__(self, batches: Sampler, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self):
        for batch in self.batches:
            start, stop = shard_bounds(len(batch), self.rank, self.world_size)
            yield batch[start:stop] or batch[-1:]

    def __len__(self) -> int:
        return len(self.batches)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of every outermost nn.ModuleList / nn.Sequential that holds two or more modules
    of one class with parameters (transformer layers, conv stages): FSDP2's per-block units."""
    found, inside = [], None  # inside: the prefix of the last container taken (its blocks are not searched)
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        children = list(module.children())
        if (isinstance(module, (nn.ModuleList, nn.Sequential)) and len(children) >= 2
                and len({type(child) for child in children}) == 1
                and all(any(True for _ in child.parameters()) for child in children)):
            found.extend(children)
            inside = f"{name}." if name else ""
    return found


def fully_shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2: one fully_shard unit per repeated block, then the root for the rest. Frozen parameters
    are sharded and all-gathered for compute like the others, but only parameters that received a
    gradient are reduce-scattered, so frozen weights cost no gradient communication or memory."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def gradient_sync(module: nn.Module, sync: bool):
    """A context in which backward reduces gradients across ranks only when `sync` (the last
    micro-batch of an accumulation window); other micro-batches accumulate locally."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel) and not sync:
        return module.no_sync()
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` sharded as `like` when that is an FSDP2 shard of a tensor of value's shape (every rank
    holds the whole value, so no communication), else `value`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor) and value.shape == like.shape:
        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return value


@torch.no_grad()
def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """target[...] = value, where target may be an FSDP2 shard and every rank holds the whole value."""
    target.copy_(shard_like(value.to(device=target.device, dtype=target.dtype), target))


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all ranks (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's equally sized `local` rows in rank order and keep the first `total`."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)[:total]
