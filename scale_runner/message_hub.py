"""``MessageHub``: MMEngine's runtime information and scalar histories, owned by one runner.

MMEngine keeps a process-wide ``MessageHub.get_current_instance()``; here every runner owns
its hub (``runner.message_hub``), so two runners in one process never share counters. The
``RuntimeInfoHook`` fills it: ``train/lr``, ``train/<output key>`` (``loss``, ...) and
``val/<metric>`` scalars, and the ``cfg`` / ``seed`` / ``experiment_name`` infos. ``epoch``,
``iter``, ``max_epochs`` and ``max_iters`` are read from the runner's ``TrainState`` when
asked (counters of completed work: in ``after_train_iter``, ``get_info('iter')`` counts the
iteration just finished, where MMEngine's is its 0-based index).

Values may be tensors: they are kept as they are and converted to floats only when a
statistic is read (or in batches of ``PENDING`` values), so recording a loss never waits on
the device.
"""
from __future__ import annotations

from array import array
from typing import Any

from .errors import closest
from .logs import PENDING, to_floats

LIVE_INFO = ('epoch', 'iter', 'inner_iter', 'max_epochs', 'max_iters')  # read from TrainState


class HistoryBuffer:
    """The recent values of one scalar and their counts (MMEngine's ``HistoryBuffer``):
    ``current()``, ``mean(window)``, ``min(window)``, ``max(window)``; ``mean`` is
    ``sum(values) / sum(counts)`` over the window, as in MMEngine. Values are kept as 8-byte
    floats (counts only once one is not 1): a million iterations cost 8 MB per key."""

    def __init__(self, max_length: int = 1_000_000):
        self.max_length = max_length
        self._floats = array('d')
        self._counts: array | None = None  # None: every count is 1
        self._pending: list = []
        self._pending_counts: list = []

    def update(self, value: Any, count: int = 1) -> None:
        self._pending.append(value)
        self._pending_counts.append(count)
        if len(self._pending) >= PENDING:
            self._settle()

    def extend(self, values: list) -> None:
        """``update(v)`` for every value, in one call."""
        self._pending.extend(values)
        self._pending_counts.extend([1] * len(values))
        if len(self._pending) >= PENDING:
            self._settle()

    def _settle(self) -> None:
        if not self._pending:
            return
        counts = self._pending_counts
        if self._counts is None and counts.count(1) != len(counts):
            self._counts = array('d', [1.0]) * len(self._floats)
        self._floats.extend(to_floats(self._pending))
        if self._counts is not None:
            self._counts.extend(float(c) for c in counts)
        self._pending, self._pending_counts = [], []
        extra = len(self._floats) - self.max_length
        if extra > self.max_length // 8:  # trimmed now and then, not on every update
            del self._floats[:extra]
            if self._counts is not None:
                del self._counts[:extra]

    def __len__(self) -> int:
        return min(len(self._floats) + len(self._pending), self.max_length)

    @property
    def data(self) -> tuple[list[float], list[float]]:
        """``(values, counts)``, oldest first."""
        values, counts = self._window(None) if len(self) else ([], [])
        return values, counts

    def _window(self, window_size: int | None) -> tuple[list[float], list[float]]:
        self._settle()
        if not self._floats:
            raise ValueError('the history buffer is empty: nothing was recorded yet')
        n = min(len(self._floats), self.max_length)
        if window_size is not None:
            n = min(n, max(int(window_size), 1))
        values = self._floats[-n:].tolist()
        counts = self._counts[-n:].tolist() if self._counts is not None else [1.0] * n
        return values, counts

    def current(self) -> float:
        self._settle()
        if not self._floats:
            raise ValueError('the history buffer is empty: nothing was recorded yet')
        return self._floats[-1]

    def mean(self, window_size: int | None = None) -> float:
        values, counts = self._window(window_size)
        return sum(values) / (sum(counts) or 1)

    def min(self, window_size: int | None = None) -> float:
        return min(self._window(window_size)[0])

    def max(self, window_size: int | None = None) -> float:
        return max(self._window(window_size)[0])

    def statistics(self, method_name: str, *args) -> float:
        if method_name not in ('current', 'mean', 'min', 'max'):
            raise KeyError(f'HistoryBuffer has no statistic {method_name!r}: it has current, '
                           f'mean, min and max')
        return getattr(self, method_name)(*args)


