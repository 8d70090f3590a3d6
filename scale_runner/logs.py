"""Per-runner logging: the Python logger (console + file) and the scalar window buffer."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

FORMAT = '%(asctime)s - scale_runner - %(levelname)s - %(message)s'


def make_logger(name: str, log_file: Path | None, level: str | int, is_main: bool) -> logging.Logger:
    """A logger of this run only: console on the main process, a file on every process."""
    logger = logging.getLogger(f'scale_runner.{name}')
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(level, int):
        from .errors import ConfigError
        raise ConfigError(f'log_level must be one of DEBUG, INFO, WARNING, ERROR, got {level!r}')
    logger.setLevel(level)
    formatter = _FormatOnce(FORMAT, '%Y/%m/%d %H:%M:%S')
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    console.setLevel(level if is_main else logging.ERROR)
    logger.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(formatter)
        logger.addHandler(fh)
    return logger


class _FormatOnce(logging.Formatter):
    """The console and the file write the same line: format each record once, not per
    handler (a logged training line costs about a third less)."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.__dict__.get('_scale_runner_line')
        if text is None:
            text = record._scale_runner_line = super().format(record)
        return text


def close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


class LogBuffer:
    """Scalars of the current logging window, one window per mode (``train``, ``val``,
    ``test``), so validation timings never mix into a training window.

    Values may be tensors (on any device): they are only read when a line is logged, all
    keys of a window in one transfer, so training never waits on the device for a number
    nobody prints. ``current`` holds the latest value of every key updated here (any mode).

    A *source* (``add_source``) keeps its own window and reports it when asked: an object with
    ``window_means(mode) -> dict`` and ``clear_window(mode)``. The IterTimerHook is one: it
    appends two timestamps per iteration and turns them into ``time``/``data_time`` means only
    when a line is written, which costs less per step than a value per key.
    """

    def __init__(self):
        self._windows: dict[str, dict[str, list]] = {}
        self._rows: dict[str, list[dict]] = {}  # update_dict's dicts, split into keys when read
        self._sources: list = []
        self.current: dict[str, Any] = {}

    def update(self, key: str, value: Any, mode: str = 'train') -> None:
        try:
            self._windows[mode][key].append(value)
        except KeyError:
            self._windows.setdefault(mode, {})[key] = [value]
        self.current[key] = value

    def update_dict(self, values: dict, mode: str = 'train') -> None:
        """``update`` for every item of ``values``. Per step (the LoggerHook's call) it only
        keeps the dict (not a copy): its keys are split into the window when a line is written."""
        try:
            self._rows[mode].append(values)
        except KeyError:
            self._rows[mode] = [values]
        self.current.update(values)

    def _window(self, mode: str) -> dict[str, list]:
        window = self._windows.setdefault(mode, {})
        for values in self._rows.pop(mode, ()):
            for key, value in values.items():
                try:
                    window[key].append(value)
                except KeyError:
                    window[key] = [value]
        return window

    def add_source(self, source) -> None:
        if source not in self._sources:
            self._sources.append(source)

    def means(self, mode: str = 'train') -> dict[str, float]:
        """The mean of every key of the window (one device transfer for all tensor values)."""
        window = self._window(mode)
        keys = [k for k, v in window.items() if v]
        floats = to_floats([v for k in keys for v in window[k]])
        out, at = {}, 0
        for k in keys:
            n = len(window[k])
            out[k] = sum(floats[at:at + n]) / n
            at += n
        for source in self._sources:
            out.update(source.window_means(mode))
        return out

    def clear_window(self, mode: str = 'train') -> None:
        self._windows.pop(mode, None)
        self._rows.pop(mode, None)
        for source in self._sources:
            source.clear_window(mode)


def to_floats(values: list) -> list[float]:
    """Plain floats (a tensor: the mean of its elements). A CPU tensor is read with ``item()``
    (cheaper than stacking); tensors on an accelerator are stacked and moved to the CPU together,
    one transfer per device, so a window of 10 iterations waits on the device once per line."""
    out: list = [0.0] * len(values)
    by_device: dict = {}
    for i, v in enumerate(values):
        if not hasattr(v, 'detach'):
            out[i] = float(v)
        elif v.is_cpu:
            out[i] = v.item() if v.numel() == 1 else v.detach().float().mean().item()
        else:
            if v.dim() != 0:
                v = v.reshape(()) if v.numel() == 1 else v.detach().float().mean()
            by_device.setdefault(v.device, []).append((i, v))
    if by_device:
        import torch
        for pairs in by_device.values():
            floats = torch.stack([v for _, v in pairs]).detach().float().tolist()
            for (i, _), f in zip(pairs, floats):
                out[i] = f
    return out
