"""Run by tests/test_distributed.py under torchrun: the classifier's gradients under DDP equal one process's.

Each process computes, in float64, one process's gradient of paper A's 3D
ResNet50 on the whole global batch, then its own share under
DistributedDataParallel with global-batch batch norm; it prints the worst
relative difference. (In float32 a width-4 ResNet50's gradients at
initialisation change by several percent with the order of a sum alone, so
only float64 tells a wrong gradient from rounding.)
"""

import copy

import torch
import torch.distributed as dist

from lungseg import distributed
from lungseg.configs import make_config

world, device = distributed.setup("cpu")
torch.manual_seed(0)
reference = make_config("cls", arch="resnet3d50", width=4).build_model().double()
model = distributed.prepare(copy.deepcopy(reference), world, device)
ddp = distributed.wrap(model, world, device)
x = torch.rand(4, 1, 8, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
y = torch.tensor([0, 1, 0, 1])
torch.nn.functional.cross_entropy(reference(x), y).backward()
share = slice(2 * world.rank, 2 * world.rank + 2)
torch.nn.functional.cross_entropy(ddp(x[share]), y[share]).backward()
worst = max(float((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12))
            for a, b in zip(model.parameters(), reference.parameters()))
running = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(), reference.state_dict().values())
              if a.is_floating_point())
print(f"rank {world.rank}: worst relative gradient difference {worst:.3g}, running statistics {running:.3g}",
      flush=True)
dist.barrier()
distributed.teardown(world)
