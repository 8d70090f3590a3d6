"""ParamSchedulerHook: steps the parameter schedulers once per optimizer update / epoch."""
from __future__ import annotations

from ..registry import HOOKS
from .hook import Hook


@HOOKS.register_module()
class ParamSchedulerHook(Hook):
    """Iteration schedulers step after every optimizer *update* (``runner.state.stepped``: not
    every micro-batch, and once whatever the number of processes); epoch schedulers after every
    epoch."""

    priority = 'LOW'

    def before_train(self, runner) -> None:
        # no iteration scheduler: no call per iteration (each costs ~1% of a small model's step)
        per_iter = any(not s.by_epoch for s in runner.param_schedulers)
        self.idle_points = frozenset() if per_iter else frozenset({'after_train_iter'})

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if not runner.state.stepped:
            return
        for s in runner.param_schedulers:
            if not s.by_epoch:
                s.step()

    def after_train_epoch(self, runner) -> None:
        for s in runner.param_schedulers:
            if s.by_epoch:
                s.step()
