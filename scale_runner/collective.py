"""Small agreements between ranks, on the CPU, so that a GPU run never syncs its device for
them: a gloo group of all ranks and an element-wise maximum of a few integers."""
from __future__ import annotations


def cpu_group():
    """A gloo group of all ranks (created collectively), or the default group when that is
    gloo already. Its all-reduce of CPU integers involves no accelerator."""
    import torch.distributed as dist
    if dist.get_backend() == 'gloo':
        return dist.group.WORLD
    return dist.new_group(backend='gloo')


def agree_max(values: list[int], group) -> list[int]:
    """Each value's maximum over all ranks: one all-reduce of a few CPU integers."""
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()
