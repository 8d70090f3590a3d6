"""``Hook``: the base class of every hook, its priorities and the standard hook points."""
from __future__ import annotations

import functools
import inspect
from typing import Any

from ..errors import ConfigError, closest, edit_distance

PRIORITIES = {'HIGHEST': 0, 'VERY_HIGH': 10, 'HIGH': 30, 'ABOVE_NORMAL': 40, 'NORMAL': 50,
              'BELOW_NORMAL': 60, 'LOW': 70, 'VERY_LOW': 90, 'LOWEST': 100}

STAGES = ('before_run', 'after_load_checkpoint', 'before_train', 'before_train_epoch',
          'before_train_iter', 'after_train_iter', 'after_train_epoch', 'before_val',
          'before_val_epoch', 'before_val_iter', 'after_val_iter', 'after_val_epoch', 'after_val',
          'before_save_checkpoint', 'after_train', 'before_test', 'before_test_epoch',
          'before_test_iter', 'after_test_iter', 'after_test_epoch', 'after_test', 'after_run')

# Keyword arguments the runner passes at hook points; a hook method whose first parameter is
# one of these (the seed document's style) is called without the runner.
HOOK_KWARGS = frozenset({'batch_idx', 'data_batch', 'outputs', 'metrics', 'checkpoint'})


def get_priority(priority: int | str, where: str = 'priority') -> int:
    """``'NORMAL'`` / ``50`` -> 50, with an error listing valid names otherwise."""
    if isinstance(priority, bool):
        raise ConfigError(f'{where}: {priority!r} is not a priority')
    if isinstance(priority, int):
        if not 0 <= priority <= 100:
            raise ConfigError(f'{where}: {priority} is outside 0..100 (0 = HIGHEST, 100 = LOWEST)')
        return priority
    if isinstance(priority, str) and priority.upper() in PRIORITIES:
        return PRIORITIES[priority.upper()]
    near = closest(str(priority).upper(), PRIORITIES, n=2)
    hint = f' Did you mean {" or ".join(near)}?' if near else ''
    raise ConfigError(f'{where}: unknown priority {priority!r}.{hint} '
                      f'Valid: an int in 0..100 or one of {", ".join(PRIORITIES)}.')


class Hook:
    """Base class of hooks. Override any standard point; every default is a no-op.

    Methods are called as ``method(runner, **kwargs)``. Counters are already advanced when an
    ``after_*`` point runs: in ``after_train_iter``, ``runner.iter`` counts the iteration just
    finished.
    """

    priority: int | str = 'NORMAL'
    #: extra method names this hook defines as custom points close to a standard name.
    custom_points: tuple = ()
    #: points this hook implements but has no work at in the current run (set in
    #: ``before_train``): never called. A point's hooks are listed when it is first called.
    idle_points: frozenset = frozenset()

    def before_run(self, runner) -> None: ...
    def after_run(self, runner) -> None: ...
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None: ...
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None: ...
    def before_train(self, runner) -> None: ...
    def after_train(self, runner) -> None: ...
    def before_train_epoch(self, runner) -> None: ...
    def after_train_epoch(self, runner) -> None: ...
    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None: ...
    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: dict | None = None) -> None: ...
    def before_val(self, runner) -> None: ...
    def after_val(self, runner) -> None: ...
    def before_val_epoch(self, runner) -> None: ...
    def after_val_epoch(self, runner, metrics: dict | None = None) -> None: ...
    def before_val_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None: ...
    def after_val_iter(self, runner, batch_idx: int, data_batch: Any = None,
                       outputs: Any = None) -> None: ...
    def before_test(self, runner) -> None: ...
    def after_test(self, runner) -> None: ...
    def before_test_epoch(self, runner) -> None: ...
    def after_test_epoch(self, runner, metrics: dict | None = None) -> None: ...
    def before_test_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None: ...
    def after_test_iter(self, runner, batch_idx: int, data_batch: Any = None,
                        outputs: Any = None) -> None: ...

    # ---- MMEngine's helpers (counters count completed work, see class docstring) --------
    def every_n_epochs(self, runner, n: int, start: int = 0) -> bool:
        done = runner.epoch - start
        return n > 0 and done > 0 and done % n == 0

    def every_n_train_iters(self, runner, n: int, start: int = 0) -> bool:
        done = runner.iter - start
        return n > 0 and done > 0 and done % n == 0

    def every_n_inner_iters(self, batch_idx: int, n: int) -> bool:
        return n > 0 and (batch_idx + 1) % n == 0

    def end_of_epoch(self, dataloader, batch_idx: int) -> bool:
        return batch_idx + 1 == len(dataloader)

    # Counters count completed work, so in ``after_train_epoch`` / ``after_train_iter`` the
    # last epoch / iteration is the one where the counter reached its maximum.
    def is_last_train_epoch(self, runner) -> bool:
        return runner.max_epochs is not None and runner.epoch == runner.max_epochs

    def is_last_train_iter(self, runner) -> bool:
        return runner.max_iters is not None and runner.iter == runner.max_iters

    def overrides(self, point: str) -> bool:
        """Whether this hook implements ``point`` (standard points: only if overridden) and has
        work there (not in ``idle_points``)."""
        if point in self.idle_points:
            return False
        impl = getattr(type(self), point, None)
        if impl is None:
            return point in vars(self) and callable(vars(self)[point])
        return impl is not getattr(Hook, point, None)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(priority={self.priority!r})'


def check_hook_points(hook: Hook) -> None:
    """Reject methods that look like a misspelt standard point (``after_train_iters``,
    ``befor_val_epoch``); the error names the closest standard point."""
    allowed = set(STAGES) | set(getattr(hook, 'custom_points', ()))
    for name in dir(type(hook)):
        if name.startswith('_') or name in allowed or hasattr(Hook, name):
            continue
        if not callable(getattr(type(hook), name, None)):
            continue
        # The distance is at least the length difference: only points of similar length can be
        # within 2 (this check runs for every hook at every start).
        dist = {s: edit_distance(name, s) for s in STAGES if abs(len(s) - len(name)) <= 2}
        near = sorted((s for s in dist if dist[s] <= 2), key=dist.__getitem__)
        if near:
            raise ConfigError(
                f'{type(hook).__name__}.{name} looks like a misspelt hook point: did you mean '
                f'{near[0]!r}? It would never be called. If it is a custom point that your loop '
                f"calls, add custom_points = ('{name}',) to the class.")


def bind_point(hook: Hook, point: str, runner):
    """Return a callable ``f(**kwargs)`` for ``hook.point``, passing the runner if it takes one."""
    method = getattr(hook, point)
    try:
        params = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        params = []
    first = params[0] if params else None
    takes_runner = first is not None and (
        first.name == 'runner' or first.kind == first.VAR_POSITIONAL
        or (first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD)
            and first.name not in HOOK_KWARGS))
    if takes_runner:
        return functools.partial(method, runner)
    return method


def bind_positional(hook: Hook, point: str, runner, names: tuple):
    """Return ``f(*values)`` for ``hook.point``, ``values`` being those of ``names`` in order: the
    bound method itself when it takes exactly those parameters in that order (no keyword dict
    per call: the per-iteration points), else an adapter passing them by keyword."""
    fn = bind_point(hook, point, runner)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = None
    if (params is not None and len(params) == len(names)
            and all(p.name == n and p.kind == p.POSITIONAL_OR_KEYWORD for p, n in zip(params, names))):
        return fn
    return lambda *values: fn(**dict(zip(names, values)))
