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
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(FORMAT, '%Y/%m/%d %H:%M:%S'))
    console.setLevel(level if is_main else logging.ERROR)
    logger.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(fh)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


class LogBuffer:
    """Scalars of the current logging window; values may be tensors (read only when logged,
    so training never waits on the device for a number nobody prints)."""

    def __init__(self):
        self._window: dict[str, list] = {}
        self.current: dict[str, Any] = {}

    def update(self, key: str, value: Any) -> None:
        self._window.setdefault(key, []).append(value)
        self.current[key] = value

    def mean(self, key: str) -> float:
        values = self._window.get(key) or [self.current[key]]
        total = 0.0
        for v in values:
            total += float(v)
        return total / len(values)

    def keys(self):
        return self._window.keys()

    def clear_window(self) -> None:
        self._window.clear()
