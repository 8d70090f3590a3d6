"""LoggerHook: console lines, the JSON-lines scalars file, experiment trackers, progress bar."""
from __future__ import annotations

import datetime
import json
import logging
import math
import time
from typing import Any

from ..registry import HOOKS
from .hook import Hook
from .iter_timer_hook import SPREAD_KEYS

FLUSH_SECONDS = 1.0  # scalars.jsonl lines a killed process can lose at most
_json_key = json.encoder.encode_basestring_ascii  # a str as json.dumps writes it, quoted
_POSITION = frozenset({'step', 'epoch', 'iter'})
FIRST_KEYS = ('lr', 'eta', 'time', 'data_time', 'samples_per_s', 'tokens_per_s', 'mfu', 'memory')


@HOOKS.register_module()
class LoggerHook(Hook):
    """Every ``interval`` iterations (50 by default, as Lightning's ``log_every_n_steps``;
    MMEngine's is 10): the window mean (MMEngine's LogProcessor) of losses, times and
    throughput (and ``mfu``, see IterTimerHook), the current lr, the ETA and peak GPU memory.
    Lines read like MMEngine's::

        Epoch(train) [2][ 40/100]  lr: 1.0000e-03  eta: 0:01:12  time: 0.0510  data_time: 0.0020  loss: 0.4123
        Iter(train) [ 400/5000]  lr: ...
        Epoch(val) [2][20/20]  accuracy: 0.9100  time: 0.0102  data_time: 0.0011

    ``by_epoch=None`` follows the train loop; ``ignore_last=True`` skips the last, partial
    window of an epoch (and of an iteration-based run). Every logged scalar also goes to
    ``<work_dir>/<timestamp>/scalars.jsonl`` (``{"step", "epoch", "iter", **values}``, step = train
    iteration) and, on the main process, to the runner's ``trackers`` with the same step and
    values (validation as ``val/<metric>``, test as ``test/<metric>``). ``progress_bar``:
    ``None`` = on an interactive terminal only (see ``scale_runner.progress``).
    ``log_metric_by_epoch`` is accepted for MMEngine configs; steps are always train iterations.

    Stragglers, with several processes: every line also records the slowest and the fastest
    rank's mean ``time``, ``data_time`` and ``compute_time`` (``<figure>/rank_max``,
    ``/rank_min``, ``/slowest_rank``, see ``IterTimerHook.rank_spread``) in ``scalars.jsonl``
    and the trackers; the console line shows them for a figure whose spread exceeds
    ``straggler_threshold`` (0.1: a tenth of the mean iteration time).
    """

    priority = 'BELOW_NORMAL'

    def __init__(self, interval: int = 50, by_epoch: bool | None = None, ignore_last: bool = True,
                 log_metric_by_epoch: bool = True, progress_bar: bool | None = None,
                 straggler_threshold: float = 0.1):
        from ..errors import ConfigError
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ConfigError(f'default_hooks.logger.interval must be a positive int, got {interval!r}')
        if (isinstance(straggler_threshold, bool) or not isinstance(straggler_threshold, (int, float))
                or straggler_threshold < 0):
            raise ConfigError(f'default_hooks.logger.straggler_threshold must be a number >= 0 (a '
                              f'fraction of the iteration time), got {straggler_threshold!r}')
        self.straggler_threshold = straggler_threshold
        self.interval = interval
        self.by_epoch = by_epoch
        self.ignore_last = ignore_last
        self.log_metric_by_epoch = log_metric_by_epoch
        self.progress_bar = progress_bar
        self._file = None
        self._flushed = 0.0
        self._trackers = None
        self._bar = None
        self._timer = None
        self._tracker_state: dict = {}

    # ---- run ----------------------------------------------------------------------------------
    def before_run(self, runner) -> None:
        from ..trackers import Trackers
        processor = getattr(runner, 'log_processor', None)
        if self.by_epoch is None and processor is not None:
            self.by_epoch = processor.by_epoch  # log_processor.by_epoch (None: the loop's)
        if runner.train_loop is not None and (self.by_epoch is None or runner.state.max_epochs is None):
            self.by_epoch = runner.state.max_epochs is not None
        main = runner.accelerator.is_main_process
        if main and self._file is None:
            # Block-buffered: a flush (a write syscall) per line costs more than the line.
            # Flushed at least every FLUSH_SECONDS, at epoch ends, checkpoints and the end.
            self._file = open(runner.log_dir / 'scalars.jsonl', 'a')
            self._flushed = time.monotonic()
        if self._trackers is None:  # checked on every rank: a missing package fails everywhere
            self._trackers = Trackers(getattr(runner, 'trackers', None))
            self._trackers.load_state_dict(self._tracker_state)
        from ..progress import ProgressBar, progress_wanted
        if self._bar is None and progress_wanted(self.progress_bar, main, runner.logger):
            self._bar = ProgressBar(runner.logger)

    def after_run(self, runner) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._trackers is not None:
            self._trackers.finish(runner)
        if self._file is not None:
            self._file.close()
            self._file = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        self._flush()  # the log on disk reaches the checkpoint's iteration

    def state_dict(self) -> dict:
        """The trackers' resume state (their run ids and steps)."""
        return self._trackers.state_dict() if self._trackers is not None else dict(self._tracker_state)

    def load_state_dict(self, state: dict) -> None:
        self._tracker_state = dict(state)
        if self._trackers is not None:
            self._trackers.load_state_dict(self._tracker_state)

    # ---- train --------------------------------------------------------------------------------
    def before_train(self, runner) -> None:
        self._timer = runner.get_hook('IterTimerHook')  # read at every line: looked up once
        self._trackers.start(runner)
        if self._bar is not None and not self.by_epoch:
            self._bar.start_task('train', runner.max_iters, runner.iter)

    def before_train_epoch(self, runner) -> None:
        runner.log_buffer.clear_window('train')  # an ignored last window does not leak on
        if self._bar is not None and self.by_epoch:
            self._bar.start_task(f'train {runner.epoch + 1}/{runner.max_epochs}',
                                 _len(runner.train_loop.dataloader), runner.state.inner_iter)

    def after_train_epoch(self, runner) -> None:
        self._flush()
        if self._bar is not None and self.by_epoch:
            self._bar.end_task(f'train {runner.epoch}/{runner.max_epochs}')

    def after_train(self, runner) -> None:
        self._flush()
        if self._bar is not None and not self.by_epoch:
            self._bar.end_task('train')

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        buf = runner.log_buffer
        if outputs:
            buf.update_dict(outputs, 'train')
        if self._bar is not None:
            self._bar.advance(f'train {runner.epoch + 1}/{runner.max_epochs}' if self.by_epoch
                              else 'train')
        if self.by_epoch:
            # len() of a prepared dataloader is not free: only asked at a possible epoch end.
            due = (runner.state.inner_iter % self.interval == 0
                   or (not self.ignore_last
                       and runner.state.inner_iter == _len(runner.train_loop.dataloader)))
        else:
            state = runner.state
            due = (state.iter % self.interval == 0
                   or (not self.ignore_last and state.iter == state.max_iters))
        if due:
            self._train_line(runner)

    def _train_line(self, runner) -> None:
        """Write the window's line, scalars and tracker values, and start a new window."""
        buf = runner.log_buffer
        timer = self._timer
        # 'lr', or '<name>.lr' per wrapper of an OptimWrapperDict (MMEngine's keys)
        values: dict[str, Any] = {k: v[0] for k, v in runner.optim_wrapper.get_lr().items()}
        means = buf.means('train')
        buf.clear_window('train')
        spread = timer.rank_spread(means) if timer is not None else {}  # every rank, collective
        for key in FIRST_KEYS[2:7]:  # time ... mfu: the IterTimerHook's
            if key in means:
                values[key] = means.pop(key)
        memory = timer.memory_mb(runner) if timer is not None else None
        if memory is not None:
            values['memory'] = memory
        grad_norm = getattr(runner.optim_wrapper, 'grad_norm', None)
        if grad_norm is not None:
            values['grad_norm'] = float(grad_norm)
        skipped = getattr(runner.optim_wrapper, 'scaler_skips', None)
        if skipped is not None:
            values['scaler_skips'] = skipped  # fp16 grad scaler: steps skipped so far
        processor = getattr(runner, 'log_processor', None)
        if processor is not None and processor.smooths:  # log_processor: the message hub's view
            means = processor.train_values(runner, means)
        values.update(means)
        if runner.logger.isEnabledFor(logging.INFO):  # the line is not even formatted otherwise
            if self.by_epoch:
                n_batches = _len(runner.train_loop.dataloader)
                head = (f'Epoch(train) [{runner.epoch + 1}]'
                        f'[{runner.state.inner_iter:>{len(str(n_batches))}}/{n_batches}]')
            else:
                head = f'Iter(train) [{runner.iter:>{len(str(runner.max_iters))}}/{runner.max_iters}]'
            eta = timer.eta_seconds(runner) if timer is not None else None
            shown = {**values, **stragglers(spread, values.get('time'), self.straggler_threshold)}
            runner.logger.info(f'{head}  {format_values(shown, eta, digits=_digits(runner))}')
        self._emit(runner, {**values, **spread})

    # ---- val / test ---------------------------------------------------------------------------
    def before_val(self, runner) -> None:
        self._before_eval(runner, 'val')

    def before_test(self, runner) -> None:
        self._before_eval(runner, 'test')

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._eval_iter(runner, 'val', batch_idx)

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._eval_iter(runner, 'test', batch_idx)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._after_eval(runner, 'val', metrics)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._after_eval(runner, 'test', metrics)

    def _before_eval(self, runner, mode: str) -> None:
        self._trackers.start(runner)
        runner.log_buffer.clear_window(mode)
        if self._bar is not None:
            self._bar.start_task(mode, _len(_eval_loader(runner, mode)))

    def _eval_head(self, runner, mode: str, done: int, total: int) -> str:
        width = len(str(total))
        if self.by_epoch and runner.state.max_epochs:
            return f'Epoch({mode}) [{max(runner.epoch, 1)}][{done:>{width}}/{total}]'
        return f'Iter({mode}) [{done:>{width}}/{total}]'

    def _eval_iter(self, runner, mode: str, batch_idx: int) -> None:
        if self._bar is not None:
            self._bar.advance(mode)
        done = batch_idx + 1
        total = _len(_eval_loader(runner, mode))
        if done % self.interval or done == total:  # the last one: the metrics line follows
            return
        timer = runner.get_hook('IterTimerHook')
        eta = timer.eval_eta_seconds(done, total) if timer is not None else None
        means = runner.log_buffer.means(mode)
        runner.logger.info(f'{self._eval_head(runner, mode, done, total)}  '
                           f'{format_values(means, eta, digits=_digits(runner))}')

    def _after_eval(self, runner, mode: str, metrics: dict | None) -> None:
        if self._bar is not None:
            self._bar.end_task(mode)
        metrics = dict(metrics or {})
        total = _len(_eval_loader(runner, mode))
        means = runner.log_buffer.means(mode)
        timing = {k: means[k] for k in FIRST_KEYS if k in means}
        runner.log_buffer.clear_window(mode)
        line = format_values({**metrics, **timing}, None, order=False, digits=_digits(runner))
        runner.logger.info(f'{self._eval_head(runner, mode, total, total)}  {line}')
        # The loop's own loss is named `val_loss`/`test_loss`; the tracker key is `val/loss`.
        self._emit(runner, {f'{mode}/{k[len(mode) + 1:] if k == f"{mode}_loss" else k}': v
                            for k, v in metrics.items()})
        self._flush()  # validation is rare and its numbers are the ones people wait for

    # ---- outputs ------------------------------------------------------------------------------
    def _emit(self, runner, values: dict) -> None:
        """The same numbers, at the same step, to the scalars file and every tracker."""
        if self._file is None:
            return
        scalars = {}
        for k, v in values.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                scalars[k] = int(v) if k == 'memory' or k.endswith('/slowest_rank') else v
        if not scalars:
            return
        step = runner.iter
        if scalars.keys() & _POSITION:  # a logged value named like a position field replaces it
            line = json.dumps({'step': step, 'epoch': runner.epoch, 'iter': step, **scalars})
        else:  # what json.dumps writes for finite numbers (float repr), at a quarter of its cost
            fields = ', '.join(f'{_json_key(k)}: {v!r}' for k, v in scalars.items())
            line = f'{{"step": {step}, "epoch": {runner.epoch}, "iter": {step}, {fields}}}'
        self._file.write(line + '\n')
        if time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self._flush()
        self._trackers.log(runner, scalars, step)

    def _flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._flushed = time.monotonic()


