"""Per-runner logging: the Python logger (console + file) and the scalar window buffer."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

PENDING = 256  # tensors held before reading them together (bounds the memory they pin)
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

    Values may be tensors (on any device): they are only read when a line is logged (and
    every ``PENDING`` iterations of a longer window), all keys in one transfer, so training
    never waits on the device for a number nobody prints. ``current`` holds the latest value
    of every key updated here (any mode).

    A *source* (``add_source``) keeps its own window and reports it when asked: an object with
    ``window_means(mode) -> dict`` and ``clear_window(mode)``. The IterTimerHook is one: it
    appends two timestamps per iteration and turns them into ``time``/``data_time`` means only
    when a line is written, which costs less per step than a value per key.
    """

    def __init__(self):
        self._windows: dict[str, dict[str, list[float]]] = {}  # values already read as floats
        self._rows: dict[str, list[dict]] = {}  # update_dict's dicts, not yet read
        self._sources: list = []
        self.current: dict[str, Any] = {}

    def update(self, key: str, value: Any, mode: str = 'train') -> None:
        self.update_dict({key: value}, mode)

    def update_dict(self, values: dict, mode: str = 'train') -> None:
        """``update`` for every item of ``values``. Per step (the LoggerHook's call) it only
        keeps the dict (not a copy); every ``PENDING`` dicts, and when a line is written, they
        are read as floats together (a long window holds floats, not thousands of tensors)."""
        try:
            rows = self._rows[mode]
        except KeyError:
            rows = self._rows[mode] = []
        rows.append(values)
        self.current.update(values)
        if len(rows) >= PENDING:
            self._window(mode)

    def _window(self, mode: str) -> dict[str, list[float]]:
        """``mode``'s window, with the dicts kept since the last read split into its keys and
        read as floats (one transfer per device)."""
        window = self._windows.setdefault(mode, {})
        by_key = columns(self._rows.pop(mode, ()))
        floats = to_floats([v for values in by_key.values() for v in values])
        at = 0
        for key, values in by_key.items():
            window.setdefault(key, []).extend(floats[at:at + len(values)])
            at += len(values)
        return window

    def add_source(self, source) -> None:
        if source not in self._sources:
            self._sources.append(source)

    def means(self, mode: str = 'train') -> dict[str, float]:
        """The mean of every key of the window, and the sources' window means."""
        out = {k: sum(v) / len(v) for k, v in self._window(mode).items() if v}
        for source in self._sources:
            out.update(source.window_means(mode))
        return out

    def clear_window(self, mode: str = 'train') -> None:
        self._windows.pop(mode, None)
        self._rows.pop(mode, None)
        for source in self._sources:
            source.clear_window(mode)


def columns(rows) -> dict[str, list]:
    """``[{key: value}, ...]`` as ``{key: [its values, in order]}`` (a row may lack a key)."""
    out: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            try:
                out[key].append(value)
            except KeyError:
                out[key] = [value]
    return out


def to_floats(values: list) -> list[float]:
    """Plain floats (a tensor: the mean of its elements), in one ``torch.stack`` when the values
    are tensors of one device and shape (a window's losses): one transfer, so a window waits on
    the device once per line, and on the CPU one call instead of a read per value (which costs
    several times its hot cost between training steps). Mixed values: see :func:`_to_floats`."""
    if not values or not hasattr(values[0], 'detach'):
        return _to_floats(values)
    import torch
    try:
        stacked = torch.stack(values).detach()
    except (TypeError, RuntimeError):  # numbers among them, several devices or shapes
        return _to_floats(values)
    return (stacked.float() if stacked.dim() == 1 else stacked.flatten(1).float().mean(1)).tolist()


def _to_floats(values: list) -> list[float]:
    """:func:`to_floats` of mixed values: a number or CPU tensor read alone; tensors on an
    accelerator stacked per device (one transfer each)."""
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
