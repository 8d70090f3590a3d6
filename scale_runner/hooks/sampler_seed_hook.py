"""DistSamplerSeedHook: MMEngine's ``sampler_seed`` default hook."""
from __future__ import annotations

from ..data import set_epoch
from ..registry import HOOKS
from .hook import Hook


@HOOKS.register_module()
class DistSamplerSeedHook(Hook):
    """Sets the epoch of the train sampler (and of an Accelerate-prepared loader) before each
    epoch, so shuffling differs per epoch and agrees across ranks.

    The built-in train loops do this themselves too, so removing the hook never repeats a data
    order; it is kept for custom train loops and for MMEngine configs that name it.
    """

    priority = 'NORMAL'

    def before_train_epoch(self, runner) -> None:
        set_epoch(runner.train_loop.dataloader, runner.epoch)
