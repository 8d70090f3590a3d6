"""The hand-sharded FSDP2 model of the 2-rank checkpoint jobs (fsdp2_job.py,
proto_sharded_job.py): built with ``fully_shard`` per layer and at the root, and trained on
per-rank seeded batches."""

import torch
from torch.distributed.fsdp import fully_shard

from scale_runner.optim import OptimWrapper


def build():
    """``(model, optim_wrapper)``: the same initial weights on every rank, sharded."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    for layer in (model[0], model[2], model):
        fully_shard(layer)
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2))
    wrapper.bind(None, model)
    return model, wrapper


def train(model, wrapper, first: int, n: int, rank: int) -> None:
    """Iterations ``first .. first + n - 1``; batch ``i`` of rank ``r`` is seeded ``2 i + r``."""
    for i in range(first, first + n):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i * 2 + rank))
        wrapper.update_params(model(x).square().mean())
