"""LoggerHook: console lines and a JSON-lines scalars file in the run's log directory."""
from __future__ import annotations

import datetime
import json
import math

from ..registry import HOOKS
from .hook import Hook

TIME_KEYS = ('time', 'data_time')


@HOOKS.register_module()
class LoggerHook(Hook):
    """Every ``interval`` iterations: the window mean of losses and times, the current lr.

    Lines read like MMEngine's::

        Epoch(train) [2][ 40/100]  lr: 1.0000e-03  eta: 0:01:12  time: 0.0510  data_time: 0.0020  loss: 0.4123

    Every logged scalar also goes to ``<log_dir>/scalars.jsonl`` with ``step`` = train iteration.
    """

    priority = 'BELOW_NORMAL'

    def __init__(self, interval: int = 10, by_epoch: bool | None = None, ignore_last: bool = True,
                 log_metric_by_epoch: bool = True):
        if not isinstance(interval, int) or interval < 1:
            from ..errors import ConfigError
            raise ConfigError(f'default_hooks.logger.interval must be a positive int, got {interval!r}')
        self.interval = interval
        self.by_epoch = by_epoch
        self.ignore_last = ignore_last
        self.log_metric_by_epoch = log_metric_by_epoch
        self._file = None

    def before_run(self, runner) -> None:
        if self.by_epoch is None:
            self.by_epoch = runner.state.max_epochs is not None
        if runner.accelerator.is_main_process and self._file is None:
            self._file = open(runner.log_dir / 'scalars.jsonl', 'a', buffering=1)

    def after_run(self, runner) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        buf = runner.log_buffer
        if outputs:
            for k, v in outputs.items():
                buf.update(k, v)
        n_batches = _len(runner.train_loop.dataloader)
        progress = runner.state.inner_iter if self.by_epoch else runner.iter
        at_interval = progress % self.interval == 0
        end_of_epoch = self.by_epoch and not self.ignore_last and runner.state.inner_iter == n_batches
        if not (at_interval or end_of_epoch):
            return
        values = {'lr': runner.optim_wrapper.get_lr()['lr'][0]}
        if runner.optim_wrapper.grad_norm is not None:
            values['grad_norm'] = float(runner.optim_wrapper.grad_norm)
        for key in buf.keys():
            values[key] = buf.mean(key)
        buf.clear_window()
        if self.by_epoch and runner.state.max_epochs:
            width = len(str(n_batches))
            head = f'Epoch(train) [{runner.epoch + 1}][{runner.state.inner_iter:>{width}}/{n_batches}]'
        else:
            width = len(str(runner.max_iters))
            head = f'Iter(train) [{runner.iter:>{width}}/{runner.max_iters}]'
        timer = runner.get_hook('IterTimerHook')
        eta = str(datetime.timedelta(seconds=int(timer.eta_seconds(runner)))) if timer else None
        runner.logger.info(f'{head}  {_format(values, eta)}')
        self._write(runner, values)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._log_metrics(runner, 'val', metrics)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._log_metrics(runner, 'test', metrics)

    def _log_metrics(self, runner, stage: str, metrics: dict | None) -> None:
        metrics = metrics or {}
        if self.by_epoch and runner.state.max_epochs:
            head = f'Epoch({stage}) [{runner.epoch}]'
        else:
            head = f'Iter({stage}) [{runner.iter}]'
        runner.logger.info(f'{head}  {_format(metrics, None)}')
        self._write(runner, {f'{stage}/{k}': v for k, v in metrics.items()})

    def _write(self, runner, values: dict) -> None:
        if self._file is None:
            return
        record = {'step': runner.iter, 'epoch': runner.epoch, 'iter': runner.iter}
        for k, v in values.items():
            try:
                record[k] = float(v)
            except (TypeError, ValueError):
                continue
        self._file.write(json.dumps(record) + '\n')


def _len(dataloader) -> int:
    try:
        return len(dataloader)
    except TypeError:
        return 0


def _format(values: dict, eta: str | None) -> str:
    parts = []
    if 'lr' in values:
        parts.append(f'lr: {values["lr"]:.4e}')
    if eta is not None:
        parts.append(f'eta: {eta}')
    for key in TIME_KEYS:
        if key in values:
            parts.append(f'{key}: {values[key]:.4f}')
    for key, v in values.items():
        if key in TIME_KEYS or key == 'lr':
            continue
        try:
            v = float(v)
            parts.append(f'{key}: {v:.4f}' if math.isfinite(v) and abs(v) >= 1e-3 or v == 0 else f'{key}: {v:.4e}')
        except (TypeError, ValueError):
            parts.append(f'{key}: {v}')
    return '  '.join(parts)
