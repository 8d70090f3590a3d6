"""SyncBuffersHook: average buffers (BatchNorm statistics) across processes before validation."""
from __future__ import annotations

import torch

from ..model import unwrap
from ..registry import HOOKS
from .hook import Hook


def all_reduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    """Replace each tensor by its mean over the processes: one all-reduce per dtype and device."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@HOOKS.register_module()
class SyncBuffersHook(Hook):
    """MMEngine's ``SyncBuffersHook``: before every validation epoch, each floating-point buffer
    of the model (BatchNorm ``running_mean`` / ``running_var``, ...) is replaced by its mean over
    all processes, so every rank validates the same model. Integer buffers
    (``num_batches_tracked``) are equal everywhere and left alone. Nothing happens on one process.

    Runs at ``ABOVE_NORMAL`` so the buffers are synchronised before ``EMAHook`` swaps the
    averaged weights in.
    """

    priority = 'ABOVE_NORMAL'

    def before_val_epoch(self, runner) -> None:
        world = runner.accelerator.num_processes
        if world > 1:
            bufs = [b for b in unwrap(runner.model).buffers() if b.is_floating_point()]
            if bufs:
                with torch.no_grad():
                    all_reduce_mean(bufs, world)
