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

    def __init__(self):
        self._per_iter: bool | None = None  # whether an iteration scheduler exists (before_train)

    def before_train(self, runner) -> None:
        self._per_iter = any(not s.by_epoch for s in runner.param_schedulers)

    def overrides(self, point: str) -> bool:
        # Asked when a point is first called (after before_train): a run with no iteration
        # scheduler has no call per iteration (each hook call costs ~1% of a small model's step)
        if point == 'after_train_iter' and self._per_iter is False:
            return False
        return super().overrides(point)

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
