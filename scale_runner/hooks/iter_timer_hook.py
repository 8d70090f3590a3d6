"""IterTimerHook: per-iteration ``time`` / ``data_time``, throughput, ETA and peak memory."""
from __future__ import annotations

import time
from typing import Any

from ..registry import HOOKS
from .hook import Hook


@HOOKS.register_module()
class IterTimerHook(Hook):
    """Records, per iteration of every loop (into ``runner.log_buffer`` under the loop's stage):

    - ``data_time``: seconds spent waiting for the batch;
    - ``time``: seconds of the whole iteration (data included);
    - ``samples_per_s``: samples per second over all processes (batch size x processes / time);
    - ``tokens_per_s``: when the batch is a dict with ``input_ids``: tokens (the
      ``attention_mask`` sum if there is one, else ``input_ids.numel()``) x processes / time.
      The token count stays a device tensor until the line is logged (no per-step sync).

    ``eta_seconds`` and ``memory_mb`` (peak ``torch.cuda.max_memory_allocated`` since the last
    call, in MiB; ``None`` off the GPU) are read by the LoggerHook when it writes a line.
    """

    priority = 'NORMAL'

    def __init__(self):
        self._last = 0.0
        self._start_time = 0.0
        self._start_iter = 0
        self._eval_start = 0.0
        self._procs = 1

    # ---- train ------------------------------------------------------------------------------
    def before_train(self, runner) -> None:
        self._procs = _num_processes(runner)
        self._start_time = time.perf_counter()
        self._start_iter = runner.iter
        self._last = self._start_time

    def before_train_epoch(self, runner) -> None:
        self._last = time.perf_counter()

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        self._data_time(runner, 'train')

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs=None) -> None:
        self._iter_time(runner, 'train', data_batch)

    # ---- val / test ---------------------------------------------------------------------------
    def before_val_epoch(self, runner) -> None:
        self._procs = _num_processes(runner)
        self._last = self._eval_start = time.perf_counter()

    before_test_epoch = before_val_epoch

    def before_val_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        self._data_time(runner, 'val')

    def after_val_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs=None) -> None:
        self._iter_time(runner, 'val', data_batch)

    def before_test_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        self._data_time(runner, 'test')

    def after_test_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs=None) -> None:
        self._iter_time(runner, 'test', data_batch)

    # ---- measurements ---------------------------------------------------------------------------
    def _data_time(self, runner, stage: str) -> None:
        runner.log_buffer.update('data_time', time.perf_counter() - self._last, stage)

    def _iter_time(self, runner, stage: str, data_batch: Any) -> None:
        now = time.perf_counter()
        elapsed = max(now - self._last, 1e-9)
        self._last = now
        buf = runner.log_buffer
        buf.update('time', elapsed, stage)
        procs = self._procs
        n = batch_size(data_batch)
        if n:
            buf.update('samples_per_s', n * procs / elapsed, stage)
        tokens = token_count(data_batch)
        if tokens is not None:
            buf.update('tokens_per_s', tokens * (procs / elapsed), stage)

    def eta_seconds(self, runner) -> float:
        """Seconds left in training, from the mean iteration time of this run so far."""
        done = runner.iter - self._start_iter
        if done <= 0 or not runner.max_iters:
            return 0.0
        elapsed = time.perf_counter() - self._start_time
        return elapsed / done * (runner.max_iters - runner.iter)

    def eval_eta_seconds(self, done: int, total: int) -> float:
        """Seconds left in the running val/test loop after ``done`` of ``total`` batches."""
        if done <= 0 or total <= done:
            return 0.0
        return (time.perf_counter() - self._eval_start) / done * (total - done)

    def memory_mb(self, runner) -> int | None:
        """Peak accelerator memory (MiB) since the previous call; ``None`` when not on a GPU."""
        device = getattr(runner.accelerator, 'device', None)
        if device is None or device.type != 'cuda':
            return None
        import torch
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(peak // (1024 * 1024))


def _num_processes(runner) -> int:
    return runner.accelerator.num_processes if runner.accelerator is not None else 1


def batch_size(data_batch: Any) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    first = data_batch
    for _ in range(4):
        if isinstance(first, dict):
            first = next(iter(first.values()), None)
        elif isinstance(first, (list, tuple)):
            first = first[0] if first else None
        else:
            break
    shape = getattr(first, 'shape', None)
    if shape:
        return int(shape[0])
    try:
        return len(first) if first is not None and not isinstance(first, (str, bytes)) else 0
    except TypeError:
        return 0


def token_count(data_batch: Any):
    """Tokens in a language-model batch (a dict with ``input_ids``), or ``None``."""
    if not isinstance(data_batch, dict) or 'input_ids' not in data_batch:
        return None
    mask = data_batch.get('attention_mask')
    if hasattr(mask, 'sum'):
        return mask.sum()  # a device tensor: read only when logged
    ids = data_batch['input_ids']
    return ids.numel() if hasattr(ids, 'numel') else None