class MessageHub:
    """Scalars (``update_scalar`` / ``get_scalar``) and runtime information (``update_info`` /
    ``get_info``) of one run, with MMEngine's method names."""

    def __init__(self, name: str = '', state=None):
        self.name = name
        self._state = state  # the runner's TrainState: the live counters
        self._log_scalars: dict[str, HistoryBuffer] = {}
        self._runtime_info: dict[str, Any] = {}
        self._resumed_keys: dict[str, bool] = {}
        self._sources: list = []  # callables that record values held back (RuntimeInfoHook's)

    def add_source(self, settle) -> None:
        """``settle()`` records values a writer held back; called before every scalar read, so
        a writer can append per step to a list of its own and pay no call into the hub."""
        if settle not in self._sources:
            self._sources.append(settle)

    def _settle(self) -> None:
        for settle in self._sources:
            settle()

    # ---- scalars ----------------------------------------------------------------------------
    def update_scalar(self, key: str, value: Any, count: int = 1, resumed: bool = True) -> None:
        if self._sources:
            self._settle()  # what was held back came first
        self.buffer(key, resumed).update(value, count)

    def buffer(self, key: str, resumed: bool = True) -> HistoryBuffer:
        """The history of ``key``, created empty if new (no settling: for sources)."""
        buf = self._log_scalars.get(key)
        if buf is None:
            buf = self._log_scalars[key] = HistoryBuffer()
            self._resumed_keys[key] = resumed
        return buf

    def update_scalars(self, log_dict: dict, resumed: bool = True) -> None:
        """``{key: value}`` or ``{key: dict(value=..., count=...)}``."""
        if not isinstance(log_dict, dict):
            raise TypeError(f'update_scalars takes a dict, got {type(log_dict).__name__}')
        for key, value in log_dict.items():
            if isinstance(value, dict):
                self.update_scalar(key, value['value'], value.get('count', 1), resumed)
            else:
                self.update_scalar(key, value, 1, resumed)

    def get_scalar(self, key: str) -> HistoryBuffer:
        self._settle()
        buf = self._log_scalars.get(key)
        if buf is None:
            near = closest(key, self._log_scalars, n=3)
            hint = f'; closest: {", ".join(near)}' if near else ''
            raise KeyError(f'{key!r} is not a scalar of the message hub (it has '
                           f'{sorted(self._log_scalars) or "none yet"}{hint})')
        return buf

    @property
    def log_scalars(self) -> dict[str, HistoryBuffer]:
        self._settle()
        return self._log_scalars

    # ---- runtime information ----------------------------------------------------------------
    def update_info(self, key: str, value: Any, resumed: bool = True) -> None:
        if key in LIVE_INFO and self._state is not None:
            return  # the counters have one source of truth, runner.state: set them there
        self._runtime_info[key] = value
        self._resumed_keys[key] = resumed

    def update_info_dict(self, info_dict: dict, resumed: bool = True) -> None:
        for key, value in info_dict.items():
            self.update_info(key, value, resumed)

    def get_info(self, key: str, default: Any = None) -> Any:
        if key in LIVE_INFO and self._state is not None:
            return getattr(self._state, key)
        return self._runtime_info.get(key, default)

    @property
    def runtime_info(self) -> dict[str, Any]:
        info = dict(self._runtime_info)
        if self._state is not None:
            info.update((k, getattr(self._state, k)) for k in LIVE_INFO)
        return info

    # ---- checkpoints (through RuntimeInfoHook's state) --------------------------------------
    def state_dict(self) -> dict:
        """The infos marked ``resumed`` that a checkpoint can hold (numbers, strings, lists,
        dicts, tensors). Scalar histories are not saved: logging windows start afresh."""
        info = {}
        for key, value in self._runtime_info.items():
            if self._resumed_keys.get(key, True) and _storable(value):
                info[key] = value
        return {'runtime_info': info}

    def load_state_dict(self, state: dict) -> None:
        self._runtime_info.update(state.get('runtime_info', {}))


def _storable(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)) or hasattr(value, 'detach'):
        return True
    if isinstance(value, (list, tuple)):
        return all(_storable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _storable(v) for k, v in value.items())
    return False
