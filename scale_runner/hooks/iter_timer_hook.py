"""IterTimerHook: per-iteration ``time`` / ``data_time`` and the ETA."""
from __future__ import annotations

import time

from ..registry import HOOKS
from .hook import Hook


@HOOKS.register_module()
class IterTimerHook(Hook):
    """Records ``data_time`` (waiting for the batch) and ``time`` (the whole iteration)."""

    priority = 'NORMAL'

    def __init__(self):
        self._last = 0.0
        self._start_time = 0.0
        self._start_iter = 0

    def _reset(self, runner) -> None:
        self._last = time.perf_counter()

    def before_train(self, runner) -> None:
        self._start_time = time.perf_counter()
        self._start_iter = runner.iter
        self._last = self._start_time

    def before_train_epoch(self, runner) -> None:
        self._reset(runner)

    def before_val_epoch(self, runner) -> None:
        self._reset(runner)

    def before_test_epoch(self, runner) -> None:
        self._reset(runner)

    def _before_iter(self, runner, batch_idx, data_batch=None) -> None:
        now = time.perf_counter()
        runner.log_buffer.update('data_time', now - self._last)

    def _after_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        now = time.perf_counter()
        runner.log_buffer.update('time', now - self._last)
        self._last = now

    before_train_iter = before_val_iter = before_test_iter = _before_iter
    after_train_iter = after_val_iter = after_test_iter = _after_iter

    def eta_seconds(self, runner) -> float:
        done = runner.iter - self._start_iter
        if done <= 0 or not runner.max_iters:
            return 0.0
        elapsed = time.perf_counter() - self._start_time
        return elapsed / done * (runner.max_iters - runner.iter)
