"""EmptyCacheHook: release PyTorch's cached GPU memory at epoch / iteration boundaries."""
from __future__ import annotations

import torch

from ..registry import HOOKS
from .hook import Hook


@HOOKS.register_module()
class EmptyCacheHook(Hook):
    """MMEngine's ``EmptyCacheHook``: ``torch.cuda.empty_cache()`` before every epoch
    (``before_epoch``), after every epoch (``after_epoch``, default) and/or after every iteration
    (``after_iter``) of training, validation and test. Helps when other processes share the GPU
    or memory fragments; it costs a synchronisation each time, so ``after_iter`` is slow.
    Without CUDA it does nothing. ``calls`` counts the boundaries at which it ran.
    """

    priority = 'NORMAL'

    def __init__(self, before_epoch: bool = False, after_epoch: bool = True, after_iter: bool = False):
        self._before_epoch = before_epoch
        self._after_epoch = after_epoch
        self._after_iter = after_iter
        self.calls = 0

    def _empty(self) -> None:
        self.calls += 1
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def _epoch_start(self, runner) -> None:
        if self._before_epoch:
            self._empty()

    def _epoch_end(self, runner, metrics=None) -> None:
        if self._after_epoch:
            self._empty()

    def _iter_end(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self._after_iter:
            self._empty()

    before_train_epoch = before_val_epoch = before_test_epoch = _epoch_start
    after_val_epoch = after_test_epoch = _epoch_end

    def after_train_epoch(self, runner) -> None:
        self._epoch_end(runner)

    after_train_iter = after_val_iter = after_test_iter = _iter_end
