"""``log_processor=dict(...)``: MMEngine's LogProcessor options for the training log lines.

``LoggerHook`` writes the lines; this object says how its train values are smoothed:

- ``window_size`` (int): each logged output (``loss``, ...) is the mean of its last
  ``window_size`` iterations (read from ``runner.message_hub``). ``None`` (the default here;
  MMEngine's is 10 with a logging interval of 10) means the iterations since the last line.
- ``by_epoch``: ``Epoch(train) [e][i/n]`` lines (True) or ``Iter(train) [i/n]`` (False);
  ``None`` follows the train loop. An iteration-based loop always logs by iteration.
- ``custom_cfg``: ``[dict(data_src='loss', method_name='mean'|'min'|'max'|'current',
  window_size=10|'epoch'|'global', log_name='loss_global')]``: extra (or, without
  ``log_name``, replaced) values computed from the message hub's history of ``data_src``.
- ``num_digits``: decimals of the logged values (4).
- ``mean_pattern``: outputs whose key does not match are logged as their latest value when
  ``window_size`` is set (MMEngine's default: losses, times and ``grad_norm`` are averaged).
"""
from __future__ import annotations

import re
from typing import Any

from .errors import ConfigError, check_keys, did_you_mean

KEYS = ('window_size', 'by_epoch', 'custom_cfg', 'num_digits', 'log_with_hierarchy',
        'mean_pattern', 'type')
ENTRY_KEYS = ('data_src', 'method_name', 'window_size', 'log_name')
METHODS = ('mean', 'min', 'max', 'current')
WINDOWS = ('epoch', 'global')
MEAN_PATTERN = r'.*(loss|time|data_time|grad_norm).*'


class LogProcessor:
    def __init__(self, window_size: int | None = None, by_epoch: bool | None = None,
                 custom_cfg: list | None = None, num_digits: int = 4,
                 log_with_hierarchy: bool = False, mean_pattern: str = MEAN_PATTERN):
        where = 'log_processor'
        if window_size is not None and (not isinstance(window_size, int) or isinstance(window_size, bool)
                                        or window_size < 1):
            raise ConfigError(f'{where}.window_size = {window_size!r} is not valid: it takes a '
                              f'positive int (or None: the iterations since the last log line)')
        if by_epoch is not None and not isinstance(by_epoch, bool):
            raise ConfigError(f'{where}.by_epoch = {by_epoch!r} is not valid: it takes True, '
                              f'False or None (follow the train loop)')
        if not isinstance(num_digits, int) or isinstance(num_digits, bool) or not 0 <= num_digits <= 12:
            raise ConfigError(f'{where}.num_digits = {num_digits!r} is not valid: it takes an int '
                              f'in 0..12')
        if log_with_hierarchy:
            raise ConfigError(f'{where}.log_with_hierarchy = True is not supported: trackers '
                              f'already get validation values as val/<metric> and test/<metric>, '
                              f'training values by their own names; remove the key')
        try:
            self.mean_pattern = re.compile(mean_pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(f'{where}.mean_pattern = {mean_pattern!r} is not a regular '
                              f'expression: {e}') from None
        self.window_size = window_size
        self.by_epoch = by_epoch
        self.num_digits = num_digits
        self.custom_cfg = _check_custom(custom_cfg, where)

    @property
    def smooths(self) -> bool:
        """Whether the hub's histories are read at all (else the logger's window is used)."""
        return self.window_size is not None or bool(self.custom_cfg)

    def train_values(self, runner, means: dict) -> dict:
        """``means`` (the logger's window) with the outputs smoothed over ``window_size`` and
        the ``custom_cfg`` values added: read from ``runner.message_hub``."""
        hub = runner.message_hub
        out = dict(means)
        if self.window_size is not None:
            for key in means:
                buf = hub.log_scalars.get(f'train/{key}')
                if buf is not None and len(buf):
                    out[key] = (buf.mean(self.window_size) if self.mean_pattern.match(key)
                                else buf.current())
        for i, entry in enumerate(self.custom_cfg):
            src = entry['data_src']
            buf = hub.log_scalars.get(f'train/{src}')
            if buf is None:
                have = sorted(k[6:] for k in hub.log_scalars if k.startswith('train/'))
                near = did_you_mean(src, have)
                did = f' Did you mean {near!r}?' if near else ''
                raise ConfigError(f'log_processor.custom_cfg[{i}].data_src = {src!r} is not a '
                                  f'training value (they are {have}; is default_hooks.runtime_info '
                                  f'removed?).{did}')
            method = entry.get('method_name', 'mean')
            window = entry.get('window_size', self.window_size)
            if window == 'epoch':
                window = max(runner.state.inner_iter, 1) if runner.state.max_epochs else None
            elif window == 'global':
                window = None
            out[entry.get('log_name', src)] = (buf.current() if method == 'current'
                                               else buf.statistics(method, window))
        return out


def _check_custom(custom_cfg: Any, where: str) -> list[dict]:
    if custom_cfg is None:
        return []
    if not isinstance(custom_cfg, (list, tuple)):
        raise ConfigError(f"{where}.custom_cfg = {custom_cfg!r} is not valid: it takes a list of "
                          f"dict(data_src='loss', method_name='mean', window_size='global')")
    out, names = [], {}
    for i, entry in enumerate(custom_cfg):
        at = f'{where}.custom_cfg[{i}]'
        if not isinstance(entry, dict):
            raise ConfigError(f"{at} = {entry!r} is not valid: it takes dict(data_src='loss', "
                              f"method_name='mean', window_size=10)")
        check_keys(entry, ENTRY_KEYS, at, 'a custom_cfg')
        if not isinstance(entry.get('data_src'), str):
            raise ConfigError(f"{at}.data_src is missing: name a logged value, e.g. data_src='loss'")
        method = entry.get('method_name', 'mean')
        if method not in METHODS:
            near = did_you_mean(str(method), METHODS)
            did = f' (did you mean {near!r}?)' if near else ''
            raise ConfigError(f'{at}.method_name = {method!r} is not valid{did}: it takes '
                              f'{", ".join(METHODS)}')
        window = entry.get('window_size')
        if window is not None and window not in WINDOWS and (
                not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ConfigError(f"{at}.window_size = {window!r} is not valid: it takes a positive "
                              f"int, 'epoch' or 'global'")
        name = entry.get('log_name', entry['data_src'])
        if name in names:
            raise ConfigError(f'{at} logs {name!r}, as {where}.custom_cfg[{names[name]}] does: give '
                              f'one of them another log_name')
        names[name] = i
        out.append(dict(entry))
    return out


def build_log_processor(cfg: Any) -> LogProcessor:
    """``log_processor=dict(...)`` (``type='LogProcessor'`` optional) or a built one."""
    if cfg is None:
        return LogProcessor()
    if isinstance(cfg, LogProcessor):
        return cfg
    if not isinstance(cfg, dict):
        raise ConfigError(f'log_processor = {cfg!r} is not valid: it takes a dict, e.g. '
                          f"log_processor=dict(window_size=10, by_epoch=True)")
    cfg = dict(cfg)
    check_keys(cfg, KEYS, 'log_processor', 'a log_processor')
    kind = cfg.pop('type', 'LogProcessor')
    if kind not in ('LogProcessor', LogProcessor):
        raise ConfigError(f"log_processor.type = {kind!r} is not valid: only 'LogProcessor'")
    return LogProcessor(**cfg)
