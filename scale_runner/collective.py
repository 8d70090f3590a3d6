"""The few agreements between ranks, in one place. Each is a no-op on one process.

- :func:`from_main`: a small Python object decided on the main process, the same on all;
- :func:`gather`: one small Python object per rank, in rank order, on every rank;
- :func:`agree_max`: a few integers' maxima (a flag any rank raised), over a CPU (gloo)
  group, so a GPU run never syncs its device for them: :func:`cpu_group`.

Tensors of data (a NaN guard's losses, buffers, metrics) are reduced where they live, on
their device, by the code that owns them.
"""
from __future__ import annotations

from typing import Any


def _world() -> int:
    import sys
    dist = sys.modules.get('torch.distributed')  # nothing to agree on if it was never imported
    return dist.get_world_size() if dist is not None and dist.is_available() and dist.is_initialized() else 1


def from_main(obj: Any) -> Any:
    """The main process's ``obj`` on every rank (picklable objects only)."""
    if _world() == 1:
        return obj
    from accelerate.utils import broadcast_object_list
    box = [obj]
    broadcast_object_list(box)
    return box[0]


def gather(obj: Any, group=None) -> list:
    """Every rank's ``obj``, in rank order, on every rank (over ``group``: a group of all
    ranks, e.g. a background checkpoint's own, or the default one)."""
    if _world() == 1:
        return [obj]
    if group is not None:
        import torch.distributed as dist
        out: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out
    from accelerate.utils import gather_object
    return gather_object([obj])


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


def background_groups() -> tuple:
    """Two new gloo groups of all ranks (collective), ``(None, None)`` on one process: one for
    a background checkpoint's agreements, one for the training thread's polls of it. Each
    group's collectives must come from one thread, in the same order on every rank."""
    if _world() == 1:
        return None, None
    import torch.distributed as dist
    return dist.new_group(backend='gloo'), dist.new_group(backend='gloo')