def stragglers(spread: dict, time_: float | None, threshold: float) -> dict:
    """The figures of ``spread`` whose max - min exceeds ``threshold`` x the iteration time."""
    if not spread:  # one process: nothing to compare
        return {}
    out = {}
    for key in SPREAD_KEYS:
        high, low = spread.get(f'{key}/rank_max'), spread.get(f'{key}/rank_min')
        if high is not None and time_ and high - low > threshold * time_:
            out[f'{key}/rank_max'], out[f'{key}/rank_min'] = high, low
            out[f'{key}/slowest_rank'] = int(spread[f'{key}/slowest_rank'])
    return out


def _eval_loader(runner, mode: str):
    loop = getattr(runner, f'{mode}_loop', None)
    return getattr(loop, 'dataloader', None)


def _len(dataloader) -> int:
    try:
        return len(dataloader)
    except TypeError:
        return 0


def _digits(runner) -> int:
    processor = getattr(runner, 'log_processor', None)
    return processor.num_digits if processor is not None else 4


def format_values(values: dict, eta: float | None, order: bool = True, digits: int = 4) -> str:
    """``lr: 1.0000e-03  eta: 0:01:12  time: 0.0510  ...`` (MMEngine's order when ``order``;
    ``digits`` decimals, ``log_processor.num_digits``)."""
    values = dict(values)
    parts = []
    if eta is not None:
        values['eta'] = eta
    keys = [k for k in FIRST_KEYS if k in values] if order else []
    keys += [k for k in values if k not in keys and k != 'eta']
    if not order and 'eta' in values:
        keys.insert(0, 'eta')
    for key in keys:
        v = values[key]
        if key == 'eta':
            parts.append(f'eta: {datetime.timedelta(seconds=int(v))}')
        elif key == 'lr' or key.endswith('.lr'):
            parts.append(f'{key}: {float(v):.4e}')
        elif key == 'memory':
            parts.append(f'memory: {int(v)}')
        elif key in ('samples_per_s', 'tokens_per_s'):
            parts.append(f'{key}: {float(v):.1f}')
        else:
            try:
                f = float(v)
            except (TypeError, ValueError):
                parts.append(f'{key}: {v}')
                continue
            if isinstance(v, int) and not isinstance(v, bool):
                parts.append(f'{key}: {v}')
            elif f == 0 or (math.isfinite(f) and 1e-3 <= abs(f) < 1e6):
                parts.append(f'{key}: {f:.{digits}f}')
            else:
                parts.append(f'{key}: {f:.{digits}e}')
    return '  '.join(parts)
