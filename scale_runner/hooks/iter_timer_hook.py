"""IterTimerHook: per-iteration ``time`` / ``data_time``, throughput, ETA and peak memory."""
from __future__ import annotations

import time
from typing import Any

from ..registry import HOOKS
from .hook import Hook


@HOOKS.register_module()
class IterTimerHook(Hook):
    """Times every iteration of every loop and reports, per logging window and mode, to
    ``runner.log_buffer`` (as a window source, see :class:`~scale_runner.logs.LogBuffer`):

    - ``data_time``: mean seconds spent waiting for the batch;
    - ``time``: mean seconds of the whole iteration (data included);
    - ``samples_per_s``: samples of the window over all processes / the window's time;
    - ``tokens_per_s``: when the batch is a dict with ``input_ids``: tokens (the
      ``attention_mask`` sum if there is one, else ``input_ids.numel()``) over all processes /
      the window's time. The token counts stay device tensors until the line is logged.
    - ``mfu`` (train): model FLOPs utilization, the window's training FLOPs (``input_ids.numel()``
      x FLOPs per token, see :mod:`scale_runner.flops`) / its time / the device's peak dense
      FLOP/s for the run's precision. Needs FLOPs per token (``flops_per_token``: a number, else
      the model's ``flops_per_token(seq_len)``, else a ``transformers`` model's config) and a
      peak (``mfu_peak_flops``: FLOP/s of one device, else the table for H100, H200, A100 and
      L4 GPUs); without both, no ``mfu`` (on a CPU: only with ``mfu_peak_flops``).

    Per iteration it only appends two timestamps and the batch size: the means are computed
    when a line is written (per-step work runs with cold caches between torch kernels, so
    every avoided operation counts). Time spent outside the loop (validation in the middle of
    training, an epoch's setup) is not charged to the next iteration.

    ``eta_seconds`` and ``memory_mb`` (peak ``torch.cuda.max_memory_allocated`` since the last
    call, in MiB; ``None`` off the GPU) are read by the LoggerHook when it writes a line.

    Stragglers (several processes): ``compute_time`` is each rank's mean forward time (batch
    ready to loss: the part of its own work in which DDP waits for no other rank; the backward
    pass waits for the slowest rank's gradients, so ``time`` is the same everywhere). On a GPU
    it is timed by CUDA events, read at the log line. :meth:`rank_spread` gathers every rank's
    ``time``, ``data_time`` and ``compute_time`` once per log line (one small all-gather).
    """

    priority = 'NORMAL'

    def __init__(self, flops_per_token: float | None = None, mfu_peak_flops: float | None = None):
        for key, value in (('flops_per_token', flops_per_token), ('mfu_peak_flops', mfu_peak_flops)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value > 0):
                from ..errors import ConfigError
                raise ConfigError(f'default_hooks.timer.{key} must be a positive number (or None: '
                                  f"{'the model' if key == 'flops_per_token' else 'the GPU table'}"
                                  f"'s), e.g. {key}={'6 * 124e6' if key == 'flops_per_token' else '989e12'}, "
                                  f'got {value!r}')
        self.flops_per_token = flops_per_token
        self.mfu_peak_flops = mfu_peak_flops
        self._peak = None        # peak FLOP/s of one device, when mfu is reported
        self._fpt = None         # seq_len -> training FLOPs per token, when mfu is reported
        self._seq, self._per_token = None, 0.0  # the last batch's sequence length, its FLOPs/token
        self._start_time = 0.0
        self._start_iter = 0
        self._eval_start = 0.0
        self._procs = 1
        self._device = None  # the accelerator's device, once known (False: none)
        self._train = _Window(0.0)  # one window per mode, replaced when the mode starts
        self._val = _Window(0.0)
        self._test = _Window(0.0)
        self._rows = _unknown  # the batch-size reader, made for the first batch's structure
        self._tokens = False     # whether batches are dicts with input_ids
        self._events = None      # CUDA events' class, when a multi-GPU run times compute_time

    # ---- train ------------------------------------------------------------------------------
    def before_train(self, runner) -> None:
        self._procs = _num_processes(runner)
        runner.log_buffer.add_source(self)
        self._start_time = time.perf_counter()
        self._start_iter = runner.iter
        self._train = _Window(self._start_time)
        self._mfu_setup(runner)
        wrapper = runner.optim_wrapper
        if self._procs > 1 and hasattr(wrapper, 'loss_clock'):  # per-rank compute_time
            wrapper.loss_clock = self._loss_stamp
            device = getattr(runner.accelerator, 'device', None)
            if device is not None and device.type == 'cuda':
                import torch
                self._events = torch.cuda.Event

    def after_train(self, runner) -> None:
        if getattr(runner.optim_wrapper, 'loss_clock', None) == self._loss_stamp:
            runner.optim_wrapper.loss_clock = None
        self._events = None

    def before_train_epoch(self, runner) -> None:
        self._train.resume(time.perf_counter())

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        self._train.ready.append(time.perf_counter())
        if self._events is not None:
            self._train.gpu.append(_recorded(self._events))

    def _loss_stamp(self) -> None:
        train = self._train
        if len(train.computed) == len(train.ends):  # the first loss of the iteration
            train.computed.append(time.perf_counter() if self._events is None
                                  else _recorded(self._events))

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs=None) -> None:
        self._end(self._train, data_batch)
        if self._fpt is not None:
            self._count_flops(data_batch)

    def _mfu_setup(self, runner) -> None:
        from ..flops import device_peak_flops, flops_per_token_fn
        acc = runner.accelerator
        self._peak = self.mfu_peak_flops or (device_peak_flops(getattr(acc, 'device', None),
                                                               acc.mixed_precision) if acc else None)
        self._fpt, self._seq = None, None
        if self._peak and runner.model is not None:
            from ..model import unwrap
            self._fpt = flops_per_token_fn(unwrap(runner.model), self.flops_per_token)

    def _count_flops(self, data_batch: Any) -> None:
        ids = data_batch.get('input_ids') if isinstance(data_batch, dict) else None
        shape = getattr(ids, 'shape', None)
        if not shape:
            return
        if shape[-1] != self._seq:  # the per-token FLOPs of a new sequence length, once
            self._seq, self._per_token = shape[-1], self._fpt(shape[-1])
        self._train.flops.append(ids.numel() * self._per_token)

    # ---- val / test ---------------------------------------------------------------------------
    def before_val_epoch(self, runner) -> None:
        self._val = self._start_eval(runner)

    def before_test_epoch(self, runner) -> None:
        self._test = self._start_eval(runner)

    def _start_eval(self, runner) -> _Window:
        self._procs = _num_processes(runner)
        runner.log_buffer.add_source(self)
        self._eval_start = time.perf_counter()
        return _Window(self._eval_start)

    def after_val(self, runner) -> None:
        # Validation (metrics and after_val_epoch's best-checkpoint saving included) is not
        # charged to the next train iteration.
        self._train.resume(time.perf_counter())

    def after_test(self, runner) -> None:
        self._train.resume(time.perf_counter())

    def before_val_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        self._val.ready.append(time.perf_counter())

    def after_val_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs=None) -> None:
        self._end(self._val, data_batch)

    def before_test_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        self._test.ready.append(time.perf_counter())

    def after_test_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs=None) -> None:
        self._end(self._test, data_batch)

    def _end(self, window: _Window, data_batch: Any) -> None:
        window.ends.append(time.perf_counter())
        try:
            window.samples.append(self._rows(data_batch))
        except Exception:  # a batch of another structure than the reader was made for
            self._rows, self._tokens = size_reader(data_batch)
            window.samples.append(self._rows(data_batch))
        if self._tokens:
            tokens = token_count(data_batch)
            if tokens is not None:
                window.tokens.append(tokens)

    # ---- the LogBuffer source protocol ----------------------------------------------------------
    def _window(self, mode: str) -> _Window | None:
        return {'train': self._train, 'val': self._val, 'test': self._test}.get(mode)

    def window_means(self, mode: str) -> dict:
        window = self._window(mode)
        if window is None:
            return {}
        out = window.means(self._procs)
        if window.flops and mode == 'train' and out.get('time'):  # this rank's FLOPs / its time
            out['mfu'] = sum(window.flops) / (out['time'] * len(window.ends)) / self._peak
        return out

    def clear_window(self, mode: str) -> None:
        window = self._window(mode)
        if window is not None:
            window.clear()

    def rank_spread(self, means: dict) -> dict:
        """Every rank's ``time``, ``data_time`` and ``compute_time`` of this window (``means``,
        this rank's), gathered on every rank: ``<figure>/rank_max``, ``/rank_min`` and
        ``/slowest_rank`` (the rank of the maximum). Empty on one process."""
        if self._procs < 2:
            return {}
        from ..collective import gather
        mine = [means.get(k) for k in SPREAD_KEYS]
        ranks = gather(mine)
        out = {}
        for i, key in enumerate(SPREAD_KEYS):
            values = [(v[i], r) for r, v in enumerate(ranks) if v[i] is not None]
            if len(values) == len(ranks):
                high, low = max(values), min(values)
                out.update({f'{key}/rank_max': high[0], f'{key}/rank_min': low[0],
                            f'{key}/slowest_rank': high[1]})
        return out

    # ---- read when a line is logged -------------------------------------------------------------
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
        if self._device is None:  # Accelerator.device is a chain of properties: asked once
            self._device = getattr(runner.accelerator, 'device', None) or False
        device = self._device
        if not device or device.type != 'cuda':
            return None
        import torch
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(peak // (1024 * 1024))


SPREAD_KEYS = ('time', 'data_time', 'compute_time')


def _recorded(event_class):
    event = event_class(enable_timing=True)
    event.record()
    return event


class _Window:
    """One mode's iterations since its last logged line: when each batch was ready, when each
    iteration ended, the batch sizes and token counts. Iteration ``i`` starts where ``i - 1``
    ended, unless the loop was left in between (``resume``)."""

    __slots__ = ('start', 'ready', 'ends', 'samples', 'tokens', 'resumed', 'computed', 'gpu', 'flops')

    def __init__(self, start: float):
        self.start = start
        self.ready: list[float] = []
        self.ends: list[float] = []
        self.samples: list[int] = []
        self.tokens: list = []
        self.resumed: dict[int, float] = {}
        self.computed: list = []  # when each iteration's loss arrived (compute_time)
        self.gpu: list = []       # CUDA events at each batch's arrival, on a GPU
        self.flops: list = []     # each iteration's training FLOPs, when mfu is reported

    def resume(self, stamp: float) -> None:
        """The next iteration starts at ``stamp`` (not where the previous one ended)."""
        self.resumed[len(self.ends)] = stamp

    def clear(self) -> None:
        n = len(self.ends)
        self.start = self.resumed.get(n, self.ends[-1] if n else self.start)
        self.ready = self.ready[n:]  # a batch that is ready but not yet finished stays
        self.computed, self.gpu = self.computed[n:], self.gpu[n:]
        self.ends, self.samples, self.tokens, self.resumed, self.flops = [], [], [], {}, []

    def means(self, procs: int) -> dict:
        n = len(self.ends)
        if not n:
            return {}
        data = busy = 0.0
        prev = self.start
        for i, (ready, end) in enumerate(zip(self.ready, self.ends)):
            begin = self.resumed.get(i, prev)
            data += ready - begin
            busy += end - begin
            prev = end
        busy = max(busy, 1e-9)
        out = {'time': busy / n, 'data_time': data / n}
        samples = sum(self.samples)
        if samples:  # 0: batches without a first dimension (or none passed): no throughput
            out['samples_per_s'] = samples * procs / busy
        if self.tokens:
            from ..logs import to_floats
            out['tokens_per_s'] = sum(to_floats(self.tokens)) * procs / busy
        if len(self.computed) >= n:
            out['compute_time'] = self._compute(n) / n
        return out

    def _compute(self, n: int) -> float:
        """Seconds from each batch's arrival to its loss, over the first ``n`` iterations."""
        if not self.gpu:
            return sum(loss - ready for ready, loss in zip(self.ready[:n], self.computed[:n]))
        self.computed[n - 1].synchronize()  # the log line's one wait for the device
        return sum(a.elapsed_time(b) for a, b in zip(self.gpu[:n], self.computed[:n])) / 1000


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


def size_reader(data_batch: Any):
    """``(rows, tokens)``: a function giving the batch size of batches shaped like
    ``data_batch`` (cheaper per step than the general :func:`batch_size`), and whether they
    carry tokens to count. The reader raises on a batch of another structure."""
    tokens = isinstance(data_batch, dict) and 'input_ids' in data_batch
    if isinstance(data_batch, (list, tuple)) and data_batch and getattr(data_batch[0], 'shape', None):
        return _rows_of_first_item, tokens
    if isinstance(data_batch, dict) and getattr(next(iter(data_batch.values()), None), 'shape', None):
        return _rows_of_first_value, tokens
    if getattr(data_batch, 'shape', None):
        return _rows, tokens
    return batch_size, tokens


def _unknown(batch) -> int:
    raise LookupError('no batch seen yet')


def _rows_of_first_item(batch) -> int:
    return batch[0].shape[0]


def _rows_of_first_value(batch) -> int:
    return next(iter(batch.values())).shape[0]


def _rows(batch) -> int:
    return batch.shape[0]


def token_count(data_batch: Any):
    """Tokens in a language-model batch (a dict with ``input_ids``), or ``None``."""
    if not isinstance(data_batch, dict) or 'input_ids' not in data_batch:
        return None
    mask = data_batch.get('attention_mask')
    if hasattr(mask, 'sum'):
        return mask.sum()  # a device tensor: read only when logged
    ids = data_batch['input_ids']
    return ids.numel() if hasattr(ids, 'numel') else None
