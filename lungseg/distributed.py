"""Training on several processes: ``torchrun`` and DistributedDataParallel.

``torchrun --nproc-per-node N --no-python lungseg train-seg ...`` (or ``train-cls``)
trains one network on N processes, each on its own GPU (NCCL) or, without
GPUs, on the CPU (gloo). Nothing else changes:

- **One data order.** Each epoch's order is the single-process one
  (:class:`lungseg.datasets.EpochSampler`, drawn from (seed, epoch)); every
  global batch of ``--batch-size`` items is cut into one equal share per
  process (:class:`ShardSampler`). Gradients are averaged over the processes,
  so a step is the step of one process on the whole global batch, and the
  exact-resume guarantee of :mod:`lungseg.train` holds unchanged.
- **Batch norm over the global batch.** Batch-norm statistics are those of
  the global batch, as in one process: PyTorch's ``SyncBatchNorm`` on GPUs,
  :class:`SyncBatchNorm` here on the CPU, where PyTorch's refuses.
- **Rank 0 writes**: checkpoints, the log, the curves, the progress display.

The losses then equal those of one process with the same global batch, to
float rounding, when each global batch divides evenly among the processes. A
last, smaller batch of an epoch is split as evenly as it goes (its step then
weighs each process's share alike), and is dropped when it holds fewer items
than there are processes, which would leave one without work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from .device import resolve_device
from .errors import TrainingError


@dataclass(frozen=True)
class World:
    """This process's place among those ``torchrun`` started (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that writes (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The world ``torchrun`` describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (none: one process)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise TrainingError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them)") from None
    if size < 1 or not 0 <= rank < size:
        raise TrainingError(f"RANK {rank} is not within WORLD_SIZE {size}")
    return World(rank, size, local)


def setup(device_name: str) -> tuple[World, torch.device]:
    """This process's world and device, joining the process group when torchrun started several.

    With CUDA, each process takes the GPU of its local rank (NCCL); on the
    CPU the processes talk over gloo.
    """
    world = world_from_env()
    device = resolve_device(device_name)
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def teardown(world: World) -> None:
    """Leave the process group :func:`setup` joined."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def local_batch_size(global_batch: int, world: World) -> int:
    """Each process's share of a global batch; refused when it does not divide evenly."""
    if global_batch % world.size:
        raise TrainingError(f"--batch-size {global_batch} does not divide among {world.size} processes; "
                            f"use a multiple of {world.size}")
    return global_batch // world.size


class ShardSampler(Sampler):
    """This process's share of every global batch of another sampler's epoch order.

    ``sampler`` gives the whole epoch's order (an :class:`EpochSampler`);
    global batch ``k`` is items ``k B .. (k + 1) B - 1`` of it, and process
    ``r`` takes the ``r``-th of its ``W`` equal shares (of a last, smaller
    batch: the ``r``-th of ``W`` near-equal shares, none when it has fewer
    than ``W`` items). With one process it yields the sampler's order as is.
    """

    def __init__(self, sampler, global_batch: int, world: World):
        self.sampler, self.global_batch, self.world = sampler, global_batch, world
        self.local = local_batch_size(global_batch, world)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def _share(self, start: int, n: int) -> range:
        """Positions (in the epoch's order) of this process's share of the global batch at ``start`` of size n."""
        if n == self.global_batch:
            first = start + self.world.rank * self.local
            return range(first, first + self.local)
        if n < self.world.size:
            return range(0)
        part = np.array_split(np.arange(start, start + n), self.world.size)[self.world.rank]
        return range(int(part[0]), int(part[-1]) + 1)

    def _positions(self, n: int) -> list[int]:
        return [i for start in range(0, n, self.global_batch)
                for i in self._share(start, min(self.global_batch, n - start))]

    def __len__(self) -> int:
        return len(self._positions(len(self.sampler)))

    def __iter__(self) -> Iterator:
        order = list(self.sampler)
        return iter([order[i] for i in self._positions(len(order))])


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, with the gradient summed back (each process's input feeds every process's output)."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.clone()
        dist.all_reduce(g)
        return g


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are the global batch's, over every process; on any device.

    PyTorch's ``SyncBatchNorm`` runs on GPUs only. This one sums each
    channel's count and sum over the processes (gloo on the CPU; the mean
    first, then the squared deviations from it, as batch norm
    itself does), so the output, the gradients and the running statistics are those
    of one process normalising the whole global batch. Outside training, or
    in one process, it is plain batch norm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected input of (N, C, ...), got {x.dim()} dimensions")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        channels = x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() / channels, dtype=x.dtype, device=x.device)
        sums = _AllReduceSum.apply(torch.cat([count, x.sum(dims)]))      # two passes, as batch norm's own
        n = sums[0]
        mean = sums[1:] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / max(float(n) - 1, 1.0), momentum)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def _sync_batch_norms(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every batch norm computing global-batch statistics (same parameters and buffers)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        like = next(iter(module.state_dict().values()), None)
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, device=device,
                             dtype=like.dtype if like is not None and like.is_floating_point() else None)
        sync.load_state_dict(module.state_dict())
        return sync
    for name, child in module.named_children():
        setattr(module, name, _sync_batch_norms(child, device))
    return module


def prepare(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The network to build the optimizer on: batch norms over the global batch when several processes train."""
    return _sync_batch_norms(model, device) if world.distributed else model


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The network to train: DistributedDataParallel over the processes (one process: the network itself)."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_over_processes(total: float, count: int, world: World) -> float:
    """``sum(total) / sum(count)`` over the processes: an epoch's mean loss over the global batches."""
    if not world.distributed:
        return total / max(count, 1)
    t = torch.tensor([total, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / max(float(t[1]), 1.0))


def any_process(flag: bool, world: World) -> bool:
    """True when ``flag`` holds on any process (all take the same decision, e.g. to skip a step)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t)
    return bool(t.item() > 0)
